"""Kronecker-factored Fisher: recovery, sign/scale invariance, clean-up, full-Fisher brute force."""

from __future__ import annotations

import pytest
import torch

from stagepipe.kron import clean_factors, full_fisher, nkp_power_iteration
from stagepipe.linalg import factor_metric, weighted_loss, weighted_svd


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return x @ x.T + 0.5 * torch.eye(n, dtype=torch.float64)


def kron_gradients(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample gradients with vec(G) ~ N(0, B ⊗ A): G = L_A Z L_Bᵀ."""
    a, b = spd(m, seed + 1), spd(n, seed + 2)
    z = torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.cholesky(a) @ z @ torch.linalg.cholesky(b).T, a, b


def source_of(grads: torch.Tensor, batch: int = 64):
    return lambda: iter([{"w": grads[i : i + batch].float()} for i in range(0, len(grads), batch)])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / x.norm() / y.norm())


def test_recovers_known_kronecker_factors() -> None:
    grads, a, b = kron_gradients(6, 5, 4000)
    res = nkp_power_iteration(source_of(grads), {"w": torch.eye(5, dtype=torch.float64)}, 30, 1e-10)["w"]
    ca, cb, _ = clean_factors(res.A, res.B, 1e-10)
    assert cosine(ca, a) > 0.998 and cosine(cb, b) > 0.998
    # and the product matches the population Fisher up to sampling error
    assert torch.linalg.norm(torch.kron(cb, ca) - torch.kron(b, a)) / torch.linalg.norm(torch.kron(b, a)) < 0.1


def test_power_iteration_matches_svd_of_rearranged_fisher() -> None:
    grads = torch.randn(50, 4, 3, dtype=torch.float64)
    rearranged = sum(torch.kron(g, g) for g in grads) / len(grads)
    u, s, vh = torch.linalg.svd(rearranged)
    res = nkp_power_iteration(source_of(grads, 7), {"w": torch.eye(3, dtype=torch.float64)}, 200, 1e-12)["w"]
    assert abs(cosine(u[:, 0].reshape(4, 4), res.A)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.linalg.norm(res.B)) == pytest.approx(float(s[0]), rel=1e-5)


def test_sign_and_scale_invariance() -> None:
    grads, _, _ = kron_gradients(5, 4, 300)
    res = nkp_power_iteration(source_of(grads), {"w": torch.eye(4, dtype=torch.float64)}, 50, 1e-12)["w"]
    base = clean_factors(res.A, res.B, 1e-8)
    for sign, scale in [(-1.0, 1.0), (1.0, 7.5), (-1.0, 0.01)]:
        a, b, info = clean_factors(sign * scale * res.A, sign * res.B / scale, 1e-8)
        assert torch.allclose(a, base[0], atol=1e-10) and torch.allclose(b, base[1], atol=1e-8)
        assert float(torch.trace(a)) == pytest.approx(5.0)
        assert info.get("sign_flipped", False) == (sign < 0)


def test_near_singular_factor_is_repaired_and_recorded_not_identity() -> None:
    a = torch.diag(torch.tensor([1.0, 1e-12, -1e-9, 0.5], dtype=torch.float64))
    b = spd(3, 4)
    ca, cb, info = clean_factors(a, b, 1e-6)
    assert info["A"]["n_negative"] == 1 and info["A"]["floored_fraction"] == pytest.approx(0.5)
    assert not torch.allclose(ca / ca.diagonal().mean(), torch.eye(4, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(ca).min()) > 0


def test_unusable_side_is_reported() -> None:
    a, b, info = clean_factors(spd(3, 1), -spd(2, 2), 1e-6)
    assert a is not None and b is None and "B_unusable" in info


def test_gfwsvd_loss_and_full_fisher_diagnostics() -> None:
    """Weighted loss = Σ dropped σ̃², and under the full Fisher GFWSVD beats plain SVD on Kronecker data."""
    grads, _, _ = kron_gradients(6, 5, 400, seed=3)
    res = nkp_power_iteration(source_of(grads), {"w": torch.eye(5, dtype=torch.float64)}, 50, 1e-10)["w"]
    ca, cb, _ = clean_factors(res.A, res.B, 1e-10)
    left, right = factor_metric(ca, 1e-12), factor_metric(cb, 1e-12)
    w = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    result = weighted_svd(w, left, right)
    fisher = full_fisher(grads)
    vec = lambda d: d.T.reshape(-1)  # noqa: E731
    for rank in (1, 2, 3):
        delta = w - result.reconstruct(rank)
        assert weighted_loss(delta, left, right) == pytest.approx(result.dropped_energy(rank), rel=1e-9)
        plain = w - weighted_svd(w, None, None).reconstruct(rank)
        assert vec(delta) @ fisher @ vec(delta) < vec(plain) @ fisher @ vec(plain)


def test_factored_products_equal_explicit_gradients() -> None:
    from stagepipe.kron import _products

    g = torch.Generator().manual_seed(5)
    d, x = torch.randn(3, 4, 9, generator=g), torch.randn(3, 4, 7, generator=g)  # T=4 < m=9, n=7
    grads = d.transpose(1, 2) @ x
    for side, y in (("A", torch.randn(7, 7, generator=g)), ("B", torch.randn(9, 9, generator=g))):
        y = y @ y.T
        assert torch.allclose(_products((d, x), y, side), _products(grads, y, side), rtol=1e-5, atol=1e-4)


def test_per_token_weighted_nkp_equals_the_explicit_per_token_formula() -> None:
    """``chunk_tokens: 1``: A = Dᵀ diag(w) D with w_t = x_tᵀ B x_t (and the mirror for B) equals
    Σ_t G_t B G_tᵀ over explicit rank-one gradients G_t = d_t x_tᵀ, and the power iteration on the
    weighted path finds the NKP of the explicit per-token Fisher (1/K) Σ_t vec(G_t) vec(G_t)ᵀ."""
    from stagepipe.kron import _products
    from stagepipe.stages.fisher.gradients import _chunks

    g = torch.Generator().manual_seed(8)
    d, x = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 4, generator=g)  # 3 windows × 5 tokens
    dt, xt = _chunks(d, 1), _chunks(x, 1)  # (15, 1, m), (15, 1, n)
    explicit = dt.transpose(1, 2).double() @ xt.double()  # (15, m, n) rank-one G_t
    for side, y in (("A", spd(4, 1)), ("B", spd(6, 2))):
        expected = sum(gt @ y @ gt.T if side == "A" else gt.T @ y @ gt for gt in explicit)
        assert torch.allclose(_products((dt, xt), y.float(), side), expected, rtol=1e-5, atol=1e-5)

    source = lambda: iter([{"w": (dt[:8], xt[:8])}, {"w": (dt[8:], xt[8:])}])  # noqa: E731
    res = nkp_power_iteration(source, {"w": torch.eye(4, dtype=torch.float64)}, 300, 1e-12)["w"]
    rearranged = sum(torch.kron(gt, gt) for gt in explicit) / len(explicit)
    u, s, _ = torch.linalg.svd(rearranged)
    assert abs(cosine(u[:, 0].reshape(6, 6), res.A)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.linalg.norm(res.B)) == pytest.approx(float(s[0]), rel=1e-5)
    fisher = full_fisher(explicit)
    per_token = sum(torch.kron(xt[i, 0, :, None].double() @ xt[i, 0, None].double(),
                               dt[i, 0, :, None].double() @ dt[i, 0, None].double()) for i in range(15)) / 15
    assert torch.allclose(fisher, per_token, atol=1e-10)  # the per-token Fisher is Σ (x xᵀ) ⊗ (d dᵀ)


def test_chunk_padding_keeps_gradients_exact() -> None:
    from stagepipe.stages.fisher.gradients import _chunks

    g = torch.Generator().manual_seed(6)
    d, x = torch.randn(2, 10, 5, generator=g), torch.randn(2, 10, 3, generator=g)
    dc, xc = _chunks(d, 4), _chunks(x, 4)  # 10 tokens → 3 chunks, the last padded with zeros
    per_chunk = (dc.transpose(1, 2) @ xc).view(2, 3, 5, 3).sum(1)
    assert torch.allclose(per_chunk, d.transpose(1, 2) @ x, atol=1e-5)


def test_interrupted_power_iteration_resumes_from_the_last_sweep(tmp_path) -> None:
    from stagepipe.stages.fisher import SweepCheckpoint

    grads, _, _ = kron_gradients(5, 4, 200, seed=7)
    warm = {"w": torch.eye(4, dtype=torch.float64)}
    full = nkp_power_iteration(source_of(grads), warm, 6, 0.0)["w"]
    passes = {"n": 0}

    def crashing_source():
        passes["n"] += 1
        if passes["n"] == 7:  # during sweep 4
            raise KeyboardInterrupt
        return source_of(grads)()

    checkpoint = SweepCheckpoint(tmp_path / ".resume-x")
    with pytest.raises(KeyboardInterrupt):
        nkp_power_iteration(crashing_source, warm, 6, 0.0, on_sweep=checkpoint.save)
    assert [p.name for p in (tmp_path / ".resume-x").iterdir()] == ["sweeps.safetensors"]  # one file: one atomic unit
    resumed_cp = SweepCheckpoint(tmp_path / ".resume-x")
    start = resumed_cp.load()
    assert resumed_cp.loaded_sweep == 3
    resumed = nkp_power_iteration(source_of(grads), warm, 6, 0.0, start=start)["w"]
    assert resumed.sweeps == 6 and resumed.history == full.history
    assert torch.equal(resumed.A, full.A) and torch.equal(resumed.B, full.B)  # exact resume, not allclose


def test_diagnostics_are_exact_on_an_exactly_kronecker_fisher() -> None:
    """With G_k = √K · L_A E_k L_Bᵀ over all K = m·n unit matrices, F = B ⊗ A exactly: the NKP error is
    0 and the Kronecker-predicted loss increase equals the full-Fisher quadratic. With B replaced by I
    the error is ‖B − I‖/‖B‖ (‖X ⊗ Y‖ = ‖X‖‖Y‖) and the prediction no longer matches."""
    from stagepipe.kron import diagnostics

    m, n = 4, 3
    a, b = spd(m, 11), spd(n, 12)
    la, lb = torch.linalg.cholesky(a), torch.linalg.cholesky(b)
    units = torch.eye(m * n, dtype=torch.float64).reshape(m * n, n, m).transpose(1, 2)  # E_k, column-major order
    grads = (m * n) ** 0.5 * la @ units @ lb.T
    assert torch.allclose(full_fisher(grads), torch.kron(b, a), atol=1e-12)
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = diagnostics(grads, a, b, w, 2, 1e-12)
    assert exact["nkp_rel_error"] < 1e-12
    assert exact["predicted_loss_increase"] == pytest.approx(exact["full_fisher_loss_increase"], rel=1e-9)
    assert exact["full_fisher_loss_increase"] < exact["full_fisher_loss_increase_plain_svd"]
    wrong = diagnostics(grads, a, torch.eye(n, dtype=torch.float64), w, 2, 1e-12)
    eye = torch.eye(n, dtype=torch.float64)
    assert wrong["nkp_rel_error"] == pytest.approx(float(torch.linalg.norm(b - eye) / torch.linalg.norm(b)), rel=1e-9)
    assert abs(wrong["predicted_loss_increase"] - wrong["full_fisher_loss_increase"]) > 1e-3 * wrong["full_fisher_loss_increase"]


def test_official_alpha_leaves_a_positive_definite_factor_alone_and_shrinks_an_indefinite_one() -> None:
    from stagepipe.errors import MetricError
    from stagepipe.linalg import official_alpha

    spd_matrix = spd(5, 21)
    same, info = official_alpha(spd_matrix)
    assert torch.equal(same, spd_matrix) and info == {"kind": "official_alpha", "alpha": 0.0, "tries": 0}
    indefinite = spd_matrix - 1.02 * float(torch.linalg.eigvalsh(spd_matrix).min()) * torch.eye(5, dtype=torch.float64)
    repaired, info = official_alpha(indefinite)
    mean = float(indefinite.diagonal().mean())
    # brute force: the first α of 1e-4, 1e-3, … whose shrunk matrix is positive definite
    shrunk = [(t, a, (1 - a) * indefinite + a * mean * torch.eye(5, dtype=torch.float64))
              for t, a in enumerate((1e-4, 1e-3, 1e-2, 1e-1), start=1)]
    tries, alpha, candidate = next(s for s in shrunk if bool(torch.linalg.eigvalsh(s[2]).min() > 0))
    assert info["tries"] == tries and info["alpha"] == pytest.approx(alpha) and torch.allclose(repaired, candidate)
    with pytest.raises(MetricError, match="not positive definite after 2"):
        official_alpha(-spd_matrix, tries=2)  # never silently replaced
    a, b, clean = clean_factors(spd(4, 1), spd(3, 2), 1e-6, "official_alpha")
    assert clean["A"]["kind"] == clean["B"]["kind"] == "official_alpha" and a is not None and b is not None
