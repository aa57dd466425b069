"""K-FAC for fully connected layers, with the damped Kronecker factors inverted exactly.

For a linear layer ``s = W a + b`` (``W: (d_out, d_in)``) K-FAC approximates the
Fisher block of ``[W, b]`` by ``A (x) G``, with ``A = E[a~ a~^T]`` over the layer
inputs ``a~ = [a; 1]`` and ``G = E[g g^T]`` over the gradients ``g`` of the loss
with respect to ``s``. The update is

    [W, b] <- [W, b] - lr * (A (x) G + damping I)^{-1} vec(grad),

computed without forming the Kronecker product: with ``A = U_A diag(a) U_A^T`` and
``G = U_G diag(g) U_G^T``, it is ``U_G [(U_G^T V U_A) / (g a^T + damping)] U_A^T``
for ``V = [grad_W, grad_b]``. Damping the product exactly (rather than each factor)
keeps the single knob of the paper's code, ``damping = 1e-3``.

Why the book carries its own: the maintained PyTorch packages that compute K-FAC
(curvlinops-for-pytorch 3.0, nngeometry 0.4) provide curvature operators, not an
optimizer, and a plain ``pip install`` of either replaces the pinned CPU build of
torch with a newer CUDA build (their dependencies pull torchvision). Installed
without dependencies they import beside it; using them would still leave the update
to write, behind an install step that skips dependencies. The tests compare this
module with the dense Kronecker formula, and its factors with curvlinops' type-2
K-FAC where curvlinops is installed.

The factors are supplied by the caller (:func:`spectral_precond.optimizers.train_classifiers`
computes them with the exact Fisher of the softmax output), through
:meth:`KFAC.update_curvature`; between updates the last eigen-decompositions are reused.
"""

from __future__ import annotations

import torch

from ._checks import finite_real


class KFAC(torch.optim.Optimizer):
    """K-FAC over layers given as ``(weight, bias)`` pairs.

    Parameters
    ----------
    layers : list of (weight, bias)
        ``weight: (d_out, d_in)``; ``bias: (d_out,)`` or None.
    lr : float
    damping : float
        Added to the Kronecker product ``A (x) G`` before inversion; > 0.
    momentum : float
        Heavy-ball momentum on the preconditioned direction, in [0, 1).
    kl_clip : float or None
        Trust region of the common K-FAC implementations: the preconditioned
        directions ``v`` of all layers are scaled by
        ``min(1, sqrt(kl_clip / (lr^2 sum v . grad)))``, which bounds the change of
        the model's output distribution per step. Without it a small damping lets
        directions of tiny curvature take steps ``1 / damping`` times the gradient.
        None switches it off.

    :meth:`update_curvature` must have been called for every layer before the first
    :meth:`step`.
    """

    def __init__(self, layers, lr: float, damping: float = 1e-3, momentum: float = 0.0,
                 kl_clip: float | None = 1e-3):
        lr, damping, momentum = (finite_real(n, v) for n, v in
                                 (("lr", lr), ("damping", damping), ("momentum", momentum)))
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if kl_clip is not None and not finite_real("kl_clip", kl_clip) > 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip}")
        self.kl_clip = kl_clip
        groups = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, (tuple, list)) or len(layer) != 2:
                raise TypeError(f"layer {i} must be a (weight, bias) pair, got {type(layer).__name__}")
            weight, bias = layer
            if weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[:1]):
                raise ValueError(
                    f"layer {i}: weight must be (d_out, d_in) and bias (d_out,), got "
                    f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}"
                )
            groups.append({"params": [weight] + ([bias] if bias is not None else []),
                           "has_bias": bias is not None})
        super().__init__(groups, {"lr": lr, "damping": damping, "momentum": momentum})

    @torch.no_grad()
    def update_curvature(self, layer: int, inputs: torch.Tensor, output_grads: torch.Tensor,
                         n_samples: int | None = None) -> None:
        """Set the factors of ``layer`` from ``inputs: (n, d_in)`` and
        ``output_grads: (m, d_out)``.

        ``A = a~^T a~ / n`` and ``G = g^T g / n_samples`` (``n_samples`` defaults to
        ``m``; pass ``n`` when ``output_grads`` stacks several vectors per sample, as
        in the exact Fisher, where they are summed, not averaged).
        """
        group = self.param_groups[layer]
        weight = group["params"][0]
        d_out, d_in = weight.shape
        if inputs.ndim != 2 or inputs.shape[1] != d_in:
            raise ValueError(f"inputs must be (n, {d_in}), got {tuple(inputs.shape)}")
        if output_grads.ndim != 2 or output_grads.shape[1] != d_out:
            raise ValueError(f"output_grads must be (m, {d_out}), got {tuple(output_grads.shape)}")
        a = inputs
        if group["has_bias"]:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        A = a.T @ a / a.shape[0]
        G = output_grads.T @ output_grads / (n_samples or output_grads.shape[0])
        # float64 for the decompositions: the factors are often nearly singular.
        group["eig_A"] = tuple(t.to(weight.dtype) for t in torch.linalg.eigh(A.double()))
        group["eig_G"] = tuple(t.to(weight.dtype) for t in torch.linalg.eigh(G.double()))

    @staticmethod
    def precondition(grad: torch.Tensor, eig_A, eig_G, damping: float) -> torch.Tensor:
        """``(A (x) G + damping I)^{-1} vec(grad)`` reshaped like ``grad: (d_out, d_in)``."""
        (a, UA), (g, UG) = eig_A, eig_G
        inner = UG.T @ grad @ UA
        return UG @ (inner / (g.clamp_min(0)[:, None] * a.clamp_min(0)[None, :] + damping)) @ UA.T

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions = []
        for group in self.param_groups:
            params = group["params"]
            if any(p.grad is None for p in params):
                continue
            V = params[0].grad
            if group["has_bias"]:
                V = torch.cat([V, params[1].grad[:, None]], dim=1)
            if "eig_A" not in group:
                raise RuntimeError("call update_curvature for every layer before the first step")
            directions.append((group, V, self.precondition(V, group["eig_A"], group["eig_G"], group["damping"])))
        scale = 1.0
        if self.kl_clip is not None and directions:
            vg = sum((v * V).sum().item() * group["lr"] ** 2 for group, V, v in directions)
            if vg > 0:
                scale = min(1.0, (self.kl_clip / vg) ** 0.5)
        for group, _, update in directions:
            params = group["params"]
            update = update * scale
            if group["momentum"]:
                state = self.state[params[0]]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                update = buf
            params[0].sub_(update[:, : params[0].shape[1]], alpha=group["lr"])
            if group["has_bias"]:
                params[1].sub_(update[:, -1], alpha=group["lr"])
        return loss
