"""MoDeGPT's three module decompositions (Lin et al., ICLR 2025): shrink the *inner* dimension of a
pair of consecutive matrices, so the result is smaller dense matrices with no extra factor.

All in float64, in torch's (out, in) weight orientation; ``gram`` is the input Gram ``Σ x xᵀ`` of the
module pair (the attention input for Q·K and V·O, the MLP intermediate ``h = act(W_g x) ⊙ W_u x``
for the MLP), as ``capture`` stores it. No inverse is formed.

- **Type I, MLP (Nyström).** Keep the ``k`` intermediate neurons ``S`` of largest ridge leverage
  ``diag(C (C + λI)⁻¹)``; ``W_g' = W_g[S]``, ``W_u' = W_u[S]`` and ``W_d' = W_d C[:,S] C[S,S]⁻¹``,
  which is the least-squares fit of ``W_d h`` from ``h_S`` over the calibration tokens
  (a rank-deficient ``C[S,S]`` gets the minimum-norm solution; its numerical rank is recorded).
- **Type II, Q·K (CR decomposition).** Per KV group, score each RoPE pair ``(j, j + d_h/2)`` by
  ``‖K_pair‖ · Σ_{h in group} ‖Q_h,pair‖`` (norms over the calibration tokens, ``‖C^{1/2} w‖``;
  a pair's norm is unchanged by the rotation) and keep the top pairs in Q and K alike. A pair
  stays whole, so the rotation of a kept coordinate still meets its partner; a K head shared by
  several Q heads keeps one set for the group. ``rope_index`` says which coordinates survive.
- **Type III, V·O (weighted SVD).** Per KV group, the stacked products ``[W_o,h W_v,g]_{h in g}``
  under the input metric ``C``: ``W_v,g' = Σ^{1/2} V_kᵀ C^{-1/2}``, ``W_o,h' = (U_k Σ^{1/2})_h``,
  so the shared V head keeps one basis for all its Q heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stagepipe.errors import MetricError
from stagepipe.geometry import BlockGeometry
from stagepipe.linalg import factor_metric, reproducible, weighted_svd

Tensor = torch.Tensor


@dataclass(frozen=True)
class Heads:
    """Attention geometry: ``n_heads`` query heads share ``n_kv_heads`` key/value heads."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def check(self) -> None:
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise MetricError(f"unsupported attention geometry {self}: heads must split evenly into KV groups "
                              "and the head dimension must be even (RoPE pairs)")


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def ridge_leverage(gram: Tensor, ridge_rel: float) -> Tensor:
    """``diag(C (C + λI)⁻¹)`` with ``λ = ridge_rel · trace(C)/n``, from ``C``'s eigen-decomposition."""
    c = _f64(gram)
    eigenvalues, basis = torch.linalg.eigh(0.5 * (c + c.T))
    eigenvalues = eigenvalues.clamp_min(0)
    lam = ridge_rel * float(eigenvalues.sum()) / c.shape[0]
    if lam <= 0:
        raise MetricError("the intermediate Gram is zero: no neuron can be ranked")
    return (basis**2) @ (eigenvalues / (eigenvalues + lam))


