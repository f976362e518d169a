"""What ``decompose`` stores: the full weighted spectrum, and factors only up to the largest rank a
later stage can read (``Method.stored_rank``), which no allocation or trainer goes past."""

from __future__ import annotations

import itertools
import math

import torch

from stagepipe.accounting import max_stored_rank, max_useful_rank, rank_for_fraction
from stagepipe.config import load_pipeline
from stagepipe.io import safetensors_io
from stagepipe.methods import make_method
from stagepipe.stagekit import artifacts
from stagepipe.stagekit.plan import make_plan
from stagepipe.stages import make_runner
from tests.conftest import learned_pipeline


def test_no_allocated_rank_passes_the_stored_rank() -> None:
    """Policies clamp ranks to ``[align, max_useful_rank]`` and ``rank_for_fraction`` never leaves
    it; both stay within 16-bit storage's ``max_stored_rank`` for every shape and alignment."""
    for m, n, align in itertools.product(range(1, 41), range(1, 41), (1, 2, 4, 8)):
        cap = max_stored_rank(m, n)
        assert max_useful_rank(m, n, align) <= cap
        for kept in (0.1, 0.5, 0.9, 1.0):
            rank = rank_for_fraction(m, n, kept, align)
            assert rank is None or rank <= cap


def test_learned_methods_keep_what_they_train_on(write_pipeline, tmp_path) -> None:
    svdllm = make_plan(load_pipeline(write_pipeline(method={"name": "svdllm"}))).method
    assert svdllm.stored_rank(64, 32) == max_stored_rank(64, 32) == 21

    def soco_method(**options):
        path = learned_pipeline(tmp_path, "soco", 0.6, {"name": "soco", "base": "svdllm", **options})
        return make_method(load_pipeline(path).method)

    soco = soco_method()
    assert soco.stored_rank(64, 32) == 32  # every component is offered to training by default
    assert soco_method(candidates=0.5).stored_rank(64, 32) == max(21, math.ceil(0.5 * 32))
    assert soco.stored_options() != svdllm.stored_options()  # so they do not share a decompose output


def _run(pipeline, ws) -> dict[str, object]:
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.run()
    return {str(e.ref): e.state.output for e in runner.states()}


def _model_tensors(assembled) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(assembled.rglob("*.safetensors")):
        found.update({f"{path.name}:{k}": v for k, v in safetensors_io.read(path).items()})
    return found


def test_stored_factors_stop_at_the_stored_rank_and_assemble_the_same_model(write_pipeline, tmp_path, monkeypatch) -> None:
    """Factors cut at the stored rank give the very model that full-rank factors give (global
    greedy allocation, which can take a matrix up to its largest useful rank)."""
    pipeline = write_pipeline(method={"name": "kfac_svd"}, allocation={"policy": "global_greedy", "align": 4},
                              target={"kept_fraction": 0.9})
    state = _run(pipeline, tmp_path / "cut")
    stored = safetensors_io.read(state["decompose@layer-000"] / artifacts.WEIGHTED_SVD)
    measured = artifacts.read_diagnostics(state["decompose@layer-000"])["linears"]
    for name, info in artifacts.read_results(state["decompose@layer-000"])["linears"].items():
        m, n = info["shape"]
        assert stored[f"{name}.sigma"].shape == (min(m, n),)
        assert stored[f"{name}.left"].shape == (m, max_stored_rank(m, n))
        assert stored[f"{name}.right"].shape == (max_stored_rank(m, n), n)
        assert measured[name]["full_rank_rel_err"] < 1e-6  # checked before the factors are cut

    monkeypatch.setattr(type(make_plan(load_pipeline(pipeline)).method), "stored_rank", lambda self, m, n: min(m, n))
    full = _run(pipeline, tmp_path / "full")
    assert safetensors_io.read(full["decompose@layer-000"] / artifacts.WEIGHTED_SVD)["mlp.up_proj.left"].shape[1] == 32
    ours, reference = _model_tensors(state["assemble@all"]), _model_tensors(full["assemble@all"])
    assert ours.keys() == reference.keys() and ours
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
