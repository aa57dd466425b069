"""The batched trainer against the independent autograd reference, and its contract."""

import numpy as np
import pytest
import torch

import spectral_precond as sp


def _batch(ps, dh=24, n_train=40, seed=0):
    """Two groups (Case High, Case Low), one model per p, two SNRs among the models."""
    Xs, ys, Ps = [], [], []
    for g, case in enumerate([sp.case_high(), sp.case_low()]):
        data = sp.make_regression_data(
            case.inputs, case.teacher(sp.generator(seed + g, "teacher")),
            n_samples=300, n_train=n_train, snr=[1.0, 4.0],
            generator=sp.generator(seed + g, "data"),
        )
        Xs.append(data.X_train)
        ys.append(torch.stack([data.y_train[m % 2] for m in range(len(ps))]))
        Ps.append(torch.stack([sp.population_power(case.inputs, p) for p in ps]))
    seeds = np.arange(2 * len(ps)).reshape(2, len(ps)) + 100 * seed
    # A larger-than-paper init scale makes the ReLU pattern change during the run.
    params = sp.kaiming_init(seeds, dx=10, dh=dh, scale=0.5)
    return torch.stack(Xs), torch.stack(ys), torch.stack(Ps), params


# "torch" is the path a GPU takes; on the CPU the products go through NumPy by default.
@pytest.mark.parametrize("products", ["numpy", "torch"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_batched_matches_reference_step_by_step(weight_decay, products, monkeypatch):
    monkeypatch.setattr(sp.training, "CPU_PRODUCTS", products)
    ps = [-1.0, -0.5, 0.0, 0.5, 1.0]
    X, y, P, params = _batch(ps)
    n_steps = 60
    cfg = sp.TrainConfig(n_steps=n_steps, lr=1e-2, weight_decay=weight_decay,
                         log_steps=list(range(n_steps + 1)))
    result = sp.train(X, y, P, params, cfg)
    for g in range(2):
        for m in range(len(ps)):
            losses, final = sp.reference_train(
                X[g], y[g, m], P[g, m], *params.model(g, m), n_steps=n_steps,
                lr=1e-2, weight_decay=weight_decay,
            )
            torch.testing.assert_close(result.train_loss[g, m], losses, rtol=1e-12, atol=1e-12)
            for got, want in zip(result.params.model(g, m), final):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # The losses moved: the comparison was not between two frozen runs.
    assert (result.train_loss[..., -1] < 0.9 * result.train_loss[..., 0]).all()


def test_float32_matches_reference_within_float_tolerance():
    X, y, P, params = _batch([-1.0, 1.0], seed=3)
    cfg = sp.TrainConfig(n_steps=30, log_steps=list(range(31)))
    result = sp.train(X.float(), y.float(), P, params, cfg)
    assert result.train_loss.dtype == torch.float32
    for g in range(2):
        for m in range(2):
            losses, _ = sp.reference_train(X[g], y[g, m], P[g, m], *params.model(g, m), n_steps=30)
            torch.testing.assert_close(result.train_loss[g, m].double(), losses, rtol=1e-4, atol=1e-5)


def test_models_in_a_batch_do_not_interact():
    X, y, P, params = _batch([-0.5, 0.5, 1.0], seed=5)
    cfg = sp.TrainConfig(n_steps=20, log_steps=[0, 10, 20])
    together = sp.train(X, y, P, params, cfg)
    sub = sp.Params(*(t[1:, 1:2] for t in params.tensors()))
    alone = sp.train(X[1:], y[1:, 1:2], P[1:, 1:2], sub, cfg)
    torch.testing.assert_close(together.train_loss[1:, 1:2], alone.train_loss, rtol=1e-13, atol=0)


def test_same_seed_gives_identical_results():
    runs = [sp.train(*_batch([0.0, 1.0], seed=7), sp.TrainConfig(n_steps=25)) for _ in range(2)]
    assert torch.equal(runs[0].train_loss, runs[1].train_loss)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].params.tensors(), runs[1].params.tensors()))
    other = sp.train(*_batch([0.0, 1.0], seed=8), sp.TrainConfig(n_steps=25))
    assert not torch.equal(runs[0].train_loss, other.train_loss)


def test_test_loss_is_the_mse_of_the_logged_parameters():
    X, y, P, params = _batch([0.0], seed=2)
    Xt, yt = X.flip(1), y.flip(-1)  # any other inputs will do
    result = sp.train(X, y, P, params, sp.TrainConfig(n_steps=15, log_steps=[15]), Xt, yt)
    want = ((sp.predict(result.params, Xt) - yt) ** 2).mean(-1)
    torch.testing.assert_close(result.test_loss[..., -1], want)
    torch.testing.assert_close(
        result.train_loss[..., -1], ((sp.predict(result.params, X) - y) ** 2).mean(-1)
    )


