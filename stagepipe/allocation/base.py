"""What a policy sees (each target matrix's shape and full weighted spectrum), the policy base
class, and the registry.

A policy is one module: its config model (a subclass of ``PolicyConfig`` whose ``policy`` is a
``Literal``) and its ``Policy`` subclass decorated with ``@register``. Stages ask the policy
class what it needs (``needs_sensitivity``), never its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from stagepipe.schema import Strict


@dataclass(frozen=True)
class MatrixSpectrum:
    name: str  # full module name, e.g. model.layers.3.mlp.up_proj
    m: int
    n: int
    sigma: torch.Tensor  # weighted singular values, descending


@dataclass(frozen=True)
class Candidate:
    """One row of the ``sensitivity`` table: a matrix truncated to a candidate kept fraction."""

    matrix: str  # full module name
    kept: float  # the candidate kept fraction ρ
    rank: int  # its aligned rank
    ppl: float  # calibration perplexity with only this matrix truncated


class PolicyConfig(Strict):
    """Options every policy has."""

    policy: str
    align: int = Field(8, ge=1, description="every rank is a multiple of this")


class Policy(ABC):
    name: ClassVar[str]
    config: ClassVar[type[PolicyConfig]]
    #: the policy reads the ``sensitivity`` stage's table (so that stage is part of the pipeline)
    needs_sensitivity: ClassVar[bool] = False

    def __init__(self, align: int) -> None:
        self.align = align

    @classmethod
    def from_config(cls, cfg: Any, sensitivity: list[Candidate] | None = None) -> Policy:
        return cls(cfg.align)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def details(self) -> dict[str, Any] | None:
        """What the last ``allocate`` decided beyond the ranks (for the report), if anything."""
        return None

    @abstractmethod
    def allocate(self, spectra: list[MatrixSpectrum], kept_fraction: float) -> dict[str, int | None]:
        """Rank per matrix (``None``: leave dense), each a multiple of ``align`` below break-even."""


def layer_of(name: str) -> int:
    """Decoder block index of a full module name (its first integer component)."""
    return next(int(part) for part in name.split(".") if part.isdigit())


POLICIES: dict[str, type[Policy]] = {}
#: the policy of a pipeline whose ``allocation`` block names none
DEFAULT_POLICY = "uniform"


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: add a policy to ``POLICIES`` under its config's ``policy`` literal."""
    declared = cls.config.model_fields["policy"].annotation.__args__[0]
    if declared != cls.name:
        raise TypeError(f"{cls.__name__}: config policy {declared!r} != policy name {cls.name!r}")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise TypeError(f"policy {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls
