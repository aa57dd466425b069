"""Grids of the paper's synthetic runs: configuration in, cached results out.

A :class:`Sweep` describes cases x seeds x powers ``p`` x SNRs of the paper's
synthetic experiment and everything else that decides a run (sizes, training
settings, initialisation, kind of preconditioner). :func:`run_sweep` cuts it into
units, one per (case, seed): the models of a unit share one data set, so they train
together as one group of the batched trainer (:func:`spectral_precond.train`). Each
finished unit is stored on disk under the hash of its configuration and of the
library (:mod:`spectral_precond.cache`): a rebuild, or another chapter asking for
the same unit, reuses it, and a sweep killed halfway resumes.

Within a unit every model sees the same inputs, the same noise draw (scaled per
SNR) and the same initial weights: differences between ``p`` values are not blurred
by independent draws (common random numbers). Seeds change all three.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .cache import RunReport, Store, default_store, run_units
from .data import Case, RegressionData, make_regression_data, softplus10
from .networks import Params, kaiming_init, p_isotropic_init
from .preconditioners import empirical_power, population_power
from .seeding import generator
from .training import TrainConfig, train

INITS = ("kaiming", "p-isotropic")
PRECONDITIONERS = ("population", "empirical")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _tuple_of_floats(name: str, values) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError(f"{name} must hold at least one value, got {values!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a value, got {list(out)}")
    return out


@dataclass(frozen=True)
class Sweep:
    """A grid of synthetic runs (defaults: the paper's sizes and training settings).

    Parameters
    ----------
    cases : sequence of Case
        Spectra and teacher placements (e.g. ``case_high(), case_low()``); names
        must differ.
    ps : sequence of float
        Powers of ``P = Sigma^p`` (population) or of the damped empirical covariance.
    snrs : sequence of float
        Label signal-to-noise ratios (``inf`` for clean labels).
    seeds : sequence of int
        One data set, teacher scale and initialisation per seed.
    n_samples, n_train, width : int
        Samples drawn (the rest of ``n_train`` is the test set), training samples,
        hidden units.
    config : TrainConfig
        Steps, learning rate, weight decay, logging and snapshot schedule.
    init : "kaiming" or "p-isotropic"
        The authors' kaiming-uniform initialisation, or Gaussian first-layer rows with
        covariance proportional to ``P`` (what the theorems assume); both scaled by
        ``init_scale``.
    preconditioner : "population" or "empirical"
        ``P`` from the known covariance, or from the training inputs' covariance
        plus ``damping * I``.
    dtype : "float32" or "float64"
    activation : callable
        The teacher's activation (softplus(10 z) by default). It enters the cache key
        by its module and name, so give different functions different names.
    device : str
        Where to train (``"cpu"`` or ``"cuda"``); part of the cache key.
    """

    cases: Sequence[Case]
    ps: Sequence[float]
    snrs: Sequence[float] = (1.0,)
    seeds: Sequence[int] = (0,)
    n_samples: int = 10_000
    n_train: int = 200
    width: int = 500
    config: TrainConfig = field(default_factory=TrainConfig)
    init: str = "kaiming"
    init_scale: float = 1e-3
    preconditioner: str = "population"
    damping: float = 1e-3
    dtype: str = "float32"
    activation: Callable = softplus10
    device: str = "cpu"

    def __post_init__(self):
        cases = tuple(self.cases)
        if not cases or not all(isinstance(c, Case) for c in cases):
            raise TypeError(f"cases must be a non-empty sequence of Case, got {self.cases!r}")
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            raise ValueError(f"case names must differ, got {names}")
        object.__setattr__(self, "cases", cases)
        ps = _tuple_of_floats("ps", self.ps)
        for p in ps:
            finite_real("p", p)
        object.__setattr__(self, "ps", ps)
        snrs = _tuple_of_floats("snrs", self.snrs)
        if any(not s > 0 for s in snrs):
            raise ValueError(f"snrs must be > 0 (inf for no noise), got {list(snrs)}")
        object.__setattr__(self, "snrs", snrs)
        seeds = tuple(self.seeds)
        if not seeds or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                for s in seeds):
            raise ValueError(f"seeds must be a non-empty sequence of ints, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must not repeat, got {list(seeds)}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        positive_int("n_samples", self.n_samples)
        positive_int("n_train", self.n_train, minimum=2)
        if self.n_train >= self.n_samples:
            raise ValueError(
                f"n_train must be smaller than n_samples to leave a test set, got "
                f"n_train={self.n_train} >= n_samples={self.n_samples}"
            )
        positive_int("width", self.width)
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        finite_real("init_scale", self.init_scale)
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}"
            )
        if finite_real("damping", self.damping) < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not callable(self.activation):
            raise TypeError(f"activation must be callable, got {self.activation!r}")
        dims = {c.inputs.dim for c in cases}
        if len(dims) != 1:
            raise ValueError(f"all cases must have one input dimension, got {sorted(dims)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(cases, seeds, ps, snrs)``."""
        return len(self.cases), len(self.seeds), len(self.ps), len(self.snrs)

    def data(self, case: int, seed: int) -> RegressionData:
        """The data set of unit (``cases[case]``, ``seed``), as the sweep draws it.

        Labels have shape ``(len(snrs), n)``, one row per SNR.
        """
        c = self.cases[case]
        teacher = c.teacher(generator(seed, "teacher"), self.activation)
        return make_regression_data(
            c.inputs, teacher, self.n_samples, self.n_train, list(self.snrs),
            generator(seed, "data"), DTYPES[self.dtype],
        )

    def preconditioners(self, case: int, data: RegressionData) -> torch.Tensor:
        """``(len(ps), dx, dx)`` float64: the ``P`` of each power for one unit."""
        if self.preconditioner == "population":
            return torch.stack([population_power(self.cases[case].inputs, p) for p in self.ps])
        return torch.stack([empirical_power(data.X_train, p, self.damping) for p in self.ps])

    def unit_tensors(self, case: int, seed: int, p_index: Sequence[int] | None = None,
                     snr_index: Sequence[int] | None = None):
        """One unit's models laid out as the sweep trains them, in ``(p, snr)`` order.

        Returns ``X_train: (N, dx)``, ``y_train: (M, N)``, ``X_test: (n, dx)``,
        ``y_test: (M, n)`` and ``P: (M, dx, dx)`` (float64), with ``M`` the number of
        selected powers times selected SNRs (all of them by default).
        """
        data = self.data(case, seed)
        pi = list(range(len(self.ps))) if p_index is None else list(p_index)
        ri = list(range(len(self.snrs))) if snr_index is None else list(snr_index)
        P = self.preconditioners(case, data)[pi].repeat_interleave(len(ri), dim=0)
        return (data.X_train, data.y_train[ri].repeat(len(pi), 1), data.X_test,
                data.y_test[ri].repeat(len(pi), 1), P)

    def unit_description(self, case: int, seed: int) -> dict:
        """Everything that decides the result of one unit (the cache key's input)."""
        c = self.cases[case]
        act = self.activation
        return {
            "kind": "synthetic-sweep-unit",
            "case": {"name": c.name, "eigenvalues": c.inputs.eigenvalues,
                     "eigenvectors": c.inputs.eigenvectors, "coefficients": c.coefficients},
            "activation": f"{getattr(act, '__module__', '?')}.{getattr(act, '__qualname__', repr(act))}",
            "seed": seed, "ps": list(self.ps), "snrs": [str(s) for s in self.snrs],
            "n_samples": self.n_samples, "n_train": self.n_train, "width": self.width,
            "config": {k: (list(v) if isinstance(v, (tuple, list, np.ndarray)) else v)
                       for k, v in asdict(self.config).items()},
            "init": self.init, "init_scale": self.init_scale,
            "preconditioner": self.preconditioner, "damping": self.damping,
            "dtype": self.dtype, "device": self.device,
        }


def _run_unit(sweep: Sweep, case: int, seed: int) -> dict:
    """Train the models of one unit; plain tensors on the CPU, ready to store."""
    X, y, X_test, y_test, P_models = sweep.unit_tensors(case, seed)
    n_p, n_snr = len(sweep.ps), len(sweep.snrs)
    seeds = np.full((1, n_p * n_snr), seed)
    if sweep.init == "kaiming":
        params = kaiming_init(seeds, X.shape[1], sweep.width, sweep.init_scale)
    else:
        params = p_isotropic_init(seeds, P_models.unsqueeze(0), sweep.width, sweep.init_scale)
    device, dtype = torch.device(sweep.device), DTYPES[sweep.dtype]
    result = train(
        X.unsqueeze(0).to(device), y.unsqueeze(0).to(device),
        P_models.unsqueeze(0).to(device, dtype), params.to(dtype, device), sweep.config,
        X_test.unsqueeze(0).to(device), y_test.unsqueeze(0).to(device),
    )

    def grid(t):
        return t[0].reshape(n_p, n_snr, *t.shape[2:]).cpu()

    # Final parameters are kept (a few MB per sweep) so that later analyses, such as
    # transfer to a new task, can reuse a stored unit instead of retraining it.
    return {
        "steps": torch.as_tensor(result.steps),
        "train_loss": grid(result.train_loss),
        "test_loss": grid(result.test_loss),
        "diverged_at": grid(result.diverged_at),
        "params": [grid(t) for t in result.params.tensors()],
        "snapshots": {t: [grid(x) for x in p.tensors()] for t, p in result.snapshots.items()},
    }


@dataclass
class SweepResult:
    """The results of a :class:`Sweep`, as arrays indexed ``[case, seed, p, snr, ...]``.

    ``train_loss`` and ``test_loss``: ``(C, S, P, R, L)`` mean squared errors at the
    logged ``steps: (L,)`` (NaN after a model diverged); ``diverged_at: (C, S, P, R)``
    the step at which a model was found diverged and frozen, or -1.
    """

    sweep: Sweep
    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    diverged_at: np.ndarray
    report: RunReport
    _units: list = field(repr=False, default_factory=list)

    def params(self, case: int, seed: int, step: int | None = None) -> Params:
        """Parameters of unit (case index, seed index) as a ``(P, R)`` grid.

        Row ``i`` holds the models of ``ps[i]``, column ``j`` those of ``snrs[j]``: a
        grid for analysis, not for :func:`train` (whose groups share a data set).
        ``step=None`` gives the final parameters; otherwise a step of
        ``sweep.config.snapshot_steps``.
        """
        unit = self._units[case * len(self.sweep.seeds) + seed]
        if step is None:
            return Params(*unit["params"])
        if step not in unit["snapshots"]:
            raise ValueError(
                f"step {step} was not snapshot; available: {sorted(unit['snapshots'])}"
            )
        return Params(*unit["snapshots"][step])

    def diverged(self) -> list[tuple[str, int, float, float, int]]:
        """``(case name, seed, p, snr, step)`` of every model that diverged."""
        s = self.sweep
        return [
            (s.cases[c].name, s.seeds[k], s.ps[i], s.snrs[j], int(self.diverged_at[c, k, i, j]))
            for c, k, i, j in zip(*np.nonzero(self.diverged_at >= 0))
        ]


def run_sweep(
    sweep: Sweep,
    store: Store | None | str = "default",
    executor: Executor | None = None,
) -> SweepResult:
    """Run (or read back) every unit of ``sweep``.

    Parameters
    ----------
    store : Store, None or "default"
        Where finished units are kept; ``"default"`` is :func:`cache.default_store`
        (``$BOOK_CACHE`` or ``.sweep-cache/``), None computes everything afresh.
    executor : concurrent.futures.Executor, optional
        Runs the units (a process pool, a Dask cluster's executor); in this process,
        one after the other, by default.
    """
    if not isinstance(sweep, Sweep):
        raise TypeError(f"sweep must be a Sweep, got {type(sweep).__name__}")
    if isinstance(store, str):
        if store != "default":
            raise ValueError(f"store must be a Store, None or 'default', got {store!r}")
        store = default_store()
    units = [
        (sweep.unit_description(c, s), (sweep, c, s))
        for c in range(len(sweep.cases)) for s in sweep.seeds
    ]
    n_models = math.prod(sweep.shape)
    outs, report = run_units(
        _run_unit, units, store, executor,
        description=f"{n_models} models, {n_models // len(units)} per unit")
    C, S, _, _ = sweep.shape

    def stack(key):
        return np.stack([o[key].numpy() for o in outs]).reshape(C, S, *outs[0][key].shape)

    return SweepResult(
        sweep=sweep, steps=outs[0]["steps"].numpy(), train_loss=stack("train_loss"),
        test_loss=stack("test_loss"), diverged_at=stack("diverged_at"), report=report,
        _units=outs,
    )


#: The powers and SNRs of the label-noise experiment (the paper gives no grid).
PAPER_PS = (-1.0, -0.5, 0.0, 0.5, 1.0)
PAPER_SNRS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def paper_sweep(**overrides) -> Sweep:
    """The label-noise experiment's grid, sized by the active profile.

    Case High and Case Low, ``p`` in :data:`PAPER_PS`, the SNRs of
    :data:`PAPER_SNRS`, the authors' settings (10,000 samples, 200 for training,
    width 500, 10,000 steps at lr 1e-2, weight decay 1e-6, kaiming x 1e-3) and five
    seeds under ``BOOK_PROFILE=paper``; small sizes under ``ci``. Chapters that start
    from the same runs call this with the same ``overrides`` and share stored units.
    """
    from .data import case_high, case_low
    from .profiles import pick

    settings = dict(
        cases=(case_high(), case_low()),
        ps=PAPER_PS,
        snrs=pick(paper=PAPER_SNRS, ci=(0.5, 1.0, 4.0)),
        seeds=tuple(range(pick(paper=5, ci=2))),
        n_samples=pick(paper=10_000, ci=2_000),
        n_train=pick(paper=200, ci=100),
        width=pick(paper=500, ci=64),
        config=TrainConfig(n_steps=pick(paper=10_000, ci=400), lr=1e-2, weight_decay=1e-6,
                           n_log=100),
    )
    unknown = set(overrides) - set(Sweep.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown Sweep field(s) {sorted(unknown)}")
    settings.update(overrides)
    return Sweep(**settings)
