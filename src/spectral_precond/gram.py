"""The Gram matrix in the metric of ``P`` and the cross-Gram vectors of test inputs.

With samples as rows (``X: (N, dx)``) the paper's ``G_P = X^T P X`` reads
``X P X^T`` here, and the cross-Gram vector ``c_P = X^T P x`` of a test input ``x``
is a row of ``x P X^T``. The closed forms of the spectral bias that ``P = Sigma^p``
induces sit beside them: the spectrum of ``G_P`` (:func:`gram_spectrum_law`) and the
direction of the first-layer gradient at a small initialisation
(:func:`gradient_direction`, :func:`empirical_gradient_direction`,
:func:`gradient_alignment_law`).
"""

from __future__ import annotations

import torch

from ._checks import finite_real, positive_int
from .preconditioners import population_power


def gram(X: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``G_P = X P X^T`` for ``X: (..., N, dx)``, ``P: (dx, dx)``; returns ``(..., N, N)``."""
    P = P.to(X.dtype)
    return X @ P @ X.transpose(-1, -2)


def cross_gram(X_train: torch.Tensor, P: torch.Tensor, X_test: torch.Tensor) -> torch.Tensor:
    """``c_P`` of each test input, as rows: ``X_test P X_train^T``, ``(n_test, N)``."""
    P = P.to(X_train.dtype)
    return X_test.to(X_train.dtype) @ P @ X_train.transpose(-1, -2)


def gram_spectrum_law(s: torch.Tensor, p: float, n: int) -> torch.Tensor:
    """Non-zero eigenvalues of ``G_P`` for ``P = C^p``, from the singular values of X.

    With the thin SVD ``X = U diag(s) V^T`` of ``X: (n, dx)`` and the uncentred
    empirical covariance ``C = X^T X / n = V diag(s^2 / n) V^T``, ``P = C^p`` shares
    ``V`` and ``G_P = X P X^T = U diag(s^2 (s^2 / n)^p) U^T``: the eigenvalues are
    ``s^{2(p+1)} n^{-p}`` exactly. For the population ``P = Sigma^p`` they hold
    approximately, as ``C`` approaches ``Sigma``.

    Parameters
    ----------
    s : (..., r) tensor of singular values, all > 0
    p : power of the covariance
    n : number of samples (rows of ``X``)
    """
    p = finite_real("p", p)
    positive_int("n", n)
    s = torch.as_tensor(s, dtype=torch.float64)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"singular values must be finite and > 0, got {s.tolist()}")
    return s.pow(2 * (p + 1)) / float(n) ** p


def gradient_direction(covariance, beta: torch.Tensor, p: float) -> torch.Tensor:
    """The population first-layer gradient direction ``Sigma^{p+1} beta``, ``(dx,)``.

    For Gaussian inputs ``x ~ N(0, Sigma)`` and labels ``y = h(<beta, x>) + noise``,
    Stein's lemma gives ``E[y x] = Sigma beta E[h'(<beta, x>)]``; preconditioning by
    ``P = Sigma^p`` turns it into ``Sigma^{p+1} beta`` (up to that positive factor for
    an increasing ``h``). Not normalised.

    Parameters
    ----------
    covariance : GaussianInputs or (dx, dx) tensor
    beta : (dx,) teacher direction
    p : power of the preconditioner ``P = Sigma^p``
    """
    beta = _vector("beta", beta)
    S = population_power(covariance, finite_real("p", p) + 1.0)
    if S.shape[0] != beta.numel():
        raise ValueError(
            f"beta has length {beta.numel()}, the covariance is {tuple(S.shape)}"
        )
    return S @ beta


def empirical_gradient_direction(
    X: torch.Tensor, y: torch.Tensor, P: torch.Tensor
) -> torch.Tensor:
    """``P X^T y / N``: the sample version of :func:`gradient_direction`, ``(dx,)``.

    At a small initialisation the network's outputs are close to zero, so the
    residuals are ``-y``, and a ReLU unit with a random weight vector is active on
    about half of the inputs: averaged over hidden units (each weighted by its
    output weight), the preconditioned first-layer gradient points along
    ``-P X^T y``. ``X: (N, dx)``, ``y: (N,)``, ``P: (dx, dx)``.
    """
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        raise ValueError(
            f"X must be a 2-D tensor (N, dx), got {getattr(X, 'shape', X)!r}"
        )
    y = _vector("y", y)
    if y.numel() != X.shape[0]:
        raise ValueError(f"y has {y.numel()} labels for {X.shape[0]} rows of X")
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.shape != (X.shape[1], X.shape[1]):
        dx = X.shape[1]
        raise ValueError(f"P must be ({dx}, {dx}), got {tuple(P.shape)}")
    return P @ (X.to(torch.float64).T @ y) / X.shape[0]


def gradient_alignment_law(
    covariance,
    cross_covariance: torch.Tensor,
    p: float,
    n: int,
    direction: torch.Tensor,
) -> torch.Tensor:
    """Predicted ``|cos|`` of ``Sigma^p X^T y / n`` with ``direction``, ``n`` samples.

    The sample cross-covariance ``c = X^T y / n`` has mean ``mu = E[y x]`` and, for
    standardised labels (``E[y^2] = 1``) whose square is uncorrelated with ``x x^T``,
    covariance ``(Sigma - mu mu^T) / n``. With ``g = Sigma^p c``, ``d`` the unit
    ``direction`` and ``C = Sigma^p (Sigma - mu mu^T) Sigma^p / n`` this returns

        sqrt( ((Sigma^p mu . d)^2 + d^T C d) / (|Sigma^p mu|^2 + tr C) ),

    the root of the ratio of the expected squared projection to the expected squared
    norm: a signal-to-noise estimate of the cosine, accurate when the cosine does not
    fluctuate much from one training set to the next.

    Parameters
    ----------
    covariance : GaussianInputs or (dx, dx) tensor
    cross_covariance : (dx,) ``E[y x]`` (by Stein's lemma parallel to ``Sigma beta``)
    p : power of ``P = Sigma^p``
    n : number of training samples
    direction : (dx,) the direction compared with (for instance ``beta``)
    """
    p = finite_real("p", p)
    positive_int("n", n)
    mu = _vector("cross_covariance", cross_covariance)
    d = _vector("direction", direction)
    if d.norm() == 0:
        raise ValueError("direction must be non-zero")
    Sigma = population_power(covariance, 1.0)
    if Sigma.shape[0] != mu.numel() or mu.numel() != d.numel():
        raise ValueError(
            f"covariance {tuple(Sigma.shape)}, cross_covariance ({mu.numel()},) and "
            f"direction ({d.numel()},) must share one dimension"
        )
    d = d / d.norm()
    Sp = population_power(covariance, p)
    m = Sp @ mu
    C = Sp @ (Sigma - torch.outer(mu, mu)) @ Sp / n
    return (((m @ d) ** 2 + d @ C @ d) / (m @ m + torch.trace(C))).sqrt()


def _vector(name: str, v) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim != 1 or not torch.isfinite(v).all():
        raise ValueError(
            f"{name} must be a finite 1-D tensor, got shape {tuple(v.shape)}"
        )
    return v
