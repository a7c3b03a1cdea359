"""The low-rank algebra against dense float64 torch.

Every expectation is computed from the dense matrix ``L @ R`` with ``torch.linalg``; nothing here calls a
``fedlora.lowrank`` helper to produce a reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlora import lowrank
from fedlora.types import LoRAFactors, LowRank

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DTYPES = [torch.float64, torch.float32]
# Relative tolerances: float64 to ~1e-9 of the matrix norm, float32 to 1e-5.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def d64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def rand_lowrank(gen: torch.Generator, m: int, n: int, k: int, dtype,
                 true_rank: int | None = None) -> LowRank:
    """``L @ R`` with inner dimension ``k``; with ``true_rank`` the product has (at most) that rank."""
    if true_rank is None:
        left = torch.randn(m, k, generator=gen, dtype=torch.float64)
    else:
        left = torch.randn(m, true_rank, generator=gen, dtype=torch.float64) @ torch.randn(
            true_rank, k, generator=gen, dtype=torch.float64
        )
    right = torch.randn(k, n, generator=gen, dtype=torch.float64)
    return LowRank(left.to(dtype), right.to(dtype))


def dense(x: LowRank) -> torch.Tensor:
    return d64(x.left) @ d64(x.right)


def amax(t: torch.Tensor) -> float:
    """Largest absolute entry, 0 for an empty tensor."""
    return float(t.abs().max()) if t.numel() else 0.0


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t))


def assert_close_matrix(actual: torch.Tensor, expected: torch.Tensor, dtype, scale: float | None = None):
    """``||actual - expected||_F <= rtol * max(||expected||_F, scale)``."""
    ref = max(fro(expected), scale or 0.0, 1e-300)
    err = fro(d64(actual) - expected)
    assert err <= RTOL[dtype] * ref * 10, f"relative error {err / ref:.3e}"


dims = st.integers(1, 12)
inner_dims = st.integers(0, 8)
seeds = st.integers(0, 2**31 - 1)


@st.composite
def products(draw, min_k: int = 0):
    m, n = draw(dims), draw(dims)
    k = draw(st.integers(min_k, 8))
    return m, n, k, draw(seeds)


# ------------------------------------------------------------------ construction

def test_lowrank_rejects_factors_that_do_not_chain():
    with pytest.raises(ValueError, match="do not chain"):
        LowRank(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        LowRank(torch.zeros(3), torch.zeros(1, 4))


def test_zeros_is_the_zero_matrix():
    z = LowRank.zeros(3, 5, dtype=torch.float64)
    assert z.shape == (3, 5) and z.rank == 0
    assert torch.equal(z.dense(), torch.zeros(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=1), n_terms=st.integers(1, 4))
def test_concat_and_subtract_match_dense(dtype, spec, n_terms):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    terms = [rand_lowrank(gen, m, n, k, dtype) for _ in range(n_terms)]
    coeffs = (torch.rand(n_terms, generator=gen, dtype=torch.float64) * 4 - 2).tolist()
    expected = sum(c * dense(t) for c, t in zip(coeffs, terms))
    got = lowrank.concat(terms, coeffs)
    assert got.shape == (m, n) and got.rank == n_terms * k
    assert_close_matrix(got.dense(), expected, dtype)
    assert_close_matrix(lowrank.concat(terms).dense(), sum(dense(t) for t in terms), dtype)
    diff = lowrank.subtract(terms[0], terms[-1]).dense()
    assert_close_matrix(diff, dense(terms[0]) - dense(terms[-1]), dtype, scale=fro(dense(terms[0])))


def test_concat_rejects_mismatched_shapes_and_empty():
    with pytest.raises(ValueError):
        lowrank.concat([])
    with pytest.raises(ValueError):
        lowrank.concat([LowRank(torch.zeros(3, 1), torch.zeros(1, 4)),
                        LowRank(torch.zeros(4, 1), torch.zeros(1, 3))])


# ------------------------------------------------------------------ SVD and truncation

@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=0), deficient=st.booleans())
def test_svd_matches_dense_svd(dtype, spec, deficient):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = rand_lowrank(gen, m, n, k, dtype, true_rank=min(k, 1) if deficient else None)
    X = dense(x)
    u, s, vh = lowrank.svd(x)
    assert u.shape[0] == m and vh.shape[1] == n and u.shape[1] == s.numel() == vh.shape[0]
    assert s.numel() <= min(k, m, n)
    s_ref = torch.linalg.svdvals(X)
    norm = fro(X)
    tol = RTOL[dtype] * 10 * max(norm, 1e-300)
    # Singular values: the computed ones, padded with zeros, are the dense ones.
    padded = torch.zeros_like(s_ref)
    padded[: s.numel()] = d64(s)
    assert amax(padded - s_ref) <= tol
    assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())
    # Reconstruction and orthonormality.
    assert fro(d64(u) * d64(s) @ d64(vh) - X) <= tol
    if s.numel():
        eye = torch.eye(s.numel(), dtype=torch.float64)
        live = s_ref[: s.numel()] > tol  # directions with a well-defined singular vector
        uu = d64(u).mT @ d64(u)
        vv = d64(vh) @ d64(vh).mT
        assert amax((uu - eye)[live][:, live]) <= RTOL[dtype] * 100
        assert amax((vv - eye)[live][:, live]) <= RTOL[dtype] * 100


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", ["balanced", "left", "right"])
@given(spec=products(min_k=1), rank=st.integers(1, 6))
def test_truncate_is_eckart_young(dtype, split, spec, rank):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = rand_lowrank(gen, m, n, k, dtype)
    X = dense(x)
    s_ref = torch.linalg.svdvals(X)
    head, tail, tail_s = lowrank.truncate(x, rank, split)
    tol = RTOL[dtype] * 10 * fro(X)
    assert head.shape == (m, n) and head.rank == rank  # always the requested inner dimension
    # head + tail is x.
    assert fro(dense(head) + dense(tail) - X) <= tol
    # The head is the best rank-`rank` approximation: its error is the dense tail of singular values.
    tail_ref = math.sqrt(float(s_ref[rank:].square().sum()))
    assert abs(fro(X - dense(head)) - tail_ref) <= tol
    assert abs(math.sqrt(float(d64(tail_s).square().sum())) - tail_ref) <= tol
    assert abs(fro(dense(tail)) - tail_ref) <= tol
    head_s = torch.linalg.svdvals(dense(head))
    keep = min(rank, s_ref.numel())
    assert amax(head_s[:keep] - s_ref[:keep]) <= tol
    # The split: which factor carries the singular values.
    kept = min(rank, k, m, n)
    L, R = d64(head.left[:, :kept]), d64(head.right[:kept])
    live = s_ref[:kept] > tol
    eye = torch.eye(kept, dtype=torch.float64)
    if split == "left":
        assert amax((R @ R.mT - eye)[live][:, live]) <= RTOL[dtype] * 100
    elif split == "right":
        assert amax((L.mT @ L - eye)[live][:, live]) <= RTOL[dtype] * 100
    else:
        assert amax(L.mT @ L - R @ R.mT) <= tol


def test_truncate_pads_with_zero_directions_when_rank_exceeds_the_matrix():
    x = LowRank(torch.tensor([[1.0], [2.0]], dtype=torch.float64),
                torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64))
    head, tail, tail_s = lowrank.truncate(x, 3)
    assert head.rank == 3 and tail_s.numel() == 0
    assert torch.allclose(head.dense(), torch.tensor([[3.0, 4.0, 0.0], [6.0, 8.0, 0.0]], dtype=torch.float64))
    assert torch.equal(head.left[:, 1:], torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [3, 9])
def test_truncation_residual_is_how_far_head_plus_tail_is_from_x(dtype, k):
    """The residual of the small SVD bounds ``||x - head - tail||`` (dense float64) to the working precision,
    and ``head`` equals :func:`truncate`'s, on the factored and the dense path."""
    gen = torch.Generator().manual_seed(k)
    x = rand_lowrank(gen, 60, 50, k, dtype)
    assert not lowrank.prefers_dense(x)
    head, tail, tail_s, residual = lowrank.truncation(x, 2)
    X = dense(x)
    assert residual is not None and 0.0 <= residual <= RTOL[dtype] * fro(X)
    assert fro(dense(head) + dense(tail) - X) <= RTOL[dtype] * 10 * fro(X)
    assert torch.equal(head.left, lowrank.truncate(x, 2)[0].left)
    wide = rand_lowrank(gen, 12, 10, 9, dtype)
    assert lowrank.prefers_dense(wide)
    head, tail, _, residual = lowrank.truncation(wide, 2)
    W = dense(wide)
    assert residual is not None and 0.0 <= residual <= RTOL[dtype] * fro(W)
    assert fro(dense(head) + dense(tail) - W) <= RTOL[dtype] * 10 * fro(W)


