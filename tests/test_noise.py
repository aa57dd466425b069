"""Continued runs, the period-2 detector, Spearman orderings and verdict rules."""

import numpy as np
import pytest
import scipy.stats
import torch

import spectral_precond as sp
from spectral_precond.adahessian import train_adahessian
from spectral_precond.noise import (
    adahessian_runs,
    continue_runs,
    count_verdict,
    ordering_verdict,
    period_two,
    preconditioned_sharpness,
    spearman,
    sweep_sharpness,
)
from spectral_precond.sweeps import Sweep, run_sweep


def _sweep(n_steps, log_steps=None):
    return Sweep(cases=[sp.case_high(), sp.case_low()], ps=[-1.0, 0.0, 1.0], snrs=[0.5, 2.0],
                 seeds=[0, 1], n_samples=300, n_train=40, width=12, dtype="float64",
                 config=sp.TrainConfig(n_steps=n_steps, lr=0.05, weight_decay=1e-3,
                                       log_steps=log_steps))


def test_continuing_a_run_is_the_same_as_running_longer():
    """Gradient descent has no state besides the parameters: 30 steps then 20 more
    equal 50 steps, for a subset of cases, seeds, powers and SNRs."""
    short = run_sweep(_sweep(30), store=None)
    long = run_sweep(_sweep(50, log_steps=[30, 35, 50]), store=None)
    cont = continue_runs(short, 20, log_steps=[0, 5, 20], cases=["low"], seeds=[1],
                         ps=[1.0, -1.0], snrs=[2.0], store=None)
    assert cont.steps.tolist() == [30, 35, 50]
    assert cont.cases == ("low",) and cont.seeds == (1,) and cont.ps == (1.0, -1.0)
    ref_train = long.train_loss[1, 1][[2, 0]][:, [1]]          # case low, seed 1, p, snr
    ref_test = long.test_loss[1, 1][[2, 0]][:, [1]]
    assert np.allclose(cont.train_loss[0, 0], ref_train, rtol=1e-10)
    assert np.allclose(cont.test_loss[0, 0], ref_test, rtol=1e-10)
    final = long.params(1, 1)
    assert np.allclose(cont.params.W1[0, 0].numpy(), final.W1[2, 1].numpy(), rtol=1e-9)


def test_continued_runs_refuse_unknown_selections():
    short = run_sweep(_sweep(5), store=None)
    with pytest.raises(ValueError, match=r"p 0.5 is not in the sweep; available: \[-1.0, 0.0, 1.0\]"):
        continue_runs(short, 3, ps=[0.5], store=None)
    with pytest.raises(ValueError, match="case 'mid' is not in the sweep"):
        continue_runs(short, 3, cases=["mid"], store=None)
    with pytest.raises(TypeError, match="result must be a SweepResult"):
        continue_runs("runs", 3)


def test_adahessian_runs_start_where_the_sweep_starts_and_use_power_minus_p():
    sweep = _sweep(10, log_steps=[0, 10])
    exact = run_sweep(sweep, store=None)
    config = sp.TrainConfig(n_steps=6, lr=0.01, weight_decay=1e-3, log_steps=[0, 6])
    ada = adahessian_runs(sweep, config, store=None)
    assert ada.train_loss.shape == exact.train_loss.shape
    assert np.allclose(ada.train_loss[..., 0], exact.train_loss[..., 0], rtol=1e-12)
    assert np.allclose(ada.test_loss[..., 0], exact.test_loss[..., 0], rtol=1e-12)
    one = adahessian_runs(sweep, config, cases=["low"], seeds=[1], ps=[1.0], snrs=[0.5],
                          store=None)
    data = sweep.data(1, 1)
    init = sp.kaiming_init([[1]], 10, sweep.width, sweep.init_scale)
    direct = train_adahessian(data.X_train[None], data.y_train[None, :1], init, -1.0, config,
                              data.X_test[None], data.y_test[None, :1], seed=1)
    assert np.allclose(one.train_loss[0, 0, 0, 0], direct.train_loss[0, 0].numpy(), rtol=1e-12)


def test_period_two_detector_tells_a_cycle_from_a_trend_and_from_noise():
    t = np.arange(20)
    rng = np.random.default_rng(0)
    cycle = 0.5 + 0.01 * (-1.0) ** t - 1e-4 * t           # cycle on a slow trend
    trend = 0.5 * np.exp(-0.01 * t)
    noise = 0.5 + 1e-8 * rng.standard_normal(20)            # float32-like jitter
    out = period_two(np.stack([cycle, trend, noise]))
    assert out.oscillating.tolist() == [True, False, False]
    assert out.amplitude[0] == pytest.approx(0.01 / cycle.mean(), rel=0.02)
    assert out.mean[0] == pytest.approx(cycle.mean())
    assert out.alternation[1] == 0.0


