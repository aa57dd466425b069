"""K-FAC against the dense Kronecker-factored formula."""

import pytest
import torch

from spectral_precond.kfac import KFAC
from spectral_precond.optimizers import TwoLayerNets, _kfac_curvature

torch.set_default_dtype(torch.float64)


def tiny_layer(seed=0, d_out=3, d_in=4, n=7):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(2 * n, d_out, generator=gen, dtype=torch.float64)
    W.grad = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    b.grad = torch.randn(d_out, generator=gen, dtype=torch.float64)
    return W, b, a, g


def dense_direction(W, b, a, g, n, damping):
    a1 = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    A = a1.T @ a1 / a1.shape[0]
    G = g.T @ g / n
    V = torch.cat([W.grad, b.grad[:, None]], 1)
    F = torch.kron(A, G) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    # column-major vec: vec(G V A) = (A kron G) vec(V)
    v = torch.linalg.solve(F, V.T.reshape(-1))
    return v.reshape(A.shape[0], G.shape[0]).T


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_step_equals_the_dense_damped_kronecker_solve(damping):
    W, b, a, g = tiny_layer()
    W0, b0 = W.detach().clone(), b.detach().clone()
    opt = KFAC([(W, b)], lr=0.1, damping=damping, kl_clip=None)
    opt.update_curvature(0, a, g, n_samples=a.shape[0])
    opt.step()
    expected = dense_direction(W, b, a, g, a.shape[0], damping)
    torch.testing.assert_close(W0 - W.detach(), 0.1 * expected[:, :-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b0 - b.detach(), 0.1 * expected[:, -1], rtol=1e-9, atol=1e-12)


def test_kl_clip_bounds_the_step_and_momentum_accumulates():
    W, b, a, g = tiny_layer(seed=1)
    W0 = W.detach().clone()
    opt = KFAC([(W, b)], lr=1.0, damping=1e-3, kl_clip=1e-6)
    opt.update_curvature(0, a, g)
    opt.step()
    v = dense_direction(W, b, a, g, g.shape[0], 1e-3)
    V = torch.cat([W.grad, b.grad[:, None]], 1)
    scale = (1e-6 / (v * V).sum()).sqrt()
    assert scale < 1
    torch.testing.assert_close(W0 - W.detach(), scale * v[:, :-1])
    W1 = W.detach().clone()
    opt.step()  # same gradient again: momentum buffer = (1 + 0.0) * v, no momentum given
    torch.testing.assert_close(W1 - W.detach(), scale * v[:, :-1])
    W2_, b2_, a2, g2 = tiny_layer(seed=1)
    with_momentum = KFAC([(W2_, b2_)], lr=1.0, damping=1e-3, momentum=0.5, kl_clip=1e-6)
    with_momentum.update_curvature(0, a2, g2)
    with_momentum.step()
    before = W2_.detach().clone()
    with_momentum.step()
    torch.testing.assert_close(before - W2_.detach(), 1.5 * scale * v[:, :-1])


def test_kfac_refuses_to_step_without_curvature_and_checks_inputs():
    W, b, a, g = tiny_layer()
    opt = KFAC([(W, b)], lr=0.1)
    with pytest.raises(RuntimeError, match="update_curvature"):
        opt.step()
    with pytest.raises(ValueError, match=r"inputs must be \(n, 4\)"):
        opt.update_curvature(0, a[:, :3], g)
    with pytest.raises(ValueError, match="damping must be > 0"):
        KFAC([(W, b)], lr=0.1, damping=0.0)
    with pytest.raises(TypeError, match=r"\(weight, bias\) pair"):
        KFAC([W], lr=0.1)


def test_curvature_of_the_classifier_is_the_exact_softmax_fisher():
    """G of the output layer is E_n[diag(q) - q q^T]; G of the hidden layer is
    E_n[D W2^T (diag(q) - q q^T) W2 D], D the ReLU mask."""
    nets = TwoLayerNets([0], dx=5, width=6, n_out=4, dtype=torch.float64)
    X = torch.randn(1, 9, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    opt = KFAC([(nets.params[0][0], nets.params[0][1]), (nets.params[0][2], nets.params[0][3])], lr=0.1)
    with torch.no_grad():
        Z, out = nets.forward(X)
    _kfac_curvature([opt], nets, X, Z, out, torch.ones(1, dtype=torch.bool), "cross_entropy")
    q = out[0].softmax(-1)
    Hq = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    W2 = nets.params[0][2].detach()
    D = (Z[0] > 0).double()
    G_out = Hq.mean(0)
    G_hid = torch.einsum("ni,ic,ncd,dj,nj->ij", D, W2.T, Hq, W2, D) / 9
    for group, expected in zip(opt.param_groups, [G_hid, G_out]):
        g, U = group["eig_G"]
        torch.testing.assert_close((U * g) @ U.T, expected)
    H1 = torch.cat([Z[0].clamp_min(0), torch.ones(9, 1, dtype=torch.float64)], 1)
    a, U = opt.param_groups[1]["eig_A"]
    torch.testing.assert_close((U * a) @ U.T, H1.T @ H1 / 9)


def test_factors_match_curvlinops_type2_kfac_where_it_is_installed():
    """An independent implementation: curvlinops' KFAC with the type-2 (exact) Fisher.

    curvlinops is not a dependency (its requirements replace the CPU build of torch);
    install it with ``pip install --no-deps curvlinops-for-pytorch einops einconv
    linear_operator`` to run this check.
    """
    curvlinops = pytest.importorskip("curvlinops")
    from torch import nn

    nets = TwoLayerNets([3], dx=6, width=7, n_out=5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(1, 11, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (11,), generator=gen)
    W1, b1, W2, b2 = nets.params[0]
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5)).double()
    with torch.no_grad():
        for layer, (W, b) in zip([model[0], model[2]], [(W1, b1), (W2, b2)]):
            layer.weight.copy_(W)
            layer.bias.copy_(b)
    reference = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[0], y)],
        fisher_type="type-2", separate_weight_and_bias=False, check_deterministic=False)
    reference.compute_kronecker_factors()
    opt = KFAC([(W1, b1), (W2, b2)], lr=0.1)
    with torch.no_grad():
        Z, out = nets.forward(X)
    _kfac_curvature([opt], nets, X, Z, out, torch.ones(1, dtype=torch.bool), "cross_entropy")
    for name, group in zip(["0", "2"], opt.param_groups):
        a, UA = group["eig_A"]
        g, UG = group["eig_G"]
        torch.testing.assert_close((UA * a) @ UA.T, reference._input_covariances[name])
        torch.testing.assert_close((UG * g) @ UG.T, reference._gradient_covariances[name])
