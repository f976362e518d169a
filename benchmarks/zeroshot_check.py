"""stagepipe's zero-shot scores against a plain lm-eval-harness run of the same model directory.

For every finished ``zeroshot`` partition of a pipeline's workspace, runs lm-eval's own
``simple_evaluate(model="hf", model_args={"pretrained": <dir>, "dtype": "float32"})`` — the model
loaded from disk by lm-eval, not handed over in memory — on the same task (lm-eval's config, the
installed documents), limit and batch size, and compares the metrics as lm-eval prints them (4
decimals) and document by document. Prints a table and writes JSON; exit 1 on any difference.

    python benchmarks/zeroshot_check.py PIPELINE.yaml --workspace WS [--out docs/zeroshot/check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stagepipe import zeroshot
from stagepipe.config import load_pipeline
from stagepipe.stagekit import artifacts
from stagepipe.stages import make_runner


def plain_lm_eval(directory: Path, task: str, limit: int | None, batch_size: int) -> zeroshot.TaskScore:
    from lm_eval import simple_evaluate

    output = simple_evaluate(model="hf", model_args={"pretrained": str(directory), "dtype": "float32",
                                                     "trust_remote_code": True},
                             tasks=[zeroshot.task_config(task)], num_fewshot=0, limit=limit, batch_size=batch_size,
                             device="cpu", log_samples=True)
    return zeroshot.task_score(task, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = load_pipeline(Path(args.pipeline))
    states = {e.ref: e.state for e in make_runner(config, Path(args.workspace)).states()}
    finished = {ref: s.output for ref, s in states.items() if ref.stage == "zeroshot" and s.status == "done"}
    models = {m: states[artifacts.ref(stage)].output for m, stage in (("dense", "snapshot"), ("compressed", "assemble"))
              if states.get(artifacts.ref(stage)) is not None and states[artifacts.ref(stage)].status == "done"}
    rows, same = [], True
    print("| partition | docs | metric | stagepipe | lm-eval (plain) | equal (4 decimals) | documents equal | lm-eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for ref, output in sorted(finished.items()):
        ours = json.loads((output / artifacts.RESULTS).read_text())
        model, _, task = ref.partition.partition("-")
        started = time.time()
        theirs = plain_lm_eval(artifacts.model_dir(models[model]), task, config.evaluation.limit_of(task),
                               config.evaluation.task_batch_size)
        seconds = time.time() - started
        documents_equal = ours["per_doc"] == theirs.per_doc
        for metric, value in ours["metrics"].items():
            equal = f"{value:.4f}" == f"{theirs.metrics[metric]:.4f}"
            same &= equal and documents_equal
            rows.append({"partition": ref.partition, "metric": metric, "stagepipe": value, "lm_eval": theirs.metrics[metric],
                         "equal_printed": equal, "documents_equal": documents_equal, "n_docs": ours["n_docs"],
                         "lm_eval_seconds": seconds})
            print(f"| {ref.partition} | {ours['n_docs']} | {metric} | {value:.4f} | {theirs.metrics[metric]:.4f} | "
                  f"{'yes' if equal else 'NO'} | {'yes' if documents_equal else 'NO'} | {seconds:.0f} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"pipeline": args.pipeline, "rows": rows}, indent=1))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
