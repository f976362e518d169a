"""Any left metric with any right metric, e.g. GFWSVD's output factor × the SVD-LLM input Gram."""

from typing import Literal

from pydantic import Field

from stagepipe.methods.base import GradientOptions, Method, register
from stagepipe.methods.metrics import LEFT, RIGHT


class MixedConfig(GradientOptions):
    """Any left (output-side) metric with any right (input-side) metric."""

    name: Literal["mixed"]
    left: Literal[tuple(LEFT)]  # type: ignore[valid-type]
    right: Literal[tuple(RIGHT)]  # type: ignore[valid-type]
    alpha: float = Field(0.5, gt=0, le=2, description="exponent of act_mean / act_max")


@register
class Mixed(Method):
    """Any named left metric with any named right metric."""

    name = "mixed"
    config = MixedConfig

    def pair(self) -> tuple[str, str]:
        return self.cfg.left, self.cfg.right
