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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ._checks import finite_real, positive_int
from .networks import Params


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
    divergence_factor: float = 1e6

    def __post_init__(self):
        positive_int("n_steps", self.n_steps)
        lr = finite_real("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        wd = finite_real("weight_decay", self.weight_decay)
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        if not finite_real("divergence_factor", self.divergence_factor) > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
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
    ``diverged_at: (G, M)`` holds the step at which a model was found diverged and
    frozen, or -1 for models that trained to the end.
    """

    steps: np.ndarray
    train_loss: torch.Tensor
    test_loss: torch.Tensor | None
    params: Params
    diverged_at: torch.Tensor
    snapshots: dict[int, Params] = field(default_factory=dict)

    @property
    def diverged(self) -> torch.Tensor:
        """``(G, M)`` boolean mask of the models that diverged."""
        return self.diverged_at >= 0


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
    if not torch.isfinite(P).all():
        raise ValueError("P has non-finite entries")
    # Check the matrices as given, before broadcasting: one check per distinct matrix.
    Pd = P.detach().to("cpu", torch.float64).reshape(-1, dx, dx)
    scale = Pd.abs().amax(dim=(1, 2)).clamp_min(1e-300)
    asym = (Pd - Pd.transpose(1, 2)).abs().amax(dim=(1, 2))
    if (asym > 1e-5 * scale).any():
        i = int((asym / scale).argmax())
        raise ValueError(
            f"P must be symmetric: matrix {i} has max |P - P^T| = {asym[i]:.3g} "
            f"(max |P| = {scale[i]:.3g})"
        )
    smallest = torch.linalg.eigvalsh(0.5 * (Pd + Pd.transpose(1, 2)))[:, 0]
    if (smallest < -1e-5 * scale).any():
        i = int((smallest / scale).argmin())
        raise ValueError(
            f"P must be positive semi-definite: matrix {i} has smallest eigenvalue "
            f"{smallest[i]:.3g}"
        )
    try:
        return P.expand(G, M, dx, dx)
    except RuntimeError:
        raise ValueError(
            f"P of shape {tuple(P.shape)} does not broadcast to the model grid ({G}, {M})"
        ) from None


#: Activations of one chunk of models stay below this size on the CPU, so that the
#: passes over them in one step hit the cache rather than main memory.
CPU_CHUNK_BYTES = 2 << 20
#: Same bound for the test-set forward pass.
EVAL_CHUNK_BYTES = 2 << 20
#: Losses are checked for divergence at every logged step and every this many steps.
DIVERGENCE_CHECK_EVERY = 50


class _Run:
    """State shared by the chunks of one call to :func:`train`."""

    def __init__(self, X, y, P, params, config, steps, X_test, y_test, chunk_models):
        self.config, self.steps, self.params = config, steps, params
        G, M = params.grid
        N, dx, dh = X.shape[1], params.dim, params.width
        dtype, device = X.dtype, X.device
        self.G, self.M, self.N, self.dx, self.dh = G, M, N, dx, dh
        ones = torch.ones(G, N, 1, dtype=dtype, device=device)
        # Inputs with a column of ones: the first-layer bias rides in the product.
        self.X1 = torch.cat([X, ones], dim=2)
        self.X1t = self.X1.transpose(1, 2).contiguous()
        self.y, self.P = y, P
        self.X1t_test = None
        if X_test is not None:
            ones = torch.ones(G, X_test.shape[1], 1, dtype=dtype, device=device)
            self.X1t_test = torch.cat([X_test, ones], dim=2).transpose(1, 2).contiguous()
            self.y_test = y_test
        # W1 and b1 side by side in one tensor A = [W1 | b1] of shape (G, M, dh, dx + 1).
        self.A = torch.cat([params.W1, params.b1.unsqueeze(-1)], dim=-1).contiguous()
        self.W2, self.b2 = params.W2, params.b2
        self.log_at = {int(t): i for i, t in enumerate(steps)}
        self.snapshot_at = sorted({int(t) for t in config.snapshot_steps})
        self.snapshot_A = {t: torch.empty_like(self.A) for t in self.snapshot_at}
        self.snapshot_W2 = {t: torch.empty_like(self.W2) for t in self.snapshot_at}
        self.snapshot_b2 = {t: torch.empty_like(self.b2) for t in self.snapshot_at}
        self.train_loss = torch.full((G, M, len(steps)), float("nan"), dtype=dtype, device=device)
        self.test_loss = None if X_test is None else torch.full_like(self.train_loss, float("nan"))
        self.diverged_at = torch.full((G, M), -1, dtype=torch.long, device=device)
        itemsize = torch.finfo(dtype).bits // 8
        if chunk_models is None:
            if device.type == "cpu":
                chunk_models = max(1, CPU_CHUNK_BYTES // (dh * N * itemsize))
            else:
                chunk_models = M
        positive_int("chunk_models", chunk_models)
        self.chunk_models = min(chunk_models, M)
        self.itemsize = itemsize

    def chunks(self):
        for g in range(self.G):
            for m0 in range(0, self.M, self.chunk_models):
                yield _Chunk(self, g, m0, min(self.M, m0 + self.chunk_models))

    def result(self) -> TrainResult:
        dx = self.dx
        def unpack(A, W2, b2):
            return Params(A[..., :dx].contiguous(), A[..., dx].contiguous(), W2, b2)
        snapshots = {
            t: unpack(self.snapshot_A[t], self.snapshot_W2[t], self.snapshot_b2[t])
            for t in self.snapshot_at
        }
        return TrainResult(
            steps=self.steps, train_loss=self.train_loss, test_loss=self.test_loss,
            params=unpack(self.A, self.W2, self.b2), diverged_at=self.diverged_at,
            snapshots=snapshots,
        )


class _Chunk:
    """Models ``m0:m1`` of group ``g``: views into the run's tensors, and buffers.

    All models of a chunk share the group's inputs, so the first-layer forward and
    backward products are single wide matrix products with the hidden units of the
    chunk's models side by side (``c * dh`` rows).
    """

    def __init__(self, run: _Run, g: int, m0: int, m1: int):
        self.run, self.g = run, g
        c, dh, N = m1 - m0, run.dh, run.N
        self.c = c
        self.A = run.A[g, m0:m1]                       # (c, dh, dx + 1), a view
        self.A2 = self.A.view(c * dh, run.dx + 1)
        self.W2, self.b2 = run.W2[g, m0:m1], run.b2[g, m0:m1]
        self.W2_rows = self.W2.view(c, 1, dh)
        self.y = run.y[g, m0:m1]
        self.P = run.P[g, m0:m1]
        self.X1, self.X1t = run.X1[g], run.X1t[g]
        self.Z = torch.empty(c * dh, N, dtype=self.A.dtype, device=self.A.device)
        self.slice = (g, slice(m0, m1))

    def forward(self):
        """Pre-activations into the buffer, ReLU in place; returns outputs ``(c, N)``."""
        H = torch.mm(self.A2, self.X1t, out=self.Z).clamp_min_(0.0)
        return torch.bmm(self.W2_rows, H.view(self.c, self.run.dh, -1)).squeeze(1).add_(
            self.b2.unsqueeze(-1))

    def test_mse(self):
        run = self.run
        X1t = run.X1t_test[self.g]
        y = run.y_test[self.slice]
        n = X1t.shape[1]
        width = max(1, EVAL_CHUNK_BYTES // (self.c * run.dh * run.itemsize))
        total = torch.zeros(self.c, dtype=X1t.dtype, device=X1t.device)
        for s in range(0, n, width):
            H = torch.mm(self.A2, X1t[:, s : s + width]).clamp_min_(0.0)
            f = torch.bmm(self.W2_rows, H.view(self.c, run.dh, -1)).squeeze(1)
            total += (f.add_(self.b2.unsqueeze(-1)) - y[:, s : s + width]).square_().sum(-1)
        return total / n

    def train(self):
        run, config = self.run, self.run.config
        c, N = self.c, run.N
        lr, decay = config.lr, config.weight_decay / N
        log_at, train_loss, test_loss = run.log_at, run.train_loss, run.test_loss
        snapshot_at = set(run.snapshot_at)
        diverged_at = run.diverged_at[self.slice]
        active = torch.ones(c, dtype=torch.bool, device=self.A.device)
        frozen = False          # True once a model of this chunk has diverged
        limit = None
        for t in range(config.n_steps + 1):
            if t in snapshot_at:
                run.snapshot_A[t][self.slice].copy_(self.A)
                run.snapshot_W2[t][self.slice].copy_(self.W2)
                run.snapshot_b2[t][self.slice].copy_(self.b2)
            if t == config.n_steps and t not in log_at:
                break
            r = self.forward().sub_(self.y)                  # residuals (c, N)
            if t in log_at or t % DIVERGENCE_CHECK_EVERY == 0 or t == config.n_steps:
                loss = torch.linalg.vecdot(r, r) / N
                if limit is None:
                    limit = config.divergence_factor * loss.clamp_min(1.0)
                bad = ~(loss <= limit) & active               # NaN-safe
                if bad.any():     # one host synchronisation per check, not per step
                    diverged_at.masked_fill_(bad, t)
                    active &= ~bad
                    frozen = True
                if t in log_at:
                    i = log_at[t]
                    train_loss[self.slice][:, i] = loss.masked_fill(~active, float("nan"))
                    if test_loss is not None:
                        test_loss[self.slice][:, i] = self.test_mse().masked_fill(
                            ~active, float("nan"))
            if t == config.n_steps:
                break
            self.step(r.mul_(2.0 / N), active if frozen else None, lr, decay)

    def step(self, d, active, lr, decay):
        """One preconditioned gradient step from ``d = dL/df`` of shape ``(c, N)``.

        With the mask ``S = 1[Z > 0]`` the first-layer gradient is
        ``W2 * GX`` with ``GX = (S * d) @ X1``, computed as ``S @ (d * X1)`` so that
        the sample weights fall on the small input matrix rather than on the
        activations. The gradient of ``W2`` is the row-wise dot product of ``A`` with
        ``GX`` (because ``relu(z) = 1[z > 0] z`` and ``Z = A X1^T``), so the
        activations are read by one product only. Models with ``active`` False
        (diverged) are left unchanged.
        """
        dh, dx = self.run.dh, self.run.dx
        S = self.Z.sign_().view(self.c, dh, -1)             # ReLU mask, in place of H
        Xd = self.X1t.unsqueeze(0) * d.unsqueeze(1)         # (c, dx + 1, N)
        # Gradients are formed transposed, (c, dx + 1, dh): the products are faster
        # with dh as the long output dimension.
        GXT = torch.bmm(Xd, S.transpose(1, 2))
        gW2 = torch.linalg.vecdot(GXT.transpose(1, 2), self.A)
        gAT = GXT.mul_(self.W2.unsqueeze(1))                # [dL/dW1 | dL/db1]^T before decay
        gW1T = gAT[:, :dx]
        if decay:
            gW1T.add_(self.A[..., :dx].transpose(1, 2), alpha=decay)
            gW2.add_(self.W2, alpha=decay)
        # The preconditioned first-layer step, (dL/dW1 P)^T = P^T (dL/dW1)^T; the bias
        # and the head take plain steps.
        gW1T.copy_(torch.bmm(self.P.transpose(1, 2), gW1T))
        gb2 = d.sum(-1)
        if active is not None:
            gAT.masked_fill_(~active.view(-1, 1, 1), 0.0)
            gW2.masked_fill_(~active.view(-1, 1), 0.0)
            gb2.masked_fill_(~active, 0.0)
        self.A.sub_(gAT.transpose(1, 2), alpha=lr)
        self.W2.sub_(gW2, alpha=lr)
        self.b2.sub_(gb2, alpha=lr)


def train(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    P: torch.Tensor,
    params: Params,
    config: TrainConfig = TrainConfig(),
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    chunk_models: int | None = None,
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
    chunk_models : int, optional
        How many models of a group are stepped together. By default as many as keep
        one chunk's activations within a few MiB on the CPU (so that they stay in
        cache) and whole groups on a GPU. Results do not depend on it.

    Returns
    -------
    TrainResult
        A model whose loss becomes non-finite or exceeds ``config.divergence_factor``
        times its initial loss is frozen at that step; ``diverged_at`` records the
        step and its later logged losses are NaN. The other models are unaffected.
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
    p = params.to(dtype=dtype, device=device).clone()
    run = _Run(X, y, P.contiguous(), p, config, steps, X_test, y_test, chunk_models)
    chunks = list(run.chunks())
    workers = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
    if workers <= 1:
        for chunk in chunks:
            chunk.train()
        return run.result()
    # On the CPU, whole chunks go to worker threads, each running single-threaded
    # operations: the chunks are independent, the products release the GIL, and this
    # avoids the fork-join (and, on a busy machine, spin-waiting) of splitting every
    # small operation across cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(chunk.train) for chunk in chunks]:
                future.result()
    finally:
        torch.set_num_threads(threads)
    return run.result()
