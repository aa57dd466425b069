"""The Gram matrix in the metric of ``P`` and the cross-Gram vectors of test inputs.

With samples as rows (``X: (N, dx)``) the paper's ``G_P = X^T P X`` reads
``X P X^T`` here, and the cross-Gram vector ``c_P = X^T P x`` of a test input ``x``
is a row of ``x P X^T``.
"""

from __future__ import annotations

import torch


def gram(X: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``G_P = X P X^T`` for ``X: (..., N, dx)``, ``P: (dx, dx)``; returns ``(..., N, N)``."""
    P = P.to(X.dtype)
    return X @ P @ X.transpose(-1, -2)


def cross_gram(X_train: torch.Tensor, P: torch.Tensor, X_test: torch.Tensor) -> torch.Tensor:
    """``c_P`` of each test input, as rows: ``X_test P X_train^T``, ``(n_test, N)``."""
    P = P.to(X_train.dtype)
    return X_test.to(X_train.dtype) @ P @ X_train.transpose(-1, -2)
