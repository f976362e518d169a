"""Which stages a pipeline needs, asked of its method and policy objects (never of their names).

The engine runs exactly ``Needs.stage_names()``; the dry-run estimate lists exactly the same
names; a stage's dependencies name only stages that are part of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagepipe.allocation import POLICIES
from stagepipe.methods import Method, make_method

#: every stage, in execution order
ORDER = ("snapshot", "tokenize", "capture", "fisher", "decompose", "sensitivity", "train", "allocate", "structure", "residual",
         "anchor", "refit", "assemble", "evaluate", "report")


@dataclass(frozen=True)
class Needs:
    method: Method
    capture: bool  # block-by-block forward: input statistics and/or stored block inputs
    fisher: bool  # gradient statistics
    sensitivity: bool  # the policy reads a per-matrix sensitivity table
    residual: bool  # the method's factors depend on the allocated rank
    refit: bool  # least-squares refit on propagated inputs
    anchor: bool  # the method's factors are fitted layer by layer on propagated inputs (AA-SVD)
    structure: bool = False  # smaller dense matrices instead of two factors (MoDeGPT): no decompose
    learned: bool = False  # ranks learned on the whole model (SoCo, Dobi-SVD): from ``train``
    learned_factors: bool = False  # ``train`` writes the final factors too (SoCo)
    #: the input Grams come from fisher's recording pass instead of capture (``gram_in_fisher``)
    gram_in_fisher: bool = False

    @property
    def capture_stats(self) -> frozenset[str]:
        """The input statistics ``capture`` records: the method's, less the Grams fisher records."""
        return self.method.activation_stats - ({"gram"} if self.gram_in_fisher else set())


    def stage_names(self) -> list[str]:
        optional = {"capture": self.capture, "fisher": self.fisher, "sensitivity": self.sensitivity,
                    "residual": self.residual, "anchor": self.anchor, "refit": self.refit,
                    "decompose": not self.structure, "structure": self.structure, "train": self.learned}
        return [name for name in ORDER if optional.get(name, True)]


def needs(config: Any) -> Needs:
    method = make_method(config.method)
    policy = POLICIES[config.allocation.policy]
    refit = bool(config.method.refit)
    # sensitivity starts from stored block inputs; refit and anchor read the original model's block inputs
    anchor = method.sequential
    capture = bool(method.activation_stats) or method.needs_gradients or refit or anchor or policy.needs_sensitivity
    # Fisher walks the blocks backwards after capture walked them forwards, so Grams recorded by
    # capture would all wait on disk for the whole walk (32 × 1.4 GB on a 7B model). When only fisher
    # and decompose read them, fisher records them in its recording pass instead: the same inputs
    # of the same blocks, summed the same way, one layer at a time.
    others = method.structured or anchor or policy.needs_sensitivity or method.post_allocation
    gram_in_fisher = "gram" in method.activation_stats and method.needs_gradients and not others
    return Needs(method=method, capture=capture, fisher=method.needs_gradients, sensitivity=policy.needs_sensitivity,
                 residual=method.post_allocation, refit=refit, anchor=anchor,
                 structure=method.structured, learned=method.learned is not None,
                 learned_factors=method.learned_factors, gram_in_fisher=gram_in_fisher)
