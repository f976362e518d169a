"""Per-sequence gradients of one decoder block, one shard of the calibration windows at a time.

``fisher`` splits every partition into jobs over ``runtime.shards`` contiguous shards of windows
(``stagekit.shards.shard_ranges``; one shard without it) and runs them through ``Work.fan_out`` (in
process, or as Ray tasks). A job is a plain picklable description (``GradientJob``); a worker
rebuilds the block from the snapshot and reads its rows from the shared workspace:

- ``head_shard``: the loss of each window and the gradient at the last block's output;
- ``record_shard``: one recording pass: the gradient at the block's input (its rows of
  ``grad.zarr``), K-FAC and squared-gradient *sums* (and the input Grams when
  ``Plan.gram_in_fisher``), and for the Kronecker factors (``stored``) the shard's gradient
  factors in its own scratch directory;
- ``product_shard``: one half-sweep of the NKP power iteration on this shard's gradients
  (``kron.product_sums``: sums and a count, not yet divided);
- ``clean_job``: when the partition's jobs are shipped, the Kronecker factors' clean-up, one job
  per linear (float64 eigendecompositions: the layer's largest serial step otherwise).

``fisher`` adds the shards' sums in shard order in float64 and divides once, so a run's result
depends on the number of shards, never on where they ran; one shard gives today's bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stagepipe.io import zarr_io
from stagepipe.kron import clean_factors, product_sums
from stagepipe.models.blocks import BlockRunner
from stagepipe.models.layout import block_linears
from stagepipe.models.sources import DTYPES, resolve_device
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.shards import add_gram
from stagepipe.stagekit.streams import block_input_rows

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear → (D, X) per window or chunk


@dataclass(frozen=True)
class GradientJob:
    """One shard of one fisher partition: paths and plain values only (shipped to Ray workers)."""

    snapshot: Path
    tokens: Path
    index: int  # the block; -1 for the head
    rows: tuple[int, int]
    device: str
    dtype: str
    batch: int
    modules: Any = None  # target.modules (None: every linear)
    chunk: int = 0  # tokens per gradient (0: whole windows)
    below: Path | None = None  # capture output of block index-1 (None: block 0 starts from the embeddings)
    hidden: Path | None = None  # head: capture output of the last block
    grad_out: Path | None = None  # the output gradient of this block (fisher output above)
    grad_in: Path | None = None  # where this block's input gradient goes (the partition's temp dir)
    mode: str | None = None  # Kronecker factors: "stored" / "streaming"; None: K-FAC only
    scratch: Path | None = None  # this shard's stored gradients
    labels_seed: int | None = None  # head with model-sampled labels: the generator's seed
    grams: tuple[str, ...] = ()  # record the input Grams of these linears (one per input group)
    keep_device: bool = False  # in process: sums stay on the device (shipped jobs return CPU tensors)


def head_shard(job: GradientJob) -> list[float]:
    """Windows' mean next-token NLL and ∂loss/∂(last block output) for rows ``job.rows``."""
    lo, hi = job.rows
    runner = BlockRunner(job.snapshot, resolve_device(job.device), DTYPES[job.dtype])
    ids = artifacts.read_windows(job.tokens)
    last = artifacts.open_hidden(job.hidden)
    grads = artifacts.open_grad(job.grad_in, writable=True)
    sampler = None if job.labels_seed is None else torch.Generator().manual_seed(job.labels_seed)
    losses: list[float] = []
    for start in range(lo, hi, job.batch):
        stop = min(start + job.batch, hi)
        hidden = artifacts.read_rows(last, start, stop).to(runner.device).float().requires_grad_(True)
        loss = runner.window_losses(hidden, ids[start:stop], sample_from=sampler)
        (grad,) = torch.autograd.grad(loss.sum(), hidden)
        artifacts.write_rows(grads, start, grad.float())
        losses.extend(loss.tolist())
    return losses


@dataclass
class RecordPart:
    sums: dict[str, torch.Tensor]  # kfac_out.<linear>, grad_sq.<linear>, gram.<linear>: float64 sums
    tokens: int
    windows: int


