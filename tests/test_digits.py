"""The digit data, the IDX reader and the class-keyed shifts of the OOD chapter."""

import gzip

import numpy as np
import pytest
import torch

import spectral_precond as sp
from spectral_precond import digits as dg


@pytest.fixture(scope="module")
def digits():
    return dg.load_digits()


def write_idx(path, array: np.ndarray, code: int, compress: bool):
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_bundled_digits_are_scaled_to_the_unit_interval(digits):
    images, labels = digits
    assert images.shape == (1797, 64) and labels.shape == (1797,)
    assert images.min() == 0.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_round_trips_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 0x08, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 0x08, compress)
    assert np.array_equal(dg.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images)
    X, y = dg.load_mnist(tmp_path, "train")
    assert X.shape == (5, 784) and X.dtype == torch.float64
    torch.testing.assert_close(X, torch.tensor(images.reshape(5, -1) / 255.0))
    assert y.tolist() == labels.tolist()


def test_download_mnist_fetches_the_four_files_once(tmp_path):
    """A local folder served through a file:// address stands in for a mirror."""
    mirror, target = tmp_path / "mirror", tmp_path / "data"
    mirror.mkdir()
    rng = np.random.default_rng(1)
    sizes = {"train": 6, "t10k": 4}
    for prefix, n in sizes.items():
        write_idx(mirror / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), 0x08, compress=True)
        write_idx(mirror / f"{prefix}-labels-idx1-ubyte.gz",
                  rng.integers(0, 10, size=n, dtype=np.uint8), 0x08, compress=True)
    assert dg.download_mnist(target, mirror.as_uri() + "/") == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in mirror.iterdir())
    for split, prefix in (("train", "train"), ("test", "t10k")):
        X, y = dg.load_mnist(target, split)
        assert X.shape == (sizes[prefix], 784) and y.shape == (sizes[prefix],)
    # files already present are kept: a second call needs no mirror at all
    dg.download_mnist(target, (tmp_path / "nowhere").as_uri())
    assert dg.load_mnist(target, "test")[0].shape == (4, 784)


def test_idx_reader_reads_big_endian_integers(tmp_path):
    values = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    write_idx(tmp_path / "ints", values, 0x0C, compress=False)
    assert np.array_equal(dg.read_idx(tmp_path / "ints"), values)


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        dg.read_idx(tmp_path / "junk")
    write_idx(tmp_path / "short", np.zeros(4, dtype=np.uint8), 0x08, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header announces shape"):
        dg.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        dg.load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        dg.load_mnist(tmp_path, "validation")


def test_noise_patterns_are_seeded_with_the_requested_spread():
    a = dg.noise_patterns(20_000, seed=3, std=0.1)
    assert torch.equal(a, dg.noise_patterns(20_000, seed=3, std=0.1))
    assert not torch.equal(a, dg.noise_patterns(20_000, seed=4, std=0.1))
    assert a.shape == (10, 20_000)
    assert abs(a.std().item() - 0.1) < 0.002
    with pytest.raises(ValueError, match="std must be >= 0"):
        dg.noise_patterns(4, seed=0, std=-1.0)


def test_swap_pairs_is_a_derangement():
    y = torch.arange(10)
    assert (dg.swap_pairs(y) != y).all()
    assert torch.equal(dg.swap_pairs(dg.swap_pairs(y)), y)


def test_shifted_sets_follow_their_rules(digits):
    images, labels = digits
    data = dg.make_ood_digits(images, labels, n_train=600, n_val=300, seed=1)
    idx = data.info["indices"]
    assert len(idx["train"]) == 600 and len(idx["val"]) == 300 and len(idx["test"]) == 897
    assert len(torch.cat(list(idx.values())).unique()) == 1797
    P = data.patterns

    def built(rows, keys):
        return (images[rows] + P[keys]).clamp(0, 1)

    assert torch.equal(data.X_train, built(idx["train"], labels[idx["train"]]))
    assert torch.equal(data.y_train, labels[idx["train"]])
    assert torch.equal(data.X_val, built(idx["val"], labels[idx["val"]]))
    true = labels[idx["test"]]
    X, y = data.tests["in-distribution"]
    assert torch.equal(y, true) and torch.equal(X, built(idx["test"], true))
    X, y = data.tests["invariant digit"]
    assert torch.equal(y, true) and torch.equal(X, built(idx["test"], dg.swap_pairs(true)))
    X, y = data.tests["invariant noise"]
    assert torch.equal(X, built(idx["test"], y))
    # random labels, independent of the digit: about one in ten matches it
    assert 0.05 < (y == true).double().mean().item() < 0.16
    Xa, ya = data.tests["authors' invariant digit"]
    assert torch.equal(ya, y) and torch.equal(Xa, built(idx["test"], dg.swap_pairs(y)))
    assert list(data.tests) == list(dg.TEST_SETS)


def test_the_draw_depends_on_the_seed_only(digits):
    images, labels = digits
    a = dg.make_ood_digits(images, labels, 100, 50, seed=7, n_test=40)
    b = dg.make_ood_digits(images, labels, 100, 50, seed=7, n_test=40)
    c = dg.make_ood_digits(images, labels, 100, 50, seed=8, n_test=40)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.tests["invariant noise"][1], b.tests["invariant noise"][1])
    assert not torch.equal(a.X_train, c.X_train)
    assert a.tests["invariant digit"][0].shape == (40, 64)


def test_make_ood_digits_validates_its_inputs(digits):
    images, labels = digits
    with pytest.raises(ValueError, match="n_test must be between 1 and 0"):
        dg.make_ood_digits(images, labels, 1000, 797, seed=0)
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]"):
        dg.make_ood_digits(images * 16, labels, 100, 100, seed=0)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        dg.make_ood_digits(images, labels + 1, 100, 100, seed=0)
    with pytest.raises(TypeError, match="n_train must be an int"):
        dg.make_ood_digits(images, labels, 10.0, 100, seed=0)
