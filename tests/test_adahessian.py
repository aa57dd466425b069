"""AdaHessian at any power: the relaxed class, the closed-form Hessian products, the trainer."""

import math

import numpy as np
import pytest
import torch
from pytorch_optimizer import AdaHessian

import spectral_precond as sp
from spectral_precond.adahessian import (
    RelaxedAdaHessian,
    gradient_and_hvp,
    probe_generators,
    rademacher_like,
    train_adahessian,
)

# autograd's warning about create_graph=True in the maintained optimizer's own path
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


def _net(seed, dx=4, dh=6, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(dh, dx), (dh,), (dh,), ()]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(True) for s in shapes]


def _loss(net, X, y, wd=0.0):
    W1, b1, W2, b2 = net
    f = torch.relu(X @ W1.T + b1) @ W2 + b2
    return ((f - y) ** 2).mean() + 0.5 * wd / X.shape[0] * (W1.pow(2).sum() + W2.pow(2).sum())


def _quadratic_run(opt_cls, power, n_steps=6):
    """A few steps on a fixed quadratic with autograd's Hutchinson estimate."""
    torch.manual_seed(0)
    A = torch.tensor([[3.0, 0.5], [0.5, 0.2]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = opt_cls([x], lr=0.1, hessian_power=power)
    path = []
    for _ in range(n_steps):
        opt.zero_grad()
        (0.5 * x @ A @ x).backward(create_graph=True)
        opt.step()
        path.append(x.detach().clone())
    return torch.stack(path)


@pytest.mark.parametrize("power", [0.25, 0.5, 1.0])
def test_relaxed_class_equals_the_maintained_one_on_its_range(power):
    assert torch.equal(_quadratic_run(RelaxedAdaHessian, power), _quadratic_run(AdaHessian, power))


@pytest.mark.parametrize("power", [0.0, -0.5, -1.0])
def test_maintained_class_refuses_what_the_relaxed_one_accepts(power):
    with pytest.raises(ValueError, match="Hessian Power"):
        _quadratic_run(AdaHessian, power)
    assert torch.isfinite(_quadratic_run(RelaxedAdaHessian, power)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_relaxed_class_still_refuses_non_finite_powers(bad):
    with pytest.raises(ValueError, match="hessian_power must be finite"):
        RelaxedAdaHessian([torch.zeros(2)], hessian_power=bad)


@pytest.mark.parametrize("power", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_first_step_divides_the_gradient_by_the_curvature_to_the_power(power):
    """With a supplied Hessian diagonal h, the first step (bias-corrected moments)
    is -lr * g * |h|^(-power): a negative power multiplies steps by the curvature."""
    g = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    h = torch.tensor([4.0, 0.25, -9.0], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    opt = RelaxedAdaHessian([x], lr=0.1, hessian_power=power, eps=0.0)
    x.grad = g.clone()
    opt.step(hessian=[h.clone()])
    expected = -0.1 * g * h.abs() ** (-power)
    assert torch.allclose(x, expected, rtol=1e-12, atol=0)


def _grid_problem(G=2, M=3, N=7, dx=4, dh=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(G, N, dx, generator=gen, dtype=torch.float64)
    y = torch.randn(G, M, N, generator=gen, dtype=torch.float64)
    params = sp.Params(*(torch.randn(G, M, *s, generator=gen, dtype=torch.float64)
                         for s in [(dh, dx), (dh,), (dh,), ()]))
    return X, y, params


def test_closed_form_gradient_and_hessian_product_match_autograd():
    X, y, params = _grid_problem()
    probe = rademacher_like(params, probe_generators([1] * params.grid[0]))
    wd = 0.3
    loss, grad, hvp = gradient_and_hvp(params, X, y, probe, weight_decay=wd)
    G, M = params.grid
    for g in range(G):
        for m in range(M):
            net = [t.clone().requires_grad_(True) for t in params.model(g, m)]
            L = _loss(net, X[g], y[g, m], wd)
            grads = torch.autograd.grad(L, net, create_graph=True)
            v = probe.model(g, m)
            Hv = torch.autograd.grad(grads, net, grad_outputs=v)
            mse = _loss(net, X[g], y[g, m]).item()
            assert math.isclose(loss[g, m].item(), mse, rel_tol=1e-12)
            for ours, ref in zip(grad.model(g, m), grads):
                assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
            for ours, ref in zip(hvp.model(g, m), Hv):
                assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_rademacher_probe_has_entries_plus_minus_one():
    _, _, params = _grid_problem(G=3, M=4, dh=50)
    v = rademacher_like(params, probe_generators([0, 1, 2]))
    W1 = v.W1
    assert set(W1.unique().tolist()) == {-1.0, 1.0}
    assert abs(W1.mean().item()) < 0.1


def test_trainer_equals_one_maintained_optimizer_per_model():
    """The batched trainer (groups of stacked models, closed-form products) takes the
    steps that one maintained AdaHessian per model takes with autograd products and
    the same probes; powers differ between models."""
    X, y, params = _grid_problem(G=2, M=3)
    params = sp.Params(*(0.5 * t for t in params.tensors()))
    powers = [1.0, 0.5, 0.5]
    n_steps, lr, wd = 8, 0.02, 0.1
    config = sp.TrainConfig(n_steps=n_steps, lr=lr, weight_decay=wd,
                            log_steps=list(range(n_steps + 1)))
    out = train_adahessian(X, y, params, powers, config, seed=5)

    gens = probe_generators([5, 5])
    nets = [[[t.clone().requires_grad_(True) for t in params.model(g, m)] for m in range(3)]
            for g in range(2)]
    opts = [[AdaHessian(nets[g][m], lr=lr, hessian_power=powers[m]) for m in range(3)]
            for g in range(2)]
    ref = np.zeros((2, 3, n_steps + 1))
    for t in range(n_steps + 1):
        current = sp.Params.stack([[tuple(x.detach() for x in nets[g][m]) for m in range(3)]
                                   for g in range(2)])
        probe = rademacher_like(current, gens) if t < n_steps else None
        for g in range(2):
            for m in range(3):
                net = nets[g][m]
                ref[g, m, t] = _loss(net, X[g], y[g, m]).item()
                if probe is None:
                    continue
                L = _loss(net, X[g], y[g, m], wd)
                grads = torch.autograd.grad(L, net, create_graph=True)
                v = probe.model(g, m)
                Hv = torch.autograd.grad(grads, net, grad_outputs=v)
                for p, gr in zip(net, grads):
                    p.grad = gr.detach()
                opts[g][m].step(hessian=[vi * hi for vi, hi in zip(v, Hv)])
    assert np.allclose(out.train_loss.numpy(), ref, rtol=1e-10, atol=1e-12)
    for g in range(2):
        for m in range(3):
            for ours, theirs in zip(out.params.model(g, m), nets[g][m]):
                assert torch.allclose(ours, theirs.detach(), rtol=1e-9, atol=1e-12)


def test_trainer_results_do_not_depend_on_the_number_of_threads():
    X, y, params = _grid_problem(G=3, M=2)
    config = sp.TrainConfig(n_steps=6, lr=0.01, log_steps=[0, 3, 6])
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append(train_adahessian(X, y, params, [1.0, -0.5], config, X, y,
                                        seed=[4, 5, 6]))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for other in out[1:]:
        assert torch.equal(other.train_loss, out[0].train_loss)
        assert torch.equal(other.test_loss, out[0].test_loss)
        assert torch.equal(other.params.W1, out[0].params.W1)


def test_trainer_records_test_loss_and_fits_the_regression():
    case = sp.case_high()
    data = sp.make_regression_data(case.inputs, case.teacher(sp.generator(0, "teacher")),
                                   n_samples=400, n_train=100, snr=4.0,
                                   generator=sp.generator(0, "data"))
    init = sp.kaiming_init([[0, 0]], dx=10, dh=32, scale=1e-3)
    config = sp.TrainConfig(n_steps=300, lr=1e-2, n_log=10)
    out = train_adahessian(data.X_train[None], data.y_train.expand(1, 2, -1), init,
                           [1.0, 0.0], config, data.X_test[None], data.y_test.expand(1, 2, -1))
    assert out.test_loss.shape == (1, 2, len(out.steps))
    init_pred = sp.predict(init, data.X_test[None])
    first = (init_pred - data.y_test).square().mean(-1)
    assert torch.allclose(out.test_loss[..., 0], first, rtol=1e-10)
    final = (sp.predict(out.params, data.X_test[None]) - data.y_test).square().mean(-1)
    assert torch.allclose(out.test_loss[..., -1], final, rtol=1e-10)
    assert (out.train_loss[..., -1] < out.train_loss[..., 0]).all()
    assert out.train_loss[0, 1, -1] < 0.5 * out.train_loss[0, 1, 0]     # power 0: fast
    assert (out.diverged_at == -1).all()


def test_diverging_model_is_frozen_and_the_others_are_not_touched():
    X, y, params = _grid_problem(G=1, M=2)
    X = 3 * X                     # curvature ~ 10: power -3 multiplies steps by ~1000
    params = sp.Params(*(0.3 * t for t in params.tensors()))
    config = sp.TrainConfig(n_steps=30, lr=0.05, log_steps=list(range(31)),
                            divergence_factor=10.0)
    both = train_adahessian(X, y, params, [-3.0, 0.5], config)
    healthy = train_adahessian(X, y, params, [0.0, 0.5], config)   # same probes
    assert both.diverged_at[0, 0] >= 0 and both.diverged_at[0, 1] == -1
    assert (healthy.diverged_at == -1).all()
    assert torch.isnan(both.train_loss[0, 0, -1])
    assert torch.isfinite(both.params.W1[0, 0]).all()
    assert torch.equal(both.train_loss[0, 1], healthy.train_loss[0, 1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(hessian_power=[1.0]), "one number or one per model"),
    (dict(hessian_power=float("nan")), "hessian_power must be finite"),
    (dict(config=sp.TrainConfig(n_steps=2, snapshot_steps=[1])), "does not keep snapshots"),
    (dict(y_train=torch.zeros(2, 3, 5)), "y_train must have shape"),
    (dict(X_test=torch.zeros(2, 4, 4)), "give both X_test and y_test"),
    (dict(seed=[1, 2, 3]), "one int per group"),
])
def test_bad_input_is_refused_with_a_message(kwargs, message):
    X, y, params = _grid_problem()
    args = dict(X_train=X, y_train=y, params=params, hessian_power=1.0,
                config=sp.TrainConfig(n_steps=2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        train_adahessian(**args)
