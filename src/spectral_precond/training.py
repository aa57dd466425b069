"""The batched trainer: full-batch preconditioned gradient descent for many models.

This module holds the one place where the book's update is written:

    W1 <- W1 - lr * (dL/dW1) @ P        every other parameter: plain gradient descent

with ``L = mean_n (f(x_n) - y_n)^2 + 0.5 * weight_decay / N * (||W1||^2 + ||W2||^2)``
(weight decay on weights only, divided by the number of training samples, as in the
authors' code). The weight-decay gradient is part of ``dL/dW1`` and is therefore
preconditioned too.

Models are laid out as a ``(G, M)`` grid (see :mod:`networks`): the ``M`` models of a
group share one data set, so their first-layer products with the inputs are one wide
matrix product with their hidden units side by side. Gradients are written by hand;
:mod:`reference` computes the same thing with autograd, one model at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .networks import Params, predict


def log_spaced_steps(n_steps: int, n_points: int = 100) -> np.ndarray:
    """About ``n_points`` steps between 0 and ``n_steps``, log-spaced, both ends included."""
    positive_int("n_steps", n_steps)
    positive_int("n_points", n_points, minimum=2)
    steps = np.unique(np.round(np.geomspace(1, n_steps, n_points - 1)).astype(np.int64))
    return np.concatenate([[0], steps])


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (defaults: the paper's).

    ``log_steps`` lists the steps at which losses are recorded (the loss at step
    ``t`` is that of the parameters after ``t`` updates); by default about
    ``n_log`` log-spaced steps including 0 and ``n_steps``. ``snapshot_steps`` lists
    the steps at which a copy of all parameters is kept (none by default).
    """

    n_steps: int = 10_000
    lr: float = 1e-2
    weight_decay: float = 1e-6
    n_log: int = 100
    log_steps: Sequence[int] | None = None
    snapshot_steps: Sequence[int] = ()

    def __post_init__(self):
        positive_int("n_steps", self.n_steps)
        lr = finite_real("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        wd = finite_real("weight_decay", self.weight_decay)
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        for name in ("log_steps", "snapshot_steps"):
            value = getattr(self, name)
            if value is None or (name == "snapshot_steps" and len(value) == 0):
                continue
            steps = np.asarray(value)
            if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
                raise ValueError(f"{name} must be a non-empty list of ints, got {value!r}")
            if steps.min() < 0 or steps.max() > self.n_steps:
                raise ValueError(
                    f"{name} must lie in [0, n_steps={self.n_steps}], got "
                    f"[{steps.min()}, {steps.max()}]"
                )

    def schedule(self) -> np.ndarray:
        if self.log_steps is not None:
            return np.unique(np.asarray(self.log_steps, dtype=np.int64))
        return log_spaced_steps(self.n_steps, self.n_log)


@dataclass
class TrainResult:
    """What a run returns.

    ``steps: (L,)``; ``train_loss`` and ``test_loss: (G, M, L)`` hold the mean squared
    error (without the weight-decay term) at those steps; ``test_loss`` is None when
    no test set was given. ``params`` are the final parameters; ``snapshots`` maps
    each step of ``config.snapshot_steps`` to the parameters after that many updates.
    """

    steps: np.ndarray
    train_loss: torch.Tensor
    test_loss: torch.Tensor | None
    params: Params
    snapshots: dict[int, Params] = field(default_factory=dict)


def _as_groups(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        raise ValueError(f"{name} has {t.ndim} dimensions, expected {ndim} (or {ndim - 1})")
    return t


def _expand_preconditioner(P: torch.Tensor, G: int, M: int, dx: int) -> torch.Tensor:
    if not isinstance(P, torch.Tensor):
        raise TypeError(f"P must be a torch.Tensor, got {type(P).__name__}")
    if P.shape[-2:] != (dx, dx) or P.ndim not in (2, 3, 4):
        raise ValueError(
            f"P must be ({dx}, {dx}), ({M}, {dx}, {dx}) or ({G}, {M}, {dx}, {dx}), "
            f"got {tuple(P.shape)}"
        )
    try:
        return P.expand(G, M, dx, dx)
    except RuntimeError:
        raise ValueError(
            f"P of shape {tuple(P.shape)} does not broadcast to the model grid ({G}, {M})"
        ) from None


def _mse(params: Params, X: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean squared error ``(G, M)``, in chunks of samples to bound memory."""
    total = torch.zeros(params.grid, dtype=X.dtype, device=X.device)
    for start in range(0, X.shape[1], chunk):
        f = predict(params, X[:, start : start + chunk])
        total += ((f - y[..., start : start + chunk]) ** 2).sum(-1)
    return total / X.shape[1]


def train(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    P: torch.Tensor,
    params: Params,
    config: TrainConfig = TrainConfig(),
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
) -> TrainResult:
    """Train a ``(G, M)`` grid of networks by full-batch preconditioned gradient descent.

    Parameters
    ----------
    X_train : (G, N, dx)
        Training inputs of each group (``(N, dx)`` for a single group).
    y_train : (G, M, N)
        Labels of each model (``(M, N)`` for a single group).
    P : (dx, dx), (M, dx, dx) or (G, M, dx, dx)
        First-layer preconditioner of each model, broadcast over the grid.
    params : Params
        Initial parameters; not modified. Their dtype and device are taken from
        ``X_train``.
    config : TrainConfig
    X_test, y_test : (G, n_test, dx) and (G, M, n_test), optional
        Test set whose loss is recorded at the logged steps.
    """
    X = _as_groups("X_train", X_train, 3)
    y = _as_groups("y_train", y_train, 3)
    G, N, dx = X.shape
    if params.grid[0] != G or params.dim != dx:
        raise ValueError(
            f"params grid {params.grid} with input dimension {params.dim} does not match "
            f"X_train of shape {tuple(X.shape)} (G={G}, dx={dx})"
        )
    M, dh = params.grid[1], params.width
    if y.shape != (G, M, N):
        raise ValueError(f"y_train must have shape {(G, M, N)}, got {tuple(y.shape)}")
    dtype, device = X.dtype, X.device
    P = _expand_preconditioner(P, G, M, dx).to(dtype=dtype, device=device)
    if (X_test is None) != (y_test is None):
        raise ValueError("give both X_test and y_test, or neither")
    if X_test is not None:
        X_test = _as_groups("X_test", X_test, 3).to(dtype=dtype, device=device)
        y_test = _as_groups("y_test", y_test, 3).to(dtype=dtype, device=device)
        if X_test.shape[0] != G or X_test.shape[2] != dx:
            raise ValueError(f"X_test must have shape ({G}, n_test, {dx}), got {tuple(X_test.shape)}")
        if y_test.shape != (G, M, X_test.shape[1]):
            raise ValueError(
                f"y_test must have shape {(G, M, X_test.shape[1])}, got {tuple(y_test.shape)}"
            )

    steps = config.schedule()
    log_at = {int(s): i for i, s in enumerate(steps)}
    snapshot_at = {int(s) for s in config.snapshot_steps}
    snapshots: dict[int, Params] = {}
    train_loss = torch.empty(G, M, len(steps), dtype=dtype, device=device)
    test_loss = None if X_test is None else torch.empty_like(train_loss)
    test_chunk = max(1, (1 << 22) // max(1, G * M * dh))

    p = params.to(dtype=dtype, device=device).clone()
    W1, b1, W2, b2 = p.tensors()
    W1_wide = W1.view(G, M * dh, dx)
    Xt = X.transpose(1, 2)
    lr, decay = config.lr, config.weight_decay / N

    for t in range(config.n_steps + 1):
        if t in snapshot_at:
            snapshots[t] = p.clone()
        if t == config.n_steps and t not in log_at:
            break
        # Forward pass: one wide product per group, hidden units of its M models side by side.
        Z = torch.baddbmm(b1.view(G, M * dh, 1), W1_wide, Xt).view(G, M, dh, N)
        H = Z.clamp_min(0.0)
        f = (W2.unsqueeze(-2) @ H).squeeze(-2) + b2.unsqueeze(-1)
        r = f - y
        if t in log_at:
            i = log_at[t]
            train_loss[..., i] = (r * r).mean(-1)
            if test_loss is not None:
                test_loss[..., i] = _mse(p, X_test, y_test, test_chunk)
        if t == config.n_steps:
            break
        # Backward pass by hand: d = dL/df, dZ = dL/dZ.
        d = r.mul_(2.0 / N)
        gW2 = (H @ d.unsqueeze(-1)).squeeze(-1)
        gb2 = d.sum(-1)
        dZ = (W2.unsqueeze(-1) * d.unsqueeze(-2)).mul_(Z > 0)
        gb1 = dZ.sum(-1)
        gW1 = torch.bmm(dZ.view(G, M * dh, N), X).view(G, M, dh, dx)
        if decay:
            gW1.add_(W1, alpha=decay)
            gW2.add_(W2, alpha=decay)
        # The preconditioned first-layer step; the rest is plain gradient descent.
        W1.sub_(gW1 @ P, alpha=lr)
        b1.sub_(gb1, alpha=lr)
        W2.sub_(gW2, alpha=lr)
        b2.sub_(gb2, alpha=lr)

    return TrainResult(steps=steps, train_loss=train_loss, test_loss=test_loss, params=p,
                       snapshots=snapshots)
