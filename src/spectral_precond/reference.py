"""A slow, independent trainer for one model: ``torch.nn`` with autograd.

Written without calling :mod:`training`, so that tests can check the batched
trainer against it. The first-layer weight gradient is multiplied by ``P`` on the
right before the plain gradient-descent step; the loss is the mean squared error
plus ``0.5 * weight_decay / N * (||W1||^2 + ||W2||^2)``.
"""

from __future__ import annotations

import torch
from torch import nn


def reference_train(
    X: torch.Tensor,
    y: torch.Tensor,
    P: torch.Tensor,
    W1: torch.Tensor,
    b1: torch.Tensor,
    W2: torch.Tensor,
    b2: torch.Tensor,
    n_steps: int,
    lr: float = 1e-2,
    weight_decay: float = 1e-6,
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    test_steps=None,
):
    """Train one network; return ``(losses, (W1, b1, W2, b2))``.

    ``X: (N, dx)``, ``y: (N,)``, ``P: (dx, dx)``, ``W1: (dh, dx)``, ``b1, W2: (dh,)``,
    ``b2: ()``. ``losses`` has ``n_steps + 1`` entries: the mean squared error before
    each step and after the last one. With a test set, the test error is evaluated at
    ``test_steps`` (every step when None), as the authors' script does, and
    ``(losses, test_losses, params)`` is returned, ``test_losses`` a dict by step.
    """
    dtype = X.dtype
    dh, dx = W1.shape
    net = nn.Sequential(nn.Linear(dx, dh), nn.ReLU(), nn.Linear(dh, 1)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[0].bias.copy_(b1)
        net[2].weight.copy_(W2.reshape(1, dh))
        net[2].bias.copy_(b2.reshape(1))
    P = P.to(dtype)
    N = X.shape[0]
    losses, test_losses = [], {}
    wanted = None if test_steps is None else set(int(s) for s in test_steps)
    for step in range(n_steps + 1):
        net.zero_grad()
        mse = nn.functional.mse_loss(net(X).squeeze(-1), y)
        losses.append(mse.item())
        if X_test is not None and (wanted is None or step in wanted):
            with torch.no_grad():
                test_losses[step] = nn.functional.mse_loss(net(X_test).squeeze(-1), y_test).item()
        if step == n_steps:
            break
        penalty = net[0].weight.pow(2).sum() + net[2].weight.pow(2).sum()
        (mse + 0.5 * weight_decay / N * penalty).backward()
        with torch.no_grad():
            net[0].weight.grad = net[0].weight.grad @ P
            for param in net.parameters():
                param -= lr * param.grad
    final = (
        net[0].weight.detach().clone(),
        net[0].bias.detach().clone(),
        net[2].weight.detach().reshape(dh).clone(),
        net[2].bias.detach().reshape(()).clone(),
    )
    if X_test is not None:
        return torch.tensor(losses, dtype=dtype), test_losses, final
    return torch.tensor(losses, dtype=dtype), final
