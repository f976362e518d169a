"""MoDeGPT's module decompositions against brute force on small data."""

from __future__ import annotations

import pytest
import torch

from stagepipe.structured import Heads, cr_qk, nystrom_mlp, qk_pair_scores, ridge_leverage, svd_vo

torch.manual_seed(0)


def _mlp(d: int = 12, d_ff: int = 20, tokens: int = 200):
    w_gate, w_up, w_down = torch.randn(d_ff, d, dtype=torch.float64), torch.randn(d_ff, d, dtype=torch.float64), \
        torch.randn(d, d_ff, dtype=torch.float64)
    x = torch.randn(tokens, d, dtype=torch.float64)
    h = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)  # (tokens, d_ff)
    return w_gate, w_up, w_down, x, h


def test_nystrom_keeping_every_neuron_is_the_mlp_itself() -> None:
    w_gate, w_up, w_down, _, h = _mlp()
    gate, up, down, info = nystrom_mlp(w_gate, w_up, w_down, h.T @ h, keep=20, ridge_rel=1e-2)
    torch.testing.assert_close(gate, w_gate)
    torch.testing.assert_close(up, w_up)
    torch.testing.assert_close(down, w_down)
    assert info["css_rank"] == 20 and abs(info["dropped_output_energy"]) < 1e-8 * info["total_output_energy"]


def test_nystrom_down_projection_is_the_least_squares_fit_on_the_calibration_tokens() -> None:
    w_gate, w_up, w_down, x, h = _mlp()
    gate, up, down, info = nystrom_mlp(w_gate, w_up, w_down, h.T @ h, keep=7, ridge_rel=1e-2)
    kept = [int(torch.nonzero((w_gate == row).all(dim=1))[0]) for row in gate]
    assert kept == sorted(kept) and len(set(kept)) == 7
    torch.testing.assert_close(up, w_up[kept])
    # brute force: min_D ‖h W_dᵀ − h_S Dᵀ‖ over the tokens, by explicit least squares
    brute = torch.linalg.lstsq(h[:, kept], h @ w_down.T).solution.T
    torch.testing.assert_close(down, brute, rtol=1e-7, atol=1e-9)
    h_small = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    residual = ((h @ w_down.T - h_small @ down.T) ** 2).sum()
    assert float(residual) == pytest.approx(info["dropped_output_energy"], rel=1e-6)


def test_ridge_leverage_matches_its_definition() -> None:
    a = torch.randn(30, 8, dtype=torch.float64)
    gram = a.T @ a
    lam = 0.3 * torch.trace(gram) / 8
    expected = torch.diag(gram @ torch.linalg.solve(gram + lam * torch.eye(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)))
    torch.testing.assert_close(ridge_leverage(gram, 0.3), expected)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _scores(w_q, w_k, x, heads: Heads, index=None):
    """Attention logits of every Q head with its K head, with RoPE at positions 0..T-1."""
    t, d_h = x.shape[0], heads.head_dim
    inv = 1.0 / (10000 ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h))
    angles = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    k_dim = w_q.shape[0] // heads.n_heads
    q = (x @ w_q.T).view(t, heads.n_heads, k_dim)
    k = (x @ w_k.T).view(t, heads.n_kv_heads, k_dim)
    out = []
    for h in range(heads.n_heads):
        g = h // heads.group
        idx = torch.arange(d_h) if index is None else index[g]
        qh, kg = _rotate(q[:, h], cos[:, idx], sin[:, idx]), _rotate(k[:, g], cos[:, idx], sin[:, idx])
        out.append(qh @ kg.T)
    return torch.stack(out)


