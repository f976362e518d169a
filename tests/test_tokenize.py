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
