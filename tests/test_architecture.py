"""Architecture rules (import-linter contracts in pyproject.toml) and lint, run by the test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name) or name


def test_import_contracts_hold() -> None:
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_clean() -> None:
    result = subprocess.run([_tool("ruff"), "check", "stagepipe", "tests", "benchmarks", "scripts"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def _tags(schema: dict, field: str) -> set[str]:
    return {d["properties"][field]["const"] for d in schema["$defs"].values()
            if field in d.get("properties", {}) and "const" in d["properties"][field]}


def test_adding_a_method_or_policy_is_one_module() -> None:
    """The schema is built from the registries, and no module outside ``methods/`` and
    ``allocation/`` spells a method's or a policy's name (no ``if name == ...`` anywhere)."""
    from stagepipe.allocation import POLICIES
    from stagepipe.config import PipelineConfig
    from stagepipe.methods import METHODS

    schema = PipelineConfig.model_json_schema()
    assert set(METHODS) == _tags(schema, "name") and set(POLICIES) == _tags(schema, "policy")
    package = ROOT / "stagepipe"
    outside = [p for p in package.rglob("*.py") if p.relative_to(package).parts[0] not in ("methods", "allocation")]
    for name in [*METHODS, *POLICIES]:
        hits = [p.name for p in outside if f'"{name}"' in p.read_text()]
        assert not hits, f"{name!r} spelled outside its module: {hits}"


def test_every_module_has_a_layer() -> None:
    """The layers contract names every top-level module and package of ``stagepipe`` (a new module
    that no contract places would be free to import anything); stages, methods and policies are
    covered by wildcards, so adding one edits no contract."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    package = ROOT / "stagepipe"
    modules = {f"stagepipe.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    modules |= {f"stagepipe.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert modules - placed == set(), f"modules no layer places: {sorted(modules - placed)}"
    assert placed - modules == set(), f"layers name modules that do not exist: {sorted(placed - modules)}"
