"""SoCo (``methods/soco.py``, ``models/spectral.py``, ``stages/train.py``) on the tiny model: the
schedule and the budget-filling selection, the spectral linear at "keep all", the budget pressure
reaching the target, a SIGKILL mid-training resuming to bit-identical scores, and the HF reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from stagepipe.allocation import POLICIES
from stagepipe.allocation.base import MatrixSpectrum
from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.errors import StagepipeError
from stagepipe.io import manifest as manifest_io
from stagepipe.io import safetensors_io
from stagepipe.methods.base import METHODS
from stagepipe.methods.soco import Schedule, SoCoConfig, penalty_units, select, shrink_to_budget, soft_kept
from stagepipe.models.sources import load_model
from stagepipe.models.spectral import dense_mode, install
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner
from tests.conftest import TINY, learned_pipeline, learned_run, merge, train_killed_and_resumed

# prior 0: the penalty weighs parameters only, so which components survive is the learned scores' doing
SOCO = {"name": "soco", "base": "svdllm", "explore_epochs": 2, "refine_epochs": 2, "sparsify_epochs": 1,
        "tune_epochs": 1, "lr": 0.1, "prior": 0, "checkpoint_every": 2, "guard": False}  # guard: the learned set is written


def soco_pipeline(tmp: Path, name: str, kept: float, **method) -> Path:
    return learned_pipeline(tmp, name, kept, {**SOCO, **method})


def outputs(pipeline: Path, ws: Path) -> dict[PartitionRef, Path]:
    return {e.ref: e.state.output for e in make_runner(load_pipeline(pipeline), ws).states()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return learned_run(tmp_path_factory.mktemp("soco"), "soco", 0.6, SOCO)


# --------------------------------------------------------------------------- pure parts
def test_schedule_phases_and_rates() -> None:
    cfg = SoCoConfig(name="soco", explore_epochs=1, refine_epochs=2, sparsify_epochs=1, tune_epochs=1, batch=2, lr=0.1)
    schedule = Schedule.of(cfg, windows=5)  # 3 steps per epoch
    assert schedule.total == 15
    assert [schedule.phase(s) for s in (0, 2, 3, 8, 9, 11, 12, 14)] == [
        "explore", "explore", "refine", "refine", "sparsify", "sparsify", "tune", "tune"]
    assert schedule.rate(0) == schedule.rate(2) == 0.1 and schedule.rate(3) == pytest.approx(0.1)
    assert schedule.rate(11) < schedule.rate(3) and schedule.rate(12) == pytest.approx(0.1)
    assert schedule.hard_budget(9, 100.0, 40.0) == pytest.approx(80.0)
    assert schedule.soft_budget(0, 1.6, 0.6) == pytest.approx(1.6 - 1.0 / 3) and schedule.soft_budget(2, 1.6, 0.6) == pytest.approx(0.6)
    assert schedule.hard_budget(11, 100.0, 40.0) == 40.0  # reached on the last sparsify step


def test_select_buys_components_by_value_and_may_keep_a_matrix_dense() -> None:
    # A: 4×4 (a component costs 8, dense 16, break-even 2: rank 1 or dense); C: 3×9 (12 each, dense 27: rank 1, 2 or dense)
    scores = [torch.tensor([0.9, 0.8, 0.1, 0.05]), torch.tensor([0.7, 0.6, 0.3])]
    units = [torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    shapes = [(4, 4), (3, 9)]
    masks, dense = select(scores, units, shapes, 0.0, budget=30)
    # rank 1 each (8 + 12 = 20); A's dense step: (0.8 + 0.1 + 0.05)·8 for 8 more (0.95 per parameter) → 28;
    # C's rank 2: 0.6 per parameter for 12 more does not fit in 30
    assert [m.tolist() for m in masks] == [[1, 1, 1, 1], [1, 0, 0]] and dense == [True, False]
    masks, dense = select(scores, units, shapes, 0.0, budget=45)
    # then C's rank 2 (40) and its dense step (0.3·12 for 3 more: 43)
    assert dense == [True, True] and all(bool(m.all()) for m in masks)
    units[0] = torch.tensor([1.0, 1.0, 0.1, 1.0], dtype=torch.float64)  # value d/unit: 0.1 → 1.0, A's best
    masks, dense = select(scores, units, shapes, 0.0, budget=20)
    assert [m.tolist() for m in masks] == [[0, 0, 1, 0], [1, 0, 0]] and dense == [False, False]
    with pytest.raises(StagepipeError, match="cannot keep one component of every matrix"):
        select(scores, units, shapes, 0.0, budget=19)


def test_select_without_learning_is_the_global_greedy_policy_at_align_one() -> None:
    """Scores left at 1 and shrunk only by the penalty (``d = 1 − Θ·unit``): the values ``d/unit + Θ``
    rank like σ̃² per parameter, so the selection is ``global_greedy``'s at ``align`` 1."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (8, 8), (12, 5), (7, 9)]
    sigmas = [torch.rand(min(m, n), generator=generator, dtype=torch.float64).sort(descending=True).values * (j + 1)
              for j, (m, n) in enumerate(shapes)]
    costs = [m + n for m, n in shapes]
    units = penalty_units(sigmas, costs, prior=2.0)
    theta = 0.37
    scores = [(1 - theta * u).float() for u in units]
    spectra = [MatrixSpectrum(str(j), m, n, s) for j, ((m, n), s) in enumerate(zip(shapes, sigmas, strict=True))]
    dense_total = sum(m * n for m, n in shapes)
    for kept in (0.55, 0.7, 0.85, 0.95):
        ranks = POLICIES["global_greedy"](1).propose(spectra, kept)
        masks, dense = select(scores, units, shapes, theta, kept * dense_total)
        assert dense == [ranks[str(j)] is None for j in range(len(shapes))]
        for j, mask in enumerate(masks):
            expected = len(mask) if ranks[str(j)] is None else ranks[str(j)]
            assert mask.tolist() == [1.0] * expected + [0.0] * (len(mask) - expected), (kept, j)


