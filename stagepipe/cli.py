"""``stagepipe`` command line: run, status, gc, verify, dag, methods.

Heavy modules (torch, transformers, and the config schema, which imports the method registry)
are imported inside the commands, so ``stagepipe --help`` is instant. Every user-facing error is
one line on stderr with a non-zero exit code: 2 for a bad pipeline file or a missing input, 1 for
a failed stage or an operating-system error (read-only or full disk, permissions).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from stagepipe.errors import InputError, StagepipeError

log = logging.getLogger("stagepipe")


def _workspace(config: Any, workspace: str | None) -> Path:
    return Path(workspace) if workspace else Path("workspace") / config.name


def _load(pipeline: str) -> Any:
    from stagepipe.config import load_pipeline

    return load_pipeline(pipeline)


def _runner(config: Any, root: Path, pipeline: str) -> Any:
    from stagepipe.stages import make_runner

    return make_runner(config, root, pipeline)


def _setup_logging(workspace: Path | None, verbose: bool) -> None:
    log.setLevel(logging.DEBUG)
    log.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if workspace is not None:
        (workspace / "logs").mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(workspace / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.propagate = False


def _fail(exc: StagepipeError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Report stagepipe errors and operating-system errors (read-only or full disk, permissions)
    as one line with the path, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except InputError as exc:  # like a config error: the pipeline file, the key, what was expected
            _fail(InputError(f"{kwargs['pipeline']}: {exc}") if "pipeline" in kwargs else exc)
        except StagepipeError as exc:
            _fail(exc)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stagepipe")
def main() -> None:
    """Resumable SVD-family compression of causal language models (GFWSVD, SVD-LLM, ...)."""


workspace_option = click.option("--workspace", "-w", type=click.Path(file_okay=False),
                                help="run directory (default: workspace/<pipeline name>)")


@main.command()
@click.argument("pipeline", type=click.Path())
@workspace_option
@click.option("--dry-run", is_flag=True, help="print what would run and why, run nothing")
@click.option("--force", multiple=True, metavar="STAGE[@PART]", help="re-run these even if done")
@click.option("--only", multiple=True, metavar="STAGE[@PART]", help="run only these (upstream must be done)")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None, help="override executor.kind")
@click.option("--ray-address", default=None, help="Ray cluster address (auto or HOST:PORT)")
@click.option("-v", "--verbose", is_flag=True)
@one_line_errors
def run(pipeline: str, workspace: str | None, dry_run: bool, force: tuple[str, ...], only: tuple[str, ...],
        executor: str | None, ray_address: str | None, verbose: bool) -> None:
    """Run every stage of PIPELINE that is not done yet."""
    config = _load(pipeline)
    if executor:  # the disk plan depends on it too (a Ray executor overlaps fisher and decompose)
        config = config.model_copy(update={"executor": config.executor.model_copy(update={"kind": executor})})
    root = _workspace(config, workspace)
    runner = _runner(config, root, pipeline)
    from stagepipe.stages import check_inputs

    check_inputs(config)
    if dry_run:
        runner.run(force=set(force), only=set(only), dry_run=True)
        _print_status(runner, verbose=True, todo_only=True)
        _print_plan(config, runner)
        return
    _warn_budget(config, runner)
    from stagepipe.engine.executors import make_executor

    with runner.ws.lock():
        _setup_logging(root, verbose)
        (root / "pipeline.json").write_text(config.model_dump_json(indent=1))
        started = time.time()
        pool = make_executor(config.executor, executor, ray_address)
        try:
            results = runner.run(executor=pool, force=set(force), only=set(only))
        finally:
            pool.shutdown()
        ran = len(results)
        click.echo(f"{ran} partition(s) run in {time.time() - started:.1f}s; workspace {root}"
                   if ran else f"nothing to do: every stage is done ({time.time() - started:.1f}s)")
        _print_summary(runner)


def _plan(runner: Any) -> Any:
    """The runner's plan with the model's facts (``None`` when they are not reachable yet)."""
    if runner.ctx.facts is None:
        runner.states()  # the model's facts, from the snapshot or the source
    return runner.ctx.plan if runner.ctx.facts is not None else None


def _warn_budget(config: Any, runner: Any) -> None:
    """One line on stderr when the plan cannot keep the run within ``runtime.disk_budget_gb``."""
    budget = config.runtime.disk_budget_gb
    plan = _plan(runner) if budget is not None else None
    if plan is None:
        return
    peak = plan.end_and_peak()[1]
    if peak > budget * 2**30:
        click.echo(f"warning: runtime.disk_budget_gb {budget:g} GB: the plan's smallest peak is {_size(peak)} "
                   "(estimate; `stagepipe run --dry-run` shows it per stage)", err=True)


def _print_plan(config: Any, runner: Any) -> None:
    plan = _plan(runner)
    if plan is None:
        click.echo("plan: the model config is not reachable offline; estimates appear once `snapshot` has run "
                   "(or give model.shape_hint)")
        return
    from stagepipe.stagekit.cost import duration
    from stagepipe.stagekit.plan import BUDGET_MARGIN, estimate, peak_disk

    click.echo(f"\n{'stage':<12} {'disk':>10} {'RAM peak':>10} {'GPU peak':>10} {'GPU time':>9} {'CPU time':>9}  note")
    for row in plan.rows:
        click.echo(f"{row.stage:<12} {_size(row.disk):>10} {_size(row.ram):>10} {_size(row.gpu):>10} "
                   f"{duration(row.seconds(True)):>9} {duration(row.seconds(False)):>9}  {row.note}")
    gpu_total, cpu_total = (sum(row.seconds(on_gpu) for row in plan.rows) for on_gpu in (True, False))
    click.echo(f"time: ≈{duration(gpu_total)} on one 80 GB GPU, ≈{duration(cpu_total)} on this CPU — estimates from FLOP "
               "counts at assumed rates (stagepipe/stagekit/cost.py: bf16 150 TFLOP/s and float64 10 TFLOP/s on the GPU; "
               "100 / 50 GFLOP/s on the CPU); I/O-bound stages show —")
    end, peak = plan.end_and_peak()
    click.echo(f"workspace: {_size(end)} at the end, {_size(peak)} at its peak (estimates; outputs of other keys "
               "already in the workspace come on top: `stagepipe gc`)")
    budget = config.runtime.disk_budget_gb
    if budget is not None:
        verdict = "fits" if peak <= budget * 2**30 else "does NOT fit: the smallest peak this plan can reach"
        click.echo(f"disk budget {budget:g} GB: {verdict} ({_size(peak)}; {_size(peak_disk(estimate(plan, 1))[1])} "
                   f"keeping every block output); a target, not a limit: the measured peak ran {BUDGET_MARGIN:.0%} "
                   f"over the plan's (docs/cost_budget), so leave {_size(peak * BUDGET_MARGIN)} of room")


def _print_status(runner, verbose: bool, todo_only: bool = False) -> list:
    entries = runner.states()
    by_stage: dict[str, list] = {}
    for entry in entries:
        by_stage.setdefault(entry.ref.stage, []).append(entry)
    for stage, items in by_stage.items():
        counts: dict[str, int] = {}
        for entry in items:
            counts[entry.state.status] = counts.get(entry.state.status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        click.echo(f"{stage:<12} {summary}")
        if verbose:
            for entry in items:
                if todo_only and entry.state.status == "done":
                    continue
                why = entry.state.reason or (f"released: {', '.join(entry.state.released)}" if entry.state.released else "")
                click.echo(f"  {str(entry.ref):<26} {entry.state.status}{f'  ({why})' if why else ''}")
    known = {e.ref.stage for e in entries}
    for name in runner.stages:
        if name not in known:
            click.echo(f"{name:<12} partitions unknown until the model snapshot exists")
    return entries


def _print_summary(runner) -> None:
    from stagepipe.engine.stage import ALL, PartitionRef

    entries = {e.ref: e for e in runner.states()}
    report = entries.get(PartitionRef("report", ALL))
    if report is None or report.state.status != "done":
        return
    info = report.state.manifest.info
    ratios = info["ratios"]
    achieved = (f"{ratios['kept_over_target_matrices']:.4f} (targets) / {ratios['kept_over_block_linears']:.4f} "
                f"(block linears) / {ratios['kept_over_model']:.4f} (model)")
    memory = ratios.get("memory")
    delta = ratios.get("delta_ratio")
    if delta:  # a delta method: the budget was the delta's compression ratio
        click.echo(f"delta compression ratio: requested {delta['requested']:g}, achieved {delta['achieved']:.4f} "
                   f"({memory['stored_bytes']:,} bytes stored for the target matrices' delta, every index and scale counted)")
    elif memory:  # the budget was memory: say so, and give the parameter fractions beside it
        requested = memory["requested_kept_memory"]
        click.echo(f"kept memory ({memory['storage']}): " + (f"requested {requested:.3f}, " if requested is not None else "")
                   + f"achieved {memory['kept_memory_over_target_matrices']:.4f} of the dense 16-bit target matrices "
                   f"({memory['stored_bytes']:,} bytes, {memory['bits_per_weight']:.4f} bits per weight with every overhead)")
        click.echo(f"kept parameters: {achieved}")
    else:
        click.echo(f"kept fraction: requested {ratios['requested_kept_fraction']:.3f}, achieved {achieved}")
    guard = info.get("training", {}).get("guard")
    if isinstance(guard, dict):  # a learned method checked against its start on held-out windows
        (name, ratio), = ((k, v) for k, v in guard.items() if "_over_" in k)
        click.echo(f"training guard on {guard['n_windows']} {guard['windows']} windows: " + ", ".join(
            f"{c} {ppl:.3f} [{guard['interval'][c][0]:.3f}, {guard['interval'][c][1]:.3f}]" for c, ppl in guard["ppl"].items())
            + f"; {name.replace('_over_', ' / ')} ×{ratio['ratio']:.4f} [{ratio['low']:.4f}, {ratio['high']:.4f}]"
            + f" → kept {guard['chosen']}")
    intervals = info.get("perplexity_interval", {})
    for model, values in sorted(info["perplexity"].items()):
        bounds = intervals.get(model, {})
        click.echo(f"perplexity {model:<10} " + "  ".join(
            f"{d}={v:.3f}" + (f" [{bounds[d][0]:.3f}, {bounds[d][1]:.3f}]" if d in bounds else "")
            for d, v in sorted(values.items())) + ("  (95 % interval over windows)" if bounds else ""))
    for dataset, gain in sorted(info.get("gain_retained", {}).items()):
        click.echo(f"gain retained on {dataset}: {gain['value']:.4f} [{gain['low']:.4f}, {gain['high']:.4f}] of the "
                   "fine-tune's NLL gain over its base (paired over the same windows)")
    for dataset, ratio in sorted(info.get("compressed_over_dense", {}).items()):
        click.echo(f"compressed / dense on {dataset}: ×{ratio['ratio']:.4f} [{ratio['low']:.4f}, {ratio['high']:.4f}] "
                   f"(paired over the same windows), {'outside' if ratio['resolved'] else 'inside'} the noise")
    zeroshot = info.get("zeroshot")
    if zeroshot:
        for name, task in zeroshot["tasks"].items():
            acc = "  ".join(f"{model} {task[model]['acc']:.4f} ± {task[model]['acc_stderr']:.4f}"
                            for model in ("dense", "compressed") if model in task)
            click.echo(f"zero-shot {name:<13} acc {acc}  (chance {task['chance']:.3f}, {task['n_docs']} docs, {task['split']})")
        average = "  ".join(f"{m} {v:.4f}" for m, v in sorted(zeroshot["average"].items()))
        retained = (f"; accuracy retained above chance {zeroshot['retention']:.3f} [{zeroshot['retention_interval'][0]:.3f}, "
                    f"{zeroshot['retention_interval'][1]:.3f}] over {', '.join(zeroshot['retention_tasks'])}"
                    if "retention" in zeroshot else "")
        near = f"; near chance (left out): {', '.join(zeroshot['near_chance'])}" if zeroshot.get("near_chance") else ""
        click.echo(f"zero-shot average acc: {average}{retained}{near}")
    if "model_dir" in info:
        click.echo(f"model: {runner.ws.root / info['model_dir']}")
    click.echo(f"report: {report.state.output / 'report.json'}")


@main.command()
@click.argument("pipeline", type=click.Path())
@workspace_option
@click.option("-v", "--verbose", is_flag=True, help="one line per partition")
@one_line_errors
def status(pipeline: str, workspace: str | None, verbose: bool) -> None:
    """Show every stage: done / stale (with the reason) / missing / incomplete / running / corrupt,
    and the workspace size; exit 1 when a partition is corrupt."""
    from stagepipe.engine.gc import tree_size

    config = _load(pipeline)
    root = _workspace(config, workspace)
    entries = _print_status(_runner(config, root, pipeline), verbose)
    click.echo(f"workspace {root}: {_size(tree_size(root / 'stages') if (root / 'stages').is_dir() else 0)}")
    corrupt = [e.ref for e in entries if e.state.status == "corrupt"]
    if corrupt:
        click.echo(f"error: {len(corrupt)} corrupt partition(s), e.g. {corrupt[0]}; `stagepipe run` redoes them", err=True)
        sys.exit(1)


@main.command()
@click.argument("pipelines", nargs=-1, required=True, type=click.Path())
@workspace_option
@click.option("--yes", is_flag=True, help="delete what is listed (default: only list it)")
@one_line_errors
def gc(pipelines: tuple[str, ...], workspace: str | None, yes: bool) -> None:
    """List (or delete with --yes) every output of the workspace that none of PIPELINES' current
    keys use, outputs moved aside, and what dead runs left behind."""
    from stagepipe.engine import gc as garbage

    configs = [_load(p) for p in pipelines]
    roots = {_workspace(c, workspace).resolve() for c in configs}
    if len(roots) > 1:
        raise InputError(f"the pipelines use different workspaces ({', '.join(sorted(map(str, roots)))}); give -w")
    root = roots.pop()
    runners = [_runner(c, root, p) for c, p in zip(configs, pipelines, strict=True)]

    def collect() -> list:
        keep: dict = {}
        keep_stages: set[str] = set()
        for runner in runners:
            entries = runner.states()
            keep_stages |= set(runner.stages) - {e.ref.stage for e in entries}
            for entry in entries:
                if entry.key is None:
                    keep[entry.ref] = None
                elif keep.get(entry.ref, set()) is not None:
                    keep.setdefault(entry.ref, set()).add(entry.key)
        return garbage.find_garbage(runners[0].ws, keep, keep_stages)

    def show(items: list) -> None:
        for item in items:
            click.echo(f"{_size(item.size):>10}  {item.path.relative_to(root)}  ({item.why})")

    if not yes:
        items = collect()
        show(items)
        click.echo(f"{len(items)} item(s), {_size(sum(i.size for i in items))} reclaimable in {root}; "
                   "run with --yes to delete")
        return
    with runners[0].ws.lock():  # no run of this workspace is in flight while we delete
        items = collect()
        show(items)
        freed = garbage.delete(items)
    click.echo(f"deleted {len(items)} item(s), freed {_size(freed)} in {root}")


def _size(value: float) -> str:
    return f"{value / 2**30:.2f} GB" if value >= 2**27 else f"{value / 2**20:.1f} MB"


@main.command("delta-export")
@click.argument("pipeline", type=click.Path())
@click.argument("out", type=click.Path())
@workspace_option
@one_line_errors
def delta_export(pipeline: str, out: str, workspace: str | None) -> None:
    """Write a delta method's compressed delta alone (re-hashed against its manifests) to OUT."""
    from stagepipe.stagekit.artifacts import layer_index
    from stagepipe.stages.delta import export_delta

    config = _load(pipeline)
    runner = _runner(config, _workspace(config, workspace), pipeline)
    entries = {e.ref: e for e in runner.states(deep=True)}
    layers = [r for r in entries if r.stage == "delta"]
    if not layers or any(entries[r].state.status != "done" for r in layers):
        raise StagepipeError(f"{pipeline}: the delta stage is not done (a delta method's pipeline, run first)")
    outputs = {layer_index(r.partition): entries[r].state.output for r in layers}
    layout = runner.ctx.plan.layout
    index = export_delta(config, outputs, {i: layout.layer_prefix(i) for i in outputs}, Path(out))
    click.echo(f"wrote {out}: {len(outputs)} layer(s), {index['stored_bytes']:,} bytes of delta")


