"""Rank allocation policies (``allocation.policy``): spectra + target → ranks per matrix.

Every module of this package except ``base`` defines one policy and registers it with
``@register``; importing the package imports them all, so adding a policy is adding one module.
"""

import importlib
import pkgutil
from typing import Any

from stagepipe.allocation.base import (
    DEFAULT_POLICY,
    POLICIES,
    Candidate,
    MatrixSpectrum,
    Policy,
    PolicyConfig,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def make_policy(cfg: Any, sensitivity: list[Candidate] | None = None) -> Policy:
    """The configured policy (``cfg`` is the pipeline's ``allocation`` block; ``sensitivity`` the
    ``sensitivity`` stage's table, for policies that need it)."""
    return POLICIES[cfg.policy].from_config(cfg, sensitivity)


__all__ = ["DEFAULT_POLICY", "POLICIES", "Candidate", "MatrixSpectrum", "Policy", "PolicyConfig", "make_policy", "register"]
