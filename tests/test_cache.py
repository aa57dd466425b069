"""Stored results: keys, atomic files, reuse, and executors."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from spectral_precond import cache


def square(x):
    return {"value": torch.tensor(float(x) ** 2)}


def test_keys_change_with_any_part_of_the_configuration():
    base = {"p": 0.5, "seeds": [0, 1], "dtype": torch.float32, "P": torch.eye(2)}
    key = cache.config_key(base)
    assert key == cache.config_key(dict(base))
    for change in [{"p": 0.25}, {"seeds": [0, 2]}, {"dtype": torch.float64}, {"P": 2 * torch.eye(2)}]:
        assert cache.config_key({**base, **change}) != key
    with pytest.raises(TypeError, match="cannot describe"):
        cache.config_key({"f": object()})


def test_keys_include_the_library_fingerprint(monkeypatch):
    key = cache.config_key({"a": 1})
    monkeypatch.setattr(cache, "library_fingerprint", lambda module=None: "0.1.0+changed")
    assert cache.config_key({"a": 1}) != key


def test_a_result_depends_on_its_module_and_what_it_imports_only(tmp_path, monkeypatch,
                                                                 request):
    # Fingerprints of the temporary copy must not outlive the test, even if it fails.
    request.addfinalizer(cache.library_fingerprint.cache_clear)
    closure = cache.module_closure("sweeps")
    assert {"sweeps", "training", "data", "networks", "preconditioners"} <= set(closure)
    assert "plotting" not in closure and "results" not in closure
    # Copy the package, then edit one file at a time: only edits inside the closure
    # change the key of a sweep unit.
    for path in [*cache._SOURCE.glob("*.py"), *cache._SOURCE.glob("*.c")]:
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(cache, "_SOURCE", tmp_path)

    def key():
        cache.library_fingerprint.cache_clear()
        return cache.config_key({"a": 1}, "spectral_precond.sweeps")

    base = key()
    (tmp_path / "plotting.py").write_text("# edited\n" + (tmp_path / "plotting.py").read_text())
    assert key() == base
    (tmp_path / "training.py").write_text("# edited\n" + (tmp_path / "training.py").read_text())
    edited = key()
    assert edited != base
    # The trainer's C kernel counts too, through the module that builds it.
    assert "_fused" in closure
    (tmp_path / "_fused_step.c").write_text("/* edited */\n" + (tmp_path / "_fused_step.c").read_text())
    assert key() != edited
    cache.library_fingerprint.cache_clear()
    with pytest.raises(ValueError, match="not a module"):
        cache.module_closure("nope")


def test_run_units_reuses_finished_units_and_leaves_no_temporary_file(tmp_path):
    store = cache.Store(tmp_path)
    units = [({"x": x}, (x,)) for x in range(4)]
    first, report = cache.run_units(square, units[:2], store)
    assert report.computed == [0, 1] and report.reused == []
    results, report = cache.run_units(square, units, store)
    assert report.reused == [0, 1] and report.computed == [2, 3]
    assert [r["value"].item() for r in results] == [0.0, 1.0, 4.0, 9.0]
    assert not list(tmp_path.glob(".*"))
    assert len(list(tmp_path.glob("*.pt"))) == 4


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = cache.Store(tmp_path)

    def boom(value, fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        store.put("k", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_any_executor_gives_the_same_results(tmp_path):
    units = [({"x": x}, (x,)) for x in range(5)]
    serial, _ = cache.run_units(square, units)
    with ThreadPoolExecutor(2) as pool:
        pooled, report = cache.run_units(square, units, cache.Store(tmp_path), executor=pool)
    assert report.computed == [0, 1, 2, 3, 4]
    assert [r["value"] for r in pooled] == [r["value"] for r in serial]


def test_caching_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("BOOK_CACHE", "off")
    assert cache.default_store() is None
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    assert cache.default_store().folder == tmp_path