def test_split_factors_rejects_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        lowrank.split_factors(torch.eye(2), torch.ones(2), torch.eye(2), "diagonal")


# ------------------------------------------------------------------ norms and inner products

@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=0), k2=inner_dims)
def test_frobenius_norm_and_inner_match_dense(dtype, spec, k2):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = rand_lowrank(gen, m, n, k, dtype)
    y = rand_lowrank(gen, m, n, k2, dtype)
    X, Y = dense(x), dense(y)
    assert abs(lowrank.frobenius_norm(x) - fro(X)) <= RTOL[dtype] * 10 * max(fro(X), 1e-300)
    ip = float(lowrank.inner(x, y))
    assert abs(ip - float((X * Y).sum())) <= RTOL[dtype] * 10 * max(fro(X) * fro(Y), 1e-300)
    assert abs(float(lowrank.inner(x, x)) - fro(X) ** 2) <= RTOL[dtype] * 10 * max(fro(X) ** 2, 1e-300)


def test_frobenius_norm_of_a_cancelling_difference_is_small_not_negative_or_nan():
    gen = torch.Generator().manual_seed(3)
    x = rand_lowrank(gen, 9, 7, 3, torch.float64)
    diff = lowrank.subtract(x, x)
    value = lowrank.frobenius_norm(diff)
    assert math.isfinite(value) and 0.0 <= value <= 1e-12 * fro(dense(x))
    # A small genuine difference is resolved to full relative accuracy.
    eps = 1e-7
    bumped = LowRank(x.left * (1 + eps), x.right)
    expected = eps * fro(dense(x))
    assert abs(lowrank.frobenius_norm(lowrank.subtract(bumped, x)) - expected) <= 1e-6 * expected


