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

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import scipy.stats
import torch

from ._checks import finite_real, positive_int
from .adahessian import gradient_and_hvp, train_adahessian
from .cache import Store, default_store, run_units
from .networks import Params, kaiming_init
from .seeding import generator
from .sweeps import DTYPES, Sweep, SweepResult
from .training import TrainConfig, train

VERDICT_WORDS = ("reproduced", "mixed", "not reproduced")


@dataclass
class RunGrid:
    """Losses of some label-noise runs, indexed ``[case, seed, p, snr, step]``.

    ``steps: (L,)`` are absolute (a continuation counts from the start of the
    original runs); ``cases``, ``seeds``, ``ps``, ``snrs`` list the values selected;
    ``train_loss`` and ``test_loss`` have shape ``(C, S, P, R, L)``; ``diverged:
    (C, S, P, R)`` marks the models that diverged (their losses are NaN).
    ``params`` holds the final parameters as a ``(C * S, P * R)`` grid (units in
    (case, seed) order, models in (p, snr) order).
    """

    steps: np.ndarray
    cases: tuple[str, ...]
    seeds: tuple[int, ...]
    ps: tuple[float, ...]
    snrs: tuple[float, ...]
    train_loss: np.ndarray
    test_loss: np.ndarray
    diverged: np.ndarray
    params: Params


def _select(name: str, available: Sequence, wanted) -> list[int]:
    if wanted is None:
        return list(range(len(available)))
    index = []
    for w in wanted:
        hits = [i for i, a in enumerate(available) if a == w]
        if not hits:
            raise ValueError(
                f"{name} {w!r} is not in the sweep; available: {list(available)}")
        index.append(hits[0])
    return index


@dataclass(frozen=True)
class _Selection:
    """Indices into a sweep's cases, seeds, powers and SNRs."""

    sweep: Sweep
    ci: tuple[int, ...]
    si: tuple[int, ...]
    pi: tuple[int, ...]
    ri: tuple[int, ...]

    @classmethod
    def make(cls, sweep, cases, seeds, ps, snrs):
        def floats(values):
            return None if values is None else [float(v) for v in values]

        return cls(
            sweep,
            tuple(_select("case", [c.name for c in sweep.cases], cases)),
            tuple(_select("seed", sweep.seeds, seeds)),
            tuple(_select("p", sweep.ps, floats(ps))),
            tuple(_select("snr", sweep.snrs, floats(snrs))),
        )

    @property
    def shape(self):
        return len(self.ci), len(self.si), len(self.pi), len(self.ri)

    def describe(self) -> dict:
        sw = self.sweep
        units = [sw.unit_description(c, sw.seeds[s]) for c in self.ci for s in self.si]
        return {"units": units, "ps": [sw.ps[i] for i in self.pi],
                "snrs": [str(sw.snrs[i]) for i in self.ri]}

    def tensors(self):
        """Inputs, labels and preconditioners of the selected models as (G, M) grids."""
        sw = self.sweep
        units = [sw.unit_tensors(c, sw.seeds[s], self.pi, self.ri)
                 for c in self.ci for s in self.si]
        return [torch.stack(t).to(DTYPES[sw.dtype]) for t in zip(*units)]

    def grid(self, out, dead) -> RunGrid:
        sw = self.sweep
        shape = self.shape
        dead = dead | (out.diverged_at.numpy().reshape(shape) >= 0)

        def arr(t):
            a = t.detach().cpu().double().numpy().reshape(*shape, len(out.steps))
            return np.where(dead[..., None], np.nan, a)

        return RunGrid(
            steps=np.asarray(out.steps), cases=tuple(sw.cases[c].name for c in self.ci),
            seeds=tuple(sw.seeds[s] for s in self.si),
            ps=tuple(sw.ps[p] for p in self.pi),
            snrs=tuple(sw.snrs[r] for r in self.ri), train_loss=arr(out.train_loss),
            test_loss=arr(out.test_loss), diverged=dead, params=out.params,
        )


def _store(store):
    if isinstance(store, str):
        if store != "default":
            raise ValueError(f"store must be a Store, None or 'default', got {store!r}")
        return default_store()
    return store


