"""Sweeps: results equal the trainer's, finished units are reused, kills resume.

The kill test runs a sweep in a real subprocess, kills it (SIGKILL) once its first
unit is on disk, checks that every stored file is whole, and resumes the sweep in
this process: finished units are read back, not recomputed, and the results equal
those of an uninterrupted run. The Dask test runs a sweep on a LocalCluster with two
worker processes and compares with the in-process results.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond.cache import Store
from spectral_precond.sweeps import Sweep, run_sweep


def small_sweep(**overrides) -> Sweep:
    settings = dict(
        cases=[sp.case_high(), sp.case_low()], ps=[-1.0, 0.0, 1.0], snrs=[1.0, math.inf],
        seeds=[0, 1], n_samples=300, n_train=40, width=16,
        config=sp.TrainConfig(n_steps=60, n_log=8, snapshot_steps=(5,)),
    )
    settings.update(overrides)
    return Sweep(**settings)


def test_a_unit_equals_the_reference_trainer_on_the_same_data():
    sweep = small_sweep(dtype="float64")
    result = run_sweep(sweep, store=None)
    c, k, i, j = 1, 1, 2, 0          # case low, seed 1, p = 1, snr = 1
    data = sweep.data(c, sweep.seeds[k])
    P = sp.population_power(sweep.cases[c].inputs, sweep.ps[i])
    init = sp.kaiming_init(np.array([[sweep.seeds[k]]]), 10, sweep.width)
    losses, test_losses, final = sp.reference_train(
        data.X_train, data.y_train[j], P, *init.model(0, 0), n_steps=60,
        lr=sweep.config.lr, weight_decay=sweep.config.weight_decay,
        X_test=data.X_test, y_test=data.y_test[j], test_steps=result.steps,
    )
    np.testing.assert_allclose(result.train_loss[c, k, i, j], [losses[t] for t in result.steps],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.test_loss[c, k, i, j], [test_losses[t] for t in result.steps],
                               rtol=1e-9, atol=1e-12)
    W1 = result.params(c, k).W1[i, j]
    torch.testing.assert_close(W1, final[0], rtol=1e-9, atol=1e-12)
    assert result.params(c, k, step=5).W1.shape == (3, 2, 16, 10)
    assert result.diverged() == []


def test_models_share_data_and_initialisation_within_a_unit():
    sweep = small_sweep(config=sp.TrainConfig(n_steps=1, n_log=2,
                                                                 snapshot_steps=(0,)))
    result = run_sweep(sweep, store=None)
    W1 = result.params(0, 0, step=0).W1
    assert torch.equal(W1[0, 0], W1[2, 1])
    assert not torch.equal(W1[0, 0], result.params(0, 1, step=0).W1[0, 0])
    # p = 0 trains with P = I whatever the case: the same start, other data.
    assert result.train_loss[0, 0, 1, 0, 0] != result.train_loss[1, 0, 1, 0, 0]


def test_finished_units_are_reused_and_a_changed_configuration_is_recomputed(tmp_path):
    store = Store(tmp_path)
    first = run_sweep(small_sweep(), store=store)
    assert len(first.report.computed) == 4 and first.report.reused == []
    again = run_sweep(small_sweep(), store=store)
    assert again.report.computed == [] and len(again.report.reused) == 4
    np.testing.assert_array_equal(again.test_loss, first.test_loss)
    changed = run_sweep(small_sweep(config=sp.TrainConfig(n_steps=61, n_log=8,
                                                          snapshot_steps=(5,))), store=store)
    assert len(changed.report.computed) == 4
    one_more_seed = run_sweep(small_sweep(seeds=[0, 1, 2]), store=store)
    assert len(one_more_seed.report.reused) == 4 and len(one_more_seed.report.computed) == 2


def test_diverging_models_are_listed_with_their_step():
    # The preconditioned curvature grows like lambda^(p + 1): at lr = 0.01, p = 3
    # puts 10^4 on the high-variance directions, far past the stability edge.
    sweep = small_sweep(ps=[0.0, 3.0], snrs=[1.0], seeds=[0],
                        config=sp.TrainConfig(n_steps=200, n_log=10))
    result = run_sweep(sweep, store=None)
    diverged = result.diverged()
    assert {d[2] for d in diverged} == {3.0}
    for name, seed, p, snr, step in diverged:
        c = [case.name for case in sweep.cases].index(name)
        assert 0 <= step <= 200
        assert np.isnan(result.test_loss[c, 0, 1, 0, -1])
    assert np.isfinite(result.test_loss[:, 0, 0, 0, -1]).all()


def test_bad_sweeps_are_refused():
    with pytest.raises(TypeError, match="cases must be a non-empty sequence of Case"):
        small_sweep(cases=["high"])
    with pytest.raises(ValueError, match="case names must differ"):
        small_sweep(cases=[sp.case_high(), sp.case_high()])
    with pytest.raises(ValueError, match="p must be finite"):
        small_sweep(ps=[0.0, float("nan")])
    with pytest.raises(ValueError, match="snrs must be > 0"):
        small_sweep(snrs=[0.0])
    with pytest.raises(ValueError, match="seeds must not repeat"):
        small_sweep(seeds=[1, 1])
    with pytest.raises(ValueError, match="n_train must be smaller than n_samples"):
        small_sweep(n_train=300)
    with pytest.raises(ValueError, match="init must be one of"):
        small_sweep(init="xavier")
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        small_sweep(preconditioner="adam")
    with pytest.raises(ValueError, match="dtype must be one of"):
        small_sweep(dtype="float16")
    with pytest.raises(ValueError, match="was not snapshot"):
        run_sweep(small_sweep(seeds=[0], ps=[0.0], snrs=[1.0]), store=None).params(0, 0, 7)


KILLED_SWEEP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_sweeps import slow_sweep
    from spectral_precond.cache import Store
    from spectral_precond.sweeps import run_sweep
    run_sweep(slow_sweep(), store=Store({store!r}))
""")