def test_cr_keeping_every_pair_gives_the_dense_attention_logits_under_gqa() -> None:
    heads = Heads(n_heads=6, n_kv_heads=2, head_dim=8)
    w_q, w_k = torch.randn(48, 10, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    x = torch.randn(9, 10, dtype=torch.float64)
    q, k, index, info = cr_qk(w_q, w_k, x.T @ x, heads, keep_pairs=4)
    torch.testing.assert_close(_scores(q, k, x, heads, index), _scores(w_q, w_k, x, heads))
    assert info["kept_score_fraction"] == pytest.approx(1.0)


def test_cr_keeps_rope_pairs_whole_and_one_set_per_kv_group() -> None:
    heads = Heads(n_heads=6, n_kv_heads=2, head_dim=8)
    w_q, w_k = torch.randn(48, 10, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    x = torch.randn(50, 10, dtype=torch.float64)
    q, k, index, _ = cr_qk(w_q, w_k, x.T @ x, heads, keep_pairs=2)
    assert q.shape == (6 * 4, 10) and k.shape == (2 * 4, 10) and index.shape == (2, 4)
    for g in range(2):
        pairs = index[g, :2]
        assert torch.equal(index[g, 2:], pairs + 4)  # partners kept with each pair
        best = torch.topk(qk_pair_scores(w_q, w_k, x.T @ x, heads)[g], 2).indices
        assert set(pairs.tolist()) == set(best.tolist())
        for h in range(g * 3, g * 3 + 3):  # every Q head of the group keeps the group's coordinates
            torch.testing.assert_close(q[h * 4:(h + 1) * 4], w_q[h * 8 + index[g]])
    # the logits of the reduced heads are those of the dense heads restricted to the kept pairs
    reduced = _scores(q, k, x, heads, index)
    mask = torch.zeros(2, 8, dtype=torch.float64)
    mask.scatter_(1, index, 1.0)
    masked_q = (w_q.view(6, 8, 10) * mask.repeat_interleave(3, dim=0)[..., None]).view(48, 10)
    torch.testing.assert_close(reduced, _scores(masked_q, w_k, x, heads))


def test_pair_scores_are_norms_over_the_tokens() -> None:
    heads = Heads(n_heads=2, n_kv_heads=1, head_dim=4)
    w_q, w_k = torch.randn(8, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(40, 5, dtype=torch.float64)
    q, k = x @ w_q.T, x @ w_k.T
    expected = torch.zeros(2, dtype=torch.float64)
    for j in range(2):
        k_norm = k[:, [j, j + 2]].norm()
        expected[j] = k_norm * sum(q[:, [h * 4 + j, h * 4 + j + 2]].norm() for h in range(2))
    torch.testing.assert_close(qk_pair_scores(w_q, w_k, x.T @ x, heads)[0], expected)


def test_vo_svd_at_full_head_dim_reproduces_every_head_product() -> None:
    heads = Heads(n_heads=4, n_kv_heads=2, head_dim=6)
    w_v, w_o = torch.randn(12, 10, dtype=torch.float64), torch.randn(10, 24, dtype=torch.float64)
    x = torch.randn(40, 10, dtype=torch.float64)
    v, o, info = svd_vo(w_v, w_o, x.T @ x, heads, keep=6, floor_rel=1e-12)
    for h in range(4):
        g = h // 2
        torch.testing.assert_close(o[:, h * 6:(h + 1) * 6] @ v[g * 6:(g + 1) * 6],
                                   w_o[:, h * 6:(h + 1) * 6] @ w_v[g * 6:(g + 1) * 6])
    assert info["dropped_energy"] < 1e-18 * info["total_energy"] + 1e-12


def test_vo_svd_truncated_loss_is_the_dropped_weighted_energy() -> None:
    heads = Heads(n_heads=2, n_kv_heads=1, head_dim=6)
    w_v, w_o = torch.randn(6, 10, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64)
    x = torch.randn(40, 10, dtype=torch.float64)
    v, o, info = svd_vo(w_v, w_o, x.T @ x, heads, keep=3, floor_rel=1e-12)
    loss = sum(((x @ (w_o[:, h * 6:(h + 1) * 6] @ w_v).T - x @ (o[:, h * 3:(h + 1) * 3] @ v).T) ** 2).sum()
               for h in range(2))
    assert float(loss) == pytest.approx(info["dropped_energy"], rel=1e-8)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval().double()


def _grams(model, ids):
    """Per block: the attention input Gram and the MLP intermediate Gram, from forward hooks."""
    grams: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def record(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[key] = grams.get(key, 0) + x.T @ x
        return record

    handles = []
    for i, block in enumerate(model.model.layers):
        handles.append(block.self_attn.q_proj.register_forward_pre_hook(hook((i, "attn"))))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(hook((i, "mlp"))))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return grams


def _structured(model, dims, ids):
    from stagepipe.models.modeling_structured import StructuredLlamaConfig, StructuredLlamaForCausalLM
    from stagepipe.structured import BlockDims, compress_block

    grams = _grams(model, ids)
    config = StructuredLlamaConfig(structured_layers=[dims.as_dict()] * 2, **model.config.to_dict())
    small = StructuredLlamaForCausalLM(config).eval().double()
    state = {k: v for k, v in model.state_dict().items() if "layers." not in k}
    heads = Heads(6, 2, 8)
    for i, block in enumerate(model.model.layers):
        local = dict(block.state_dict())
        tensors, _ = compress_block(local, grams[(i, "attn")], grams[(i, "mlp")], heads, dims, 1e-2, 1e-12)
        local.update(tensors)
        state.update({f"model.layers.{i}.{k}": v for k, v in local.items()})
    missing, unexpected = small.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    assert isinstance(BlockDims, type)
    return small


def test_structured_model_keeping_everything_has_the_dense_logits_with_and_without_cache() -> None:
    from stagepipe.structured import BlockDims

    model = _tiny_llama()
    ids = torch.randint(0, 64, (3, 12))
    small = _structured(model, BlockDims(intermediate_size=40, qk_dim=8, vo_dim=8), ids)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(ids).logits)
        dense = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        reduced = small.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(dense, reduced)


def test_structured_model_with_smaller_dims_runs_and_cached_decoding_matches_a_full_forward(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from stagepipe.structured import BlockDims

    model = _tiny_llama()
    ids = torch.randint(0, 64, (3, 12))
    small = _structured(model, BlockDims(intermediate_size=16, qk_dim=4, vo_dim=3), ids)
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (6 * 4, 24)
    with torch.no_grad():
        out = small.generate(ids[:1, :5], max_new_tokens=5, do_sample=False)
        full = small(out[:, :-1]).logits[0, 4:].argmax(-1)
    assert torch.equal(out[0, 5:], full)  # the KV cache of reduced heads gives the uncached greedy path
    small.save_pretrained(tmp_path)
    import shutil

    from stagepipe.models import modeling_structured

    shutil.copy(modeling_structured.__file__, tmp_path / "modeling_structured.py")
    import json

    data = json.loads((tmp_path / "config.json").read_text())
    data["auto_map"] = {"AutoConfig": "modeling_structured.StructuredLlamaConfig",
                        "AutoModelForCausalLM": "modeling_structured.StructuredLlamaForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.double()(ids).logits, small(ids).logits)


def test_block_influence_fractions_average_to_the_target_respect_the_cap_and_favour_influential_blocks() -> None:
    from stagepipe.methods.modegpt import MoDeGPT, MoDeGPTConfig

    method = MoDeGPT(MoDeGPTConfig(name="modegpt", temperature=0.05, min_layer_kept=0.3))
    influence = [0.9, 0.05, 0.1, 0.02, 0.3]
    kept = method.layer_kept(influence, 0.6)
    assert sum(kept) / 5 == pytest.approx(0.6, abs=1e-9)
    assert min(kept) >= 0.3 - 1e-12 and max(kept) <= 1.0
    order = sorted(range(5), key=lambda i: influence[i])
    assert [kept[i] for i in order] == sorted(kept)  # more influence, more kept
    uniform = MoDeGPT(MoDeGPTConfig(name="modegpt", layer_allocation="uniform"))
    assert uniform.layer_kept(influence, 0.6) == [0.6] * 5


def test_structured_budget_is_spent_to_within_one_step_and_never_exceeded() -> None:
    from stagepipe.structured import StructuredBlock, spend_structured_budget

    geometry = StructuredBlock(hidden=576, intermediate=1536, heads=Heads(9, 3, 64))
    fractions = [0.5, 0.7, 0.9, 0.6]
    dims = spend_structured_budget(geometry, fractions, 0.675, align=8)
    total = sum(geometry.params(d) for d in dims)
    budget = 0.675 * 4 * geometry.params(geometry.full())
    assert budget - 3 * 576 * 8 < total <= budget
    assert all(d.qk_dim % 2 == 0 and d.intermediate_size % 8 == 0 for d in dims)
    assert [d.vo_dim for d in dims] == [round(f * 64) for f in fractions]


def test_a_structured_method_with_another_policy_is_one_clear_error(write_pipeline) -> None:
    from stagepipe.config import load_pipeline
    from stagepipe.errors import ConfigError

    pipeline = write_pipeline("m", method={"name": "modegpt"}, allocation={"policy": "global_greedy"})
    with pytest.raises(ConfigError, match="allocation.policy.*modegpt"):
        load_pipeline(pipeline)