def test_frobenius_norm_hand_case():
    # [[1, 2], [2, 4]] has norm 5.
    x = LowRank(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 2.0]]))
    assert lowrank.frobenius_norm(x) == pytest.approx(5.0, rel=1e-6)
    assert float(lowrank.inner(x, x)) == pytest.approx(25.0, rel=1e-6)


# ------------------------------------------------------------------ recompress and compact

@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=1), true_rank=st.integers(0, 4))
def test_recompress_keeps_the_matrix_and_finds_its_rank(dtype, spec, true_rank):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = rand_lowrank(gen, m, n, k, dtype, true_rank=true_rank)
    X = dense(x)
    y = lowrank.recompress(x)
    assert y.shape == (m, n)
    assert fro(dense(y) - X) <= RTOL[dtype] * 10 * max(fro(X), 1e-300)
    assert y.rank == min(true_rank, k, m, n)  # generic random factors: exactly the true rank


@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=1))
def test_compact_keeps_the_matrix_and_never_grows_past_dense(dtype, spec):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    x = rand_lowrank(gen, m, n, k, dtype)
    X = dense(x)
    y = lowrank.compact(x)
    assert fro(dense(y) - X) <= RTOL[dtype] * 10 * max(fro(X), 1e-300)
    assert y.rank <= min(k, m, n)  # never more directions than the matrix can have
    if k * (m + n) <= m * n and k <= min(m, n):
        assert y is x  # cheap enough already: left alone


def test_wire_numel_is_the_cheaper_of_factors_and_dense():
    assert lowrank.wire_numel(LowRank(torch.zeros(10, 2), torch.zeros(2, 10))) == 40
    assert lowrank.wire_numel(LowRank(torch.zeros(3, 5), torch.zeros(5, 3))) == 9
    assert lowrank.wire_numel(LowRank.zeros(4, 4)) == 0


# ------------------------------------------------------------------ LoRA helpers

