"""Plain truncated SVD: identity metrics on both sides (Eckart–Young in Frobenius norm)."""

from stagepipe.methods.base import Method


class SVD(Method):
    name = "svd"