def continue_runs(
    result: SweepResult,
    n_steps: int,
    log_steps: Sequence[int] | None = None,
    n_log: int = 100,
    cases: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    ps: Sequence[float] | None = None,
    snrs: Sequence[float] | None = None,
    store: Store | None | str = "default",
) -> RunGrid:
    """Train selected models of a stored sweep ``n_steps`` further.

    Each unit's data and preconditioners are regenerated as the sweep made them
    (:meth:`Sweep.data`, :meth:`Sweep.preconditioners`), and training resumes from
    the stored final parameters with the sweep's own learning rate, weight decay and
    divergence rule. All selected units train together, one group each; the result
    is stored like a sweep's units (see :func:`spectral_precond.sweeps.run_sweep`).

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
    store : Store, None or "default"
    """
    if not isinstance(result, SweepResult):
        raise TypeError(f"result must be a SweepResult, got {type(result).__name__}")
    positive_int("n_steps", n_steps)
    sel = _Selection.make(result.sweep, cases, seeds, ps, snrs)
    config = replace(result.sweep.config, n_steps=n_steps, n_log=n_log,
                     snapshot_steps=(),
                     log_steps=None if log_steps is None else list(log_steps))
    desc = {"kind": "label-noise-continuation", **sel.describe(),
            "config": asdict(config)}
    (grid,), _ = run_units(_continue, [(desc, (result, sel, config))], _store(store),
                           description="continued runs")
    return grid


def _continue(result: SweepResult, sel: _Selection, config: TrainConfig) -> RunGrid:
    X, y, Xt, yt, P = sel.tensors()
    inits = []
    pi, ri = torch.tensor(sel.pi), torch.tensor(sel.ri)
    for c in sel.ci:
        for s in sel.si:
            grid = result.params(c, s)
            inits.append([t[pi][:, ri].reshape(len(pi) * len(ri), *t.shape[2:])
                          for t in grid.tensors()])
    init = Params(*(torch.stack([u[k] for u in inits]) for k in range(4)))
    out = train(X, y, P, init.to(X.dtype), config, Xt, yt)
    dead = result.diverged_at[np.ix_(sel.ci, sel.si, sel.pi, sel.ri)] >= 0
    grid = sel.grid(out, dead)
    grid.steps = grid.steps + result.sweep.config.n_steps
    return grid


