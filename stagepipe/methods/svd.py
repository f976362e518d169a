"""Plain truncated SVD: identity metrics on both sides (Eckart–Young in Frobenius norm)."""

from typing import Literal

from stagepipe.methods.base import Method, MethodConfig, register


class SVDConfig(MethodConfig):
    name: Literal["svd"]


@register
class SVD(Method):
    """Plain truncated SVD of W (identity × identity)."""

    name = "svd"
    config = SVDConfig