def slow_sweep() -> Sweep:
    """Six units of a fraction of a second each: long enough to be killed between them."""
    return small_sweep(seeds=[0, 1, 2], width=64, n_train=100, n_samples=400,
                       config=sp.TrainConfig(n_steps=400, n_log=8))


def test_a_killed_sweep_resumes_without_recomputing_finished_units(tmp_path):
    store = tmp_path / "store"
    script = KILLED_SWEEP.format(tests=os.path.dirname(__file__), store=str(store))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 120
    while not list(store.glob("*.pt")):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "no unit finished within two minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(store.glob("*.pt"))
    assert 1 <= len(finished) < 6
    for path in finished:          # whole files only: each one loads
        assert "test_loss" in torch.load(path, weights_only=False)
    resumed = run_sweep(slow_sweep(), store=Store(store))
    assert len(resumed.report.reused) == len(finished)
    assert len(resumed.report.computed) == 6 - len(finished)
    fresh = run_sweep(slow_sweep(), store=None)
    np.testing.assert_array_equal(resumed.test_loss, fresh.test_loss)


def test_a_sweep_on_a_dask_local_cluster_equals_the_in_process_one(tmp_path):
    pytest.importorskip("distributed")
    from spectral_precond.cache import dask_executor

    sweep = small_sweep()
    local = run_sweep(sweep, store=None)
    with dask_executor(n_workers=2) as executor:
        remote = run_sweep(sweep, store=Store(tmp_path), executor=executor)
    assert len(remote.report.computed) == 4
    np.testing.assert_allclose(remote.test_loss, local.test_loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(remote.diverged_at, local.diverged_at)


def test_the_paper_sweep_follows_the_profile(monkeypatch):
    from spectral_precond.sweeps import PAPER_PS, paper_sweep

    monkeypatch.setenv("BOOK_PROFILE", "paper")
    paper = paper_sweep()
    assert paper.shape == (2, 5, 5, 6)
    assert (paper.n_samples, paper.n_train, paper.width) == (10_000, 200, 500)
    assert paper.config.n_steps == 10_000 and paper.config.lr == 1e-2
    assert [c.name for c in paper.cases] == ["high", "low"] and paper.ps == PAPER_PS
    monkeypatch.setenv("BOOK_PROFILE", "ci")
    assert paper_sweep().config.n_steps < paper.config.n_steps
    assert paper_sweep(seeds=(7,)).seeds == (7,)
    with pytest.raises(ValueError, match="unknown Sweep field"):
        paper_sweep(steps=3)
