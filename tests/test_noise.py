"""Continued runs, the period-2 detector, Spearman orderings and verdict rules."""

import numpy as np
import pytest
import scipy.stats

import spectral_precond as sp
from spectral_precond.noise import (
    continue_runs,
    count_verdict,
    ordering_verdict,
    period_two,
    spearman,
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
                         ps=[1.0, -1.0], snrs=[2.0])
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
        continue_runs(short, 3, ps=[0.5])
    with pytest.raises(ValueError, match="case 'mid' is not in the sweep"):
        continue_runs(short, 3, cases=["mid"])
    with pytest.raises(TypeError, match="result must be a SweepResult"):
        continue_runs("runs", 3)


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
