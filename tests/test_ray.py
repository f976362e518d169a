"""Ray executor on a cluster of several nodes: a node lost mid-decompose, its task retried elsewhere, the same
bytes and keys as in process (every method's keys in process and on Ray: test_executors_agree.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray

from stagepipe.config import load_pipeline
from stagepipe.engine.executors import RayExecutor
from stagepipe.io.hashing import sha256_file
from stagepipe.stages import make_runner
from tests.conftest import keys_and_digests

pytestmark = pytest.mark.ray


def shards(ws: Path) -> dict[str, str]:
    model = next((ws / "stages" / "assemble" / "all").glob("*/model"))
    return {p.name: sha256_file(p) for p in sorted(model.glob("*.safetensors"))}


@pytest.fixture
def reference(write_pipeline, tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, tuple[str, str]]]:
    pipeline = write_pipeline(executor={"kind": "ray", "num_cpus_per_task": 1, "num_gpus_per_task": 1})
    ws = tmp_path / "local"
    make_runner(load_pipeline(pipeline), ws).run()
    return pipeline, shards(ws), keys_and_digests(ws)


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
