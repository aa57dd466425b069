"""Real optimizers on a small classifier: adapters, the first-layer preconditioner, training.

The OOD chapter compares the optimizers named in :data:`OPTIMIZER_NAMES` on a
``d_x - width - ReLU - n_classes`` network trained by full-batch steps. Each comes
from torch or the maintained ``pytorch-optimizer`` package, except two that the book
writes itself: ``"exact"``, the paper's first-layer preconditioning

    W1 <- W1 - lr * (dL/dW1) @ P          every other parameter: plain gradient descent

(:class:`RightPreconditionedSGD`, the same update as :func:`spectral_precond.train`,
which the tests check step by step), and ``"kfac"`` (:mod:`spectral_precond.kfac`).

:func:`train_classifiers` trains ``K`` models at once: one forward and one backward
pass over all of them (their parameters are stacked for the products), each with its
own data, learning rate and seed. Every model keeps its own parameter tensors and
its own optimizer state, so batching never mixes models: optimizers that act tensor
by tensor (SGD, momentum, Adam, AdaHessian, Shampoo, exact) hold one parameter group
per model; SAM and K-FAC, whose steps use norms or curvature across a model's
tensors, get one instance per model; L-BFGS, which calls its closure itself, runs
model by model. :func:`tune_lr` picks a learning rate per optimizer on validation
accuracy.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import finite_real, positive_int
from .kfac import KFAC
from .seeding import generator

#: Names accepted by :func:`make_optimizer` and :func:`train_classifiers`.
OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "sam", "lbfgs", "kfac", "adahessian", "shampoo",
                   "soap", "muon", "exact")

#: Settings used unless overridden through ``options`` (the authors' where they give one).
DEFAULT_OPTIONS = {
    "momentum": {"momentum": 0.9},
    "sam": {"rho": 0.05, "momentum": 0.9},
    "lbfgs": {"history_size": 10},
    "kfac": {"damping": 1e-3, "momentum": 0.9, "kl_clip": 1e-3, "curvature_every": 20},
    "adahessian": {"hessian_power": 1.0},
    "shampoo": {"preconditioning_compute_steps": 20},
}
LOSSES = ("cross_entropy", "mse")


def _check_name(name: str) -> str:
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
    return name


def _check_options(name: str, options: Mapping | None) -> dict:
    merged = dict(DEFAULT_OPTIONS.get(name, {}))
    allowed = {
        "sgd": set(), "adam": {"betas", "eps"}, "momentum": {"momentum", "nesterov"},
        "sam": {"rho", "momentum", "adaptive"}, "lbfgs": {"history_size"},
        "kfac": {"damping", "momentum", "kl_clip", "curvature_every"},
        "adahessian": {"hessian_power", "betas", "update_period"},
        "shampoo": {"preconditioning_compute_steps", "momentum", "matrix_eps"},
        "soap": {"betas", "shampoo_beta", "precondition_frequency", "eps"},
        "muon": {"adamw_lr", "momentum", "nesterov", "ns_steps"},
        "exact": {"preconditioner"},
    }[name]
    unknown = set(options or {}) - allowed
    if unknown:
        raise ValueError(
            f"option(s) {sorted(unknown)} not understood by {name!r}; allowed: "
            f"{sorted(allowed) or 'none'}"
        )
    merged.update(options or {})
    if name == "exact" and "preconditioner" not in merged:
        raise ValueError("optimizer 'exact' needs options={'preconditioner': P} with P: (dx, dx) or (K, dx, dx)")
    return merged


class RightPreconditionedSGD(torch.optim.Optimizer):
    """Gradient descent whose 2-D gradients are multiplied on the right by a matrix.

    Each parameter group may carry ``preconditioner`` (a ``(d_in, d_in)`` tensor ``P``):
    its 2-D parameters then move by ``-lr * grad @ P``, which for a first-layer
    weight ``W1: (dh, dx)`` is the paper's update. Groups without one take plain
    gradient steps.
    """

    def __init__(self, params, lr: float):
        lr = finite_real("lr", lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "preconditioner": None})
        for group in self.param_groups:
            P = group["preconditioner"]
            if P is None:
                continue
            for p in group["params"]:
                if p.ndim != 2 or P.shape != (p.shape[1], p.shape[1]):
                    raise ValueError(
                        f"preconditioner of shape {tuple(P.shape)} does not fit a parameter "
                        f"of shape {tuple(p.shape)}; it must be ({p.shape[-1]}, {p.shape[-1]})"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            P = group["preconditioner"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad if P is None else p.grad @ P.to(p.grad)
                p.sub_(update, alpha=group["lr"])
        return loss


def _model_groups(name: str, params: Sequence[torch.Tensor], lr: float, options: dict,
                  P: torch.Tensor | None) -> list[dict]:
    if name == "exact":
        return [{"params": [params[0]], "lr": lr, "preconditioner": P},
                {"params": list(params[1:]), "lr": lr}]
    if name == "muon":
        # Muon is meant for hidden weight matrices: in this network only W1 is one (the
        # head is the output layer); the head and the biases take AdamW steps.
        adamw_lr = options.get("adamw_lr") or lr
        return [{"params": [params[0]], "use_muon": True, "lr": lr, "weight_decay": 0.0},
                {"params": list(params[1:]), "use_muon": False, "lr": adamw_lr,
                 "weight_decay": 0.0}]
    return [{"params": list(params), "lr": lr}]


def make_optimizer(name: str, params: Sequence[torch.Tensor], lr: float, **options) -> torch.optim.Optimizer:
    """One optimizer of :data:`OPTIMIZER_NAMES` for one two-layer network.

    ``params`` is ``[W1, b1, W2, b2]`` (``W1: (dh, dx)`` first); ``options`` override
    :data:`DEFAULT_OPTIONS` (``"exact"`` needs ``preconditioner=P``, ``P: (dx, dx)``).
    Notes on the adapters: ``"sam"`` wraps momentum SGD; ``"lbfgs"`` does one L-BFGS
    iteration per step, without line search, so that a step costs one gradient like
    the others; ``"kfac"`` needs its curvature set (see :class:`~spectral_precond.kfac.KFAC`);
    ``"adahessian"`` needs the backward pass to keep its graph (``create_graph=True``);
    ``"soap"`` is pytorch-optimizer's SOAP without weight decay; ``"muon"`` applies Muon to
    ``W1`` and AdamW (at ``adamw_lr``, ``lr`` by default) to the other tensors.
    """
    _check_name(name)
    opts = _check_options(name, options)
    lr = finite_real("lr", lr)
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = list(params)
    if len(params) != 4 or params[0].ndim != 2:
        raise ValueError("params must be [W1, b1, W2, b2] of one two-layer network, W1 2-D")
    return _build(name, [params], [lr], opts)[0]


def _build(name: str, models: list[list[torch.Tensor]], lrs: list[float], opts: dict) -> list:
    """Optimizers for ``K`` models: one instance with a group per model when the
    optimizer acts tensor by tensor, else one instance per model."""
    import pytorch_optimizer as po

    K = len(models)
    P = None
    if name == "exact":
        P = torch.as_tensor(opts["preconditioner"])
        dx = models[0][0].shape[1]
        if P.ndim == 2 and P.shape == (dx, dx):
            P = P.expand(K, dx, dx)
        if P.shape != (K, dx, dx):
            raise ValueError(f"preconditioner must be ({dx}, {dx}) or ({K}, {dx}, {dx}), got {tuple(P.shape)}")
        P = P.to(models[0][0])
    groups = [g for k in range(K) for g in
              _model_groups(name, models[k], lrs[k], opts, None if P is None else P[k])]
    if name == "sgd":
        return [torch.optim.SGD(groups, lr=lrs[0])]
    if name == "momentum":
        return [torch.optim.SGD(groups, lr=lrs[0], momentum=opts["momentum"],
                                nesterov=opts.get("nesterov", False))]
    if name == "adam":
        kw = {k: opts[k] for k in ("betas", "eps") if k in opts}
        return [torch.optim.Adam(groups, lr=lrs[0], **kw)]
    if name == "exact":
        return [RightPreconditionedSGD(groups, lr=lrs[0])]
    if name == "adahessian":
        kw = {k: opts[k] for k in ("betas", "update_period") if k in opts}
        return [po.AdaHessian(groups, lr=lrs[0], hessian_power=opts["hessian_power"], **kw)]
    if name == "shampoo":
        kw = {k: opts[k] for k in ("momentum", "matrix_eps") if k in opts}
        return [po.Shampoo(groups, lr=lrs[0],
                           preconditioning_compute_steps=opts["preconditioning_compute_steps"], **kw)]
    if name == "soap":
        kw = {k: opts[k] for k in ("betas", "shampoo_beta", "precondition_frequency", "eps")
              if k in opts}
        return [po.SOAP(groups, lr=lrs[0], weight_decay=0.0, **kw)]
    if name == "muon":
        kw = {k: opts[k] for k in ("momentum", "nesterov", "ns_steps") if k in opts}
        return [po.Muon(groups, lr=lrs[0], adamw_lr=opts.get("adamw_lr") or lrs[0], **kw)]
    if name == "sam":
        return [po.SAM(m, torch.optim.SGD, rho=opts["rho"], adaptive=opts.get("adaptive", False),
                       lr=lr, momentum=opts["momentum"]) for m, lr in zip(models, lrs)]
    if name == "lbfgs":
        return [torch.optim.LBFGS(m, lr=lr, max_iter=1, history_size=opts["history_size"])
                for m, lr in zip(models, lrs)]
    # kfac
    return [KFAC([(m[0], m[1]), (m[2], m[3])], lr=lr, damping=opts["damping"],
                 momentum=opts["momentum"], kl_clip=opts["kl_clip"]) for m, lr in zip(models, lrs)]


class TwoLayerNets:
    """``K`` networks ``x -> W2 relu(W1 x + b1) + b2``, each with its own tensors.

    ``W1: (width, dx)``, ``b1: (width,)``, ``W2: (n_out, width)``, ``b2: (n_out,)``,
    initialised like ``torch.nn.Linear`` (uniform in ``+-1/sqrt(fan_in)``) from each
    model's seed, or copied from ``init`` (a list of ``[W1, b1, W2, b2]`` per model).
    """

    def __init__(self, seeds: Sequence[int], dx: int, width: int, n_out: int,
                 dtype=torch.float32, init: Sequence[Sequence[torch.Tensor]] | None = None):
        if init is not None:
            if len(init) != len(seeds):
                raise ValueError(f"init holds {len(init)} models, seeds {len(seeds)}")
            self.params = [[t.detach().to(dtype).clone().requires_grad_(True) for t in m] for m in init]
            return
        self.params = []
        for s in seeds:
            gen = generator(int(s), "classifier-init")
            tensors = []
            for shape, fan_in in (((width, dx), dx), ((width,), dx), ((n_out, width), width), ((n_out,), width)):
                bound = 1.0 / math.sqrt(fan_in)
                t = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
                tensors.append(t.to(dtype).requires_grad_(True))
            self.params.append(tensors)

    def __len__(self):
        return len(self.params)

    def stacked(self, i: int) -> torch.Tensor:
        return torch.stack([m[i] for m in self.params])

    def forward(self, X: torch.Tensor, models: Sequence[int] | None = None):
        """``X: (K, n, dx)`` -> pre-activations ``(K, n, width)`` and outputs ``(K, n, n_out)``."""
        ms = range(len(self)) if models is None else models
        W1, b1, W2, b2 = (torch.stack([self.params[k][i] for k in ms]) for i in range(4))
        Z = torch.baddbmm(b1.unsqueeze(1), X, W1.transpose(1, 2))
        out = torch.baddbmm(b2.unsqueeze(1), F.relu(Z), W2.transpose(1, 2))
        return Z, out


@dataclass
class ClassifierResult:
    """What :func:`train_classifiers` returns (``K`` models).

    ``train_loss: (K, n_steps + 1)`` is the training objective before each step and
    after the last; ``accuracy[name]`` and ``loss[name]``: ``(K,)`` at the end, per
    evaluation set (NaN for a model that diverged); ``diverged: (K,)``.
    """

    train_loss: np.ndarray
    accuracy: dict[str, np.ndarray]
    loss: dict[str, np.ndarray]
    diverged: np.ndarray
    nets: TwoLayerNets
    lrs: np.ndarray
    seeds: np.ndarray


def _per_model_loss(out, y, kind: str) -> torch.Tensor:
    if kind == "cross_entropy":
        K, n, C = out.shape
        return F.cross_entropy(out.reshape(K * n, C), y.reshape(-1), reduction="none").view(K, n).mean(1)
    return ((out.squeeze(-1) - y) ** 2).mean(1)


def _as_batch(name: str, t: torch.Tensor, K: int, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim == ndim - 1:
        t = t.expand(K, *t.shape)
    if t.ndim != ndim or t.shape[0] != K:
        raise ValueError(f"{name} must have {ndim} dimensions with {K} models first, got {tuple(t.shape)}")
    return t


def train_classifiers(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    optimizer: str,
    lrs: float | Sequence[float],
    seeds: Sequence[int],
    n_steps: int = 500,
    width: int = 256,
    n_classes: int = 10,
    options: Mapping | None = None,
    eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    weight_decay: float = 0.0,
    loss: str = "cross_entropy",
    dtype=torch.float32,
    init: Sequence[Sequence[torch.Tensor]] | None = None,
) -> ClassifierResult:
    """Train ``K = len(seeds)`` two-layer networks by full-batch steps of one optimizer.

    Parameters
    ----------
    X_train : (K, N, dx) or (N, dx)
        Training inputs of each model (shared when 2-D).
    y_train : (K, N) or (N,)
        Class labels (int) for ``loss="cross_entropy"``, targets for ``"mse"``.
    optimizer : one of :data:`OPTIMIZER_NAMES`
    lrs : one learning rate, or one per model
    seeds : (K,) ints, each model's initialisation seed (the first also seeds the
        random probes of AdaHessian)
    n_steps : full-batch steps (epochs); one step is one gradient evaluation, two for
        SAM, a gradient plus a Hessian-vector product for AdaHessian
    options : overrides of :data:`DEFAULT_OPTIONS` (``"exact"`` needs ``preconditioner``)
    eval_sets : name -> ``(X: (K, n, dx) or (n, dx), y: (K, n) or (n,))``
    weight_decay : adds ``0.5 * weight_decay * (||W1||^2 + ||W2||^2)`` to each model's loss
    loss : ``"cross_entropy"`` (``n_classes`` outputs) or ``"mse"`` (one output; the
        mean of ``(f - y)^2``, as in :func:`spectral_precond.train`)
    init : optional initial ``[W1, b1, W2, b2]`` per model, copied
    """
    _check_name(optimizer)
    opts = _check_options(optimizer, options)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    seeds = [int(s) for s in seeds]
    K = len(seeds)
    if K == 0:
        raise ValueError("seeds must name at least one model")
    lrs = [float(lrs)] * K if np.ndim(lrs) == 0 else [float(v) for v in lrs]
    if len(lrs) != K:
        raise ValueError(f"lrs holds {len(lrs)} values for {K} models")
    for v in lrs:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"every lr must be finite and > 0, got {v}")
    positive_int("n_steps", n_steps)
    positive_int("width", width)
    wd = finite_real("weight_decay", weight_decay)
    if wd < 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}")
    X = _as_batch("X_train", X_train, K, 3).to(dtype)
    y = _as_batch("y_train", y_train, K, 2)
    y = y.to(torch.int64) if loss == "cross_entropy" else y.to(dtype)
    if y.shape[1] != X.shape[1]:
        raise ValueError(f"y_train has {y.shape[1]} samples per model, X_train {X.shape[1]}")
    if loss == "cross_entropy" and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    evals = {}
    for name, (Xe, ye) in (eval_sets or {}).items():
        evals[name] = (_as_batch(f"eval_sets[{name!r}] X", Xe, K, 3).to(dtype),
                       _as_batch(f"eval_sets[{name!r}] y", ye, K, 2))

    # AdaHessian draws its probes from the global generator: seed it, and restore it after.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seeds[0])
        n_out = n_classes if loss == "cross_entropy" else 1
        nets = TwoLayerNets(seeds, X.shape[2], width, n_out, dtype=dtype, init=init)
        opts_built = dict(opts)
        if optimizer == "exact":
            opts_built["preconditioner"] = torch.as_tensor(opts["preconditioner"]).to(dtype)
        optims = _build(optimizer, nets.params, lrs, opts_built)
        alive = torch.ones(K, dtype=torch.bool)
        history = np.full((K, n_steps + 1), np.nan)

        def objective(out_models=None, Xs=X, ys=y):
            Z, out = nets.forward(Xs, out_models)
            per = _per_model_loss(out, ys, loss)
            if wd:
                ms = range(K) if out_models is None else out_models
                per = per + 0.5 * wd * torch.stack(
                    [nets.params[k][0].pow(2).sum() + nets.params[k][2].pow(2).sum() for k in ms])
            return Z, out, per

        def forward_checked():
            Z, out, per = objective()
            bad = ~torch.isfinite(per.detach()) & alive
            if bad.any():
                # A diverged model is set to zero and frozen, so no NaN reaches the others.
                with torch.no_grad():
                    for k in torch.nonzero(bad).flatten().tolist():
                        for p in nets.params[k]:
                            p.zero_()
                alive.copy_(alive & ~bad)
                Z, out, per = objective()
            return Z, out, per

        def backward(per, create_graph=False):
            for m in nets.params:
                for p in m:
                    p.grad = None
            total = per[alive].sum()
            total.backward(create_graph=create_graph)
            for k in torch.nonzero(~alive).flatten().tolist():
                for p in nets.params[k]:
                    p.grad = None

        for t in range(n_steps + 1):
            if optimizer == "lbfgs" and t < n_steps:
                for k, opt in enumerate(optims):
                    if not alive[k]:
                        continue

                    def closure(k=k):
                        opt.zero_grad()
                        _, _, per = objective([k], X[k : k + 1], y[k : k + 1])
                        per.sum().backward()
                        return per.sum().detach()

                    history[k, t] = float(opt.step(closure))
                    if not math.isfinite(history[k, t]):
                        with torch.no_grad():
                            for p in nets.params[k]:
                                p.zero_()
                        alive[k] = False
                continue
            Z, out, per = forward_checked()
            history[:, t] = np.where(alive.numpy(), per.detach().double().numpy(), np.nan)
            if t == n_steps:
                break
            if optimizer == "kfac" and t % opts["curvature_every"] == 0:
                _kfac_curvature(optims, nets, X, Z, out, alive, loss)
            backward(per, create_graph=(optimizer == "adahessian"))
            if optimizer == "sam":
                for k, opt in enumerate(optims):
                    if alive[k]:
                        opt.first_step(zero_grad=True)
                _, _, per2 = objective()
                backward(per2)
                for k, opt in enumerate(optims):
                    if alive[k]:
                        opt.second_step(zero_grad=True)
            else:
                for opt in optims:
                    opt.step()

    for m in nets.params:
        for p in m:
            p.grad = None
    accuracy, losses = {}, {}
    with torch.no_grad():
        for name, (Xe, ye) in evals.items():
            _, out = nets.forward(Xe)
            dead = (~alive).numpy()
            if loss == "cross_entropy":
                acc = (out.argmax(-1) == ye).double().mean(1).numpy()
                accuracy[name] = np.where(dead, np.nan, acc)
            target = ye.to(torch.int64) if loss == "cross_entropy" else ye.to(out.dtype)
            losses[name] = np.where(dead, np.nan, _per_model_loss(out, target, loss).double().numpy())
    return ClassifierResult(train_loss=history, accuracy=accuracy, loss=losses,
                            diverged=(~alive).numpy(), nets=nets, lrs=np.array(lrs),
                            seeds=np.array(seeds))


@torch.no_grad()
def _kfac_curvature(optims, nets, X, Z, out, alive, loss: str) -> None:
    """Kronecker factors of the exact Fisher of each model's output distribution.

    For the softmax, ``E_y[g g^T] = diag(q) - q q^T = B B^T`` with
    ``B = diag(sqrt q) - q sqrt(q)^T`` (``q`` the predicted probabilities), so the
    output-layer factor sums ``B``'s columns and the hidden-layer factor the same
    columns back-propagated through ``W2`` and the ReLU mask. For MSE ``B`` is the
    identity (scaled by sqrt 2 for the loss ``(f - y)^2``).
    """
    K, N, C = out.shape
    if loss == "cross_entropy":
        q = out.softmax(-1)
        sq = q.sqrt()
        B = torch.diag_embed(sq) - q.unsqueeze(-1) * sq.unsqueeze(-2)       # (K, N, C, C)
    else:
        B = math.sqrt(2.0) * torch.eye(C, dtype=out.dtype).expand(K, N, C, C)
    H = Z.clamp_min(0.0)
    mask = (Z > 0).to(out.dtype)
    for k, opt in enumerate(optims):
        if not alive[k]:
            continue
        W2 = nets.params[k][2]
        g_out = B[k].transpose(1, 2).reshape(N * C, C)                       # rows: B[:, :, c]
        g_hid = (B[k].transpose(1, 2) @ W2) * mask[k].unsqueeze(1)           # (N, C, width)
        opt.update_curvature(0, X[k], g_hid.reshape(N * C, -1), n_samples=N)
        opt.update_curvature(1, H[k], g_out, n_samples=N)


@dataclass
class TuneResult:
    """Learning-rate choice of :func:`tune_lr` for one optimizer.

    ``grid: (L,)``; ``val_accuracy: (L, S)`` and ``val_loss: (L, S)`` per lr and
    selection seed (NaN where the run diverged), ``grid_diverged: (L, S)`` which of
    those runs diverged; ``lr`` the chosen value; ``accuracy[name]: (S,)`` and
    ``diverged: (S,)`` at it, over every seed; ``train_loss: (S, n_steps + 1)`` at it.
    """

    optimizer: str
    grid: np.ndarray
    val_accuracy: np.ndarray
    val_loss: np.ndarray
    lr: float
    accuracy: dict[str, np.ndarray]
    diverged: np.ndarray
    train_loss: np.ndarray
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    grid_diverged: np.ndarray | None = None


def tune_lr(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    optimizer: str,
    lr_grid: Sequence[float],
    seeds: Sequence[int],
    eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    n_select: int | None = None,
    **kwargs,
) -> TuneResult:
    """Pick a learning rate on validation accuracy, then train every seed with it.

    ``X_train: (S, N, dx)`` and ``y_train: (S, N)`` hold one training set per seed
    (likewise ``val`` and ``eval_sets``, whose tensors may also be shared). Every lr
    of ``lr_grid`` is trained on the first ``n_select`` seeds (all by default); the
    choice maximises their mean validation accuracy (a diverged run counts as 0),
    ties going to the lower mean validation loss. The other seeds are then trained
    at the chosen lr. Test sets never enter the choice. Other keyword arguments go
    to :func:`train_classifiers`; ``options["preconditioner"]`` may be ``(S, dx, dx)``.
    """
    grid = np.asarray([finite_real("lr", v) for v in lr_grid], dtype=float)
    if grid.size == 0 or (grid <= 0).any():
        raise ValueError(f"lr_grid must hold positive learning rates, got {list(lr_grid)}")
    seeds = [int(s) for s in seeds]
    S, L = len(seeds), grid.size
    n_select = S if n_select is None else positive_int("n_select", n_select)
    if n_select > S:
        raise ValueError(f"n_select={n_select} exceeds the {S} seeds given")
    sets = {"validation": val, **(eval_sets or {})}
    data = {"train": (_as_batch("X_train", X_train, S, 3), _as_batch("y_train", y_train, S, 2))}
    data.update({k: (_as_batch(f"{k} X", Xe, S, 3), _as_batch(f"{k} y", ye, S, 2))
                 for k, (Xe, ye) in sets.items()})
    opts = dict(kwargs.pop("options", None) or {})
    P = opts.get("preconditioner")
    P = None if P is None else torch.as_tensor(P)

    def run(idx: list[int], lrs: list[float]):
        """Train the seeds at positions ``idx`` with learning rates ``lrs``."""
        sel = torch.tensor(idx)
        run_opts = dict(opts)
        if P is not None and P.ndim == 3:
            run_opts["preconditioner"] = P[sel]
        evals = {k: (v[0][sel], v[1][sel]) for k, v in data.items() if k != "train"}
        return train_classifiers(data["train"][0][sel], data["train"][1][sel], optimizer, lrs,
                                 [seeds[i] for i in idx], eval_sets=evals, options=run_opts,
                                 **kwargs)

    start = time.perf_counter()
    first = list(range(n_select))
    res = run(first * L, list(np.repeat(grid, n_select)))
    acc = np.nan_to_num(res.accuracy["validation"], nan=0.0).reshape(L, n_select)
    vloss = np.nan_to_num(res.loss["validation"], nan=np.inf).reshape(L, n_select)
    best = max(range(L), key=lambda i: (acc[i].mean(), -vloss[i].mean()))
    rows = slice(best * n_select, (best + 1) * n_select)
    accuracy = {k: v[rows] for k, v in res.accuracy.items()}
    diverged, train_loss = res.diverged[rows], res.train_loss[rows]
    if n_select < S:
        rest = run(list(range(n_select, S)), [float(grid[best])] * (S - n_select))
        accuracy = {k: np.concatenate([v, rest.accuracy[k]]) for k, v in accuracy.items()}
        diverged = np.concatenate([diverged, rest.diverged])
        train_loss = np.concatenate([train_loss, rest.train_loss])
    return TuneResult(
        optimizer=optimizer, grid=grid,
        val_accuracy=res.accuracy["validation"].reshape(L, n_select),
        val_loss=res.loss["validation"].reshape(L, n_select), lr=float(grid[best]),
        accuracy=accuracy, diverged=diverged, train_loss=train_loss,
        seconds=time.perf_counter() - start, grid_diverged=res.diverged.reshape(L, n_select),
    )


def curvature_scale(X: torch.Tensor, P: torch.Tensor | None = None) -> float:
    """Largest eigenvalue of ``P^{1/2} M P^{1/2}``, ``M = X^T X / n`` for ``X: (n, dx)``.

    The first layer's curvature under the update ``grad @ P`` scales with this
    number (``M`` is the uncentred second moment, because the network sees the
    inputs uncentred), so a learning rate that is stable for ``P = I`` stays about
    as stable for ``P`` when divided by ``curvature_scale(X, P) / curvature_scale(X)``.
    """
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        raise ValueError(f"X must be a 2-D tensor (n, dx), got {getattr(X, 'shape', X)!r}")
    Xd = X.to(torch.float64)
    M = Xd.T @ Xd / Xd.shape[0]
    if P is not None:
        evals, evecs = torch.linalg.eigh(P.to(torch.float64))
        R = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        M = R @ M @ R
    return float(torch.linalg.eigvalsh(M)[-1])


def nearest_p(ps: Sequence[float], curve: np.ndarray, point: Sequence[float], n_grid: int = 401) -> float:
    """The ``p`` whose point on a piecewise-linear curve lies nearest to ``point``.

    ``curve: (len(ps), d)`` holds a measurement (for instance the two OOD
    accuracies) of exact preconditioning at each ``p`` of ``ps`` (increasing);
    ``point: (d,)`` the same measurement of another optimizer. The curve is
    interpolated linearly in ``p`` on ``n_grid`` points.
    """
    ps = np.asarray(ps, dtype=float)
    curve = np.asarray(curve, dtype=float)
    point = np.asarray(point, dtype=float)
    if ps.ndim != 1 or ps.size < 2 or np.any(np.diff(ps) <= 0):
        raise ValueError(f"ps must be at least two increasing values, got {ps.tolist()}")
    if curve.shape != (ps.size, point.size):
        raise ValueError(f"curve must have shape {(ps.size, point.size)}, got {curve.shape}")
    if not (np.isfinite(curve).all() and np.isfinite(point).all()):
        raise ValueError("curve and point must be finite")
    grid = np.linspace(ps[0], ps[-1], n_grid)
    dense = np.stack([np.interp(grid, ps, curve[:, j]) for j in range(point.size)], axis=1)
    return float(grid[np.argmin(((dense - point) ** 2).sum(1))])
