"""The effective-p estimator, the plateau rule, and the SOAP and Muon adapters."""

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond import alignment as al
from spectral_precond import effective_p as ep
from spectral_precond import optimizers as so
from spectral_precond.optimizers import TwoLayerNets


def _grid(G=2, M=3, dh=7, dx=4, seed=0):
    gen = sp.generator(seed, "effective-p-test")
    shapes = [(G, M, dh, dx), (G, M, dh), (G, M, dh), (G, M)]
    return sp.Params(
        *(torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)
    )


@pytest.fixture(scope="module")
def task():
    """A rotated power-law spectrum, an aligned teacher, three seeds' data (float64)."""
    Q, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=sp.generator(0, "q"), dtype=torch.float64)
    )
    case = al.alignment_case(
        al.power_law_spectrum(6, alpha=1.5, top=4.0), -0.5, eigenvectors=Q
    )
    draws = [
        sp.make_regression_data(
            case.inputs,
            case.teacher(sp.generator(s, "teacher")),
            140,
            60,
            float("inf"),
            sp.generator(s, "data"),
        )
        for s in range(3)
    ]
    X = torch.stack([d.X_train for d in draws])
    y = torch.stack([d.y_train for d in draws])
    return case, X, y


def test_first_layer_gradient_matches_autograd():
    params = _grid()
    X = torch.randn(2, 9, 4, generator=sp.generator(1), dtype=torch.float64)
    y = torch.randn(2, 3, 9, generator=sp.generator(2), dtype=torch.float64)
    got = ep.first_layer_gradient(params, X, y)
    for g in range(2):
        for m in range(3):
            W1, b1, W2, b2 = (
                t.clone().requires_grad_(True) for t in params.model(g, m)
            )
            f = torch.relu(X[g] @ W1.T + b1) @ W2 + b2
            ((f - y[g, m]) ** 2).mean().backward()
            torch.testing.assert_close(got[g, m], W1.grad)