@pytest.mark.parametrize("dx", [3, 5, 7])
def test_input_dimensions_with_and_without_padding_match_the_reference(dx):
    # dx + 1 = 4 and 8 need no padding; 6 is padded with two zero columns.
    gen = sp.generator(11, "pad")
    N, dh = 30, 16
    X = torch.randn(1, N, dx, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 2, N, generator=gen, dtype=torch.float64)
    B = torch.randn(dx, dx, generator=gen, dtype=torch.float64)
    P = torch.stack([torch.eye(dx, dtype=torch.float64), B @ B.T / dx])
    params = sp.kaiming_init(np.arange(2).reshape(1, 2), dx=dx, dh=dh, scale=0.5)
    cfg = sp.TrainConfig(n_steps=25, lr=1e-2, weight_decay=1e-2, log_steps=list(range(26)))
    result = sp.train(X, y, P, params, cfg)
    for m in range(2):
        losses, final = sp.reference_train(X[0], y[0, m], P[m], *params.model(0, m),
                                           n_steps=25, lr=1e-2, weight_decay=1e-2)
        torch.testing.assert_close(result.train_loss[0, m], losses, rtol=1e-12, atol=1e-12)
        for got, want in zip(result.params.model(0, m), final):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("products", ["numpy", "torch"])
