"""The two-layer network of the paper, for a grid of models at once.

``f(x) = W2 . relu(W1 x + b1) + b2`` with ``W1: (dh, dx)`` (PyTorch layout). A grid
of ``G x M`` models stores its parameters with two leading axes: models of one
group ``g`` share a data set, models ``m`` within a group differ in anything else
(preconditioner, labels, initialisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .preconditioners import matrix_sqrt
from .seeding import generator


@dataclass
class Params:
    """Parameters of a ``(G, M)`` grid of networks.

    Shapes: ``W1: (G, M, dh, dx)``, ``b1: (G, M, dh)``, ``W2: (G, M, dh)``,
    ``b2: (G, M)``.
    """

    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor

    def __post_init__(self):
        if self.W1.ndim != 4:
            raise ValueError(f"W1 must have shape (G, M, dh, dx), got {tuple(self.W1.shape)}")
        G, M, dh, _ = self.W1.shape
        expected = {"b1": (G, M, dh), "W2": (G, M, dh), "b2": (G, M)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} must have shape {shape} to match W1, got {got}")

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.W1.shape[:2])

    @property
    def width(self) -> int:
        return self.W1.shape[2]

    @property
    def dim(self) -> int:
        return self.W1.shape[3]

    def to(self, dtype=None, device=None) -> "Params":
        return Params(*(t.to(dtype=dtype, device=device) for t in self.tensors()))

    def clone(self) -> "Params":
        return Params(*(t.clone() for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.W1, self.b1, self.W2, self.b2

    def model(self, g: int, m: int) -> tuple[torch.Tensor, ...]:
        """One model's ``(W1, b1, W2, b2)``."""
        return tuple(t[g, m] for t in self.tensors())

    @staticmethod
    def stack(models: list[list[tuple[torch.Tensor, ...]]]) -> "Params":
        """Build a grid from nested lists ``models[g][m] = (W1, b1, W2, b2)``."""
        if not models or not models[0] or any(len(row) != len(models[0]) for row in models):
            raise ValueError("models must be a non-empty rectangular list of lists")
        parts = zip(*(m for row in models for m in row))
        G, M = len(models), len(models[0])
        return Params(*(torch.stack(list(p)).reshape(G, M, *p[0].shape) for p in parts))


def _seed_grid(seeds) -> np.ndarray:
    arr = np.asarray(seeds)
    if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty 2-D grid (G, M) of ints, got {seeds!r}")
    return arr


def kaiming_init(seeds, dx: int, dh: int, scale: float = 1e-3) -> Params:
    """The authors' initialisation: kaiming-uniform weights times ``scale``, zero biases.

    Kaiming-uniform (PyTorch's ``kaiming_uniform_`` defaults) draws from
    ``U(-b, b)`` with ``b = sqrt(6 / fan_in)``. Each model draws from its own seed,
    so a model's initialisation does not depend on where it sits in the grid.

    Parameters
    ----------
    seeds : (G, M) grid of ints
    dx, dh : input dimension and width
    scale : the factor applied to both weight matrices (the paper uses 1e-3)
    """
    arr = _seed_grid(seeds)
    positive_int("dx", dx)
    positive_int("dh", dh)
    scale = finite_real("scale", scale)
    W1, W2 = [], []
    for s in arr.ravel():
        gen = generator(int(s), "init")
        b1, b2 = math.sqrt(6.0 / dx), math.sqrt(6.0 / dh)
        W1.append((torch.rand(dh, dx, generator=gen, dtype=torch.float64) * 2 - 1) * b1)
        W2.append((torch.rand(dh, generator=gen, dtype=torch.float64) * 2 - 1) * b2)
    G, M = arr.shape
    W1 = scale * torch.stack(W1).reshape(G, M, dh, dx)
    W2 = scale * torch.stack(W2).reshape(G, M, dh)
    zeros = torch.zeros(G, M, dh, dtype=torch.float64)
    return Params(W1, zeros, W2, torch.zeros(G, M, dtype=torch.float64))


def p_isotropic_init(seeds, P: torch.Tensor, dh: int, scale: float = 1e-3) -> Params:
    """Gaussian first-layer rows with covariance proportional to ``P``.

    ``W1 = scale * V P^{1/2}`` with ``V`` i.i.d. ``N(0, 2/dx)`` (the kaiming variance),
    so that ``P = I`` gives the variance of :func:`kaiming_init`. ``W2`` is drawn as in
    :func:`kaiming_init`; biases are zero. This is the initialisation that the
    theorems assume. ``P`` is ``(dx, dx)`` shared by all models or ``(G, M, dx, dx)``.
    """
    arr = _seed_grid(seeds)
    G, M = arr.shape
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.ndim == 2:
        P = P.expand(G, M, *P.shape)
    if P.shape[:2] != (G, M) or P.ndim != 4:
        raise ValueError(f"P must be (dx, dx) or ({G}, {M}, dx, dx), got {tuple(P.shape)}")
    dx = P.shape[-1]
    base = kaiming_init(arr, dx, dh, scale)
    W1 = torch.empty(G, M, dh, dx, dtype=torch.float64)
    for g in range(G):
        for m in range(M):
            gen = generator(int(arr[g, m]), "init-p-isotropic")
            V = torch.randn(dh, dx, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / dx)
            W1[g, m] = scale * V @ matrix_sqrt(P[g, m])
    return Params(W1, base.b1, base.W2, base.b2)


def preactivations(params: Params, X: torch.Tensor) -> torch.Tensor:
    """First-layer pre-activations ``W1 x + b1`` of every model on its group's inputs.

    ``X: (G, n, dx)`` -> ``(G, M, dh, n)``.
    """
    G, M = params.grid
    dh, dx = params.width, params.dim
    Z = torch.baddbmm(
        params.b1.reshape(G, M * dh, 1),
        params.W1.reshape(G, M * dh, dx),
        X.transpose(1, 2),
    )
    return Z.reshape(G, M, dh, X.shape[1])


def predict(params: Params, X: torch.Tensor) -> torch.Tensor:
    """Network outputs ``(G, M, n)`` for ``X: (G, n, dx)``."""
    H = preactivations(params, X).clamp_min_(0.0)
    return (params.W2.unsqueeze(-2) @ H).squeeze(-2) + params.b2.unsqueeze(-1)
