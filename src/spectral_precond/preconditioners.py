"""First-layer preconditioners ``P`` (``dx x dx``, symmetric positive semi-definite).

The update they enter is ``W1 <- W1 - lr * (dL/dW1) @ P`` (see :mod:`training`).
Every function returns float64; the trainer casts to the training dtype.
"""

from __future__ import annotations

import torch

from ._checks import finite_real, symmetric_eigh
from .data import GaussianInputs

#: Relative size below which an eigenvalue counts as zero for a negative power.
SINGULAR_RTOL = 1e-12


def _power_from_eigh(evals, evecs, p: float, what: str) -> torch.Tensor:
    if p < 0:
        smallest, largest = evals.min().item(), evals.max().item()
        if smallest <= SINGULAR_RTOL * max(largest, 1e-300):
            raise ValueError(
                f"p={p} < 0 needs a non-singular {what}, but its smallest eigenvalue is "
                f"{smallest:.3g} (largest {largest:.3g}); use p >= 0 or add damping"
            )
    powered = evals.pow(p) if p != 0 else torch.ones_like(evals)
    return (evecs * powered) @ evecs.T


def population_power(inputs: GaussianInputs | torch.Tensor, p: float) -> torch.Tensor:
    """``P = Sigma^p`` from the population covariance.

    Parameters
    ----------
    inputs : GaussianInputs or (dx, dx) tensor
        The input distribution (its known eigen-decomposition is used exactly) or a
        covariance matrix, which must be symmetric PSD.
    p : float
        Any finite power; ``p < 0`` needs a non-singular covariance.
    """
    p = finite_real("p", p)
    if isinstance(inputs, GaussianInputs):
        return _power_from_eigh(inputs.eigenvalues, inputs.eigenvectors, p, "covariance")
    evals, evecs = symmetric_eigh("covariance", inputs)
    return _power_from_eigh(evals, evecs, p, "covariance")


def empirical_power(
    X: torch.Tensor, p: float, damping: float = 1e-3, center: bool = True
) -> torch.Tensor:
    """``P = (C + damping I)^p`` from the empirical covariance ``C`` of ``X: (n, dx)``.

    ``C = Xc^T Xc / n`` with ``Xc`` the centred rows (or the raw rows when
    ``center=False``). ``damping`` must be >= 0; it must be > 0 for ``p < 0`` when
    ``C`` is singular (for instance when ``n < dx``).
    """
    p = finite_real("p", p)
    damping = finite_real("damping", damping)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        raise ValueError(f"X must be a 2-D tensor (n, dx), got {getattr(X, 'shape', X)!r}")
    if X.shape[0] < 2:
        raise ValueError(f"X needs at least 2 rows for a covariance, got {X.shape[0]}")
    Xd = X.to(torch.float64)
    if center:
        Xd = Xd - Xd.mean(0, keepdim=True)
    C = Xd.T @ Xd / Xd.shape[0]
    C = C + damping * torch.eye(C.shape[0], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(C)
    return _power_from_eigh(evals.clamp_min(0.0), evecs, p, "damped empirical covariance")


def identity(dx: int) -> torch.Tensor:
    """``P = I``: plain gradient descent."""
    if isinstance(dx, bool) or not isinstance(dx, int) or dx < 1:
        raise ValueError(f"dx must be an int >= 1, got {dx!r}")
    return torch.eye(dx, dtype=torch.float64)


def validate_preconditioner(P: torch.Tensor, dx: int | None = None) -> torch.Tensor:
    """Check a user-given preconditioner and return it as float64.

    ``P`` must be a square, finite, symmetric, positive semi-definite ``(dx, dx)``
    tensor; a ValueError says which property fails and by how much.
    """
    symmetric_eigh("preconditioner P", P)
    if dx is not None and P.shape[0] != dx:
        raise ValueError(f"preconditioner P must be ({dx}, {dx}), got {tuple(P.shape)}")
    return P.detach().to(torch.float64)


def matrix_sqrt(P: torch.Tensor) -> torch.Tensor:
    """The symmetric square root ``P^{1/2}`` of a symmetric PSD matrix."""
    evals, evecs = symmetric_eigh("matrix", P)
    return (evecs * evals.sqrt()) @ evecs.T
