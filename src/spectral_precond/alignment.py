"""Alignment as a continuous variable: teachers spread over the eigendirections, and
the early-stopped linear theory of the best power ``p``.

A teacher direction ``beta`` with coordinates ``beta_i`` in the eigenbasis of the
input covariance (eigenvalues ``lambda_i``) is *aligned* by an exponent ``a`` when

    beta_i proportional to lambda_i^a,

scaled so that the projection ``<beta, x>`` has unit variance
(``sum_i lambda_i beta_i^2 = 1``). ``a > 0`` leans on the high-variance directions,
``a < 0`` on the low-variance ones; the share of the projection's variance carried by
direction ``i`` is ``s_i = lambda_i beta_i^2``, proportional to ``lambda_i^{2a + 1}``,
so ``a = -1/2`` spreads it evenly.

The theory (:func:`filter_risk`, :func:`theory_best_p`) is that of a *linear* model
``f(x) = w . x`` trained from ``w = 0`` by preconditioned gradient flow with
``P = Sigma^p`` on standardised labels. With the empirical covariance replaced by the
population one, direction ``i`` is fitted with the rate ``lambda_i^{p + 1}``: after a
time ``t`` its coefficient is the least-squares one shrunk by
``phi_i = 1 - exp(-t lambda_i^{p+1})``, and the expected excess test error is

    R(p, t) = sum_i (1 - phi_i)^2 r2 s_i + phi_i^2 (1 - r2) / n_train,

where ``r2`` is the share of the label variance that the best linear predictor
explains (the rest, label noise and the teacher's non-linear part, acts as noise).
The best ``p`` minimises ``min_t R(p, t)``: the stopping time is an oracle.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.stats
import torch

from ._checks import finite_real, positive_int
from .data import Case, GaussianInputs, RegressionData


def _eigenvalues(eigenvalues) -> torch.Tensor:
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if lam.ndim != 1 or lam.numel() < 2:
        raise ValueError(
            f"eigenvalues must be a 1-D sequence of at least 2 values, got shape "
            f"{tuple(lam.shape)}"
        )
    if not torch.isfinite(lam).all() or (lam <= 0).any():
        raise ValueError(f"eigenvalues must be finite and > 0, got {lam.tolist()}")
    return lam


def power_law_spectrum(
    dx: int = 10, alpha: float = 2.0, top: float = 10.0
) -> torch.Tensor:
    """Eigenvalues ``top * i^{-alpha}`` for ``i = 1 .. dx``, float64, decreasing.

    With the defaults (``dx = 10``, ``alpha = 2``, ``top = 10``) they run from 10
    down to 0.1, the two levels of the paper's Case High and Case Low.
    """
    positive_int("dx", dx, minimum=2)
    alpha, top = finite_real("alpha", alpha), finite_real("top", top)
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 for a decaying spectrum, got {alpha}")
    if top <= 0:
        raise ValueError(f"top must be > 0, got {top}")
    return top * torch.arange(1, dx + 1, dtype=torch.float64).pow(-alpha)


def aligned_coefficients(eigenvalues, a: float) -> torch.Tensor:
    """Teacher coordinates ``beta_i = c lambda_i^a``, ``sum_i lambda_i beta_i^2 = 1``.

    Parameters
    ----------
    eigenvalues : (dx,) positive
    a : alignment exponent (any finite value)

    Returns
    -------
    (dx,) float64 tensor, all entries positive.
    """
    lam = _eigenvalues(eigenvalues)
    a = finite_real("a", a)
    # Work in logs: lambda^a overflows for large |a| long before the ratio does.
    log_beta = a * lam.log()
    log_beta = log_beta - log_beta.max()
    beta = log_beta.exp()
    return beta / (lam * beta.square()).sum().sqrt()


def variance_shares(eigenvalues, coefficients) -> torch.Tensor:
    """The projection's variance share per direction, ``lambda_i beta_i^2 / sum``."""
    lam = _eigenvalues(eigenvalues)
    beta = torch.as_tensor(coefficients, dtype=torch.float64)
    if beta.shape != lam.shape:
        raise ValueError(
            f"coefficients must have shape {tuple(lam.shape)} like the eigenvalues, "
            f"got {tuple(beta.shape)}"
        )
    s = lam * beta.square()
    if not torch.isfinite(s).all() or s.sum() <= 0:
        raise ValueError("coefficients must be finite and not all zero")
    return s / s.sum()


def alignment_case(
    eigenvalues,
    a: float,
    eigenvectors: torch.Tensor | None = None,
    name: str | None = None,
) -> Case:
    """A :class:`~spectral_precond.data.Case` whose teacher is aligned by ``a``.

    The coefficients are :func:`aligned_coefficients` (unit projection variance);
    ``Case.teacher`` then multiplies them by one ``c ~ N(0, 1)`` per seed, as in the
    paper. The default name is ``"a=<a>"`` (cases of one sweep need distinct names).
    """
    lam = _eigenvalues(eigenvalues)
    a = finite_real("a", a)
    if name is None:
        name = f"a={a:+.4g}"
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    return Case(name, GaussianInputs(lam, eigenvectors), aligned_coefficients(lam, a))