def adahessian_runs(
    sweep: Sweep,
    config: TrainConfig,
    cases: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    ps: Sequence[float] | None = None,
    snrs: Sequence[float] | None = None,
    store: Store | None | str = "default",
) -> RunGrid:
    """The sweep's models trained by AdaHessian with ``hessian_power = -p`` instead.

    Same data, labels and initial parameters as the sweep's runs of exact
    preconditioning (the sweep must use ``init="kaiming"``), trained by
    :func:`spectral_precond.adahessian.train_adahessian` with ``config`` (the
    Hutchinson probes of a unit come from its own stream, seeded by its seed, so a
    unit's result does not depend on which other units are selected); the result is
    stored like a sweep's units.
    """
    if not isinstance(sweep, Sweep):
        raise TypeError(f"sweep must be a Sweep, got {type(sweep).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if sweep.init != "kaiming":
        raise ValueError(
            f"AdaHessian runs start from the kaiming init, got init={sweep.init!r}")
    sel = _Selection.make(sweep, cases, seeds, ps, snrs)
    desc = {"kind": "label-noise-adahessian", **sel.describe(),
            "config": asdict(config)}
    (grid,), _ = run_units(_adahessian, [(desc, (sel, config))], _store(store),
                           description="AdaHessian runs")
    return grid


def _adahessian(sel: _Selection, config: TrainConfig) -> RunGrid:
    sw = sel.sweep
    X, y, Xt, yt, _ = sel.tensors()
    C, S, n_p, n_r = sel.shape
    seeds = np.array([[sw.seeds[s]] * (n_p * n_r) for _ in sel.ci for s in sel.si])
    init = kaiming_init(seeds, X.shape[2], sw.width, sw.init_scale).to(X.dtype)
    powers = [-sw.ps[p] for p in sel.pi for _ in sel.ri]
    unit_seeds = [sw.seeds[s] for _ in sel.ci for s in sel.si]
    out = train_adahessian(X, y, init, powers, config, Xt, yt, seed=unit_seeds)
    return sel.grid(out, np.zeros(sel.shape, dtype=bool))


def preconditioned_sharpness(
    params: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    P: torch.Tensor,
    weight_decay: float = 0.0,
    n_iter: int = 30,
    seed: int = 0,
) -> torch.Tensor:
    """Largest eigenvalue of the loss Hessian in the metric of the update's ``P``.

    The update ``theta <- theta - lr * Ptilde grad L`` (``Ptilde`` = ``P`` on the
    right of ``W1``, identity elsewhere) is linearly stable near a point only while
    ``lr * lambda_max(Ptilde^{1/2} H Ptilde^{1/2}) < 2``. This estimates that
    eigenvalue for every model by power iteration with the closed-form products of
    :func:`spectral_precond.adahessian.gradient_and_hvp`.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid.
    X : (G, N, dx)
    y : (G, M, N)
    P : (G, M, dx, dx)
        Each model's first-layer preconditioner (symmetric PSD).
    weight_decay : float
        As in :func:`spectral_precond.train` (it adds ``weight_decay / N`` to the
        weights' Hessian).
    n_iter : int
        Power iterations; the estimate is the Rayleigh quotient after them (it
        approaches the eigenvalue of largest magnitude from below).
    seed : int
        Seeds the starting vector.

    Returns
    -------
    (G, M) tensor, float64
    """
    positive_int("n_iter", n_iter)
    if P.shape != (*params.grid, params.dim, params.dim):
        raise ValueError(f"P must have shape {(*params.grid, params.dim, params.dim)}, "
                         f"got {tuple(P.shape)}")
    evals, evecs = torch.linalg.eigh(P.double())
    root = ((evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2))
    root = root.to(params.W1.dtype)

    def apply(v: Params) -> Params:
        w = Params(v.W1 @ root, v.b1, v.W2, v.b2)
        _, _, hv = gradient_and_hvp(params, X, y, w, weight_decay)
        return Params(hv.W1 @ root, hv.b1, hv.W2, hv.b2)

    def dot(a: Params, b: Params) -> torch.Tensor:
        return ((a.W1 * b.W1).sum((-1, -2)) + (a.b1 * b.b1).sum(-1)
                + (a.W2 * b.W2).sum(-1) + a.b2 * b.b2)

    gen = generator(seed, "sharpness")
    v = Params(*(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
                 for t in params.tensors()))
    for _ in range(n_iter):
        v = apply(v)
        norm = dot(v, v).sqrt().clamp_min(1e-30)
        v = Params(v.W1 / norm[..., None, None], v.b1 / norm[..., None],
                   v.W2 / norm[..., None], v.b2 / norm)
    return (dot(v, apply(v)) / dot(v, v)).double()


def sweep_sharpness(result: SweepResult, n_iter: int = 30) -> np.ndarray:
    """:func:`preconditioned_sharpness` at the final parameters of every run of a sweep.

    Returns a ``(C, S, P, R)`` array (NaN for diverged runs).
    """
    if not isinstance(result, SweepResult):
        raise TypeError(f"result must be a SweepResult, got {type(result).__name__}")
    sw = result.sweep
    C, S, n_p, R = sw.shape
    out = np.full((C, S, n_p, R), np.nan)
    dtype = DTYPES[sw.dtype]
    threads = torch.get_num_threads()
    # The products are small: one thread is as fast, and does not spin-wait when the
    # machine is busy.
    torch.set_num_threads(1)
    try:
        _unit_sharpness(result, out, dtype, n_iter)
    finally:
        torch.set_num_threads(threads)
    return np.where(result.diverged_at >= 0, np.nan, out)


def _unit_sharpness(result: SweepResult, out: np.ndarray, dtype, n_iter: int) -> None:
    sw = result.sweep
    C, S, n_p, R = sw.shape
    for c in range(C):
        for k, seed in enumerate(sw.seeds):
            X, y, _, _, P = sw.unit_tensors(c, seed)
            grid = result.params(c, k)
            params = Params(*(t.reshape(1, n_p * R, *t.shape[2:]).to(dtype)
                              for t in grid.tensors()))
            lam = preconditioned_sharpness(params, X[None].to(dtype), y[None].to(dtype),
                                           P[None].to(dtype), sw.config.weight_decay,
                                           n_iter, seed)
            out[c, k] = lam.reshape(n_p, R).numpy()


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


def period_two(losses, min_amplitude: float = 1e-4,
               min_alternation: float = 0.9) -> PeriodTwo:
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
        raise ValueError(
            "losses need an even number >= 4 of steps on the last axis, got "
            f"{arr.shape}")
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
    alternates = alternation >= min_alternation
    oscillating = finite & (amplitude > min_amplitude) & alternates
    return PeriodTwo(amplitude=amplitude,
                     alternation=np.where(finite, alternation, np.nan),
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
        raise ValueError(
            f"values must have {x.size} entries on the last axis, got {v.shape}")
    v = np.where(np.isnan(v), np.inf, v)
    rx = scipy.stats.rankdata(x)
    rv = scipy.stats.rankdata(v, axis=-1, method="ordinal").astype(float)
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
    sem = np.full(r.shape[1], np.nan)
    if r.shape[0] > 1:
        sem = r.std(0, ddof=1) / np.sqrt(r.shape[0])
    holds = expected_sign * mean >= margin
    verdict = count_verdict(int(holds.sum()), holds.size)
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
