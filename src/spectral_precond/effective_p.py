"""The effective ``p`` of an optimizer, read from the first features its network forms.

Exact first-layer preconditioning with ``P = Sigma^p`` moves the first layer by
``-lr * G @ P``. Along an eigendirection ``u_i`` of the input covariance
(eigenvalue ``lambda_i``) that is ``-lr * lambda_i^p * G u_i``. Early in training,
while the gradient ``G`` still looks like the gradient ``G_0`` at initialisation,
the energy that the first layer gains along ``u_i`` is therefore

    E_i = ||(W1_T - W1_0) u_i||^2  ~  const * lambda_i^{2p} * ||G_0 u_i||^2.

:func:`effective_p` reads ``p`` back from any trained network as half the
least-squares slope of ``log(E_i / ||G_0 u_i||^2)`` against ``log lambda_i``, and
reports how far the profile is from a power law (the misfit). :func:`plateau_step`
chooses when to measure: the last step of a ladder at which the training loss is
still within a tolerance of its initial value. Once the network has learned the
teacher's direction every profile tends to that direction's, whatever the
optimizer, so the measurement belongs to the early phase.

The optimizers (SOAP and Muon included) come from :mod:`spectral_precond.optimizers`
and train through :func:`~spectral_precond.optimizers.train_classifiers` with the
mean squared error (:func:`train_regressors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ._checks import finite_real
from .data import GaussianInputs
from .metrics import eigendirection_energy
from .networks import Params, preactivations, predict
from .optimizers import (
    ClassifierResult,
    TwoLayerNets,
    train_classifiers,
)



def first_layer_gradient(
    params: Params, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``dL/dW1`` of ``L = mean_n (f(x_n) - y_n)^2`` for each model, ``(G, M, dh, dx)``.

    Parameters
    ----------
    params : Params
        A ``(G, M)`` grid.
    X : (G, N, dx)
        Inputs of each group.
    y : (G, M, N)
        Targets of each model.
    """
    if not isinstance(params, Params):
        raise TypeError(f"params must be Params, got {type(params).__name__}")
    G, M = params.grid
    if (
        not isinstance(X, torch.Tensor)
        or X.ndim != 3
        or X.shape[0] != G
        or X.shape[2] != params.dim
    ):
        raise ValueError(
            f"X must have shape ({G}, N, {params.dim}), got "
            f"{tuple(getattr(X, 'shape', ()))}"
        )
    N = X.shape[1]
    if not isinstance(y, torch.Tensor) or y.shape != (G, M, N):
        raise ValueError(
            f"y must have shape {(G, M, N)}, got {tuple(getattr(y, 'shape', ()))}"
        )
    X = X.to(params.W1)
    d = 2.0 * (predict(params, X) - y.to(params.W1)) / N  # (G, M, N)
    gate = (preactivations(params, X) > 0).to(params.W1)  # (G, M, dh, N)
    weighted = gate * d.unsqueeze(-2) * params.W2.unsqueeze(-1)
    return weighted @ X.unsqueeze(1)


