"""Ray executor: same bytes as in-process, tasks on several nodes, a node lost mid-decompose."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from stagepipe.config import load_pipeline
from stagepipe.engine.executors import RayExecutor
from stagepipe.io import manifest as manifest_io
from stagepipe.io.hashing import sha256_file
from stagepipe.stages import make_runner

pytestmark = pytest.mark.ray


def shards(ws: Path) -> dict[str, str]:
    model = next((ws / "stages" / "assemble" / "all").glob("*/model"))
    return {p.name: sha256_file(p) for p in sorted(model.glob("*.safetensors"))}


def keys_and_digests(ws: Path) -> dict[str, tuple[str, str]]:
    """Every partition's key and content digest (report excluded: it records per-stage timings)."""
    out = {}
    for path in sorted(ws.glob("stages/*/*/*/manifest.json")):
        manifest = manifest_io.read(path.parent)
        if manifest.stage != "report":
            out[f"{manifest.stage}@{manifest.partition}"] = (manifest.key, manifest.content_digest())
    return out


@pytest.fixture
def reference(write_pipeline, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, tuple[str, str]]]:
    pipeline = write_pipeline(executor={"kind": "ray", "num_cpus_per_task": 1, "num_gpus_per_task": 1})
    ws = tmp_path / "local"
    make_runner(load_pipeline(pipeline), ws).run()
    return pipeline, shards(ws), keys_and_digests(ws)


def test_ray_run_is_bit_identical_to_in_process(reference, tmp_path: Path) -> None:
    pipeline, expected, keys = reference
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = load_pipeline(pipeline)
        executor = RayExecutor(config.executor)
        ws = tmp_path / "ray"
        results = make_runner(config, ws).run(executor=executor)
        assert all(r.ok for r in results) and len({r.ref for r in results}) == len(results)
        assert shards(ws) == expected
        assert keys_and_digests(ws) == keys  # same keys everywhere: run metadata never enters a key
    finally:
        ray.shutdown()


def test_node_removed_mid_decompose_run_completes(reference, tmp_path: Path, monkeypatch) -> None:
    from ray.cluster_utils import Cluster

    pipeline, expected, keys = reference
    flag = tmp_path / "hung"
    monkeypatch.setenv("STAGEPIPE_TEST_HANG_IN", "decompose@layer-001")
    monkeypatch.setenv("STAGEPIPE_TEST_HANG_ONCE", str(flag))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        config = load_pipeline(pipeline)
        executor = RayExecutor(config.executor)
        ws = tmp_path / "cluster"
        results: list = []
        thread = threading.Thread(target=lambda: results.extend(make_runner(config, ws).run(executor=executor)))
        thread.start()
        deadline = time.time() + 120
        while not flag.exists():
            assert time.time() < deadline, "decompose@layer-001 never started"
            time.sleep(0.1)
        node_id = flag.read_text().split()[2]
        victim = next(w for w in workers if w.node_id == node_id)
        cluster.remove_node(victim)
        thread.join(timeout=240)
        assert not thread.is_alive()
        retried = [r for r in results if r.ref == "decompose@layer-001" and r.ok]
        assert retried and retried[0].node not in ("-", node_id)  # the retry ran on a surviving node
        assert all(r.node != "-" for r in results)  # every partition reports the Ray node it ran on
        assert not list(ws.glob("stages/*/*/.tmp-*"))
        assert shards(ws) == expected and keys_and_digests(ws) == keys
    finally:
        ray.shutdown()
        cluster.shutdown()



def report_without_timings(ws: Path) -> dict:
    import json

    data = json.loads(next(ws.glob("stages/report/all/*/report.json")).read_text())
    data.pop("stages")
    return data


@pytest.mark.parametrize("method", [
    {"name": "kfac_svd"},
    {"name": "gfwsvd", "mode": "streaming", "max_sweeps": 2},
], ids=lambda m: m["name"])
def test_ray_tasks_with_two_cpus_equal_default_threads_in_process(write_pipeline, tmp_path: Path, method: dict) -> None:
    """Beyond one thread and SVD-LLM: gradient methods (GFWSVD streaming its gradients), torch's
    default threads in process vs Ray tasks of 2 CPUs: every key, every content digest, the report."""
    pipeline = write_pipeline(f"ray_{method['name']}", method=method, runtime={"batch_size": 2, "threads": None},
                              executor={"kind": "ray", "num_cpus_per_task": 2})
    import torch

    config = load_pipeline(pipeline)
    local = tmp_path / "local"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on this 2-core machine, whatever earlier tests set
    try:
        make_runner(config, local).run()
    finally:
        torch.set_num_threads(before)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = tmp_path / "ray"
        results = make_runner(config, distributed).run(executor=RayExecutor(config.executor))
        assert results and all(r.ok and r.node != "-" for r in results)
    finally:
        ray.shutdown()
    assert keys_and_digests(distributed) == keys_and_digests(local)
    assert report_without_timings(distributed) == report_without_timings(local)