def nystrom_mlp(w_gate: Tensor, w_up: Tensor, w_down: Tensor, gram: Tensor, keep: int,
                ridge_rel: float) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Type I: ``(W_g', W_u', W_d', info)`` keeping ``keep`` neurons (their original order)."""
    d_ff = gram.shape[0]
    if not 0 < keep <= d_ff:
        raise MetricError(f"cannot keep {keep} of {d_ff} intermediate neurons")
    c, w_d = _f64(gram), _f64(w_down)
    scores = ridge_leverage(c, ridge_rel)
    kept = torch.sort(torch.topk(scores, keep).indices).values
    c_ss, c_sa = c[kept][:, kept], c[kept]
    target = c_sa @ w_d.T  # C[S,:] W_dᵀ = H_S (W_d H)ᵀ
    # rows of W_d' ᵀ solve C[S,S] X = C[S,:] W_dᵀ: the normal equations of min ‖W_d H − W_d' H_S‖
    solution = torch.linalg.lstsq(c_ss.cpu(), target.cpu(), rcond=1e-12, driver="gelsd")
    w_down_new = solution.solution.T.to(w_down.device)
    # ‖W_d H‖² and, at the least-squares optimum, ‖W_d H − W_d' H_S‖² = ‖W_d H‖² − ⟨W_d' H_S, W_d H⟩
    total = float(torch.trace(w_d @ c @ w_d.T))
    info = {"kept_neurons": keep, "of": d_ff, "css_rank": int(solution.rank),
            "dropped_output_energy": total - float(torch.trace(w_down_new @ target)),
            "total_output_energy": total}
    return _f64(w_gate)[kept], _f64(w_up)[kept], w_down_new, info


def _row_norms(w: Tensor, gram: Tensor) -> Tensor:
    """``‖C^{1/2} w_i‖`` for every row ``w_i`` of ``w``: the i-th output's norm over the tokens."""
    return ((w @ gram) * w).sum(dim=1).clamp_min(0).sqrt()


def qk_pair_scores(w_q: Tensor, w_k: Tensor, gram: Tensor, heads: Heads) -> Tensor:
    """CR score of each RoPE pair in each KV group, shape ``(n_kv_heads, head_dim/2)``."""
    heads.check()
    half = heads.head_dim // 2
    c = _f64(gram)

    def pair_norms(w: Tensor, n: int) -> Tensor:
        sq = _row_norms(_f64(w), c).pow(2).view(n, 2, half)
        return sq.sum(dim=1).sqrt()  # (n, half): ‖(x_j, x_{j+half})‖

    q = pair_norms(w_q, heads.n_heads).view(heads.n_kv_heads, heads.group, half).sum(dim=1)
    k = pair_norms(w_k, heads.n_kv_heads)
    return q * k


def cr_qk(w_q: Tensor, w_k: Tensor, gram: Tensor, heads: Heads, keep_pairs: int) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Type II: ``(W_q', W_k', rope_index, info)`` keeping ``keep_pairs`` RoPE pairs per KV group.

    ``rope_index`` (``n_kv_heads × 2·keep_pairs``) lists the kept coordinates of each group as
    ``[P, P + head_dim/2]`` with ``P`` ascending, so the reduced head is again "first halves, then
    second halves" and ``rotate_half`` pairs the same coordinates as before."""
    half = heads.head_dim // 2
    if not 0 < keep_pairs <= half:
        raise MetricError(f"cannot keep {keep_pairs} of {half} RoPE pairs per head")
    scores = qk_pair_scores(w_q, w_k, gram, heads)
    pairs = torch.sort(torch.topk(scores, keep_pairs, dim=1).indices, dim=1).values
    rope_index = torch.cat([pairs, pairs + half], dim=1)  # (n_kv, 2·keep_pairs)
    q_rows = torch.stack([h * heads.head_dim + rope_index[h // heads.group] for h in range(heads.n_heads)])
    k_rows = torch.stack([g * heads.head_dim + rope_index[g] for g in range(heads.n_kv_heads)])
    total = float(scores.sum())
    info = {"kept_pairs": keep_pairs, "of": half,
            "kept_score_fraction": float(scores.gather(1, pairs).sum()) / total if total > 0 else 1.0}
    return _f64(w_q)[q_rows.flatten()], _f64(w_k)[k_rows.flatten()], rope_index, info


def svd_vo(w_v: Tensor, w_o: Tensor, gram: Tensor, heads: Heads, keep: int,
           floor_rel: float) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Type III: ``(W_v', W_o', info)`` with head dimension ``keep`` for values and outputs."""
    d_h = heads.head_dim
    if not 0 < keep <= d_h:
        raise MetricError(f"cannot keep {keep} of {d_h} value dimensions per head")
    root = factor_metric(_f64(gram), floor_rel, "attention input Gram")
    w_v, w_o = _f64(w_v), _f64(w_o)
    hidden = w_o.shape[0]
    v_new, o_new = [], torch.empty(hidden, heads.n_heads * keep, dtype=torch.float64, device=w_o.device)
    dropped = total = 0.0
    for g in range(heads.n_kv_heads):
        members = range(g * heads.group, (g + 1) * heads.group)
        v_g = w_v[g * d_h:(g + 1) * d_h]
        stacked = torch.cat([w_o[:, h * d_h:(h + 1) * d_h] @ v_g for h in members])  # (group·hidden, in)
        svd = weighted_svd(stacked, None, root)
        up, down = svd.factors(keep)
        v_new.append(down)
        for i, h in enumerate(members):
            o_new[:, h * keep:(h + 1) * keep] = up[i * hidden:(i + 1) * hidden]
        dropped += svd.dropped_energy(keep)
        total += float((svd.sigma**2).sum())
    info = {"kept_dims": keep, "of": d_h, "dropped_energy": dropped, "total_energy": total,
            "metric_repair": root.repair if root is not None else None}
    return torch.cat(v_new), o_new, info


#: the linears of a Llama-family block that MoDeGPT rewrites, by name relative to the block
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class BlockDims:
    """Inner dimensions of one compressed block (``qk_dim`` counts coordinates: 2 per RoPE pair)."""

    intermediate_size: int
    qk_dim: int
    vo_dim: int

    def as_dict(self) -> dict[str, int]:
        return {"intermediate_size": self.intermediate_size, "qk_dim": self.qk_dim, "vo_dim": self.vo_dim}


@reproducible
def compress_block(weights: dict[str, Tensor], attention_gram: Tensor, intermediate_gram: Tensor, heads: Heads,
                   dims: BlockDims, ridge_rel: float, floor_rel: float) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The reduced block: ``{"<linear>.weight": …, "self_attn.rope_index": …}`` (float64) and per-type info."""
    w = {name: weights[f"{name}.weight"] for name in BLOCK_LINEARS}
    gate, up, down, mlp = nystrom_mlp(w["mlp.gate_proj"], w["mlp.up_proj"], w["mlp.down_proj"], intermediate_gram,
                                      dims.intermediate_size, ridge_rel)
    q, k, rope_index, qk = cr_qk(w["self_attn.q_proj"], w["self_attn.k_proj"], attention_gram, heads, dims.qk_dim // 2)
    v, o, vo = svd_vo(w["self_attn.v_proj"], w["self_attn.o_proj"], attention_gram, heads, dims.vo_dim, floor_rel)
    tensors = {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down,
               "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
               "self_attn.o_proj.weight": o, "self_attn.rope_index": rope_index}
    return tensors, {"mlp": mlp, "qk": qk, "vo": vo}


@dataclass(frozen=True)
class StructuredBlock:
    """The dense sizes of one Llama-family block, and what a ``BlockDims`` leaves of them."""

    hidden: int
    intermediate: int
    heads: Heads

    def full(self) -> BlockDims:
        return BlockDims(self.intermediate, self.heads.head_dim, self.heads.head_dim)

    def shapes(self, dims: BlockDims) -> dict[str, tuple[int, int]]:
        """(rows, columns) of every rewritten linear at ``dims`` (torch's out × in)."""
        h, nq, nkv = self.hidden, self.heads.n_heads, self.heads.n_kv_heads
        return {"self_attn.q_proj": (nq * dims.qk_dim, h), "self_attn.k_proj": (nkv * dims.qk_dim, h),
                "self_attn.v_proj": (nkv * dims.vo_dim, h), "self_attn.o_proj": (h, nq * dims.vo_dim),
                "mlp.gate_proj": (dims.intermediate_size, h), "mlp.up_proj": (dims.intermediate_size, h),
                "mlp.down_proj": (h, dims.intermediate_size)}

    def params(self, dims: BlockDims) -> int:
        return sum(r * c for r, c in self.shapes(dims).values())


def structured_block_of(config: Any) -> StructuredBlock:
    """``StructuredBlock`` of a Hugging Face Llama-family config (sizes from ``geometry.BlockGeometry``)."""
    shapes = BlockGeometry.of(config)
    heads = Heads(shapes.heads, shapes.kv_heads, shapes.head_dim)
    heads.check()
    return StructuredBlock(shapes.d, shapes.ff, heads)


def spend_structured_budget(geometry: StructuredBlock, fractions: list[float], kept: float, align: int) -> list[BlockDims]:
    """Inner dimensions per block for per-layer kept ``fractions`` (each type shrunk alike: the
    intermediate size to a multiple of ``align``, whole RoPE pairs, value dims), then the total
    brought to the largest value ≤ ``kept`` of all blocks' weights that ``align``-steps of the
    intermediate sizes reach: over budget, the block most above its share gives a step back;
    under, the block most below its share takes one while it fits."""
    full = geometry.full()
    half = full.qk_dim // 2
    dims = []
    for f in fractions:
        ff = min(full.intermediate_size, max(align, int(f * full.intermediate_size) // align * align))
        dims.append(BlockDims(ff, 2 * min(half, max(1, round(f * half))), min(full.vo_dim, max(1, round(f * full.vo_dim)))))
    per_block = geometry.params(full)
    budget = kept * per_block * len(fractions)
    step = 3 * geometry.hidden * align

    def excess(i: int) -> float:
        return geometry.params(dims[i]) / per_block - fractions[i]

    def resized(i: int, delta: int) -> BlockDims:
        d = dims[i]
        return BlockDims(d.intermediate_size + delta, d.qk_dim, d.vo_dim)

    spent = sum(geometry.params(d) for d in dims)
    while spent > budget + 1e-9:
        shrinkable = [i for i, d in enumerate(dims) if d.intermediate_size - align >= align]
        if not shrinkable:
            raise MetricError(f"kept fraction {kept} is out of reach with intermediate sizes of {align}")
        i = max(shrinkable, key=excess)
        dims[i], spent = resized(i, -align), spent - step
    while spent + step <= budget + 1e-9:
        growable = [i for i, d in enumerate(dims) if d.intermediate_size + align <= full.intermediate_size]
        if not growable:
            break
        i = min(growable, key=excess)
        dims[i], spent = resized(i, align), spent + step
    return dims
