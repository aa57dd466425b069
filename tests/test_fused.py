"""The fused CPU step: the kernel against NumPy, the trainer with and without it."""

import os
import shutil

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond import _fused

f32 = torch.float32      # explicit everywhere: another test module sets a float64 default


@pytest.fixture
def compiler():
    """Skip without a C compiler, unless ``REQUIRE_COMPILER=1`` (as in CI): then fail."""
    name = os.environ.get("CC", "cc")
    if shutil.which(name) is None:
        if os.environ.get("REQUIRE_COMPILER") == "1":
            pytest.fail(f"REQUIRE_COMPILER=1 but the C compiler {name!r} is not installed")
        pytest.skip("no C compiler on this machine")


needs_compiler = pytest.mark.usefixtures("compiler")


def _variants():
    kernel = _fused.kernel()
    if kernel.variant is None:
        return []
    return ["avx512", "avx2"] if kernel.variant == "avx512" else ["avx2"]


def _kernel_inputs(c, n, k, h, M, seed=0):
    """Float32 tensors for ``c`` models that sit among ``M`` in the trainer's layout."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=gen, dtype=f32)
    A_all = 0.5 * torch.randn(k, M, h, generator=gen, dtype=f32)
    A = A_all[:, 1:1 + c]                                   # rows of stride M * h
    W = 0.3 * torch.randn(c, h, generator=gen, dtype=f32)
    b = torch.randn(c, generator=gen, dtype=f32)
    Y = torch.randn(c, n, generator=gen, dtype=f32)
    return X, A, W, b, Y


def _expected(X, A, W, b, Y):
    """The kernel's outputs in float64, written out with einsum."""
    X, A, W, b, Y = (t.double() for t in (X, A, W, b, Y))
    Z = torch.einsum("nk,kch->cnh", X, A)
    R = torch.einsum("cnh,ch->cn", Z.clamp_min(0), W) + b[:, None] - Y
    E = torch.einsum("nk,cnh->ckh", X, (Z > 0) * R[:, :, None])
    return R, E * W[:, None, :], torch.einsum("ckh,kch->ch", E, A), R.sum(1)


@needs_compiler
def test_the_kernel_builds_and_runs_on_this_cpu():
    kernel = _fused.kernel()
    assert kernel.library is not None, kernel.reason
    assert kernel.variant in ("avx512", "avx2")
    assert sp.training.step_kernel(torch.float32, "cpu", 10) == "fused"


# Sizes with tails in every loop: samples not a multiple of 4, units not a multiple of
# 8 or 16, input columns not a multiple of 4; and the paper's own sizes.
@needs_compiler
@pytest.mark.parametrize("c, n, k, h, M", [
    (3, 7, 5, 13, 5), (2, 9, 8, 17, 3), (1, 4, 4, 8, 2), (2, 1, 3, 33, 4), (2, 200, 12, 500, 9),
])
def test_kernel_matches_numpy(c, n, k, h, M):
    X, A, W, b, Y = _kernel_inputs(c, n, k, h, M)
    want = _expected(X, A, W, b, Y)
    for variant in _variants():
        R, G, GW, GB = (torch.full(t.shape, float("nan"), dtype=f32) for t in want)
        D = torch.empty((n + k) * h, dtype=f32)
        _fused.step_function(X, A, W, b, Y, R, D, G, GW, GB, variant=variant)()
        for got, expected in zip((R, G, GW, GB), want):
            scale = expected.abs().max().item() + 1e-30
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5 * scale)


@needs_compiler
def test_a_nan_in_the_first_layer_reaches_the_residuals():
    X, A, W, b, Y = _kernel_inputs(2, 9, 4, 20, 3)
    A[1, 0, 3] = float("nan")            # model 0 only
    for variant in _variants():
        R, GB, GW = (torch.empty(shape, dtype=f32) for shape in ((2, 9), (2,), (2, 20)))
        G, D = torch.empty(2, 4, 20, dtype=f32), torch.empty(13 * 20, dtype=f32)
        _fused.step_function(X, A, W, b, Y, R, D, G, GW, GB, variant=variant)()
        assert torch.isnan(R[0]).all() and torch.isfinite(R[1]).all()


def test_bad_kernel_arguments_are_refused():
    if _fused.kernel().library is None:
        pytest.skip("no fused kernel on this machine")
    X, A, W, b, Y = _kernel_inputs(2, 5, 4, 8, 3)
    out = {name: torch.empty(shape, dtype=f32) for name, shape in
           {"R": (2, 5), "D": (9 * 8,), "G": (2, 4, 8), "GW": (2, 8), "GB": (2,)}.items()}
    with pytest.raises(ValueError, match="X must be float32 on the CPU, got torch.float64"):
        _fused.step_function(X.double(), A, W, b, Y, **out)
    with pytest.raises(ValueError, match=r"G must have shape \(2, 4, 8\), got \(2, 8, 4\)"):
        _fused.step_function(X, A, W, b, Y, **{**out, "G": torch.empty(2, 8, 4, dtype=f32)})
    with pytest.raises(ValueError, match="D must be contiguous float32 with at least 72 elements"):
        _fused.step_function(X, A, W, b, Y, **{**out, "D": torch.empty(71, dtype=f32)})
    with pytest.raises(ValueError, match="variant must be one this CPU runs"):
        _fused.step_function(X, A, W, b, Y, **out, variant="sse2")


