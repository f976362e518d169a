"""A stage's cost row in the plan: disk, RAM, GPU memory and FLOPs, from the model's shapes.

Order-of-magnitude planning, not a promise: each stage module says what it costs (its ``cost``
classmethod, from the ``CostInputs`` here); ``stagekit.plan`` adds the rows up, follows the
hand-over payloads that a release deletes, and prints time as FLOPs over stated rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagepipe.geometry import BlockGeometry

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: assumed sustained throughputs for the wall-time estimates (not measured by the plan): one 80 GB
#: A100/H100-class GPU in bf16, and the 2-core AVX-512 CPU this project is developed on in fp32
#: (SmolLM2-135M forward + backward of 256 tokens took 1.46 s there: ≈140 GFLOP/s)
GPU_FLOPS, CPU_FLOPS = 150e12, 100e9
#: float64 work (Gram and Kronecker accumulations, eigen-decompositions, SVDs): rates that
#: cuSOLVER/LAPACK-bound code sustains, far below the tensor-core peaks
GPU_FP64_FLOPS, CPU_FP64_FLOPS = 10e12, 50e9
#: resident size of a Python process with torch and transformers imported, before any tensor (measured: ~0.5 GB)
INTERPRETER = 5e8


@dataclass(frozen=True)
class Estimate:
    stage: str
    disk: float
    ram: float
    gpu: float
    note: str = ""
    #: bytes of released hand-over payloads on disk at their peak, and the last stage that reads them
    #: (``None``: this stage); ``disk`` is what stays at the end
    transient: float = 0.0
    until: str | None = None
    #: more released payloads: (bytes on disk at their peak, the last stage that reads them)
    extra: tuple[tuple[float, str], ...] = ()
    #: the workspace's peak while this stage runs, when the stage works it out itself (0: not)
    peak: float = 0.0
    #: low-precision FLOPs (block passes) and float64 FLOPs (statistics, factorisations)
    flops: float = 0.0
    flops64: float = 0.0

    def seconds(self, on_gpu: bool) -> float:
        if on_gpu:
            return self.flops / GPU_FLOPS + self.flops64 / GPU_FP64_FLOPS
        return self.flops / CPU_FLOPS + self.flops64 / CPU_FP64_FLOPS


@dataclass(frozen=True)
class CostInputs:
    """What a stage's cost row is computed from: the config, its method and the choices the plan
    made (``plan``: stages, capture's checkpoint interval), and the model's block geometry."""

    config: Any
    plan: Any
    shapes: BlockGeometry

    @property
    def method(self) -> Any:
        return self.plan.method

    @property
    def weight_bytes(self) -> int:
        return BYTES[self.config.model.dtype]

    @property
    def activation_bytes(self) -> int:
        return BYTES[self.config.runtime.activation_dtype]

    @property
    def tokens(self) -> int:
        return self.config.calibration.n_samples * self.config.calibration.seq_len

    @property
    def hidden(self) -> float:
        """Bytes of one layer's stored block outputs over the calibration windows."""
        return self.tokens * self.shapes.d * self.activation_bytes

    @property
    def batch_activations(self) -> float:
        """fp32 activations of one batch of windows through one block."""
        s, c = self.shapes, self.config
        return c.runtime.batch_size * c.calibration.seq_len * (3 * s.d + 2 * s.ff) * 4

    @property
    def model_ram(self) -> float:
        """One block and the embeddings/head in the model's dtype (the per-layer stages' model)."""
        return (self.shapes.block + self.shapes.embed) * self.weight_bytes

    @property
    def rest_load(self) -> float:
        """Reading the embeddings/head into the one-block model holds them twice for a moment."""
        return 2 * self.shapes.embed * self.weight_bytes

    @property
    def grams(self) -> float:
        """One block's input Grams, float64: attention input, o input, MLP input, down input."""
        s = self.shapes
        return (s.d * s.d * 3 + s.ff * s.ff) * 8

    @property
    def on_gpu(self) -> bool:
        return self.config.model.device != "cpu"

    def gpu(self, value: float) -> float:
        return value if self.on_gpu else 0.0

    @property
    def block_pass(self) -> float:
        """FLOPs of one forward of one block's linears over the calibration tokens."""
        return 2 * self.shapes.block * self.tokens


def duration(seconds: float) -> str:
    """``12 s``, ``3 min``, ``1.4 h`` (``—`` for nothing to compute)."""
    if seconds <= 0:
        return "—"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 1:
        return "<1 s"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
