"""Validation helpers shared by the public entry points."""

from __future__ import annotations

import math
from numbers import Real

import torch


def finite_real(name: str, value) -> float:
    """``value`` as a float, or a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def symmetric_eigh(name: str, matrix: torch.Tensor, rtol: float = 1e-5):
    """Eigen-decomposition of a symmetric PSD matrix, checked on the way.

    Returns ``(eigenvalues, eigenvectors)`` in float64. Raises a ValueError naming
    ``name`` when the matrix is not square, not finite, not symmetric or not PSD.
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(matrix.shape)}")
    m = matrix.detach().to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} has non-finite entries")
    scale = max(m.abs().max().item(), 1e-300)
    asym = (m - m.T).abs().max().item()
    if asym > rtol * scale:
        raise ValueError(
            f"{name} must be symmetric: max |A - A^T| = {asym:.3g} exceeds "
            f"{rtol:g} x max |A| = {rtol * scale:.3g}"
        )
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
    if evals[0].item() < -rtol * scale:
        raise ValueError(
            f"{name} must be positive semi-definite: smallest eigenvalue "
            f"{evals[0].item():.3g} < 0"
        )
    return evals.clamp_min(0.0), evecs
