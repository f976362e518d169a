"""Early cutoff across executors: every method run in process (torch's default threads) and as Ray
tasks with Ray's default CPUs (one thread each) gives the same key for every partition, and the
same content digest for every partition but the report (which records timings).

Keys follow from content digests, which cover only files and the results a consumer reads, never
measured diagnostics; and LAPACK, whose last bits depend on the thread count, runs single-threaded
(``linalg.single_threaded``). Either slip makes a retried task on another node re-run everything
downstream although its output bytes are identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner

from stagepipe.cli import main
from stagepipe.config import load_pipeline
from stagepipe.engine.executors import RayExecutor
from stagepipe.io import manifest as manifest_io
from stagepipe.stages import make_runner
from tests.conftest import learned_pipeline
from tests.test_pipeline import CASES

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent

#: the every-method cases, plus the methods that refine or learn (their own stages)
EXTRA = {
    "aasvd_refined": ({"name": "aasvd", "output_metric": "kfac_out", "anchor_weight": 0.5, "refine_epochs": 2},
                      {"policy": "global_greedy"}),
    "soco": ({"name": "soco", "base": "kfac_svd", "explore_epochs": 1, "refine_epochs": 1,
              "sparsify_epochs": 1, "tune_epochs": 1, "batch": 2, "checkpoint_every": 2}, None),
    "dobi_svd": ({"name": "dobi_svd", "epochs": 2, "lr": 0.05, "checkpoint_every": 2}, None),
}
ALL = {name: (method, allocation) for name, (method, allocation, *_) in CASES.items()} | EXTRA


@pytest.fixture(scope="module")
def cluster():
    """One local Ray of two CPUs for the module: tasks take Ray's default of one CPU each."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def keys(ws: Path) -> dict[str, tuple[str, str]]:
    """Key and content digest of every partition (the report's digest covers its timings)."""
    found = {}
    for path in sorted(ws.glob("stages/*/*/*/manifest.json")):
        manifest = manifest_io.read(path.parent)
        found[f"{manifest.stage}@{manifest.partition}"] = (
            manifest.key, "" if manifest.stage == "report" else manifest.content_digest())
    return found


@pytest.mark.parametrize("case", list(ALL))
def test_every_method_has_the_same_keys_in_process_and_on_ray(cluster, write_pipeline, tmp_path: Path,
                                                              case: str) -> None:
    method, allocation = ALL[case]
    runtime = {"batch_size": 2, "threads": None}  # torch's default threads in process, one per Ray task
    if allocation is None:  # a learned method: no allocation block
        pipeline = learned_pipeline(tmp_path, f"a_{case}", 0.8, method)
        text = pipeline.read_text().replace("threads: 1", "threads: null")
        pipeline.write_text(text)
    else:
        pipeline = write_pipeline(f"a_{case}", method=method, allocation={"align": 4, **allocation}, runtime=runtime)
    config = load_pipeline(pipeline)
    assert config.runtime.threads is None and config.executor.num_cpus_per_task == 1
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch starts with on the 2-core CI machine, whatever earlier tests set
    try:
        make_runner(config, tmp_path / "local").run()
    finally:
        torch.set_num_threads(before)
    results = make_runner(config, tmp_path / "ray").run(executor=RayExecutor(config.executor))
    assert results and all(r.ok and r.node != "-" for r in results)
    local, distributed = keys(tmp_path / "local"), keys(tmp_path / "ray")
    assert local.keys() == distributed.keys()
    differ = {ref: (local[ref], distributed[ref]) for ref in local if local[ref] != distributed[ref]}
    assert not differ, differ


def test_the_tiny_demo_in_process_and_with_executor_ray_leaves_the_same_key_directories(cluster, tmp_path: Path) -> None:
    """The bundled plumbing demo through the CLI, ``--executor ray`` against the default: the same
    ``stages/<stage>/<partition>/<key16>`` directories."""
    pipeline = ROOT / "pipelines" / "tiny_demo.yaml"
    for ws, extra in ((tmp_path / "local", []), (tmp_path / "ray", ["--executor", "ray"])):
        result = CliRunner().invoke(main, ["run", str(pipeline), "-w", str(ws), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    def directories(ws: Path) -> set[str]:
        return {str(p.relative_to(ws)) for p in ws.glob("stages/*/*/*") if not p.name.startswith(".")}

    assert directories(tmp_path / "local") == directories(tmp_path / "ray")
