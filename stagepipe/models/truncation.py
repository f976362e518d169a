"""Dobi-SVD's differentiable activation truncation: a soft mask on the spectrum of each window's
activations, through an SVD whose backward pass stays finite for near-degenerate singular values.

The textbook SVD gradient carries ``F_ij = 1/(σ_j² − σ_i²)``, which explodes when two singular
values meet — exactly what happens to the activations of a trained network, whose spectra have
long flat tails. For a *spectral* function ``U diag(f(σ)) Vᵀ`` the true gradient is finite there
(the divided differences ``(f(σ_i) − f(σ_j))/(σ_i − σ_j)`` are), so the blow-up is an artefact of
the factor-wise chain rule. As Dobi-SVD (arXiv 2502.02723, after Wang et al.'s robust
differentiable SVD) does, pairs whose relative gap is below ``gap`` use the truncated geometric
series ``1/(λ_j − λ_i) ≈ (1/λ_j) Σ_{k<K} (λ_i/λ_j)^k`` (``λ = σ²``, ``λ_i < λ_j``), which is
bounded by ``K/λ_j``; well-separated pairs use the exact term. The price is a bias: the coupling
inside a near-degenerate pair is dropped (tested: finite where autograd's is ~1e8, exact where the
spectrum is separated).

``TruncatedLinear`` computes ``y = x Wᵀ``, and for each window ``A = U diag(σ) Vᵀ`` of it returns
``U diag(σ ⊙ T(γ)) Vᵀ + b`` with one trainable truncation position per matrix; in dense mode it is
the plain linear (the KL teacher). Modules are swapped on the model instance.

**Units.** The trained parameter is the kept fraction ``g`` of a rank. A window of ``t`` tokens has
at most ``c = min(t, k)`` components (``k = min(m, n)``, the weight's rank bound), so the mask sits
at ``γ_window = g·c`` on the window's spectrum, and the weight keeps ``g·k`` components. When
``k > t`` this is the official code's conversion (γ trained in window units, rank ``γ·k/t``); when
``k ≤ t`` (SmolLM2's k/v at 256 tokens) the two units agree, where the official code divides by
``int(k/t) = 0``. Kept in weight units instead, the mask of a matrix with ``g·k ≥ t`` lies past the
window's last component, and its gradient is exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from stagepipe.linalg import single_threaded
from stagepipe.models.layout import swap_modules, weight_matrix


def truncation_mask(gamma: Tensor, k: int, beta: float) -> Tensor:
    """``T_i = ½ tanh(β(γ − i)) + ½`` for ``i = 0 … k−1`` (about ``γ`` components pass)."""
    index = torch.arange(k, dtype=gamma.dtype, device=gamma.device)
    return 0.5 * torch.tanh(beta * (gamma - index)) + 0.5


def inverse_gaps(sigma: Tensor, gap: float = 1e-3, terms: int = 10) -> Tensor:
    """``F_ij ≈ 1/(σ_j² − σ_i²)`` (0 on the diagonal), series-expanded where ``|λ_j − λ_i| < gap·max(λ)``."""
    lam = sigma * sigma
    li, lj = lam[:, None], lam[None, :]
    diff = lj - li
    exact = 1.0 / torch.where(diff == 0, torch.ones_like(diff), diff)
    big, small = torch.maximum(li, lj), torch.minimum(li, lj)
    ratio = small / big.clamp(min=torch.finfo(lam.dtype).tiny)
    series = sum(ratio**k for k in range(terms)) / big.clamp(min=torch.finfo(lam.dtype).tiny)
    series = torch.where(lj >= li, series, -series)
    close = diff.abs() < gap * lam.max().clamp(min=torch.finfo(lam.dtype).tiny)
    out = torch.where(close, series, exact)
    return out.fill_diagonal_(0.0)


def _svd_by_gram(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD through the float64 eigen-decomposition of the Gram of ``a``'s shorter side
    (``A Aᵀ`` for a window of fewer tokens than outputs): 4× faster than a float32 SVD of
    256 × 1536 on the 2-core CPU, and exact to float64 rounding of σ² (σ below ~1e-8·σ₁ are noise,
    and they are the ones the mask drops). Returned in ``a``'s dtype."""
    a64 = a.double()
    wide = a.shape[0] <= a.shape[1]
    gram = a64 @ a64.T if wide else a64.T @ a64
    with single_threaded():  # LAPACK: the same bits with any thread count
        lam, vectors = torch.linalg.eigh(gram)
    lam, vectors = lam.flip(0).clamp(min=0), vectors.flip(1)
    s = lam.sqrt()
    inverse = torch.where(s > s[0] * 1e-12, 1.0 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    other = (a64.T @ vectors if wide else a64 @ vectors) * inverse
    u, v = (vectors, other) if wide else (other, vectors)
    return u.to(a.dtype), s.to(a.dtype), v.to(a.dtype)


class StableSVD(torch.autograd.Function):
    """Thin SVD ``A = U diag(σ) Vᵀ`` (A p×q) with the stabilised backward pass."""

    @staticmethod
    def forward(ctx, a: Tensor, gap: float = 1e-3, terms: int = 10) -> tuple[Tensor, Tensor, Tensor]:
        u, s, v = _svd_by_gram(a)
        ctx.save_for_backward(u, s, v)
        ctx.gap, ctx.terms = gap, terms
        return u, s, v

    @staticmethod
    def backward(ctx, gu: Tensor | None, gs: Tensor | None, gv: Tensor | None):
        u, s, v = ctx.saved_tensors
        k = s.shape[-1]
        gu = torch.zeros_like(u) if gu is None else gu
        gs = torch.zeros_like(s) if gs is None else gs
        gv = torch.zeros_like(v) if gv is None else gv
        f = inverse_gaps(s, ctx.gap, ctx.terms)
        ut_gu, vt_gv = u.T @ gu, v.T @ gv
        j = f * (ut_gu - ut_gu.T)
        kk = f * (vt_gv - vt_gv.T)
        inner = torch.diag(gs) + j * s[None, :] + s[:, None] * kk
        grad = u @ inner @ v.T
        s_inv = torch.where(s > 0, 1.0 / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        if u.shape[0] > k:  # the parts of gU, gV outside the column spaces
            grad = grad + (gu - u @ ut_gu) * s_inv[None, :] @ v.T
        if v.shape[0] > k:
            grad = grad + u @ (s_inv[:, None] * (gv - v @ vt_gv).T)
        return grad, None, None


def stable_svd(a: Tensor, gap: float = 1e-3, terms: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, σ, V)`` of a 2-D ``a`` with the stabilised backward pass (``StableSVD``)."""
    return StableSVD.apply(a, gap, terms)


class TruncatedLinear(nn.Module):
    """A linear whose per-window activations are truncated at a learned kept fraction ``g``: at
    ``g·min(t, k)`` of a ``t``-token window's components, standing for rank ``g·k`` (module docstring)."""

    def __init__(self, linear: nn.Module, fraction: float, beta: float, gap: float, terms: int) -> None:
        super().__init__()
        self.register_buffer("weight", weight_matrix(linear).detach().clone(), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.k = min(self.weight.shape)  # the weight's rank bound
        self.fraction = nn.Parameter(torch.tensor(float(fraction)))  # g, float32: γ = g·k
        self.beta, self.gap, self.terms = beta, gap, terms
        self.dense = False

    @property
    def gamma(self) -> Tensor:
        """The truncation position in the weight's components, ``g·k``: the rank it stands for."""
        return self.fraction * self.k

    def window_position(self, tokens: int) -> Tensor:
        """The mask's position on the spectrum of a window of ``tokens`` tokens, ``g·min(tokens, k)``."""
        return self.fraction * min(tokens, self.k)

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight)
        if not self.dense:
            rows = []
            position = self.window_position(y.shape[-2])
            for window in y.reshape(-1, y.shape[-2], y.shape[-1]):
                u, s, v = stable_svd(window.float(), self.gap, self.terms)
                mask = truncation_mask(position, s.shape[-1], self.beta)
                rows.append(((u * (s * mask)) @ v.T).to(y.dtype))
            y = torch.stack(rows).reshape(y.shape)
        return y if self.bias is None else y + self.bias


def install_truncation(model: nn.Module, names: list[str], fractions: Mapping[str, float], beta: float, gap: float,
                       terms: int) -> dict[str, TruncatedLinear]:
    """Swap each named linear for a ``TruncatedLinear`` starting at ``fractions[name]``; every other
    parameter of the model is frozen."""
    return swap_modules(model, names, lambda name, old: TruncatedLinear(old, fractions[name], beta, gap, terms))
