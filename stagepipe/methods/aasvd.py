"""AA-SVD (Sinha & Fleuret, arXiv 2604.02119): the anchored, shift-aware layer objective and
block-level refinement, one decoder layer at a time (docs/methods.md).

For each linear with dense inputs ``Y`` (the original model's) and shifted inputs ``Ŷ`` (produced
by the already-compressed layers below and, inside the block, the already-compressed linears
before it), the factors solve ``min_{rank Ŵ ≤ r} ‖Pᵀ (W Y − Ŵ Ŷ)‖_F²`` in closed form
(``linalg.anchored_svd``, reduced-rank regression). ``Ŷ = Y`` gives SVD-LLM (identity × gram) or,
with ``output_metric: kfac_out``, K-FAC-SVD: ``closed_form: input_aware`` takes exactly that closed
form (the paper's objective ②, its final method with refinement and the official default), so the
refinement starts from SVD-LLM's (K-FAC-SVD's) factors and trains them on the shifted inputs. ``anchor_weight`` α mixes the cross term
``α·Y Ŷᵀ + (1−α)·Ŷ Ŷᵀ``: 1 is the paper's anchored objective, 0 re-whitens on the shifted inputs
only (its "objective 3").

Ranks come from the allocation policy on ``decompose``'s spectra of the base pair (the dense
inputs' Gram, like SVD-LLM); the ``anchor`` stage then computes the factors in layer order.
With ``refine_epochs > 0`` each block's factors are trained (Adam, fp32) to match the dense
block's output on the shifted inputs, keeping the best epoch by calibration block-output error,
so refinement never makes that error worse; ``refine_norms`` trains the block's norm weights too,
``refine_dense`` the target linears the allocation kept dense (the official code trains every
block parameter).
``refine_metric: kfac_out`` measures that error as ``δᵀ F δ`` with ``F = E[g gᵀ]`` the K-FAC
factor of the gradient at the block output (the second-order change of the loss) instead of ``‖δ‖²``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from stagepipe.methods.base import GradientOptions, SequentialMethod, register


class AASVDConfig(GradientOptions):
    """Anchored reduced-rank regression on shifted inputs, optional block refinement."""

    name: Literal["aasvd"]
    output_metric: Literal["identity", "kfac_out"] = Field(
        "identity", description="left (output-side) metric: identity, or the K-FAC output factor E[δδᵀ] (needs fisher)")
    closed_form: Literal["shift_aware", "input_aware"] = Field(
        "shift_aware", description="the layer objective of the closed form: shift_aware (reduced-rank regression on the "
                                   "shifted inputs, mixed by anchor_weight: the paper's ④ / ③), or input_aware (the "
                                   "paper's ②, SVD-LLM's on the dense inputs, or K-FAC-SVD's with kfac_out; the "
                                   "official code's default), which the refinement then trains on the shifted inputs")
    anchor_weight: float = Field(1.0, ge=0, le=1, description="α in the cross term α·YŶᵀ + (1−α)·ŶŶᵀ (1: anchored)")
    refine_epochs: int = Field(0, ge=0, description="epochs of block-output refinement per layer (0: closed form only)")
    refine_lr: float = Field(1e-4, gt=0, description="peak Adam learning rate of the refinement")
    refine_warmup: float = Field(0.1, ge=0, lt=1, description="share of refinement steps with linear warm-up")
    refine_clip: float = Field(1.0, gt=0, description="gradient-norm clip of the refinement")
    refine_batch: int | None = Field(None, ge=1, description="calibration windows per refinement step "
                                                             "(default: runtime.batch_size)")
    refine_metric: Literal["euclidean", "kfac_out"] = Field(
        "euclidean", description="block-output error the refinement minimises: Euclidean (the paper), or weighted "
                                 "by the K-FAC factor E[ggᵀ] of the block-output gradient (second-order loss change; "
                                 "needs fisher)")
    refine_norms: bool = Field(
        False, description="also train the block's normalisation weights (the official code trains every block "
                           "parameter, norms included); they are stored with the factors and assembled")

    refine_dense: bool = Field(
        False, description="also train the target linears the allocation keeps dense, in every block the refinement "
                           "runs (the official code trains every block parameter); stored with the factors and "
                           "assembled")

    @model_validator(mode="after")
    def _no_refit(self) -> AASVDConfig:
        if self.refit:
            raise ValueError("method.refit: aasvd already fits every linear on the propagated inputs; remove refit")
        if self.refine_metric != "euclidean" and not self.refine_epochs:
            raise ValueError("method.refine_metric: only the refinement uses it; set refine_epochs > 0 or remove it")
        if self.closed_form == "input_aware" and self.anchor_weight != 1.0:
            raise ValueError("method.anchor_weight: only the shift-aware closed form mixes the cross term; "
                             "remove it or set closed_form: shift_aware")
        if self.refine_dense and not self.refine_epochs:
            raise ValueError("method.refine_dense: only the refinement trains dense linears; set refine_epochs > 0 or "
                             "remove it")
        if self.refine_norms and not self.refine_epochs:
            raise ValueError("method.refine_norms: only the refinement trains norms; set refine_epochs > 0 or remove it")
        return self


@register
class AASVD(SequentialMethod):
    """AA-SVD: anchored reduced-rank regression on shifted inputs, layer by layer (+ block refinement)."""

    name = "aasvd"
    config = AASVDConfig
    right = "gram"

    def pair(self) -> tuple[str, str]:
        return self.cfg.output_metric, self.right

    @property
    def gradient_stats(self) -> frozenset[str]:
        """The pair's statistics, plus ``kfac_out`` when the refinement is weighted by it."""
        extra = {"kfac_out"} if self.cfg.refine_metric == "kfac_out" else set()
        return super().gradient_stats | extra

    def sequential_options(self) -> dict[str, Any]:
        """What shapes the ``anchor`` stage's factors beyond the ranks (its key)."""
        cfg = self.cfg
        options: dict[str, Any] = {"pair": list(self.pair()), "floor_rel": cfg.floor_rel, "anchor_weight": cfg.anchor_weight,
                                   "refine_epochs": cfg.refine_epochs}
        if cfg.refine_epochs:
            options.update(refine_lr=cfg.refine_lr, refine_warmup=cfg.refine_warmup, refine_clip=cfg.refine_clip,
                           refine_batch=cfg.refine_batch)
            if cfg.refine_metric != "euclidean":  # keyed only when set: Euclidean refinements keep their keys
                options["refine_metric"] = cfg.refine_metric
            if cfg.refine_norms:  # likewise
                options["refine_norms"] = True
            if cfg.refine_dense:  # likewise
                options["refine_dense"] = True
        if cfg.svd_dtype != "float64":
            options["svd_dtype"] = cfg.svd_dtype
        if cfg.closed_form != "shift_aware":  # keyed only when set: shift-aware runs keep their keys
            options["closed_form"] = cfg.closed_form
        return options