def test_period_two_needs_an_even_window():
    with pytest.raises(ValueError, match="even number >= 4"):
        period_two(np.ones(5))


def test_spearman_matches_scipy_and_ranks_nan_as_worst():
    rng = np.random.default_rng(1)
    x = [-1.0, -0.5, 0.0, 0.5, 1.0]
    v = rng.standard_normal((4, 3, 5))
    ours = spearman(x, v)
    for i in range(4):
        for j in range(3):
            assert ours[i, j] == pytest.approx(scipy.stats.spearmanr(x, v[i, j]).statistic)
    assert spearman(x, [1.0, 2.0, 3.0, 4.0, np.nan]) == pytest.approx(1.0)
    assert spearman(x, [np.nan, 4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_ordering_verdict_rule():
    rho = np.array([[-0.9, -0.8, 0.2], [-0.7, -0.1, 0.1], [-1.0, -0.5, -0.3]])
    verdict, holds, mean, sem = ordering_verdict(rho, expected_sign=-1, margin=0.5)
    assert verdict == "mixed"
    assert holds.tolist() == [True, False, False]
    assert mean[0] == pytest.approx(-0.8667, abs=1e-4)
    assert sem[0] == pytest.approx(np.std(rho[:, 0], ddof=1) / np.sqrt(3))
    assert ordering_verdict(rho[:, :1], -1)[0] == "reproduced"
    assert ordering_verdict(rho, +1)[0] == "not reproduced"
    with pytest.raises(ValueError, match="expected_sign must be"):
        ordering_verdict(rho, 0)


def test_count_verdict():
    assert count_verdict(3, 3) == "reproduced"
    assert count_verdict(1, 3) == "mixed"
    assert count_verdict(0, 3) == "not reproduced"
    assert count_verdict(2, 10, n_needed=2) == "reproduced"
    with pytest.raises(ValueError, match="n_holding must lie in"):
        count_verdict(4, 3)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_the_dense_matrix():
    """Against the dense Hessian from autograd, in the metric of P on W1."""
    gen = torch.Generator().manual_seed(3)
    dh, dx, N, wd = 4, 3, 9, 0.2
    X = torch.randn(1, N, dx, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 2, N, generator=gen, dtype=torch.float64)
    params = sp.Params(*(torch.randn(1, 2, *s, generator=gen, dtype=torch.float64)
                         for s in [(dh, dx), (dh,), (dh,), ()]))
    A = torch.randn(2, dx, dx, generator=gen, dtype=torch.float64)
    P = (A @ A.transpose(1, 2) / dx + 0.1 * torch.eye(dx, dtype=torch.float64))[None]
    ours = preconditioned_sharpness(params, X, y, P, wd, n_iter=300)
    for m in range(2):
        shapes = [t.shape[2:] for t in params.tensors()]
        sizes = [int(np.prod(s)) for s in shapes]

        def loss(flat):
            W1, b1, W2, b2 = (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))
            f = torch.relu(X[0] @ W1.T + b1) @ W2 + b2
            return ((f - y[0, m]) ** 2).mean() + 0.5 * wd / N * (
                W1.pow(2).sum() + W2.pow(2).sum())

        flat = torch.cat([t[0, m].reshape(-1) for t in params.tensors()])
        H = torch.autograd.functional.hessian(loss, flat)
        w, V = torch.linalg.eigh(P[0, m])
        root = V @ torch.diag(w.sqrt()) @ V.T
        D = torch.block_diag(torch.kron(torch.eye(dh, dtype=torch.float64), root),
                             torch.eye(sum(sizes[1:]), dtype=torch.float64))
        eig = torch.linalg.eigvalsh(D @ H @ D)
        top = eig[eig.abs().argmax()]
        assert ours[0, m].item() == pytest.approx(top.item(), rel=1e-6)


def test_sweep_sharpness_shape_and_gradient_descent_below_the_edge():
    """Runs that converge smoothly sit below the stability edge lr * sharpness = 2."""
    res = run_sweep(_sweep(30), store=None)
    lam = sweep_sharpness(res, n_iter=50)
    assert lam.shape == res.sweep.shape
    assert np.isfinite(lam).all()
    assert (res.sweep.config.lr * lam < 2.0).all()