def p_from_energies(
    energy: torch.Tensor, reference: torch.Tensor, eigenvalues
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the slope of ``log(energy / reference)`` on ``log eigenvalues``; the misfit.

    Parameters
    ----------
    energy, reference : (..., k) positive
        Energy gained along each of ``k`` directions (>= 0), and the reference energy
        (the initial gradient's, > 0) along the same directions.
    eigenvalues : (k,) positive, not all equal

    Returns
    -------
    p_hat, misfit : (...,) tensors
        ``p_hat`` is ``slope / 2``; ``misfit`` is half the root-mean-square residual of
        the straight line, in units of log energy (0 for an exact power law). Both are
        NaN where ``energy`` is 0 along some direction (the first layer has not moved
        there).
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if lam.ndim != 1 or not torch.isfinite(lam).all() or (lam <= 0).any():
        raise ValueError(
            f"eigenvalues must be a 1-D tensor of positive values, got {lam.tolist()}"
        )
    x = lam.log()
    if (x - x.mean()).abs().max() < 1e-12:
        raise ValueError("eigenvalues must not all be equal: the slope is undefined")
    E = torch.as_tensor(energy, dtype=torch.float64)
    R = torch.as_tensor(reference, dtype=torch.float64)
    if E.shape != R.shape or E.shape[-1] != lam.numel():
        raise ValueError(
            f"energy {tuple(E.shape)} and reference {tuple(R.shape)} must share a "
            f"shape ending in {lam.numel()} directions"
        )
    if (
        not (torch.isfinite(E).all() and torch.isfinite(R).all())
        or (E < 0).any()
        or (R <= 0).any()
    ):
        raise ValueError("energy must be finite and >= 0, reference finite and > 0")
    z = (E / R).log()
    xc = x - x.mean()
    zc = z - z.mean(-1, keepdim=True)
    slope = (zc * xc).sum(-1) / xc.square().sum()
    resid = zc - slope.unsqueeze(-1) * xc
    rms = resid.square().mean(-1).sqrt()
    # A model that has not moved along some direction has no slope.
    still = (E == 0).any(-1)
    nan = torch.full_like(slope, float("nan"))
    return torch.where(still, nan, slope / 2), torch.where(still, nan, rms / 2)


def reference_energy(
    init: Params, X: torch.Tensor, y: torch.Tensor, eigenvectors: torch.Tensor
) -> torch.Tensor:
    """``||G_0 u_i||^2``, the initial gradient's energy along each direction: (G, M, k).

    ``G_0`` is :func:`first_layer_gradient` at ``init`` on ``(X: (G, N, dx),
    y: (G, M, N))``; ``eigenvectors: (dx, k)`` holds the directions ``u_i`` as columns.
    """
    G0 = first_layer_gradient(init, X, y)
    if (
        not isinstance(eigenvectors, torch.Tensor)
        or eigenvectors.ndim != 2
        or eigenvectors.shape[0] != init.dim
    ):
        raise ValueError(
            f"eigenvectors must be ({init.dim}, k), got "
            f"{tuple(getattr(eigenvectors, 'shape', ()))}"
        )
    return (G0 @ eigenvectors.to(G0)).square().sum(-2)


def effective_p(
    params: Params,
    init: Params,
    X: torch.Tensor,
    y: torch.Tensor,
    inputs: GaussianInputs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective ``p`` and power-law misfit of every model of a grid, each ``(G, M)``.

    ``E_i = ||(W1 - W1_init) u_i||^2`` (the energy gained along eigendirection
    ``u_i`` of ``inputs``) is compared with :func:`reference_energy` at ``init`` on
    ``(X: (G, N, dx), y: (G, M, N))``: see :func:`p_from_energies`.
    """
    if not isinstance(inputs, GaussianInputs):
        raise TypeError(f"inputs must be GaussianInputs, got {type(inputs).__name__}")
    U = inputs.eigenvectors
    energy = eigendirection_energy(params, U, reference=init)
    return p_from_energies(energy, reference_energy(init, X, y, U), inputs.eigenvalues)


def plateau_step(
    train_loss: np.ndarray, ladder: Sequence[int], tol: float = 0.01
) -> int:
    """The last step of ``ladder`` up to which every model's loss stays near its start.

    ``train_loss: (K, T + 1)`` holds the loss before each step (column 0: at
    initialisation). Returns the largest ``t`` of ``ladder`` (``1 <= t <= T``) such that
    ``|loss[k, s] - loss[k, 0]| <= tol * loss[k, 0]`` for every model ``k`` and every
    ``s <= t``; the smallest ladder step if even that one is outside the band.
    """
    L = np.asarray(train_loss, dtype=float)
    if L.ndim != 2 or L.shape[1] < 2:
        raise ValueError(
            f"train_loss must be (K, T + 1) with T >= 1, got shape {L.shape}"
        )
    steps = np.unique(np.asarray(ladder))
    if steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(
            f"ladder must be a non-empty list of ints, got {list(ladder)!r}"
        )
    if steps.min() < 1 or steps.max() >= L.shape[1]:
        raise ValueError(
            f"ladder steps must lie in [1, {L.shape[1] - 1}], got {steps.tolist()}"
        )
    tol = finite_real("tol", tol)
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    inside = np.abs(L - L[:, :1]) <= tol * np.abs(L[:, :1])  # NaN counts as outside
    inside = np.logical_and.accumulate(inside.all(0))
    good = [int(t) for t in steps if inside[t]]
    return good[-1] if good else int(steps[0])


def small_init(seeds: Sequence[int], dx: int, width: int, scale: float = 1e-3) -> list:
    """The paper's initialisation as ``[W1, b1, W2, b2]`` per model, for ``init=``.

    The same draws as :func:`~spectral_precond.networks.kaiming_init` (kaiming-uniform
    times ``scale``, zero biases) with ``W2: (1, width)`` and ``b2: (1,)``, the
    layout of the optimizer adapters' networks.
    """
    from .networks import kaiming_init

    params = kaiming_init(np.asarray([list(seeds)]), dx, width, scale)
    return [
        [
            params.W1[0, k],
            params.b1[0, k],
            params.W2[0, k][None, :],
            params.b2[0, k][None],
        ]
        for k in range(len(seeds))
    ]


def as_params(nets: TwoLayerNets) -> Params:
    """The adapters' ``K`` one-output networks as a ``(K, 1)`` :class:`Params` grid.

    One group per network, since each may have been trained on its own data set.
    """
    if not isinstance(nets, TwoLayerNets):
        raise TypeError(f"nets must be TwoLayerNets, got {type(nets).__name__}")
    if nets.params[0][2].shape[0] != 1:
        raise ValueError(
            f"networks must have one output, got {nets.params[0][2].shape[0]}"
        )
    parts = [torch.stack([m[i].detach() for m in nets.params]) for i in range(4)]
    return Params(
        parts[0][:, None], parts[1][:, None], parts[2][:, :1], parts[3][:, :1]
    )


def train_regressors(
    name: str,
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    lrs: Sequence[float],
    init: Sequence[Sequence[torch.Tensor]],
    n_steps: int,
    eval_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    options: Mapping | None = None,
    seeds: Sequence[int] | None = None,
    dtype=torch.float32,
) -> ClassifierResult:
    """Train ``K = len(init)`` one-output networks on the MSE with optimizer ``name``.

    ``name`` is one of :data:`~spectral_precond.optimizers.OPTIMIZER_NAMES`;
    ``options`` go to the optimizer (for ``"muon"``: ``adamw_lr`` among others).
    ``seeds`` seed AdaHessian's probes (``0 .. K-1`` by default). No weight decay.
    """
    seeds = list(range(len(init))) if seeds is None else list(seeds)
    return train_classifiers(
        X_train, y_train, name, list(lrs), seeds, n_steps=n_steps,
        width=init[0][0].shape[0], options=options, eval_sets=eval_sets, loss="mse",
        dtype=dtype, init=init,
    )


@dataclass
class Measurement:
    """What :func:`measure_effective_p` returns for ``K`` models.

    ``p, misfit: (K,)`` (see :func:`p_from_energies`); ``step`` the measurement step
    chosen by :func:`plateau_step`; ``train_loss: (K, max(ladder) + 1)`` the training
    loss of the run that chose it; ``diverged: (K,)`` whether a model diverged in it.
    """

    p: np.ndarray
    misfit: np.ndarray
    step: int
    train_loss: np.ndarray
    diverged: np.ndarray


def measure_effective_p(
    name: str,
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    lrs: Sequence[float],
    init: Sequence[Sequence[torch.Tensor]],
    inputs: GaussianInputs,
    ladder: Sequence[int],
    tol: float = 0.01,
    options: Mapping | None = None,
    seeds: Sequence[int] | None = None,
    dtype=torch.float32,
) -> Measurement:
    """Train with ``name``, choose the measurement step, and read the effective ``p``.

    The models (``X_train: (K, N, dx)``, ``y_train: (K, N)``, one lr and one
    ``[W1, b1, W2, b2]`` each) train for ``max(ladder)`` steps; :func:`plateau_step`
    picks the last ladder step at which every model's loss is still within ``tol`` of
    its start; the same runs are repeated up to that step (every optimizer here is
    deterministic given its seeds) and :func:`effective_p` reads their first layers.
    """
    if not ladder:
        raise ValueError("ladder must hold at least one step")
    full = train_regressors(
        name,
        X_train,
        y_train,
        lrs,
        init,
        int(max(ladder)),
        options=options,
        seeds=seeds,
        dtype=dtype,
    )
    step = plateau_step(full.train_loss, ladder, tol)
    early = train_regressors(
        name,
        X_train,
        y_train,
        lrs,
        init,
        step,
        options=options,
        seeds=seeds,
        dtype=dtype,
    )
    replay = np.allclose(
        early.train_loss,
        full.train_loss[:, : step + 1],
        rtol=1e-5,
        atol=1e-7,
        equal_nan=True,
    )
    if not replay:
        raise RuntimeError(f"optimizer {name!r} did not repeat its first {step} steps")
    # The start as the networks saw it, in the training dtype: a float64 copy would
    # count the rounding of the initial weights as movement.
    start = as_params(
        TwoLayerNets(
            range(len(init)),
            X_train.shape[2],
            init[0][0].shape[0],
            1,
            dtype=dtype,
            init=init,
        )
    ).to(torch.float64)
    learned = as_params(early.nets).to(torch.float64)
    X = X_train.to(torch.float64)
    y = y_train.to(torch.float64).unsqueeze(1)
    p, misfit = effective_p(learned, start, X, y, inputs)
    return Measurement(
        p=p[:, 0].numpy(),
        misfit=misfit[:, 0].numpy(),
        step=step,
        train_loss=full.train_loss,
        diverged=full.diverged,
    )


def select_config(val_mse: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the configuration with the lowest mean validation MSE, and the means.

    ``val_mse: (C, S)`` final validation MSE per configuration and seed, NaN for a
    diverged run, which counts as +inf. Ties go to the later configuration (list
    learning rates in increasing order to prefer the larger one).
    """
    mse = np.asarray(val_mse, dtype=float)
    if mse.ndim != 2 or mse.size == 0:
        raise ValueError(
            f"val_mse must be a non-empty (configurations, seeds) array, got "
            f"{mse.shape}"
        )
    mean = np.where(np.isnan(mse), np.inf, mse).mean(1)
    if not np.isfinite(mean).any():
        raise ValueError("every configuration diverged on some seed")
    best = max(range(mean.size), key=lambda i: (-mean[i], i))
    return best, mean


__all__ = [
    "as_params",
    "effective_p",
    "first_layer_gradient",
    "Measurement",
    "measure_effective_p",
    "p_from_energies",
    "plateau_step",
    "reference_energy",
    "select_config",
    "small_init",
    "train_regressors",
]
