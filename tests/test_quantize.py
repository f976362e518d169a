"""Quantisation maths: GPTQ against an explicit column loop and least squares, RTN on its own grid,
packing bit for bit, and the byte accounting against what is packed."""

from __future__ import annotations

import pytest
import torch

from stagepipe.quantize import (
    Grid,
    codes,
    dequantize,
    dequantize_stored,
    fit,
    gptq,
    inverse_cholesky_upper,
    pack,
    rtn,
    stored_bytes,
    stored_tensors,
    unpack,
)


def problem(m: int = 6, n: int = 40, tokens: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)[:, None]
    x[3] = x[1] + 0.01 * x[3]  # correlated inputs: error feedback matters
    return torch.randn(m, n, generator=g, dtype=torch.float64), x, x @ x.T / tokens


def explicit_gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ as the paper states it, one column at a time, no blocks: (codes, dequantised); ``static``
    fits each group's scale on the original weights (llm-compressor)."""
    original, w = w, w.clone()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # the explicit inverse, fine for a reference
    size = grid.group_size or w.shape[1]
    q, out = torch.empty_like(w), torch.empty_like(w)
    for j in range(w.shape[1]):
        if j % size == 0:
            scale, zero = fit((original if static else w)[:, j:j + size], grid)
        q[:, j:j + 1] = codes(w[:, j:j + 1], scale, zero, grid)
        out[:, j:j + 1] = dequantize(q[:, j:j + 1], scale, zero)
        error = (w[:, j] - out[:, j]) / u[j, j]
        w[:, j + 1:] -= error[:, None] * u[j, j + 1:][None, :]
    return q, out


@pytest.mark.parametrize("grid", [Grid(3, 8), Grid(2, 8, symmetric=True), Grid(4, None), Grid(3, None, symmetric=True)],
                         ids=["3b-g8", "2b-g8-sym", "4b-channel", "3b-channel-sym"])
@pytest.mark.parametrize("static", [False, True], ids=["sequential-scales", "static-scales"])
def test_gptq_in_blocks_equals_the_explicit_column_loop(grid: Grid, static: bool) -> None:
    w, _, h = problem()
    ours = gptq(w, h, grid, damp=0.0, block=16, static_scales=static)
    q, out = explicit_gptq(w, h, grid, static)
    assert torch.equal(ours.codes, q)
    torch.testing.assert_close(ours.weight, out, rtol=0, atol=1e-12)
    assert ours.repairs == {"dead_columns": 0, "damp_added": 0.0}


def test_gptq_error_feedback_is_the_least_squares_update() -> None:
    """After column 0 is quantised, the update of the other columns is the explicit least-squares
    refit of the layer's outputs on the remaining inputs."""
    w, x, h = problem(m=3, n=5, tokens=50)
    grid = Grid(2, None)
    w_ref = w.clone()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    scale, zero = fit(w, grid)
    q0 = dequantize(codes(w[:, :1], scale, zero, grid), scale, zero)[:, 0]
    w_ref[:, 1:] -= ((w[:, 0] - q0) / u[0, 0])[:, None] * u[0, 1:][None, :]
    target = (w @ x - q0[:, None] * x[0][None, :]).T               # tokens × m
    rest = torch.linalg.lstsq(x[1:].T, target).solution.T          # m × (n − 1)
    torch.testing.assert_close(w_ref[:, 1:], rest, rtol=0, atol=1e-10)


def test_inverse_cholesky_never_inverts_h_yet_gives_its_inverse() -> None:
    _, _, h = problem()
    u = inverse_cholesky_upper(h)
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.T @ u @ h, torch.eye(h.shape[0], dtype=h.dtype), rtol=0, atol=1e-9)