def record_shard(job: GradientJob) -> RecordPart:
    """The recording pass over one shard (and the stored gradient factors, if ``stored``)."""
    collector = _collector(job, fresh=True)
    if job.mode == "stored":
        collector.store(job.scratch)
    else:
        collector.record()
    return RecordPart({k: v.cpu() for k, v in collector.sums.items()}, collector.counts["tokens"],
                      collector.counts["windows"])


def product_shard(args: tuple[GradientJob, dict[str, torch.Tensor], str]) -> tuple[dict[str, torch.Tensor], int]:
    """One half-sweep on one shard: ``Σ G Y Gᵀ`` (side 'A') or ``Σ Gᵀ Y G`` (side 'B') and the count."""
    job, other, side = args
    sums, count = product_sums(shard_source(job), other, side)
    return {k: v if job.keep_device else v.cpu() for k, v in sums.items()}, count


def clean_job(args: tuple[str, torch.Tensor, torch.Tensor, float, str]) -> tuple[Any, Any, dict[str, Any]]:
    """``kron.clean_factors`` of one linear as a shipped job: on the job's device (a GPU when Ray
    gave it one), results back on the CPU. In process the stage calls ``clean_factors`` directly."""
    device, a, b, floor_rel, regularizer = args
    target = resolve_device(device)
    a, b, info = clean_factors(a.to(target), b.to(target), floor_rel, regularizer)
    return None if a is None else a.cpu(), None if b is None else b.cpu(), info


def shard_source(job: GradientJob) -> Callable[[], Iterator[Factors]]:
    """A re-iterable source of this shard's ``(D, X)`` batches: read back from its scratch store
    (``stored``) or recomputed by a forward+backward of the block (``streaming``)."""
    collector = _collector(job)
    if job.mode == "stored":
        return collector.stored_source(job.scratch)
    return lambda: collector.batches(record=False)


# A worker keeps the collectors of the partition it last served: the record job and the product jobs
# of one shard then share one loaded block (in process: exactly today's single block). Rebuilding
# from the snapshot gives the same bits, so this is only a saving. A record job always starts fresh.
_LIVE: dict[tuple[str, int, tuple[int, int]], GradientCollector] = {}


def _collector(job: GradientJob, fresh: bool = False) -> GradientCollector:
    key = (str(job.grad_out), job.index, job.rows)
    if not fresh and key in _LIVE:
        return _LIVE[key]
    for old in [k for k in _LIVE if k[:2] != key[:2] or k == key]:
        _LIVE.pop(old).close()
    _LIVE[key] = collector = GradientCollector(job)
    return collector


def release_collectors() -> None:
    """Drop every kept collector (a partition calls this when it ends)."""
    while _LIVE:
        _LIVE.popitem()[1].close()