def linear_r2(data: RegressionData) -> np.ndarray:
    """Share of the test labels' variance explained by the best linear predictor.

    Least squares with an intercept on the test set (large, so close to the
    population value), one value per row of labels: an array of shape
    ``data.y_test.shape[:-1]`` (``(len(snr),)``, or ``()`` for one row).
    """
    if not isinstance(data, RegressionData):
        raise TypeError(f"data must be a RegressionData, got {type(data).__name__}")
    X = data.X_test.to(torch.float64)
    X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=torch.float64)], dim=1)
    Y = data.y_test.to(torch.float64).reshape(-1, X.shape[0]).T  # (n, R)
    coef = torch.linalg.lstsq(X1, Y).solution
    resid = Y - X1 @ coef
    r2 = 1.0 - resid.var(0) / Y.var(0)
    return r2.numpy().reshape(data.y_test.shape[:-1])


def filter_risk(eigenvalues, shares, ps, times, n_train: int, r2: float) -> np.ndarray:
    """Expected excess test error of the early-stopped linear model, ``(P, T)``.

    ``P = len(ps)`` and ``T = len(times)``.

    ``R(p, t) = sum_i (1 - phi_i)^2 r2 s_i + phi_i^2 (1 - r2) / n_train`` with
    ``phi_i = 1 - exp(-t lambda_i^{p+1})`` (see the module docstring).

    Parameters
    ----------
    eigenvalues : (dx,) positive
    shares : (dx,) the teacher's variance shares ``s_i`` (:func:`variance_shares`)
    ps, times : 1-D grids of powers and (positive) stopping times
    n_train : number of training samples
    r2 : share of the label variance the best linear predictor explains, in (0, 1)
    """
    lam = _eigenvalues(eigenvalues).numpy()
    s = np.asarray(shares, dtype=float)
    if s.shape != lam.shape or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(
            f"shares must be {lam.shape[0]} finite values >= 0, got "
            f"{np.asarray(shares).tolist()}"
        )
    ps = np.asarray(ps, dtype=float)
    times = np.asarray(times, dtype=float)
    if ps.ndim != 1 or not np.isfinite(ps).all() or ps.size == 0:
        raise ValueError(
            f"ps must be a non-empty 1-D grid of finite values, got {ps.tolist()}"
        )
    if (
        times.ndim != 1
        or times.size == 0
        or not (np.isfinite(times).all() and (times > 0).all())
    ):
        raise ValueError(
            f"times must be a non-empty 1-D grid of positive values, got "
            f"{times.tolist()}"
        )
    positive_int("n_train", n_train)
    r2 = finite_real("r2", r2)
    if not 0 < r2 < 1:
        raise ValueError(f"r2 must lie in (0, 1), got {r2}")
    rates = lam[None, :] ** (ps[:, None] + 1.0)  # (P, dx)
    phi = -np.expm1(-times[None, :, None] * rates[:, None, :])  # (P, T, dx)
    return ((1 - phi) ** 2 * (r2 * s) + phi**2 * (1 - r2) / n_train).sum(-1)


#: Default grids of :func:`theory_best_p`.
THEORY_PS = np.linspace(-3.0, 3.0, 301)
THEORY_TIMES = np.geomspace(1e-4, 1e7, 441)


def theory_best_p(
    eigenvalues,
    coefficients,
    n_train: int,
    r2: float,
    ps: Sequence[float] = THEORY_PS,
    times: Sequence[float] = THEORY_TIMES,
) -> tuple[float, np.ndarray]:
    """The ``p`` of ``ps`` with the lowest oracle-stopped risk, and that risk per ``p``.

    Returns ``(p_star, risk)`` with ``risk[k] = min_t R(ps[k], t)`` over ``times``.
    Where the risk is flat within round-off (a teacher on one eigendirection, for
    which any large enough ``p`` is as good), the smallest such ``p`` is returned.
    """
    shares = variance_shares(eigenvalues, coefficients).numpy()
    risk = filter_risk(eigenvalues, shares, ps, times, n_train, r2).min(1)
    ps = np.asarray(ps, dtype=float)
    best = np.flatnonzero(risk <= risk.min() * (1 + 1e-9) + 1e-15)[0]
    return float(ps[best]), risk


def best_p_on_grid(ps: Sequence[float], values: np.ndarray) -> np.ndarray:
    """Minimiser of ``values`` over ``p``, refined by a parabola through the lowest one.

    ``values: (..., len(ps))``; the last axis follows ``ps`` (increasing). The vertex of
    the parabola through the grid minimum and its two neighbours is returned, kept
    between those neighbours; a minimum at an end of the grid is returned as is.
    NaN entries (diverged runs) count as +inf. Returns ``values.shape[:-1]``.
    """
    ps = np.asarray(ps, dtype=float)
    v = np.asarray(values, dtype=float)
    if ps.ndim != 1 or ps.size < 3 or np.any(np.diff(ps) <= 0):
        raise ValueError(
            f"ps must be at least three increasing values, got {ps.tolist()}"
        )
    if v.shape[-1] != ps.size:
        raise ValueError(
            f"values must end with an axis of {ps.size}, got shape {v.shape}"
        )
    v = np.where(np.isnan(v), np.inf, v)
    flat = v.reshape(-1, ps.size)
    out = np.empty(flat.shape[0])
    for k, row in enumerate(flat):
        i = int(np.argmin(row))
        if i in (0, ps.size - 1) or not np.isfinite(row[i - 1 : i + 2]).all():
            out[k] = ps[i]
            continue
        x, y = ps[i - 1 : i + 2], row[i - 1 : i + 2]
        c2, c1, _ = np.polyfit(x, y, 2)
        out[k] = ps[i] if c2 <= 0 else float(np.clip(-c1 / (2 * c2), x[0], x[2]))
    return out.reshape(v.shape[:-1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties: average ranks)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(
            f"x and y must be 1-D of one length >= 2, got {x.shape} and {y.shape}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")

    if np.unique(x).size == 1 or np.unique(y).size == 1:
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)
