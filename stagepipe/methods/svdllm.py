"""SVD-LLM and SVD-LLM V2: right metric ``E[x xᵀ]`` (input Gram), left identity.

The truncation loss equals ``‖(W − Ŵ) X‖_F²/N`` exactly (algorithms notes §2.4). Whitening is the
eigen-decomposition with a relative floor (V2's range-space form) for both: a rank-deficient Gram
is handled and recorded instead of failing a Cholesky. V2 differs in its allocation policy
(``allocation.policy: svdllm_v2``).
"""

from stagepipe.methods.base import Method


class SVDLLM(Method):
    name = "svdllm"
    right = "gram"


class SVDLLMV2(Method):
    name = "svdllm_v2"
    right = "gram"
