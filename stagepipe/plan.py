"""Predicted disk, RAM and GPU memory per stage, from the model's shapes (``run --dry-run``)."""

from __future__ import annotations

import click

from stagepipe.config import PipelineConfig
from stagepipe.engine.stage import Context


def print_plan(config: PipelineConfig, ctx: Context) -> None:
    if ctx.model_config is None:
        click.echo("plan: the model config is not reachable offline; estimates appear once `snapshot` has run")
        return
    from stagepipe.planning import estimate

    rows = estimate(config, ctx.model_config)
    click.echo(f"\n{'stage':<12} {'disk':>10} {'RAM peak':>10} {'GPU peak':>10}  note")
    for row in rows:
        click.echo(f"{row.stage:<12} {_gb(row.disk):>10} {_gb(row.ram):>10} {_gb(row.gpu):>10}  {row.note}")


def _gb(value: float) -> str:
    return f"{value / 2**30:.2f} GB" if value >= 2**27 else f"{value / 2**20:.1f} MB"
