"""Analyses of the label-noise experiment: continued runs, period-2 checks, orderings.

The label-noise chapter starts from the stored runs of
:func:`spectral_precond.sweeps.paper_sweep`. Plain gradient descent keeps no state
besides the parameters, so a stored run can be continued from its final parameters
(:func:`continue_runs`) and the continuation is the same trajectory as a longer run
(the tests check it). That gives, cheaply, losses at every step after the paper's
last step (to see and average out a period-2 oscillation, :func:`period_two`) and a
longer training on a subset (to check convergence). :func:`spearman` and
:func:`ordering_verdict` turn "larger ``p`` gives lower test error" into a number
and a verdict word with a rule fixed in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .networks import Params
from .sweeps import SweepResult
from .training import train

VERDICT_WORDS = ("reproduced", "mixed", "not reproduced")


@dataclass
class ContinuedRuns:
    """Losses of stored runs trained further, indexed ``[case, seed, p, snr, step]``.

    ``steps: (L,)`` are absolute (counted from the start of the original runs);
    ``cases``, ``seeds``, ``ps``, ``snrs`` list the values selected; ``train_loss``
    and ``test_loss`` have shape ``(C, S, P, R, L)``; a model that diverged, in the
    original run or in the continuation, has NaN losses. ``params`` holds the final
    parameters as a ``(C * S, P * R)`` grid (units in (case, seed) order, models in
    (p, snr) order).
    """

    steps: np.ndarray
    cases: tuple[str, ...]
    seeds: tuple[int, ...]
    ps: tuple[float, ...]
    snrs: tuple[float, ...]
    train_loss: np.ndarray
    test_loss: np.ndarray
    params: Params


def _select(name: str, available: Sequence, wanted) -> list[int]:
    if wanted is None:
        return list(range(len(available)))
    index = []
    for w in wanted:
        hits = [i for i, a in enumerate(available) if a == w]
        if not hits:
            raise ValueError(f"{name} {w!r} is not in the sweep; available: {list(available)}")
        index.append(hits[0])
    return index


def continue_runs(
    result: SweepResult,
    n_steps: int,
    log_steps: Sequence[int] | None = None,
    n_log: int = 100,
    cases: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    ps: Sequence[float] | None = None,
    snrs: Sequence[float] | None = None,
) -> ContinuedRuns:
    """Train selected models of a stored sweep ``n_steps`` further.

    Each unit's data and preconditioners are regenerated as the sweep made them
    (:meth:`Sweep.data`, :meth:`Sweep.preconditioners`), and training resumes from
    the stored final parameters with the sweep's own learning rate, weight decay and
    divergence rule. All selected units train together, one group each.

    Parameters
    ----------
    result : SweepResult
    n_steps : int
        Further steps.
    log_steps : sequence of int, optional
        Steps of the continuation (0 = the original last step) at which losses are
        recorded; by default about ``n_log`` log-spaced ones.
    cases, seeds, ps, snrs : optional
        Case names and values to select (all by default).
    """
    if not isinstance(result, SweepResult):
        raise TypeError(f"result must be a SweepResult, got {type(result).__name__}")
    positive_int("n_steps", n_steps)
    sweep = result.sweep
    ci = _select("case", [c.name for c in sweep.cases], cases)
    si = _select("seed", sweep.seeds, seeds)
    pi = _select("p", sweep.ps, None if ps is None else [float(p) for p in ps])
    ri = _select("snr", sweep.snrs, None if snrs is None else [float(s) for s in snrs])
    config = replace(sweep.config, n_steps=n_steps, n_log=n_log, snapshot_steps=(),
                     log_steps=None if log_steps is None else list(log_steps))
    dtype = {"float32": torch.float32, "float64": torch.float64}[sweep.dtype]
    X, y, Xt, yt, Ps, inits = [], [], [], [], [], []
    pi_t, ri_t = torch.tensor(pi), torch.tensor(ri)
    for c in ci:
        for s in si:
            data = sweep.data(c, sweep.seeds[s])
            P = sweep.preconditioners(c, data)[pi_t]                    # (P', dx, dx)
            X.append(data.X_train)
            Xt.append(data.X_test)
            y.append(data.y_train[ri_t].repeat(len(pi), 1))             # models (p, snr)
            yt.append(data.y_test[ri_t].repeat(len(pi), 1))
            Ps.append(P.repeat_interleave(len(ri), dim=0))
            grid = result.params(c, s)
            inits.append([t[pi_t][:, ri_t].reshape(len(pi) * len(ri), *t.shape[2:])
                          for t in grid.tensors()])
    init = Params(*(torch.stack([u[k] for u in inits]) for k in range(4)))
    out = train(torch.stack(X).to(dtype), torch.stack(y).to(dtype),
                torch.stack(Ps).to(dtype), init.to(dtype), config,
                torch.stack(Xt).to(dtype), torch.stack(yt).to(dtype))
    shape = (len(ci), len(si), len(pi), len(ri), len(out.steps))
    dead = result.diverged_at[np.ix_(ci, si, pi, ri)] >= 0
    dead = dead | (out.diverged_at.numpy().reshape(shape[:4]) >= 0)

    def grid(t):
        arr = t.detach().cpu().double().numpy().reshape(shape)
        return np.where(dead[..., None], np.nan, arr)

    return ContinuedRuns(
        steps=out.steps + sweep.config.n_steps,
        cases=tuple(sweep.cases[c].name for c in ci),
        seeds=tuple(sweep.seeds[s] for s in si),
        ps=tuple(sweep.ps[p] for p in pi),
        snrs=tuple(sweep.snrs[r] for r in ri),
        train_loss=grid(out.train_loss),
        test_loss=grid(out.test_loss),
        params=out.params,
    )


@dataclass(frozen=True)
class PeriodTwo:
    """Result of :func:`period_two` for losses of shape ``(..., W)``.

    ``amplitude``: the half-amplitude of the alternating part relative to the mean;
    ``alternation``: the fraction of successive differences that change sign;
    ``oscillating``: both above their thresholds; ``mean``: the window mean (the
    value to report as "final" whatever the parity of the last step).
    """

    amplitude: np.ndarray
    alternation: np.ndarray
    oscillating: np.ndarray
    mean: np.ndarray


def period_two(losses, min_amplitude: float = 1e-4, min_alternation: float = 0.9) -> PeriodTwo:
    """Detect a period-2 oscillation in losses recorded at consecutive steps.

    Parameters
    ----------
    losses : (..., W) array
        ``W`` (even, >= 4) consecutive steps per run.
    min_amplitude : float
        Smallest relative half-amplitude ``|mean_t (-1)^t (l_t - mean l)| / mean l``
        counted as an oscillation (round-off in float32 is about 1e-7).
    min_alternation : float
        Smallest fraction of successive differences that must change sign (a
        monotone curve has 0, round-off noise about 0.5, a period-2 cycle 1).
    """
    arr = np.asarray(losses, dtype=float)
    if arr.ndim < 1 or arr.shape[-1] < 4 or arr.shape[-1] % 2:
        raise ValueError(f"losses need an even number >= 4 of steps on the last axis, got {arr.shape}")
    min_amplitude = finite_real("min_amplitude", min_amplitude)
    min_alternation = finite_real("min_alternation", min_alternation)
    W = arr.shape[-1]
    mean = arr.mean(-1)
    signs = (-1.0) ** np.arange(W)
    with np.errstate(invalid="ignore", divide="ignore"):
        amplitude = np.abs(((arr - mean[..., None]) * signs).mean(-1)) / np.abs(mean)
    d = np.sign(np.diff(arr, axis=-1))
    alternation = (d[..., 1:] * d[..., :-1] < 0).mean(-1)
    finite = np.isfinite(arr).all(-1)
    oscillating = finite & (amplitude > min_amplitude) & (alternation >= min_alternation)
    return PeriodTwo(amplitude=amplitude, alternation=np.where(finite, alternation, np.nan),
                     oscillating=oscillating, mean=mean)


def spearman(x: Sequence[float], values) -> np.ndarray:
    """Spearman rank correlation between ``x: (P,)`` and ``values: (..., P)``.

    Computed over the last axis, for every leading index. NaN values (diverged
    runs) rank as the largest, i.e. as the worst error. Ties are not expected
    (distinct losses) and get ranks in order of position.
    """
    x = np.asarray(x, dtype=float)
    v = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 3 or np.unique(x).size != x.size:
        raise ValueError(f"x must hold at least 3 distinct values, got {x.tolist()}")
    if v.shape[-1] != x.size:
        raise ValueError(f"values must have {x.size} entries on the last axis, got {v.shape}")
    v = np.where(np.isnan(v), np.inf, v)
    rx = np.argsort(np.argsort(x)).astype(float)
    rv = np.argsort(np.argsort(v, axis=-1, kind="stable"), axis=-1, kind="stable").astype(float)
    rx -= rx.mean()
    rv -= rv.mean(-1, keepdims=True)
    return (rv * rx).sum(-1) / np.sqrt((rx**2).sum() * (rv**2).sum(-1))


def ordering_verdict(rho, expected_sign: int, margin: float = 0.5):
    """Verdict on "the error is monotone in ``p`` with sign ``expected_sign``".

    Parameters
    ----------
    rho : (S, R) array
        Spearman correlation between ``p`` and the error, per seed and per condition
        (e.g. SNR).
    expected_sign : +1 or -1
        +1: the error grows with ``p``; -1: it falls.
    margin : float
        The seed-mean correlation must reach ``expected_sign * margin`` or beyond.

    Returns
    -------
    verdict : str
        "reproduced" if it holds at every condition, "mixed" if at some,
        "not reproduced" if at none.
    holds : (R,) bool
    mean, sem : (R,) arrays
        Seed mean and standard error of ``rho``.
    """
    if expected_sign not in (-1, 1):
        raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign!r}")
    margin = finite_real("margin", margin)
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must lie in [0, 1], got {margin}")
    r = np.asarray(rho, dtype=float)
    if r.ndim != 2 or r.shape[0] < 1:
        raise ValueError(f"rho must have shape (seeds, conditions), got {r.shape}")
    mean = r.mean(0)
    sem = r.std(0, ddof=1) / np.sqrt(r.shape[0]) if r.shape[0] > 1 else np.full(r.shape[1], np.nan)
    holds = expected_sign * mean >= margin
    verdict = ("reproduced" if holds.all() else "mixed" if holds.any() else "not reproduced")
    return verdict, holds, mean, sem


def count_verdict(n_holding: int, n_total: int, n_needed: int | None = None) -> str:
    """``"reproduced"`` when at least ``n_needed`` (default all) of ``n_total`` cases
    hold, ``"mixed"`` when some do, ``"not reproduced"`` when none do."""
    positive_int("n_total", n_total)
    if not 0 <= n_holding <= n_total:
        raise ValueError(f"n_holding must lie in [0, {n_total}], got {n_holding}")
    needed = n_total if n_needed is None else positive_int("n_needed", n_needed)
    if n_holding >= needed:
        return "reproduced"
    return "mixed" if n_holding > 0 else "not reproduced"