@given(spec=products(min_k=1), extra=st.integers(0, 3), scale=st.sampled_from([0.5, 2.0, 16.0]))
def test_pad_rank_keeps_the_update(spec, extra, scale):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    f = LoRAFactors(torch.randn(m, k, generator=gen, dtype=torch.float64),
                    torch.randn(k, n, generator=gen, dtype=torch.float64), scale)
    g = lowrank.pad_rank(f, k + extra)
    assert g.rank == k + extra and g.scale == scale
    assert torch.allclose(g.B @ g.A * g.scale, scale * f.B @ f.A, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        lowrank.pad_rank(f, k - 1)


@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_factors_from_product_divides_the_scale_out(split):
    gen = torch.Generator().manual_seed(0)
    x = rand_lowrank(gen, 5, 4, 2, torch.float64)
    f = lowrank.factors_from_product(x, 4.0, split)
    assert f.scale == 4.0
    assert torch.allclose(f.scale * f.B @ f.A, dense(x), rtol=1e-12, atol=1e-12)
    if split == "left":
        assert torch.equal(f.A, x.right)
    if split == "right":
        assert torch.equal(f.B, x.left)


def test_proximal_penalty_hand_case():
    # B A = 0 (B's only column meets A's zero row); B0 A0 = [[0, 1], [0, 0]]: the penalty is 1.
    # (A cross term of (B0^T B) * (A A0^T) gives -1 here, a negative squared norm.)
    B = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    A = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    B0 = torch.eye(2, dtype=torch.float64)
    A0 = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    assert float(lowrank.proximal_penalty(B, A, B0, A0)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=1), k0=st.integers(1, 5))
def test_proximal_penalty_matches_dense_value_and_gradient(dtype, spec, k0):
    m, n, k, seed = spec
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    A = torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    B0 = torch.randn(m, k0, generator=gen, dtype=torch.float64).to(dtype)
    A0 = torch.randn(k0, n, generator=gen, dtype=torch.float64).to(dtype)
    got = lowrank.proximal_penalty(B, A, B0, A0)
    got.backward()
    # Dense float64 reference, value and gradient.
    Bd = d64(B).requires_grad_()
    Ad = d64(A).requires_grad_()
    ref = (Bd @ Ad - d64(B0) @ d64(A0)).square().sum()
    ref.backward()
    scale = max(float(ref.detach()), (fro(d64(B) @ d64(A)) + fro(d64(B0) @ d64(A0))) ** 2, 1e-300)
    assert abs(float(got.detach()) - float(ref.detach())) <= RTOL[dtype] * 10 * scale
    gscale = max(fro(Bd.grad), fro(Ad.grad), math.sqrt(scale))
    assert fro(d64(B.grad) - Bd.grad) <= RTOL[dtype] * 100 * gscale
    assert fro(d64(A.grad) - Ad.grad) <= RTOL[dtype] * 100 * gscale


def test_proximal_penalty_is_zero_at_the_reference():
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    assert abs(float(lowrank.proximal_penalty(B, A, B, A))) <= 1e-10
    # Same product, other factors: still zero (the penalty is on B A, not on the factors).
    assert abs(float(lowrank.proximal_penalty(B * 2, A / 2, B, A))) <= 1e-10


# ------------------------------------------------------------------ folding into the frozen weight

@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=products(min_k=1), square=st.booleans())
def test_fold_into_weight_both_layouts(dtype, spec, square):
    m, n, k, seed = spec
    if square:
        n = m
    gen = torch.Generator().manual_seed(seed)
    corr = rand_lowrank(gen, m, n, k, dtype)
    C = dense(corr)  # linear orientation (d_out, d_in)
    W_lin = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    out = lowrank.fold_into_weight(W_lin.clone(), corr, "linear")
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_matrix(out, d64(W_lin) + C, dtype)
    W_t = torch.randn(n, m, generator=gen, dtype=torch.float64).to(dtype)  # Conv1D stores W^T
    out = lowrank.fold_into_weight(W_t.clone(), corr, "conv1d")
    assert out.dtype == dtype and out.shape == (n, m)
    assert_close_matrix(out, d64(W_t) + C.mT, dtype)
    # densify gives the correction in storage orientation.
    assert_close_matrix(lowrank.densify(corr, "conv1d"), C.mT, dtype)
    assert_close_matrix(lowrank.densify(corr, "linear"), C, dtype)


