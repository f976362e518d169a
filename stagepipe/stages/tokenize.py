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

from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from stagepipe.data.text import load_text, text_identity
from stagepipe.engine.stage import Context, PartitionRef, Stage, Work
from stagepipe.errors import StagepipeError
from stagepipe.stages import artifacts
from stagepipe.stages.artifacts import CALIBRATION, VALIDATION, eval_partition


def _token_ids(snapshot: Path, text: str) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir(snapshot))
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


class TokenizeStage(Stage):
    name = "tokenize"
    version = 1
    description = "calibration and evaluation token windows"

    def partitions(self, ctx: Context) -> list[str]:
        validation = [VALIDATION] if ctx.config.calibration.validation else []
        return [CALIBRATION, *validation] + [eval_partition(d.name) for d in ctx.config.evaluation.datasets]

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [artifacts.ref("snapshot")]

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
