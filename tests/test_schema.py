"""Cache-key dumps: a field added later keeps the keys of outputs made before it existed."""

from __future__ import annotations

from stagepipe.config import NewsArticles
from stagepipe.data.text import text_identity


def test_a_keyed_when_set_field_enters_the_key_only_when_set() -> None:
    before_the_field = {"source": "news_articles", "split": "train", "test_articles": 200}
    assert text_identity(NewsArticles(source="news_articles", split="train")) == before_the_field
    held_out = text_identity(NewsArticles(source="news_articles", split="train", validation_articles=100))
    assert held_out == {**before_the_field, "validation_articles": 100}
