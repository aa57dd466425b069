"""Aligned teachers, the early-stopped linear theory (against a simulation), helpers."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import spectral_precond as sp
from spectral_precond import alignment as al


def test_power_law_spectrum_runs_from_top_down():
    lam = al.power_law_spectrum(10, alpha=2.0, top=10.0)
    np.testing.assert_allclose(
        lam.numpy(), [10 / i**2 for i in range(1, 11)], rtol=1e-15
    )
    assert al.power_law_spectrum(4, alpha=0.0, top=3.0).tolist() == [3.0] * 4


@pytest.mark.parametrize("a", [-2.0, -0.5, 0.0, 0.7, 150.0, -150.0])
def test_aligned_coefficients_have_unit_projection_variance_and_the_power_law(a):
    lam = al.power_law_spectrum(6, alpha=1.3, top=5.0)
    beta = al.aligned_coefficients(lam, a)
    assert torch.isfinite(beta).all() and (beta >= 0).all()
    np.testing.assert_allclose(float((lam * beta**2).sum()), 1.0, rtol=1e-12)
    if abs(a) < 10:
        ratios = (beta[1:] / beta[0]).log() / (lam[1:] / lam[0]).log()
        np.testing.assert_allclose(ratios.numpy(), a, rtol=1e-10, atol=1e-12)
    shares = al.variance_shares(lam, beta)
    np.testing.assert_allclose(float(shares.sum()), 1.0, rtol=1e-12)
    if a == 150.0:  # all of the signal on the top direction
        assert shares[0] > 1 - 1e-12


def test_two_level_share_on_the_high_direction():
    lam = torch.tensor([10.0] + [0.1] * 9, dtype=torch.float64)
    for a in (-1.0, -0.5, 0.0, 0.5):
        s = al.variance_shares(lam, al.aligned_coefficients(lam, a))
        want = 100 ** (2 * a + 1) / (100 ** (2 * a + 1) + 9)
        np.testing.assert_allclose(float(s[0]), want, rtol=1e-12)


def test_alignment_case_teacher_direction_and_scale():
    lam = al.power_law_spectrum(5)
    Q, _ = torch.linalg.qr(
        torch.randn(5, 5, generator=sp.generator(0), dtype=torch.float64)
    )
    case = al.alignment_case(lam, 0.5, eigenvectors=Q)
    assert isinstance(case, sp.Case) and case.name == "a=+0.5"
    teacher = case.teacher(sp.generator(3, "teacher"))
    c = torch.randn((), generator=sp.generator(3, "teacher"), dtype=torch.float64)
    # the projection variance beta^T Sigma beta is c^2 for the unit-normalised direction
    var = teacher.beta @ case.inputs.covariance @ teacher.beta
    np.testing.assert_allclose(float(var), float(c**2), rtol=1e-12)
    coords = Q.T @ teacher.beta / c
    np.testing.assert_allclose(
        coords.numpy(), al.aligned_coefficients(lam, 0.5).numpy(), rtol=1e-10
    )


def _simulated_risk(lam, w_star, p, times, n_train, noise_var, n_draws, seed):
    """Monte Carlo excess risk of preconditioned gradient flow on a linear model.

    Exact flow on the *empirical* loss: dw/dt = -P (C w - c) with C = X^T X / N and
    c = X^T y / N, from w = 0, solved through the eigen-decomposition of the
    symmetric matrix P^{1/2} C P^{1/2}.
    """
    gen = sp.generator(seed, "linear-flow")
    d = lam.numel()
    P_half = lam.pow(p / 2)
    out = np.zeros(len(times))
    for _ in range(n_draws):
        X = torch.randn(n_train, d, generator=gen, dtype=torch.float64) * lam.sqrt()
        y = X @ w_star + math.sqrt(noise_var) * torch.randn(
            n_train, generator=gen, dtype=torch.float64
        )
        C, c = X.T @ X / n_train, X.T @ y / n_train
        A = P_half[:, None] * C * P_half[None, :]
        evals, V = torch.linalg.eigh(A)
        b = V.T @ (P_half * c)
        for k, t in enumerate(times):
            v = V @ (-torch.expm1(-t * evals) / evals * b)
            w = P_half * v
            out[k] += float(((w - w_star) ** 2 * lam).sum())
    return out / n_draws


def test_filter_risk_matches_a_simulated_linear_model():
    lam = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    beta = al.aligned_coefficients(lam, 0.3)
    r2, n_train, p = 0.6, 2000, 0.5
    w_star = math.sqrt(r2) * beta  # unit projection variance times r2
    times = np.array([0.3, 1.0, 3.0, 30.0])
    want = _simulated_risk(lam, w_star, p, times, n_train, 1 - r2, n_draws=300, seed=1)
    got = al.filter_risk(lam, al.variance_shares(lam, beta), [p], times, n_train, r2)[0]
    np.testing.assert_allclose(got, want, rtol=0.1)
    # late stopping tends to least squares: d (1 - r2) / N
    late = al.filter_risk(lam, al.variance_shares(lam, beta), [p], [1e6], n_train, r2)
    np.testing.assert_allclose(late, 3 * (1 - r2) / n_train, rtol=1e-9)


@pytest.mark.parametrize(
    "lam",
    [
        al.power_law_spectrum(10),
        torch.tensor([10.0] + [0.1] * 9, dtype=torch.float64),
        torch.tensor([3.0, 2.0, 0.5, 0.01], dtype=torch.float64),
    ],
)
def test_theory_best_p_is_minus_one_for_an_even_teacher(lam):
    for r2 in (0.1, 0.5, 0.9):
        p_star, risk = al.theory_best_p(
            lam, al.aligned_coefficients(lam, -0.5), 200, r2
        )
        assert abs(p_star + 1) < 1e-9
        assert risk.shape == al.THEORY_PS.shape


def test_theory_best_p_follows_the_alignment():
    lam = al.power_law_spectrum(10)
    bests = [
        al.theory_best_p(lam, al.aligned_coefficients(lam, a), 200, 0.4)[0]
        for a in (-1.5, -1.0, -0.5, 0.0, 0.5)
    ]
    assert np.all(np.diff(bests) > 0)
    top = torch.zeros(10, dtype=torch.float64)
    top[0] = 1.0
    bottom = torch.zeros(10, dtype=torch.float64)
    bottom[-1] = 1.0
    assert al.theory_best_p(lam, top, 200, 0.4)[0] > 1.0
    assert al.theory_best_p(lam, bottom, 200, 0.4)[0] < -2.0


def test_best_p_on_grid_finds_a_parabola_vertex_on_an_uneven_grid():
    ps = np.array([-1.5, -1.0, -0.5, -0.25, 0.0, 0.5, 1.0])
    values = np.stack([(ps - v) ** 2 + 3 for v in (-0.4, 0.3, 2.0, -3.0)])
    got = al.best_p_on_grid(ps, values)
    np.testing.assert_allclose(got, [-0.4, 0.3, 1.0, -1.5], atol=1e-9)
    # a diverged neighbour (NaN) leaves the grid point, not a parabola through it
    nan_row = np.array([3.0, 2.0, 1.0, 0.5, np.nan, 2.0, 3.0])
    assert al.best_p_on_grid(ps, nan_row).item() == -0.25
    assert al.best_p_on_grid(ps, values.reshape(2, 2, -1)).shape == (2, 2)


def test_spearman_matches_scipy():
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=12), gen.normal(size=12)
    y[3] = y[5]  # a tie
    assert al.spearman(x, y) == pytest.approx(
        scipy.stats.spearmanr(x, y).statistic, abs=1e-12
    )


def test_linear_r2_of_a_linear_teacher_is_its_snr_share():
    inputs = sp.GaussianInputs(al.power_law_spectrum(4))
    teacher = sp.SingleIndexTeacher(
        torch.tensor([0.3, -0.2, 1.0, 0.5]), activation=lambda z: z
    )
    data = sp.make_regression_data(
        inputs, teacher, 40_200, 200, [1.0, 3.0], sp.generator(0)
    )
    r2 = al.linear_r2(data)
    assert r2.shape == (2,)
    np.testing.assert_allclose(r2, [1 / 2, 9 / 10], atol=0.015)
    one = sp.make_regression_data(inputs, teacher, 10_200, 200, 2.0, sp.generator(1))
    assert al.linear_r2(one).shape == ()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: al.power_law_spectrum(1), "dx must be >= 2"),
        (lambda: al.power_law_spectrum(5, alpha=-1.0), "alpha must be >= 0"),
        (lambda: al.aligned_coefficients([1.0, 0.0, 2.0], 0.5), "finite and > 0"),
        (lambda: al.aligned_coefficients([1.0, 2.0], float("nan")), "a must be finite"),
        (
            lambda: al.variance_shares([1.0, 2.0], [1.0, 2.0, 3.0]),
            "coefficients must have shape",
        ),
        (
            lambda: al.filter_risk([1.0, 2.0], [0.5, 0.5], [0.0], [1.0], 10, 1.0),
            r"r2 must lie in",
        ),
        (
            lambda: al.filter_risk([1.0, 2.0], [0.5, 0.5], [0.0], [0.0], 10, 0.5),
            "times must be",
        ),
        (lambda: al.best_p_on_grid([0.0, 1.0, 0.5], np.zeros(3)), "increasing"),
        (lambda: al.linear_r2("data"), "RegressionData"),
        (lambda: al.spearman([1.0, 2.0], [1.0]), "x and y must be 1-D"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