@pytest.mark.parametrize("align", [1, 4, 8])
def test_the_guards_start_is_global_greedys_allocation_at_its_align(align: int) -> None:
    """The start candidate (every score 1, ``select`` at ``start_align``) is the allocation
    ``global_greedy`` makes at that align (``allocate``: its proposal with the budget then spent),
    so SoCo's guard compares the learned set with the base method's own row."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(40, 64), (48, 48), (72, 30), (56, 80), (24, 96)]
    sigmas = [torch.rand(min(m, n), generator=generator, dtype=torch.float64).sort(descending=True).values ** 3 * (j + 1)
              for j, (m, n) in enumerate(shapes)]
    units = penalty_units(sigmas, [m + n for m, n in shapes], prior=2.0)
    ones = [torch.ones(len(s)) for s in sigmas]
    spectra = [MatrixSpectrum(str(j), m, n, s) for j, ((m, n), s) in enumerate(zip(shapes, sigmas, strict=True))]
    dense_total = sum(m * n for m, n in shapes)
    for kept in (0.5, 0.7, 0.85, 0.95):
        ranks = POLICIES["global_greedy"](align).allocate(spectra, kept)
        masks, dense = select(ones, units, shapes, 0.0, kept * dense_total, align)
        assert [r is None for r in ranks.values()] == dense
        assert [int(m.sum()) for m in masks] == [len(m) if r is None else r for m, r in zip(masks, ranks.values(), strict=True)]
        assert all(m.tolist() == sorted(m.tolist(), reverse=True) for m in masks)  # top components by σ̃


def test_shrinkage_lands_on_the_budget_and_weights_by_cost_over_prior() -> None:
    scores = [torch.tensor([0.5, 1.2, 0.0]), torch.tensor([0.9, 0.7])]
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.ones(2)]
    costs, sizes, dense = [1, 3], [10, 4], 14.0
    sigmas = [torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])]
    units = penalty_units(sigmas, costs, prior=2.0)
    # c / (c̄·π): c̄ = 9/5 per component, π = σ² / mean σ² (mean 8/5)
    assert units[0].tolist() == pytest.approx([1 / (1.8 * 2.5), 1 / (1.8 * 0.625), 1 / (1.8 * 0.625)])
    assert units[1].tolist() == pytest.approx([3 / (1.8 * 0.625)] * 2)
    assert penalty_units(sigmas, costs, prior=0.0)[1].tolist() == pytest.approx([3 / 1.8] * 2)
    local = penalty_units(sigmas, costs, prior=2.0, scope="matrix")  # π normalised within each matrix
    assert local[0].tolist() == pytest.approx([1 / (1.8 * 2), 1 / (1.8 * 0.5), 1 / (1.8 * 0.5)])
    assert local[1].tolist() == pytest.approx([3 / 1.8] * 2)
    # a score above 1 counts 1, a matrix at most its dense size: (0.5 + 1) + min(3·1.6, 4)
    assert soft_kept(scores, masks, costs, sizes, dense) == pytest.approx((1.5 + 4) / 14)
    assert shrink_to_budget(scores, masks, costs, sizes, units, dense, budget=0.5) == 0.0  # already under: untouched
    assert scores[0].tolist() == [0.5, pytest.approx(1.2), 0.0]
    theta = shrink_to_budget(scores, masks, costs, sizes, units, dense, budget=0.05)
    assert soft_kept(scores, masks, costs, sizes, dense) == pytest.approx(0.05, abs=1e-6)  # float32 scores
    # every unpruned score moves by θ·unit, below 0 if it must (the model uses max(0, d)); the pruned one stays
    expected = [[d - theta * float(u) * m for d, u, m in zip(s0, u0, m0, strict=True)]
                for s0, u0, m0 in zip([[0.5, 1.2, 0.0], [0.9, 0.7]], units, [[1, 1, 0], [1, 1]], strict=True)]
    assert scores[0].tolist() == pytest.approx(expected[0], abs=1e-6)
    assert scores[1].tolist() == pytest.approx(expected[1], abs=1e-6)
    assert min(expected[0] + expected[1]) < 0


def test_base_must_be_a_plain_metric_pair_method() -> None:
    assert SoCoConfig(name="soco", base="kfac_svd")
    for bad in ("aasvd", "modegpt", "ressvd", "soco", "nope"):
        with pytest.raises(ValueError, match="unsupported base"):
            SoCoConfig(name="soco", base=bad)
    assert METHODS["soco"](SoCoConfig(name="soco")).training_options()["prior_scope"] == "matrix"  # svdllm: output units
    soco = METHODS["soco"](SoCoConfig(name="soco", base="kfac_svd", shrinkage=0.1))
    assert soco.training_options()["prior_scope"] == "global"  # K-FAC: loss units
    base = METHODS["kfac_svd"](METHODS["kfac_svd"].config(name="kfac_svd", shrinkage=0.1))
    assert soco.key_options() == base.key_options()  # decompose (and capture, fisher) shared with the base's rows


# --------------------------------------------------------------------------- the model
def test_keep_all_is_the_dense_model_and_a_fixed_point_of_the_kl(tmp_path: Path) -> None:
    """With every component at score 1 the spectral model computes the dense model, so the KL is 0
    and its gradient on the scores vanishes: training at "keep all" stays there."""
    config = load_pipeline(soco_pipeline(tmp_path, "all", 0.9))
    model, _ = load_model(config.model)
    model = model.double()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    svds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            svds[name] = (u, s, vh)
    modules = install(model, svds)
    logits = model(input_ids=ids).logits
    assert torch.allclose(logits, dense, atol=1e-10, rtol=0)
    with torch.no_grad(), dense_mode(modules):
        assert torch.equal(model(input_ids=ids).logits, dense)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(dense, -1), log_target=True,
                                    reduction="sum")
    kl.backward()
    assert abs(kl.item()) < 1e-10
    assert max(float(m.scores.grad.abs().max()) for m in modules.values()) < 1e-8


def test_budget_pressure_reaches_the_target_and_allocate_reports_it(trained) -> None:
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    history = artifacts.read_history(found[PartitionRef("train", ALL)])
    explore = [h for h in history if h["phase"] == "explore"]
    assert 0.6 < explore[0]["kept_soft"] < 1  # from 1: every component offered, no matrix counted above dense
    assert all(h["kept_soft"] == pytest.approx(0.6, abs=1e-6) for h in history if h["phase"] == "refine")
    assert history[-1]["kept_hard"] <= 0.6
    sparsify = [h["kept_hard"] for h in history if h["phase"] == "sparsify"]
    # the hard budget falls linearly from the dense size (1) to the target, one step at a time
    assert all(kept <= 1 - (1 - 0.6) * (i + 1) / len(sparsify) + 1e-9 for i, kept in enumerate(sparsify))
    assert sparsify[0] > 1 - 2 * (1 - 0.6) / len(sparsify)  # spent, not wasted, from the first step on
    ratios = json.loads((found[PartitionRef("report", ALL)] / "report.json").read_text())["ratios"]
    assert ratios["kept_over_target_matrices"] == pytest.approx(history[-1]["kept_hard"])
    assert 0.6 - 0.02 < ratios["kept_over_target_matrices"] <= 0.6  # the budget is spent: within one component
    info = artifacts.read_diagnostics(found[PartitionRef("train", ALL)])
    assert info["share_outside_sigma_order"] > 0  # pruned by learned score, not by σ order


def test_debias_restarts_the_kept_scores_at_one(tmp_path: Path) -> None:
    pipeline, ws = learned_run(tmp_path, "debias", 0.6, SOCO)  # the default
    history = artifacts.read_history(outputs(pipeline, ws)[PartitionRef("train", ALL)])
    last = [h for h in history if h["phase"] == "sparsify"][-1]
    assert last["kept_soft"] == pytest.approx(last["kept_hard"], abs=1e-6)  # every kept score is 1
    (tmp_path / "shrunk").mkdir()
    pipeline, ws = learned_run(tmp_path / "shrunk", "shrunk", 0.6, {**SOCO, "debias": False})
    history = artifacts.read_history(outputs(pipeline, ws)[PartitionRef("train", ALL)])
    last = [h for h in history if h["phase"] == "sparsify"][-1]
    assert last["kept_soft"] < last["kept_hard"] - 0.01  # without it the kept scores stay L1-shrunk


def test_reloads_with_the_learned_ranks_and_factors(trained) -> None:
    pipeline, ws = trained
    found = outputs(pipeline, ws)
    ranks = artifacts.read_learned_ranks(found[PartitionRef("train", ALL)])
    model_dir = artifacts.model_dir(found[PartitionRef("assemble", ALL)])
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.lowrank_ranks == {n: r for n, r in ranks.items() if r is not None}
    assert any(r is None for r in ranks.values())  # the search space includes "keep it dense"
    for layer in range(model.config.num_hidden_layers):
        learned = artifacts.read_learned(found[PartitionRef("train", ALL)], layer)
        for name, (up, down) in learned.items():
            module = model.model.layers[layer].get_submodule(name)
            assert module.up.weight.shape[1] == ranks[f"model.layers.{layer}.{name}"]
            assert torch.equal(module.up.weight.detach(), up.float()) and torch.equal(module.down.weight.detach(), down.float())
        dense = artifacts.read_learned_params(found[PartitionRef("train", ALL)], layer)
        for key, weight in dense.items():  # a dense-kept matrix whose scores moved: W + left·diag(σ(d − 1))·right
            assert ranks[f"model.layers.{layer}.{key.removesuffix('.weight')}"] is None
            assert torch.equal(model.model.layers[layer].get_submodule(key.removesuffix(".weight")).weight.detach(), weight)


@pytest.mark.parametrize("kept", [0.7, 0.9])
def test_learning_rate_zero_is_its_starting_allocation_bit_for_bit(tmp_path: Path, kept: float) -> None:
    """The control: SoCo on K-FAC-SVD that does not learn (``lr: 0``; ``debias``, the default: the
    kept scores back at 1, so the L1 shrinkage is undone) assembles the model of K-FAC-SVD with
    ``global_greedy`` at ``align`` 1 — the same dense-kept matrices, the same ranks, every tensor
    bit for bit. Whatever SoCo gains or loses against that row is the learning's doing."""
    soco, soco_ws = learned_run(tmp_path, "soco0", kept, {**SOCO, "base": "kfac_svd", "lr": 0, "prior": 2, "guard": True,
                                                         "start_align": 1})
    data = merge(TINY, {"name": "greedy", "method": {"name": "kfac_svd"}, "target": {"kept_fraction": kept},
                        "allocation": {"policy": "global_greedy", "align": 1}})
    (tmp_path / "greedy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "greedy.yaml"), "-w", str(tmp_path / "greedy_ws")])
    assert result.exit_code == 0, result.output

    def assembled(pipeline: Path, ws: Path) -> tuple[dict[str, torch.Tensor], dict]:
        directory = artifacts.model_dir(outputs(pipeline, ws)[PartitionRef("assemble", ALL)])
        tensors = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update(safetensors_io.read(file))
        return tensors, json.loads((directory / "config.json").read_text())["lowrank_ranks"]

    (learned, learned_ranks), (start, start_ranks) = assembled(soco, soco_ws), assembled(tmp_path / "greedy.yaml", tmp_path / "greedy_ws")
    assert learned_ranks == start_ranks
    assert 0 < len(start_ranks) < 14  # some of the 14 target matrices factored, some kept dense
    assert learned.keys() == start.keys()
    assert all(torch.equal(learned[k], start[k]) for k in start)
    guard = manifest_io.read(outputs(soco, soco_ws)[PartitionRef("train", ALL)]).diagnostics["guard"]
    assert guard["chosen"] == "start" and guard["learned_over_start"]["ratio"] == 1.0  # the start's path of the guard


def test_the_guard_keeps_the_learned_set_only_when_better_outside_the_noise(tmp_path: Path) -> None:
    """With validation windows the guard compares the start (lr 0's allocation) and the learned set
    as assembled: the assembled model's validation perplexity is the one measured for the kept one."""
    from stagepipe.perplexity import perplexity

    validation = {"text": {"source": "synthetic", "n_words": 1500, "seed": 2}, "n_samples": 4}
    pipeline, ws = learned_run(tmp_path, "soco_guard", 0.6, {**SOCO, "base": "kfac_svd", "prior": 2, "guard": True},
                               {"calibration": {"validation": validation}})
    found = outputs(pipeline, ws)
    guard = manifest_io.read(found[PartitionRef("train", ALL)]).diagnostics["guard"]
    ratio = guard["learned_over_start"]
    assert guard["windows"] == "validation" and guard["chosen"] == ("learned" if ratio["resolved"] and ratio["ratio"] < 1 else "start")
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir(found[PartitionRef("assemble", ALL)]), trust_remote_code=True)
    windows = artifacts.read_windows(found[PartitionRef("tokenize", "validation")])
    assert perplexity(model, windows, 2, torch.device("cpu")).ppl == pytest.approx(guard["ppl"][guard["chosen"]], rel=1e-5)


def test_sigkill_mid_training_resumes_to_identical_scores(tmp_path: Path) -> None:
    # killed after the 13th checkpoint (every 2 steps): step 26 of 36, mid-sparsify
    done, reference = train_killed_and_resumed(soco_pipeline(tmp_path, "kill_soco", 0.6), tmp_path, skip=12)
    assert done.telemetry["resumed_from_step"] == 26
    assert done.content_digest() == reference.content_digest()


def test_an_allocation_block_is_refused_in_one_line(tmp_path: Path) -> None:
    data = merge(TINY, {"name": "bad", "method": SOCO})  # TINY's allocation block stays
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert "allocation: soco learns its ranks" in result.output and len(result.output.strip().splitlines()) == 1
