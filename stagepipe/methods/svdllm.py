"""SVD-LLM and SVD-LLM V2: right metric ``E[x xᵀ]`` (input Gram), left identity.

The truncation loss equals ``‖(W − Ŵ) X‖_F²/N`` exactly (docs/methods.md). Whitening is the
eigen-decomposition with a relative floor (V2's range-space form) for both: a rank-deficient Gram
is handled and recorded instead of failing a Cholesky. V2 differs in its allocation policy
(``allocation.policy: svdllm_v2``).
"""

from typing import Literal

from stagepipe.methods.base import Method, MethodConfig, register


class SVDLLMConfig(MethodConfig):
    name: Literal["svdllm"]


class SVDLLMV2Config(MethodConfig):
    """SVD-LLM V2's whitening (eigen, range-space safe); pair it with ``allocation.policy: svdllm_v2``."""

    name: Literal["svdllm_v2"]


@register
class SVDLLM(Method):
    """SVD-LLM: whitened by the input Gram E[xxᵀ] (identity × gram)."""

    name = "svdllm"
    config = SVDLLMConfig
    right = "gram"


@register
class SVDLLMV2(Method):
    """SVD-LLM V2's whitening (identity × gram); pair it with the svdllm_v2 policy."""

    name = "svdllm_v2"
    config = SVDLLMV2Config
    right = "gram"