class GradientCollector:
    """Per-sequence gradient factors of one block's linears on one shard, recomputed batch by batch.

    Each pass runs the block forward on its cached inputs and backward from the stored output
    gradient; hooks read every linear's input ``X`` and output gradient ``D``. ``batches(record=True)``
    also accumulates the K-FAC output factor and the squared per-sequence gradients and writes the
    gradient w.r.t. the block's input (block i−1's output gradient).
    """

    def __init__(self, job: GradientJob) -> None:
        self.job = job
        lo, hi = job.rows
        self.runner = BlockRunner(job.snapshot, resolve_device(job.device), DTYPES[job.dtype])
        self.block = self.runner.load_block(job.index)
        self.linears = block_linears(self.block, job.modules)
        self.ids = artifacts.read_windows(job.tokens)[lo:hi]
        self.chunk = job.chunk or self.ids.shape[1]
        self.grad_out = artifacts.open_grad(job.grad_out)
        self.grad_in = None if job.grad_in is None else artifacts.open_grad(job.grad_in, writable=True)
        self.n_chunks = -(-self.ids.shape[1] // self.chunk)
        self.n_gradients = len(self.ids) * self.n_chunks
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = {"tokens": 0, "windows": 0}
        self._captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.linears}
        self._handles = [m.register_forward_hook(lambda mod, a, o, n=n: self._hook(n, a, o)) for n, m in self.linears.items()]

    def _hook(self, name: str, args: tuple, output: torch.Tensor) -> None:
        self._captured[name]["x"] = args[0].detach()
        output.register_hook(lambda g: self._captured[name].__setitem__("d", g.detach()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def batches(self, record: bool) -> Iterator[Factors]:
        """Per batch of windows: ``{linear: (D, X)}`` split into ``chunk``-token pieces (``G_k = D_kᵀ X_k``)."""
        runner, job = self.runner, self.job
        for start, hidden in block_input_rows(runner, self.ids, job.below, job.batch, offset=job.rows[0]):
            hidden = hidden.to(runner.device, runner.dtype).requires_grad_(True)
            output = runner.run_block(self.block, hidden)
            upstream = artifacts.read_rows(self.grad_out, start, start + len(hidden)).to(output.device, output.dtype)
            output.backward(upstream)
            if record and self.grad_in is not None:
                artifacts.write_rows(self.grad_in, start, hidden.grad.float())
            result = {}
            for name in job.grams if record else ():  # from the inputs as the block computed them, like capture
                add_gram(self.sums, f"gram.{name}", self._captured[name]["x"])
            for name, got in self._captured.items():
                x, d = got["x"].float(), got["d"].float()
                if record:
                    _add(self.sums, f"kfac_out.{name}", _gram(d.reshape(-1, d.shape[-1])))
                    _add(self.sums, f"grad_sq.{name}", ((d.transpose(1, 2) @ x) ** 2).double().sum(0))
                result[name] = (_chunks(d, self.chunk), _chunks(x, self.chunk))
            if record:
                self.counts["tokens"] += x.shape[0] * x.shape[1]
                self.counts["windows"] += x.shape[0]
            yield result

    def record(self) -> None:
        """One recording pass (statistics and input gradients), discarding the factors."""
        for _ in self.batches(record=True):
            pass

    def store(self, scratch: Path) -> None:
        """The recording pass, keeping every ``(D, X)`` in a zarr in ``scratch`` (float32)."""
        step = self.job.batch * self.n_chunks
        stored: dict[tuple[str, str], Any] = {}
        for i, factors in enumerate(self.batches(record=True)):
            for n, pair in factors.items():
                for kind, value in zip(("d", "x"), pair, strict=True):
                    if (n, kind) not in stored:
                        stored[n, kind] = zarr_io.create_array(scratch / "grads.zarr", f"{n}.{kind}",
                                                               (self.n_gradients, self.chunk, value.shape[2]), "float32", step)
                    zarr_io.write_rows(stored[n, kind], i * step, value)

    def stored_source(self, scratch: Path) -> Callable[[], Iterator[Factors]]:
        rows, step = self.n_gradients, self.job.batch * self.n_chunks
        stored = {(n, k): zarr_io.open_array(scratch / "grads.zarr", f"{n}.{k}") for n in self.linears for k in ("d", "x")}
        device = self.runner.device

        def read_back() -> Iterator[Factors]:
            for start in range(0, rows, step):
                yield {n: (zarr_io.read_rows(stored[n, "d"], start, start + step).to(device),
                           zarr_io.read_rows(stored[n, "x"], start, start + step).to(device)) for n in self.linears}

        return read_back


def _chunks(values: torch.Tensor, chunk: int) -> torch.Tensor:
    """(b, T, c) → (b·⌈T/chunk⌉, chunk, c); the tail is zero-padded, which leaves ``Dᵀ X`` exact."""
    b, t, c = values.shape
    pad = -t % chunk
    if pad:
        values = torch.cat([values, values.new_zeros(b, pad, c)], dim=1)
    return values.reshape(b * (t + pad) // chunk, chunk, c)


def _gram(flat: torch.Tensor) -> torch.Tensor:
    return (flat.T @ flat).double()  # float32 per batch, float64 across batches


def _add(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value