@main.command("delta-apply")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("delta", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@one_line_errors
def delta_apply(base: str, delta: str, out: str) -> None:
    """Add an exported delta (DELTA) to a base model directory (BASE), written to OUT."""
    from stagepipe.stages.delta import apply_delta

    apply_delta(Path(base), Path(delta), Path(out))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("pipeline", type=click.Path())
@workspace_option
@one_line_errors
def verify(pipeline: str, workspace: str | None) -> None:
    """Re-hash every finished output against its manifest; exit 1 if any differs."""
    config = _load(pipeline)
    runner = _runner(config, _workspace(config, workspace), pipeline)
    bad = 0
    checked = 0
    for entry in runner.states(deep=True):
        if entry.state.status == "corrupt":
            bad += 1
            click.echo(f"CORRUPT {entry.ref}: {entry.state.reason}")
        elif entry.state.status == "done":
            checked += 1
    click.echo(f"verified {checked} partition(s), {bad} corrupt")
    if bad:
        sys.exit(1)


@main.command()
@click.argument("pipeline", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "dot"]), default="text",
              help="text: one line per stage; dot: Graphviz")
@one_line_errors
def dag(pipeline: str, fmt: str) -> None:
    """Print the DAG of PIPELINE as the code derives it: the stages it runs, in order, each with
    the stages (and payloads) it reads; ``*`` marks a stage that joins by its own choice."""
    from stagepipe.stagekit.dag import describe, problems, to_dot
    from stagepipe.stages import discover

    config = _load(pipeline)
    click.echo(to_dot(config) if fmt == "dot" else describe(config))
    facts = discover(config, {})
    found = problems(config, facts) if facts is not None else []
    if found:
        raise StagepipeError(f"{len(found)} declaration(s) disagree, e.g. {found[0]}")


@main.command()
@one_line_errors
def methods() -> None:
    """List the registered methods (method.name) and allocation policies (allocation.policy)."""
    from stagepipe.allocation import POLICIES
    from stagepipe.methods import METHODS

    click.echo("methods (method.name) and their kind:")
    for name, cls in sorted(METHODS.items()):
        kind = cls.kind().__name__ if cls.kind() is not None else "metric pair"
        click.echo(f"  {name:<14} {kind:<20} {cls.summary()}")
    click.echo("allocation policies (allocation.policy):")
    for name, cls in sorted(POLICIES.items()):
        click.echo(f"  {name:<14} {cls.summary()}")


if __name__ == "__main__":
    main()