def test_chunk_sizes_and_test_blocks_do_not_change_the_results(products, monkeypatch):
    monkeypatch.setattr(sp.training, "CPU_PRODUCTS", products)
    X, y, P, params = _batch([-1.0, -0.5, 0.0, 0.5, 1.0], seed=4)
    Xt, yt = X.flip(1), y.flip(-1)
    cfg = sp.TrainConfig(n_steps=20, log_steps=[0, 7, 20])
    whole = sp.train(X, y, P, params, cfg, Xt, yt)
    # Chunks of at most 1, 2 and 3 models (of unequal sizes for 2 and 3), each with
    # test-set blocks of 3 columns (the last one shorter).
    for chunk in (1, 2, 3):
        monkeypatch.setattr(sp.training, "EVAL_CHUNK_BYTES", 3 * chunk * 24 * 8)
        parts = sp.train(X, y, P, params, cfg, Xt, yt, chunk_models=chunk)
        torch.testing.assert_close(parts.train_loss, whole.train_loss, rtol=1e-13, atol=0)
        torch.testing.assert_close(parts.test_loss, whole.test_loss, rtol=1e-13, atol=0)
        for a, b in zip(parts.params.tensors(), whole.params.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_test_set_blocks_share_one_buffer(monkeypatch):
    # A test set of any size costs a chunk one block of activations, not one per block.
    X, y, P, params = _batch([0.0, 1.0])
    Xt = X.repeat(1, 10, 1)                     # 400 test points per group
    monkeypatch.setattr(sp.training, "EVAL_CHUNK_BYTES", 2 * 24 * 8 * 16)   # 16 columns
    cfg = sp.TrainConfig(n_steps=1, log_steps=[1])
    run = sp.training._Run(X, y, P.contiguous(), params.clone(), cfg, cfg.schedule(), Xt,
                           y.repeat(1, 1, 10), None)
    chunk = next(run.chunks())
    blocks, n = chunk.test_blocks()
    assert n == 400 and len(blocks) == 25
    for buffers in ([b.Z for b in blocks], [b.F for b in blocks]):
        assert len({t.untyped_storage().data_ptr() for t in buffers}) == 1
        assert buffers[0].untyped_storage().nbytes() == buffers[0].numel() * 8


def test_both_product_libraries_give_the_same_run(monkeypatch):
    X, y, P, params = _batch([-1.0, 0.0, 1.0], seed=5)
    Xt, yt = X.flip(1), y.flip(-1)
    cfg = sp.TrainConfig(n_steps=40, log_steps=[0, 10, 40])
    runs = {}
    for products in ("numpy", "torch"):
        monkeypatch.setattr(sp.training, "CPU_PRODUCTS", products)
        runs[products] = sp.train(X, y, P, params, cfg, Xt, yt)
    a, b = runs["numpy"], runs["torch"]
    torch.testing.assert_close(a.train_loss, b.train_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.test_loss, b.test_loss, rtol=1e-12, atol=0)
    for got, want in zip(a.params.tensors(), b.params.tensors()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert not torch.equal(a.params.W1, params.W1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trains_with_torch_products(dtype, monkeypatch):
    # NumPy's BLAS has no bfloat16 and no fast float16: these dtypes take torch's path.
    X, y, P, params = _batch([0.0, 1.0])
    cfg = sp.TrainConfig(n_steps=20, log_steps=[0, 20])
    backends = []
    make = sp.training._product
    monkeypatch.setattr(sp.training, "_product",
                        lambda *args: backends.append(args[-1]) or make(*args))
    low = sp.train(X.to(dtype), y.to(dtype), P, params, cfg)
    assert backends and set(backends) == {"torch"}
    monkeypatch.setattr(sp.training, "_product", make)
    full = sp.train(X.float(), y.float(), P, params, cfg)
    assert low.train_loss.dtype == dtype and low.params.W1.dtype == dtype
    torch.testing.assert_close(low.train_loss.float(), full.train_loss, rtol=5e-2, atol=1e-3)
    assert (low.train_loss[..., -1] < low.train_loss[..., 0]).all()


def test_unknown_product_library_is_refused(monkeypatch):
    X, y, P, params = _batch([1.0])
    monkeypatch.setattr(sp.training, "CPU_PRODUCTS", "mkl")
    with pytest.raises(ValueError, match=r"CPU_PRODUCTS must be one of \('numpy', 'torch'\), got 'mkl'"):
        sp.train(X, y, P, params, sp.TrainConfig(n_steps=2))


@pytest.mark.parametrize("G, M, chunk_models, at_least, sizes", [
    (1, 8, 8, 2, [4, 4]),        # one chunk would leave a core idle
    (1, 5, 8, 2, [2, 3]),
    (2, 8, 8, 2, [8, 8]),        # one chunk per group is already one per core
    (1, 1, 8, 2, [1]),           # a single model cannot be split
    (1, 20, 8, 2, [6, 7, 7]),    # the size bound gives more chunks than cores
])
def test_chunks_give_every_core_work(G, M, chunk_models, at_least, sizes):
    gen = sp.generator(0, "chunks")
    X = torch.randn(G, 6, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(G, M, 6, generator=gen, dtype=torch.float64)
    P = torch.eye(3, dtype=torch.float64).expand(G, M, 3, 3)
    params = sp.kaiming_init(np.arange(G * M).reshape(G, M), dx=3, dh=4)
    cfg = sp.TrainConfig(n_steps=1)
    run = sp.training._Run(X, y, P, params.clone(), cfg, cfg.schedule(), None, None, chunk_models)
    got = [chunk.c for chunk in run.chunks(at_least=at_least)]
    assert got == sizes          # over all groups, in order


def _blas_threads():
    return [i["num_threads"] for i in sp.training._blas_controller().info()
            if i["user_api"] == "blas"]


def test_blas_runs_single_threaded_during_training_and_stays_so(monkeypatch):
    X, y, P, params = _batch([0.0, 1.0])
    seen = []
    make = sp.training._product

    def recording(*args):
        product = make(*args)

        def call():
            seen.append(_blas_threads())
            product()
        return call

    monkeypatch.setattr(sp.training, "_product", recording)
    # Two BLAS threads to begin with (CI starts with one), to see the change.
    with sp.training._blas_controller().limit(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and set(before) == {2}
        sp.train(X, y, P, params, sp.TrainConfig(n_steps=3))
        assert _blas_threads() == [1] * len(before)
    assert seen and all(threads == [1] * len(before) for threads in seen)


def test_a_blas_that_cannot_be_made_single_threaded_falls_back_to_torch(monkeypatch):
    X, y, P, params = _batch([0.0, 1.0])
    cfg = sp.TrainConfig(n_steps=10, log_steps=[0, 10])
    monkeypatch.setattr(sp.training, "CPU_PRODUCTS", "torch")
    want = sp.train(X, y, P, params, cfg)
    monkeypatch.setattr(sp.training, "CPU_PRODUCTS", "numpy")
    monkeypatch.setattr(sp.training, "_single_threaded_blas", lambda: False)
    backends = []
    make = sp.training._product
    monkeypatch.setattr(sp.training, "_product",
                        lambda *args: backends.append(args[-1]) or make(*args))
    with pytest.warns(RuntimeWarning, match="could not be set to one thread"):
        got = sp.train(X, y, P, params, cfg)
    assert backends and set(backends) == {"torch"}
    assert torch.equal(got.train_loss, want.train_loss)
    assert torch.equal(got.params.W1, want.params.W1)


def test_initial_parameters_are_not_modified():
    X, y, P, params = _batch([1.0])
    before = params.clone()
    sp.train(X, y, P, params, sp.TrainConfig(n_steps=5))
    assert all(torch.equal(a, b) for a, b in zip(before.tensors(), params.tensors()))


def test_log_spaced_steps():
    steps = sp.log_spaced_steps(10_000, 100)
    assert steps[0] == 0 and steps[-1] == 10_000
    assert np.all(np.diff(steps) > 0)
    assert len(steps) == 100
    # Log-spaced: the gaps never shrink, and the last ones are wide.
    assert np.all(np.diff(np.diff(steps)) >= -1) and steps[-1] - steps[-2] > 100
    assert sp.log_spaced_steps(7, 100).tolist() == list(range(8))
    assert sp.log_spaced_steps(50, 2).tolist() == [0, 50]
    assert sp.TrainConfig(n_steps=10_000).schedule().tolist() == steps.tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"n_steps": 10, "log_steps": [0, 11]}, "log_steps must lie in"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sp.TrainConfig(**kwargs)



def test_snapshots_hold_the_parameters_after_that_many_steps():
    X, y, P, params = _batch([0.5], seed=4)
    full = sp.train(X, y, P, params, sp.TrainConfig(n_steps=12, snapshot_steps=[0, 5, 12]))
    short = sp.train(X, y, P, params, sp.TrainConfig(n_steps=5))
    assert sorted(full.snapshots) == [0, 5, 12]
    assert all(torch.equal(a, b) for a, b in zip(full.snapshots[0].tensors(), params.tensors()))
    assert all(torch.equal(a, b) for a, b in zip(full.snapshots[5].tensors(), short.params.tensors()))
    assert all(torch.equal(a, b) for a, b in zip(full.snapshots[12].tensors(), full.params.tensors()))


def test_diverging_models_are_reported_and_frozen_without_harming_the_others():
    X, y, P, params = _batch([0.0, 1.0, 0.0], seed=6)
    P = P.clone()
    P[0, 1] *= 1e4          # one model per group is pushed far past the stability edge
    P[1, 2] = 1e4 * torch.eye(10, dtype=torch.float64)
    cfg = sp.TrainConfig(n_steps=300, log_steps=list(range(0, 301, 10)))
    mixed = sp.train(X, y, P, params, cfg)
    assert mixed.diverged.tolist() == [[False, True, False], [False, False, True]]
    step = mixed.diverged_at[0, 1].item()
    assert 0 < step <= 300
    # Losses after detection are NaN, never a huge number; frozen parameters stay finite
    # or at least do not change after detection.
    after = torch.as_tensor(mixed.steps) >= step
    assert torch.isnan(mixed.train_loss[0, 1, after]).all()
    assert torch.isfinite(mixed.train_loss[0, 1, ~after]).all()
    # The healthy models train exactly as they do without the diverging neighbours.
    keep = [[0, 2], [0, 1]]
    for g in range(2):
        sub = sp.Params(*(t[g : g + 1, keep[g]] for t in params.tensors()))
        alone = sp.train(X[g : g + 1], y[g : g + 1, keep[g]], P[g : g + 1, keep[g]], sub, cfg)
        torch.testing.assert_close(mixed.train_loss[g : g + 1, keep[g]], alone.train_loss,
                                   rtol=1e-12, atol=0)
        assert not alone.diverged.any()


def test_diverged_model_parameters_stop_changing():
    X, y, P, params = _batch([0.0], seed=9)
    P = P * 1e4
    short = sp.train(X, y, P, params, sp.TrainConfig(n_steps=200, log_steps=[200]))
    longer = sp.train(X, y, P, params, sp.TrainConfig(n_steps=400, log_steps=[400]))
    assert short.diverged.all() and longer.diverged.all()
    assert torch.equal(short.diverged_at, longer.diverged_at)
    for a, b in zip(short.params.tensors(), longer.params.tensors()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    X, y, P, params = _batch([-1.0, 0.0, 1.0], seed=3)
    cfg = sp.TrainConfig(n_steps=30, log_steps=[0, 15, 30])
    cpu = sp.train(X, y, P, params, cfg)
    gpu = sp.train(X.cuda(), y.cuda(), P.cuda(), params.to(device="cuda"), cfg)
    assert gpu.params.W1.device.type == "cuda"
    torch.testing.assert_close(gpu.train_loss.cpu(), cpu.train_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gpu.params.W1.cpu(), cpu.params.W1, rtol=1e-9, atol=1e-12)