def test_fold_into_conv1d_square_weight_is_transposed():
    """Square weight: shapes cannot catch a missing transpose; the values must."""
    # dense correction [[0, 2, 3], [0, 0, 0], [0, 0, 0]]
    corr = LowRank(torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64),
                   torch.tensor([[0.0, 2.0, 3.0]], dtype=torch.float64))
    W = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    conv = lowrank.fold_into_weight(W.clone(), corr, "conv1d")
    expected_conv = W + torch.tensor([[0.0, 0, 0], [2, 0, 0], [3, 0, 0]], dtype=torch.float64)
    assert torch.equal(conv, expected_conv)
    lin = lowrank.fold_into_weight(W.clone(), corr, "linear")
    assert torch.equal(lin, W + torch.tensor([[0.0, 2, 3], [0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert not torch.equal(conv, lin)


def test_fold_into_weight_is_in_place_and_checks_shapes():
    W = torch.zeros(4, 3)
    corr = LowRank(torch.ones(4, 1), torch.ones(1, 3))
    out = lowrank.fold_into_weight(W, corr, "linear")
    assert out is W and torch.equal(W, torch.ones(4, 3))
    with pytest.raises(ValueError, match="conv1d"):
        lowrank.fold_into_weight(torch.zeros(4, 3), corr, "conv1d")
    with pytest.raises(ValueError):
        lowrank.fold_into_weight(torch.zeros(3, 3), corr, "linear")
    # A rank-0 correction is a no-op whatever the shape.
    W2 = torch.full((2, 2), 7.0)
    assert torch.equal(lowrank.fold_into_weight(W2, LowRank.zeros(5, 5), "linear"), torch.full((2, 2), 7.0))


def test_fold_into_low_precision_weight_accumulates_in_float32():
    W = torch.ones(2, 2, dtype=torch.bfloat16)
    corr = LowRank(torch.full((2, 1), 0.5, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    out = lowrank.fold_into_weight(W, corr, "linear")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), torch.full((2, 2), 1.5))


@pytest.mark.parametrize("k", [4, 30, 60, 90])
def test_dense_and_factored_paths_agree_with_a_dense_float64_reference(monkeypatch, k):
    """Whichever path :func:`lowrank.prefers_dense` picks, svd, truncate and the norm match numpy-free dense
    float64 results (the path is forced both ways)."""
    g = torch.Generator().manual_seed(k)
    x = LowRank(torch.randn(70, k, generator=g, dtype=torch.float64),
                torch.randn(k, 50, generator=g, dtype=torch.float64))
    dense = x.left @ x.right
    ref_s = torch.linalg.svdvals(dense)
    for fraction in (0.0, math.inf):  # 0: always dense; inf: always factored
        monkeypatch.setattr(lowrank, "DENSE_FRACTION", fraction)
        assert lowrank.prefers_dense(x) == (fraction == 0.0)
        u, s, vh = lowrank.svd(x)
        assert s.numel() == min(k, 50)
        assert torch.allclose(s, ref_s[: s.numel()], rtol=1e-12, atol=1e-10)
        assert torch.allclose((u * s) @ vh, dense, atol=1e-10)
        head, tail, _ = lowrank.truncate(x, 3)
        assert torch.allclose(head.left @ head.right + tail.left @ tail.right, dense, atol=1e-10)
        assert lowrank.frobenius_norm(x) == pytest.approx(float(dense.norm()), rel=1e-12)


@pytest.mark.parametrize("spread", ["rounding-like", "rank one"])
def test_probed_residual_estimates_the_dense_float64_residual(spread):
    """A known residual ``E = P - U S Vh`` (``U`` perturbed): the probe estimate is within its stated spread
    for an ``E`` over many directions, within a factor 3 for a rank-one ``E``, and the same on every call."""
    gen = torch.Generator().manual_seed(3)
    P = torch.randn(300, 200, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(P, full_matrices=False)
    if spread == "rank one":
        noise = torch.outer(torch.randn(300, generator=gen, dtype=torch.float64), vh[0]) * 1e-6
    else:
        noise = torch.randn(300, 200, generator=gen, dtype=torch.float64) * 1e-6
    u2 = u + noise / s[0]
    exact = float((P - (u2 * s) @ vh).norm())
    got = lowrank.probed_residual(P, u2, s, vh)
    assert got == lowrank.probed_residual(P, u2, s, vh)
    if spread == "rank one":
        assert exact / 3 <= got <= 3 * exact
    else:  # effective rank ~200: relative spread of the norm ~ sqrt(2 / (8 * 200)) / 2 ~ 2 %
        assert got == pytest.approx(exact, rel=0.1)