def test_p_from_energies_reads_an_exact_power_law():
    lam = torch.tensor([5.0, 2.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    ref = torch.rand(2, 5, generator=sp.generator(3), dtype=torch.float64) + 0.1
    for p in (-1.0, -0.3, 0.0, 0.8):
        energy = 7.0 * lam.pow(2 * p) * ref
        p_hat, misfit = ep.p_from_energies(energy, ref, lam)
        np.testing.assert_allclose(p_hat.numpy(), p, atol=1e-12)
        np.testing.assert_allclose(misfit.numpy(), 0.0, atol=1e-12)
    # a bent profile has a misfit; one that did not move along a direction has no p
    bent = ref * torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    assert (ep.p_from_energies(bent, ref, lam)[1] > 0.1).all()
    still = ref.clone()
    still[0, 2] = 0.0
    p_hat, misfit = ep.p_from_energies(still, ref, lam)
    assert torch.isnan(p_hat[0]) and torch.isnan(misfit[0]) and torch.isfinite(p_hat[1])


def test_effective_p_of_preconditioned_steps_built_by_hand(task):
    """Steps -lr G P with P = Sigma^p, G the gradient at the start, read back as p."""
    case, X, y = task
    init = sp.kaiming_init([[s] * 4 for s in range(3)], 6, 20, scale=1e-3)
    y_models = y.unsqueeze(1).expand(3, 4, -1).contiguous()
    ps = [-1.0, -0.25, 0.5, 1.0]
    G0 = []
    for g in range(3):
        row = []
        for m in range(4):
            W1, b1, W2, b2 = (t.clone().requires_grad_(True) for t in init.model(g, m))
            f = torch.relu(X[g] @ W1.T + b1) @ W2 + b2
            ((f - y[g]) ** 2).mean().backward()
            row.append(W1.grad)
        G0.append(torch.stack(row))
    G0 = torch.stack(G0)
    P = torch.stack([sp.population_power(case.inputs, p) for p in ps])
    moved = init.clone()
    moved.W1 -= 0.3 * (G0 @ P)  # three steps' worth, same gradient
    p_hat, misfit = ep.effective_p(moved, init, X, y_models, case.inputs)
    np.testing.assert_allclose(p_hat.numpy(), np.broadcast_to(ps, (3, 4)), atol=1e-9)
    assert (misfit < 1e-9).all()


def test_plateau_step_rule():
    loss = np.array(
        [[1.0, 1.0, 0.999, 0.995, 0.98, 0.5], [2.0, 2.0, 2.0, 1.999, 1.999, 1.9]]
    )
    assert ep.plateau_step(loss, [1, 2, 4], tol=0.01) == 2
    assert ep.plateau_step(loss, [1, 2, 3, 4, 5], tol=0.01) == 3
    assert ep.plateau_step(loss, [1, 2, 3, 4, 5], tol=0.1) == 4
    rising = np.array([[1.0, 1.5, 1.0, 1.0]])  # leaving the band once is enough
    assert ep.plateau_step(rising, [1, 2, 3]) == 1  # nothing inside: the first rung
    diverged = np.array([[1.0, 1.0, np.nan, np.nan]])
    assert ep.plateau_step(diverged, [1, 2, 3]) == 1


def test_small_init_and_as_params_follow_kaiming_init():
    init = ep.small_init([4, 7], dx=5, width=6)
    want = sp.kaiming_init([[4, 7]], 5, 6)
    torch.testing.assert_close(init[1][0], want.W1[0, 1])
    torch.testing.assert_close(init[1][2][0], want.W2[0, 1])
    grid = ep.as_params(TwoLayerNets([4, 7], 5, 6, 1, dtype=torch.float64, init=init))
    assert grid.grid == (2, 1)
    torch.testing.assert_close(grid.W1[:, 0], want.W1[0])
    with pytest.raises(ValueError, match="one output"):
        ep.as_params(TwoLayerNets([0], 5, 6, 3))


def test_muon_orthogonalises_the_first_layer_and_steps_the_rest_with_adamw():
    W1 = torch.randn(40, 6, generator=sp.generator(5), dtype=torch.float64)
    rest = [
        torch.zeros(40, dtype=torch.float64),
        torch.zeros(1, 40, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
    ]
    params = [t.clone().requires_grad_(True) for t in [W1, *rest]]
    opt = so.make_optimizer("muon", params, lr=0.1, adamw_lr=1e-3)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 1e-3
    # a gradient whose singular values span four orders of magnitude
    U, _ = torch.linalg.qr(
        torch.randn(40, 6, generator=sp.generator(6), dtype=torch.float64)
    )
    V, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=sp.generator(7), dtype=torch.float64)
    )
    params[0].grad = U @ torch.diag(torch.logspace(0, -4, 6, dtype=torch.float64)) @ V.T
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    opt.step()
    update = (W1 - params[0].detach()) / 0.1
    s = torch.linalg.svdvals(update)
    assert s.max() / s[:4].min() < 3.0  # equalised (Newton-Schulz is approximate)
    assert torch.allclose(
        params[1].detach(), torch.full((40,), -1e-3, dtype=torch.float64), rtol=1e-3
    )  # first Adam step: lr times the sign


@pytest.mark.parametrize(
    "name, lr, options", [("soap", 1e-2, None), ("muon", 1e-2, {"adamw_lr": 3e-3})]
)
def test_soap_and_muon_fit_a_regression(task, name, lr, options):
    _, X, y = task
    res = ep.train_regressors(
        name,
        X[:2],
        y[:2],
        [lr, lr],
        ep.small_init([0, 1], 6, 16, 0.3),
        n_steps=80,
        options=options,
        dtype=torch.float64,
    )
    assert not res.diverged.any()
    assert (res.train_loss[:, -1] < 0.5 * res.train_loss[:, 0]).all(), res.train_loss[
        :, [0, -1]
    ]


def test_measure_effective_p_recovers_exact_preconditioning(task):
    case, X, y = task
    for p in (-1.0, 0.5):
        P = sp.population_power(case.inputs, p).expand(3, 6, 6)
        m = ep.measure_effective_p(
            "exact",
            X,
            y,
            [1e-2] * 3,
            ep.small_init([0, 1, 2], 6, 16),
            case.inputs,
            [1, 2, 4, 8, 16, 32],
            options={"preconditioner": P},
            dtype=torch.float64,
        )
        assert 1 <= m.step <= 32 and m.train_loss.shape == (3, 33)
        np.testing.assert_allclose(m.p, p, atol=0.05)
    sgd = ep.measure_effective_p(
        "sgd",
        X,
        y,
        [1e-2] * 3,
        ep.small_init([0, 1, 2], 6, 16),
        case.inputs,
        [1, 2, 4, 8],
        dtype=torch.float64,
    )
    np.testing.assert_allclose(sgd.p, 0.0, atol=0.05)


def test_a_first_layer_that_has_not_moved_has_no_effective_p(task):
    """Shampoo's inverse roots start at zero and are first computed at step 20: before
    that its first layer stays exactly where it started, in the training dtype."""
    case, X, y = task
    m = ep.measure_effective_p(
        "shampoo",
        X,
        y,
        [1e-3] * 3,
        ep.small_init([0, 1, 2], 6, 16),
        case.inputs,
        [1, 2, 4, 8],
    )
    assert m.step == 8 and np.isnan(m.p).all()


def test_select_config_counts_divergence_as_infinite_and_prefers_the_later_tie():
    mse = np.array([[0.5, 0.5], [0.1, np.nan], [0.3, 0.3], [0.3, 0.3]])
    best, mean = ep.select_config(mse)
    assert best == 3 and np.isinf(mean[1])
    with pytest.raises(ValueError, match="every configuration diverged"):
        ep.select_config(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: ep.first_layer_gradient(
                _grid(), torch.zeros(2, 5, 3), torch.zeros(2, 3, 5)
            ),
            "X must have shape",
        ),
        (
            lambda: ep.first_layer_gradient(
                _grid(), torch.zeros(2, 5, 4), torch.zeros(2, 3, 4)
            ),
            "y must have shape",
        ),
        (
            lambda: ep.p_from_energies(torch.ones(3), torch.ones(3), [1.0, 1.0, 1.0]),
            "not all be equal",
        ),
        (
            lambda: ep.p_from_energies(-torch.ones(3), torch.ones(3), [1.0, 2.0, 3.0]),
            "energy must be",
        ),
        (
            lambda: ep.p_from_energies(torch.ones(2), torch.ones(2), [1.0, 2.0, 3.0]),
            "must share a shape",
        ),
        (lambda: ep.plateau_step(np.ones((2, 5)), [0, 2]), "ladder steps must lie"),
        (lambda: ep.plateau_step(np.ones(5), [1]), "train_loss must be"),
        (
            lambda: ep.train_regressors(
                "adamw",
                torch.zeros(1, 3, 2),
                torch.zeros(1, 3),
                [0.1],
                ep.small_init([0], 2, 4),
                2,
            ),
            "unknown optimizer 'adamw'",
        ),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
