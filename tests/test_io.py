"""Storage verbs: manifests (round trip, verify, content digest), zarr arrays, safetensors, JSON."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stagepipe.io import json_io, safetensors_io, zarr_io
from stagepipe.io import manifest as manifest_io


def make_manifest(directory: Path, **changes) -> manifest_io.Manifest:
    fields = dict(stage="s", partition="all", stage_version=1, key="k" * 64, key_material={"stage": "s"},
                  files=manifest_io.record_files(directory), info={"ppl": math.inf, "n": 3}, telemetry={"resumed": 1},
                  run_id="r1", host="h1", pid=1, started_at=0.0, finished_at=1.0, wall_s=1.0, peak_rss_mb=10.0)
    return manifest_io.Manifest(**{**fields, **changes})


def test_manifest_round_trip_keeps_inf_and_verify_finds_damage(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    manifest = make_manifest(tmp_path)
    manifest_io.write_atomic(tmp_path, manifest)
    back = manifest_io.read(tmp_path)
    assert back == manifest.sealed() and math.isinf(back.info["ppl"])
    assert manifest_io.verify(tmp_path, back, deep=True) == []
    (tmp_path / "a.bin").write_bytes(b"0123456780")  # same size, other content: a stamp cannot vouch for it
    assert manifest_io.verify(tmp_path, back) == ["a.bin: content hash differs from manifest"]
    assert manifest_io.verify(tmp_path, back, deep=True) == ["a.bin: content hash differs from manifest"]
    (tmp_path / "a.bin").write_bytes(b"012")
    assert "size 3" in manifest_io.verify(tmp_path, back)[0]


def test_stamps_spare_rehashing_unchanged_files_but_never_a_changed_one(tmp_path: Path, monkeypatch) -> None:
    """A file whose size, mtime, ctime and inode match its stamp is not hashed again; any write
    changes its ctime, so it is; a stamp taken in the file's own clock tick is not trusted."""
    import os
    import time

    (tmp_path / "a.bin").write_bytes(b"0123456789")
    manifest = make_manifest(tmp_path)
    hashed: list[str] = []
    real = manifest_io.sha256_file
    monkeypatch.setattr(manifest_io, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    assert manifest_io.verify(tmp_path, manifest) == [] and hashed == ["a.bin"]
    stamps = tmp_path / manifest_io.STAMPS_NAME
    later = time.time_ns() + 5_000_000_000  # as if the stamp were written well after the file's last change
    os.utime(stamps, ns=(later, later))
    assert manifest_io.verify(tmp_path, manifest) == [] and hashed == ["a.bin"]  # vouched for: one stat
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    assert manifest_io.verify(tmp_path, manifest) == ["a.bin: content hash differs from manifest"]
    assert hashed == ["a.bin", "a.bin"]


def test_an_edited_manifest_that_still_parses_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")
    manifest_io.write_atomic(tmp_path, make_manifest(tmp_path, info={"ppl": 12.5}))
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text().replace("12.5", "11.5"))
    with pytest.raises(manifest_io.ManifestError, match="differs from its own hash"):
        manifest_io.read(tmp_path)


def test_diagnostics_stay_out_of_the_content_digest(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")
    base = make_manifest(tmp_path, diagnostics={"err": 4.3359e-14})
    assert make_manifest(tmp_path, diagnostics={"err": 4.3355e-14}).content_digest() == base.content_digest()


def test_manifest_of_another_schema_or_garbage_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 1}')
    with pytest.raises(manifest_io.ManifestError, match="schema_version 1, expected 2"):
        manifest_io.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(manifest_io.ManifestError, match="unreadable"):
        manifest_io.read(tmp_path)


def test_content_digest_ignores_run_facts_but_not_results_or_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x")
    base = make_manifest(tmp_path)
    other_run = make_manifest(tmp_path, key="q" * 64, key_material={"other": 1}, run_id="r2", host="h2", pid=2,
                              started_at=5.0, finished_at=9.0, wall_s=4.0, peak_rss_mb=1.0, telemetry={"resumed": 0})
    assert base.content_digest() == other_run.content_digest()
    assert make_manifest(tmp_path, info={"ppl": 1.0, "n": 3}).content_digest() != base.content_digest()
    (tmp_path / "a.bin").write_bytes(b"y")
    assert make_manifest(tmp_path).content_digest() != base.content_digest()


def test_zarr_rows_round_trip_including_bfloat16_and_refuse_unwritten_chunks(tmp_path: Path) -> None:
    values = torch.randn(6, 3, 4)
    for dtype, tolerance in (("float32", 0.0), ("bfloat16", 1e-2)):
        array = zarr_io.create_array(tmp_path / f"{dtype}.zarr", "x", (6, 3, 4), dtype, 2)
        zarr_io.write_rows(array, 0, values[:2])
        zarr_io.write_rows(array, 2, values[2:4])
        assert torch.allclose(zarr_io.read_rows(array, 0, 4).float(), values[:4], atol=tolerance, rtol=tolerance)
        with pytest.raises(FileNotFoundError, match="chunk c/2/0/0 is missing"):
            zarr_io.read_rows(array, 2, 6)  # zarr alone would return zeros for rows 4:6
    zarr_io.write_atomic(tmp_path / "g.zarr", {"a": np.arange(5), "b": torch.ones(2, 2, dtype=torch.bfloat16)},
                         attrs={"tokens": 7})
    read = zarr_io.read(tmp_path / "g.zarr")
    assert read["a"].tolist() == [0, 1, 2, 3, 4] and read["b"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert zarr_io.attrs(tmp_path / "g.zarr") == {"tokens": 7}


def test_safetensors_files_are_bit_identical_for_equal_tensors(tmp_path: Path) -> None:
    tensors = {"b.weight": torch.arange(6.0).view(2, 3), "a.weight": torch.ones(3, 2).T}
    safetensors_io.write_atomic(tmp_path / "one.safetensors", tensors)
    safetensors_io.write_atomic(tmp_path / "two.safetensors", dict(reversed(tensors.items())))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert safetensors_io.keys(tmp_path / "one.safetensors") == ["a.weight", "b.weight"]
    assert torch.equal(safetensors_io.read(tmp_path / "one.safetensors", ["b.weight"])["b.weight"], tensors["b.weight"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_json_documents_are_replaced_whole_and_read_forgivingly(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    json_io.write_atomic(path, {"b": 1, "a": [1, 2]})
    assert json_io.read(path) == {"a": [1, 2], "b": 1}
    path.write_text('{"half": ')
    assert json_io.read(path) is None and json_io.read(tmp_path / "missing.json") is None