def _float32_batch(n_models=4, seed=0):
    gen = sp.generator(seed, "fused")
    X = torch.randn(2, 30, 10, generator=gen, dtype=f32)
    y = torch.randn(2, n_models, 30, generator=gen, dtype=f32)
    B = torch.randn(10, 10, generator=gen, dtype=f32)
    P = torch.stack([torch.eye(10, dtype=f32), B @ B.T / 10]).repeat(n_models // 2, 1, 1)
    params = sp.kaiming_init(np.arange(2 * n_models).reshape(2, n_models), dx=10, dh=37,
                             scale=0.5).to(torch.float32)
    return X, y, P, params


@needs_compiler
def test_training_with_the_fused_step_matches_training_with_blas(monkeypatch):
    X, y, P, params = _float32_batch()
    Xt, yt = X.flip(1), y.flip(-1)
    cfg = sp.TrainConfig(n_steps=60, lr=5e-2, weight_decay=1e-2, log_steps=[0, 1, 20, 60])
    calls = []
    make = _fused.step_function
    monkeypatch.setattr(_fused, "step_function", lambda *a, **k: calls.append(1) or make(*a, **k))
    fused = sp.train(X, y, P, params, cfg, Xt, yt)
    fused_chunks = len(calls)
    assert fused_chunks                          # the fused kernel did run
    monkeypatch.setattr(sp.training, "FUSED_CPU_STEP", False)
    blas = sp.train(X, y, P, params, cfg, Xt, yt)
    assert len(calls) == fused_chunks            # and this run did not use it
    torch.testing.assert_close(fused.train_loss, blas.train_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused.test_loss, blas.test_loss, rtol=1e-4, atol=1e-6)
    for a, b in zip(fused.params.tensors(), blas.params.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (fused.train_loss[..., -1] < 0.9 * fused.train_loss[..., 0]).all()


@needs_compiler
def test_the_fused_step_does_not_depend_on_the_chunks():
    X, y, P, params = _float32_batch(n_models=6, seed=1)
    cfg = sp.TrainConfig(n_steps=15, log_steps=[0, 15])
    whole = sp.train(X, y, P, params, cfg)
    for chunk in (1, 4):
        parts = sp.train(X, y, P, params, cfg, chunk_models=chunk)
        assert torch.equal(parts.train_loss, whole.train_loss)
        assert all(torch.equal(a, b) for a, b in zip(parts.params.tensors(), whole.params.tensors()))


@needs_compiler
def test_a_diverging_model_is_caught_by_the_fused_step():
    X, y, P, params = _float32_batch()
    P = P.clone()
    P[1] *= 1e4
    cfg = sp.TrainConfig(n_steps=200, log_steps=list(range(0, 201, 10)))
    result = sp.train(X, y, P, params, cfg)
    assert result.diverged[:, 1].all() and not result.diverged[:, [0, 2, 3]].any()
    assert torch.isnan(result.train_loss[:, 1, -1]).all()


def test_which_step_runs(monkeypatch):
    step = sp.training.step_kernel
    assert step(torch.float64, "cpu", 10) == "numpy"
    assert step(torch.bfloat16, "cpu", 10) == "torch"
    assert step(torch.float32, "meta", 10) == "torch"
    assert step(torch.float32, "cpu", 1000) == "numpy"          # past FUSED_MAX_FEATURES
    monkeypatch.setattr(sp.training, "FUSED_CPU_STEP", False)
    assert step(torch.float32, "cpu", 10) == "numpy"
    monkeypatch.setattr(sp.training, "FUSED_CPU_STEP", "yes")
    X, y, P, params = _float32_batch()
    with pytest.raises(ValueError, match="FUSED_CPU_STEP must be True or False, got 'yes'"):
        sp.train(X, y, P, params, sp.TrainConfig(n_steps=2))


def test_a_kernel_that_cannot_be_built_falls_back_to_blas(monkeypatch, tmp_path):
    X, y, P, params = _float32_batch()
    cfg = sp.TrainConfig(n_steps=10, log_steps=[0, 10])
    monkeypatch.setattr(sp.training, "FUSED_CPU_STEP", False)
    want = sp.train(X, y, P, params, cfg)
    monkeypatch.setattr(sp.training, "FUSED_CPU_STEP", True)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPECTRAL_PRECOND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sp.training, "_fused_warned", False)
    _fused.kernel.cache_clear()
    try:
        kernel = _fused.kernel()
        assert kernel.library is None and kernel.failed
        assert "could not be built" in kernel.reason and "no-such-compiler" in kernel.reason
        with pytest.warns(RuntimeWarning, match="the fused CPU step is unavailable"):
            got = sp.train(X, y, P, params, cfg)
    finally:
        _fused.kernel.cache_clear()
    assert torch.equal(got.train_loss, want.train_loss)
    assert list((tmp_path / "cache").glob("*")) == []      # nothing half-built left behind