def test_gptq_beats_round_to_nearest_in_its_own_loss() -> None:
    """On correlated inputs (as a layer's are), error feedback buys a large share of the loss."""
    w, x, _ = problem(m=16, n=64)
    mix = torch.randn(64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 8 + torch.eye(64)
    x = mix @ x
    h = x @ x.T / x.shape[1]
    for grid in (Grid(3, 16), Grid(2, None)):
        def loss(q) -> float:
            d = w - q.weight
            return float(torch.trace(d @ h @ d.T))
        assert loss(gptq(w, h, grid, damp=0.01)) < 0.8 * loss(rtn(w, grid))


def test_act_order_keeps_codes_in_place_and_groups_follow_the_order() -> None:
    w, _, h = problem(m=4, n=32)
    grid = Grid(3, 8)
    result = gptq(w, h, grid, act_order=True, block=16)
    assert not torch.equal(result.order, torch.arange(32))
    index = result.group_index()
    rebuilt = (result.codes - result.zeros.gather(1, index.expand(4, -1))) * result.scales.gather(1, index.expand(4, -1))
    torch.testing.assert_close(rebuilt, result.weight, rtol=0, atol=0)


def test_dead_inputs_are_repaired_and_counted_never_zeroed() -> None:
    w, _, h = problem(m=3, n=8)
    h[2, :] = 0
    h[:, 2] = 0
    result = gptq(w, h, Grid(4, None))
    assert result.repairs["dead_columns"] == 1 and result.repairs["damp_added"] > 0
    assert torch.count_nonzero(result.weight[:, 2]) > 0


def test_rtn_reproduces_weights_that_lie_on_its_grid() -> None:
    """Weights dequantised from a 4-bit asymmetric grid in groups of 32 come back exactly from RTN
    on the same grid (SmolLM2's Q4_1 blocks are close to that: a comparison there is rigged)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (5, 64), generator=g).double()
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15  # every group spans its grid
    scale = (torch.rand(5, 2, generator=g, dtype=torch.float64) + 0.01).to(torch.float16).double()
    zero = torch.randint(1, 15, (5, 2), generator=g).double()  # integer zero points: the range holds 0
    w = torch.cat([(q[:, :32] - zero[:, :1]) * scale[:, :1], (q[:, 32:] - zero[:, 1:]) * scale[:, 1:]], 1)
    assert torch.equal(rtn(w, Grid(4, 32)).weight, w)
    assert not torch.equal(rtn(w, Grid(4, 128 // 2 + 1)).weight, w)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trips_bit_for_bit(bits: int) -> None:
    values = torch.randint(0, 1 << bits, (1 + 37 * bits,), generator=torch.Generator().manual_seed(bits))
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-values.numel() * bits // 8)
    assert torch.equal(unpack(packed, bits, values.numel()), values)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(torch.tensor([1 << bits]), bits)


@pytest.mark.parametrize("grid", [Grid(3, 16), Grid(2, None, symmetric=True), Grid(4, 128), Grid(3, 7)])
def test_stored_bytes_are_what_is_stored_and_it_unpacks_bit_for_bit(grid: Grid) -> None:
    """compressed-tensors' layout: ``stored_bytes`` is the bytes of the tensors ``stored_tensors``
    writes, and unpacking them gives the quantised weights exactly."""
    w, _, h = problem(m=9, n=40)
    quantized = gptq(w, h, grid)
    tensors = stored_tensors(quantized)
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored_bytes(9, 40, grid)
    assert torch.equal(dequantize_stored(tensors, grid), quantized.weight)


#: the accelerator when there is one (its path is what these tests are for), else the host (CI: the same calls)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_a_gpu_stays_there_and_matches_the_host(act_order: bool) -> None:
    """The quantise stage runs the sweep on the model's device: every tensor follows the inputs,
    the stored form (host memory) decodes to the weights, and the result is the host's up to the
    float64 rounding of a different Cholesky (a flipped code at most here and there). Without a
    GPU the same calls run on the host."""
    w, _, h = problem(m=32, n=256, tokens=1200)
    grid = Grid(3, 64)
    host = gptq(w, h, grid, act_order=act_order)
    device = gptq(w.to(DEVICE), h.to(DEVICE), grid, act_order=act_order)
    assert {t.device.type for t in (device.codes, device.scales, device.zeros, device.weight, device.order)} == {DEVICE}
    back = device.cpu()
    if not act_order:  # act-order groups cannot be stored (compressed-tensors ignores a group index)
        assert torch.equal(dequantize_stored(stored_tensors(device), grid), back.weight)
    assert float((back.codes == host.codes).double().mean()) > 0.99

    def loss(q: torch.Tensor) -> float:
        return float(((w - q) @ h * (w - q)).sum())

    assert loss(back.weight) == pytest.approx(loss(host.weight), rel=0.02)
    assert torch.equal(rtn(w.to(DEVICE), grid).cpu().weight, rtn(w, grid).weight)  # elementwise: identical
