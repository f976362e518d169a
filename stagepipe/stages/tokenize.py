"""``tokenize``: calibration windows and evaluation windows as token ids in zarr.

- ``calibration``: ``n_samples`` windows of ``seq_len`` tokens at random *token* offsets of the
  tokenised text (numpy ``Generator(seed)``); the offsets are stored with the ids.
- ``validation`` (only with ``calibration.validation``): the held-out text cut into the first
  ``n_samples`` non-overlapping windows of the calibration ``seq_len``.
- ``eval-<name>``: the test text tokenised once and cut into non-overlapping windows of
  ``evaluation.seq_len`` (remainder dropped; the first ``max_windows`` when capped).
The two kinds are separate partitions so that changing the evaluation never touches calibration.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from stagepipe.data.text import load_text, text_identity
from stagepipe.engine.stage import Context, Read, Work
from stagepipe.errors import StagepipeError
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.artifacts import CALIBRATION, MODEL_DIR, TOKENS, VALIDATION, eval_partition
from stagepipe.stagekit.base import PipelineStage, register
from stagepipe.stagekit.cost import CostInputs, Estimate

#: a cut where the GPT-2 regex of a byte-level pre-tokenizer cuts anyway: before a newline that an
#: ASCII letter follows. In the whole text that newline ends a whitespace run followed by a non-space,
#: so ``\s+(?!\S)`` leaves it out of the run's piece and it becomes the piece "\n" (`` ?`` takes only a
#: space); the run's rest, now at a chunk's end, is still one piece; no other pattern holds a "\n"
_SAFE_BREAK = re.compile(r"(?=\n[A-Za-z])")
#: characters per tokenizer call when the text can be cut exactly (about 130 MB of tokenizer memory)
CHUNK_CHARS = 1 << 20


def _cuts_exactly(tokenizer: Any) -> bool:
    """Whether tokenising ``_SAFE_BREAK``-separated chunks gives the ids of the whole text: a plain
    byte-level BPE (GPT-2 regex, no prefix space, no normaliser) whose added tokens hold no newline."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and not any("\n" in token.get("content", "") for token in spec.get("added_tokens", [])))


def text_chunks(text: str, size: int = CHUNK_CHARS):
    """``text`` cut after safe newlines into pieces of about ``size`` characters (one piece if none)."""
    start = 0
    while len(text) - start > size:
        match = _SAFE_BREAK.search(text, start + size)
        if match is None:
            break
        yield text[start:match.start()]
        start = match.start()
    yield text[start:]


def token_ids(tokenizer: Any, text: str) -> np.ndarray:
    """The ids of ``text`` without special tokens. A whole text costs the fast tokenizer ~130 bytes
    per character (1.6 GB for the 12 MB news train split), so where cutting provably changes no id
    the text goes through in ~1 MB chunks; otherwise in one call."""
    pieces = text_chunks(text) if _cuts_exactly(tokenizer) else [text]
    parts = [np.asarray(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
             for piece in pieces]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _token_ids(snapshot: Path, text: str) -> np.ndarray:
    return token_ids(AutoTokenizer.from_pretrained(artifacts.model_dir(snapshot)), text)


@register
class TokenizeStage(PipelineStage):
    name = "tokenize"
    version = 1
    description = "calibration and evaluation token windows"
    writes = {TOKENS: "token ids n × T (input_ids; offsets of the calibration windows)"}

    def partitions(self, ctx: Context) -> list[str]:
        validation = [VALIDATION] if ctx.config.calibration.validation else []
        return [CALIBRATION, *validation] + [eval_partition(d.name) for d in ctx.config.evaluation.datasets]

    @classmethod
    def needs(cls, choices) -> dict[str, set[str]]:
        return {"snapshot": {MODEL_DIR}}

    def reads(self, ctx: Context, partition: str) -> list[Read]:
        return [Read(artifacts.ref("snapshot"), MODEL_DIR)]  # its tokenizer

    @classmethod
    def cost(cls, c: CostInputs) -> Estimate:
        return Estimate(cls.name, c.tokens * 8, 3e8, 0, "byte-level BPE: 1 MB chunks; other tokenizers: ~130 B per text character")

    def _dataset(self, ctx: Context, partition: str):
        return next(d for d in ctx.config.evaluation.datasets if eval_partition(d.name) == partition)

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        if partition == CALIBRATION:
            cal = ctx.config.calibration
            return {"text": text_identity(cal.text, "calibration.text"), "n_samples": cal.n_samples, "seq_len": cal.seq_len,
                    "seed": cal.seed}
        if partition == VALIDATION:
            val = ctx.config.calibration.validation
            return {"text": text_identity(val.text, "calibration.validation.text"), "n_samples": val.n_samples,
                    "seq_len": ctx.config.calibration.seq_len}
        ev = ctx.config.evaluation
        dataset = self._dataset(ctx, partition)
        index = ev.datasets.index(dataset)
        return {"text": text_identity(dataset.text, f"evaluation.datasets[{index}].text"), "seq_len": ev.seq_len,
                "max_windows": ev.max_windows}

    def run(self, ctx: Context, work: Work) -> dict[str, Any]:
        snapshot = work.input("snapshot")
        partition = work.partition
        if partition == CALIBRATION:
            cal = ctx.config.calibration
            text, provenance = load_text(cal.text)
            ids = _token_ids(snapshot, text)
            if len(ids) < cal.seq_len + 1:
                raise StagepipeError(f"calibration.text: {len(ids)} tokens, fewer than seq_len {cal.seq_len}")
            rng = np.random.Generator(np.random.PCG64(cal.seed))
            offsets = rng.integers(0, len(ids) - cal.seq_len, size=cal.n_samples)
            windows = np.stack([ids[o : o + cal.seq_len] for o in offsets])
            artifacts.write_windows(work.out, windows, offsets)
            return {"n_windows": len(windows), "seq_len": cal.seq_len, "text_tokens": int(len(ids)), **provenance}
        if partition == VALIDATION:
            val = ctx.config.calibration.validation
            return _consecutive(work.out, snapshot, val.text, ctx.config.calibration.seq_len, val.n_samples,
                                "calibration.validation.text")
        ev = ctx.config.evaluation
        return _consecutive(work.out, snapshot, self._dataset(ctx, partition).text, ev.seq_len, ev.max_windows,
                            f"evaluation dataset {partition}")


def _consecutive(out: Path, snapshot: Path, spec: Any, seq_len: int, limit: int | None, what: str) -> dict[str, Any]:
    """The text tokenised once, cut into non-overlapping ``seq_len`` windows (the first ``limit``)."""
    text, provenance = load_text(spec)
    ids = _token_ids(snapshot, text)
    n = len(ids) // seq_len
    if limit:
        n = min(n, limit)
    if n == 0:
        raise StagepipeError(f"{what}: {len(ids)} tokens, fewer than seq_len {seq_len}")
    artifacts.write_windows(out, ids[: n * seq_len].reshape(n, seq_len))
    return {"n_windows": n, "seq_len": seq_len, "text_tokens": int(len(ids)), **provenance}
