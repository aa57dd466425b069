"""Transfer: ridge heads on frozen first layers against scikit-learn, and bad input."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

import spectral_precond as sp
from spectral_precond import transfer
from spectral_precond.transfer import fit_ridge_head, mse, stack_groups, transfer_case


def _grid(G, M, dh, dx, seed=0):
    gen = sp.generator(seed, "test-transfer")
    W1 = torch.randn(G, M, dh, dx, generator=gen, dtype=torch.float64)
    b1 = torch.randn(G, M, dh, generator=gen, dtype=torch.float64)
    W2 = torch.randn(G, M, dh, generator=gen, dtype=torch.float64)
    b2 = torch.randn(G, M, generator=gen, dtype=torch.float64)
    return sp.Params(W1, b1, W2, b2)


def _task(G, M, n, dx, seed=1):
    gen = sp.generator(seed, "test-transfer-data")
    X = torch.randn(G, n, dx, generator=gen, dtype=torch.float64)
    y = torch.randn(G, M, n, generator=gen, dtype=torch.float64) + 3.0
    return X, y


@pytest.mark.parametrize("dh", [5, 40])  # fewer features than samples, and more
def test_head_and_errors_match_sklearn_ridge(dh):
    G, M, N, n_test, dx, penalty = 2, 3, 25, 60, 4, 1e-2
    params = _grid(G, M, dh, dx)
    X, y = _task(G, M, N, dx)
    Xt, yt = _task(G, M, n_test, dx, seed=2)
    head = fit_ridge_head(params, X, y, penalty)
    errors = mse(head, Xt, yt)
    for g in range(G):
        for m in range(M):
            W1, b1 = (t[g, m].double().numpy() for t in (params.W1, params.b1))

            def features(A):
                return np.maximum(A @ W1.T + b1, 0.0)

            ref = Ridge(alpha=penalty * N, fit_intercept=True, solver="svd")
            ref.fit(features(X[g].numpy()), y[g, m].numpy())
            np.testing.assert_allclose(head.W2[g, m].numpy(), ref.coef_,
                                       rtol=1e-7, atol=1e-9)
            assert abs(head.b2[g, m].item() - ref.intercept_) < 1e-8
            pred = ref.predict(features(Xt[g].numpy()))
            expected = np.mean((pred - yt[g, m].numpy()) ** 2)
            assert abs(errors[g, m].item() - expected) < 1e-8
    torch.testing.assert_close(head.W1, params.W1)
    torch.testing.assert_close(head.b1, params.b1)


def test_a_float32_first_layer_is_fitted_in_float64_and_evaluated_in_float32():
    params = _grid(2, 3, 30, 4)
    X, y = _task(2, 3, 40, 4)
    single = sp.Params(params.W1.float(), params.b1.float(), params.W2, params.b2)
    head = fit_ridge_head(single, X, y)
    assert head.W1.dtype == torch.float32 and head.W2.dtype == torch.float64
    exact = sp.Params(head.W1.double(), head.b1.double(), head.W2, head.b2)
    torch.testing.assert_close(mse(head, X, y), mse(exact, X, y), rtol=1e-5, atol=0)


def test_labels_shared_by_a_group_equal_the_same_labels_per_model():
    params = _grid(2, 3, 8, 4)
    X, y = _task(2, 1, 20, 4)
    shared = fit_ridge_head(params, X, y[:, 0])
    per_model = fit_ridge_head(params, X, y.expand(2, 3, 20))
    torch.testing.assert_close(shared.W2, per_model.W2)
    torch.testing.assert_close(mse(shared, X, y), mse(per_model, X, y.expand(2, 3, 20)))


def test_penalty_shrinks_the_head_to_the_label_mean():
    params = _grid(1, 2, 6, 3)
    X, y = _task(1, 2, 30, 3)
    head = fit_ridge_head(params, X, y, penalty=1e9)
    assert head.W2.abs().max() < 1e-6
    torch.testing.assert_close(head.b2, y.mean(-1), atol=1e-5, rtol=0)


def test_mse_is_the_same_in_chunks_of_one_input(monkeypatch):
    params = _grid(2, 5, 16, 3)
    X, y = _task(2, 5, 50, 3)
    whole = mse(params, X, y)
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1)
    torch.testing.assert_close(mse(params, X, y), whole)
    f = sp.predict(params.to(torch.float64), X)
    torch.testing.assert_close(whole, (f - y).square().mean(-1))


def test_transfer_case_keeps_the_inputs_and_moves_the_teacher():
    source = sp.case_high()
    target = transfer_case(source, 9)
    assert target.inputs is source.inputs
    assert target.name == "high-to-e10"
    e10 = torch.eye(10, dtype=torch.float64)[9]
    torch.testing.assert_close(target.coefficients, e10)
    beta = target.teacher(sp.generator(0)).beta
    assert beta[:9].abs().max() == 0 and beta[9] != 0


def test_stack_groups_puts_each_grid_in_one_group_in_row_major_order():
    grids = [_grid(3, 2, 4, 5, seed=s) for s in range(4)]
    stacked = stack_groups(grids)
    assert stacked.grid == (4, 6)
    for k, g in enumerate(grids):
        for i in range(3):
            for j in range(2):
                for a, b in zip(stacked.model(k, 2 * i + j), g.model(i, j)):
                    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("penalty, error, message", [
    (0.0, ValueError, "penalty must be > 0, got 0.0"),
    (-1.0, ValueError, "penalty must be > 0, got -1.0"),
    (float("nan"), ValueError, "penalty must be finite, got nan"),
    ("big", TypeError, "penalty must be a real number"),
])
def test_bad_penalty(penalty, error, message):
    X, y = _task(1, 1, 10, 3)
    with pytest.raises(error, match=message):
        fit_ridge_head(_grid(1, 1, 4, 3), X, y, penalty)


def test_inputs_of_the_wrong_dimension():
    X, y = _task(1, 1, 10, 4)
    message = r"X_train must have shape \(1, n, 3\) for this grid"
    with pytest.raises(ValueError, match=message):
        fit_ridge_head(_grid(1, 1, 4, 3), X, y)


def test_labels_of_the_wrong_length():
    X, _ = _task(1, 1, 10, 3)
    message = r"y must have shape \(1, n\) or \(1, 1 or 2, n\)"
    with pytest.raises(ValueError, match=message):
        mse(_grid(1, 2, 4, 3), X, torch.zeros(1, 2, 9))


def test_non_finite_labels():
    X, y = _task(1, 1, 10, 3)
    y[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        fit_ridge_head(_grid(1, 1, 4, 3), X, y)


def test_one_training_sample_cannot_be_centred():
    X, y = _task(1, 1, 1, 3)
    with pytest.raises(ValueError, match="need at least 2 training samples"):
        fit_ridge_head(_grid(1, 1, 4, 3), X, y)


def test_params_must_be_params():
    X, y = _task(1, 1, 10, 3)
    with pytest.raises(TypeError, match="params must be Params"):
        fit_ridge_head(torch.zeros(1, 1, 4, 3), X, y)


@pytest.mark.parametrize("direction, error, message", [
    (10, ValueError, r"direction must be in \[0, 9\] for dx = 10, got 10"),
    (-1, ValueError, r"direction must be in \[0, 9\]"),
    (1.0, TypeError, "direction must be an int"),
])
def test_bad_direction(direction, error, message):
    with pytest.raises(error, match=message):
        transfer_case(sp.case_low(), direction)


def test_grids_of_different_shapes_do_not_stack():
    with pytest.raises(ValueError, match="all grids must have one shape"):
        stack_groups([_grid(1, 2, 4, 3), _grid(1, 3, 4, 3)])


@pytest.mark.parametrize("dh", [5, 40])
def test_effective_dof_is_the_trace_of_the_hat_matrix(dh):
    G, M, N, dx, penalty = 2, 2, 25, 4, 1e-2
    params = _grid(G, M, dh, dx)
    X, _ = _task(G, M, N, dx)
    dof = transfer.effective_dof(params, X, penalty)
    for g in range(G):
        for m in range(M):
            W1, b1 = (t[g, m].double().numpy() for t in (params.W1, params.b1))
            H = np.maximum(X[g].numpy() @ W1.T + b1, 0.0)
            Hc = H - H.mean(0)
            hat = Hc @ np.linalg.solve(Hc.T @ Hc + penalty * N * np.eye(dh), Hc.T)
            assert abs(dof[g, m].item() - np.trace(hat)) < 1e-8
    assert (dof > 0).all() and (dof < min(dh, N - 1)).all()


def test_effective_dof_needs_a_tensor_of_inputs():
    with pytest.raises(TypeError, match="X_train must be a torch.Tensor, got list"):
        transfer.effective_dof(_grid(1, 1, 4, 3), [[0.0, 1.0, 2.0]])


def test_non_finite_inputs():
    X, _ = _task(1, 1, 10, 3)
    X[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="X_train must be finite"):
        transfer.effective_dof(_grid(1, 1, 4, 3), X)
