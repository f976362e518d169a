"""``tokenize``: calibration windows and evaluation windows as token ids in zarr.

- ``calibration``: ``n_samples`` windows of ``seq_len`` tokens at random *token* offsets of the
  tokenised text (numpy ``Generator(seed)``); the offsets are stored with the ids.
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
from stagepipe.stages.artifacts import CALIBRATION, eval_partition


def _token_ids(snapshot: Path, text: str) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir(snapshot))
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


class TokenizeStage(Stage):
    name = "tokenize"
    version = 1
    description = "calibration and evaluation token windows"

    def partitions(self, ctx: Context) -> list[str]:
        return [CALIBRATION] + [eval_partition(d.name) for d in ctx.config.evaluation.datasets]

    def dependencies(self, ctx: Context, partition: str) -> list[PartitionRef]:
        return [artifacts.ref("snapshot")]

    def _dataset(self, ctx: Context, partition: str):
        return next(d for d in ctx.config.evaluation.datasets if eval_partition(d.name) == partition)

    def config_slice(self, ctx: Context, partition: str) -> dict[str, Any]:
        if partition == CALIBRATION:
            cal = ctx.config.calibration
            return {"text": text_identity(cal.text, "calibration.text"), "n_samples": cal.n_samples, "seq_len": cal.seq_len,
                    "seed": cal.seed}
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
        ev = ctx.config.evaluation
        text, provenance = load_text(self._dataset(ctx, partition).text)
        ids = _token_ids(snapshot, text)
        n = len(ids) // ev.seq_len
        if ev.max_windows:
            n = min(n, ev.max_windows)
        if n == 0:
            raise StagepipeError(f"evaluation dataset {partition}: {len(ids)} tokens, fewer than seq_len {ev.seq_len}")
        windows = ids[: n * ev.seq_len].reshape(n, ev.seq_len)
        artifacts.write_windows(work.out, windows)
        return {"n_windows": n, "seq_len": ev.seq_len, "text_tokens": int(len(ids)), **provenance}
