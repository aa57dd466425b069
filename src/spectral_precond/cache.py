"""Finished runs on disk, keyed by what produced them; any executor to produce them.

A long sweep is cut into independent units (for instance one data set each). Each
unit has a configuration, a JSON-able description of everything that determines
its result. The result is stored under the hash of that configuration and of the
library's fingerprint (its version and the hash of its source files), so that

- rebuilding the book reuses every finished unit;
- a sweep killed halfway resumes without recomputing finished units;
- a changed configuration, or changed library code, never reads a stale result
  (the key hashes the module that computes the result and every module of the
  package it imports, plus the library and torch versions).

Files are written to a temporary name in the same folder and renamed into place, so
a reader never sees a half-written result. Units run on any
``concurrent.futures``-style executor: a thread or process pool, or a Dask
cluster's (``distributed.Client(...).get_executor()``); see :func:`dask_executor`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

_SOURCE = Path(__file__).resolve().parent


def _package_imports(name: str) -> set[str]:
    """Modules of this package that module ``name`` imports (anywhere in its text)."""
    tree = ast.parse((_SOURCE / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return {m for m in found if (_SOURCE / f"{m}.py").exists()}


def module_closure(name: str) -> list[str]:
    """``name`` and every module of this package it imports, directly or not."""
    if not (_SOURCE / f"{name}.py").exists():
        raise ValueError(f"{name!r} is not a module of {_SOURCE.name}")
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_package_imports(m) - seen)
    return sorted(seen)


@lru_cache(maxsize=None)
def library_fingerprint(module: str | None = None) -> str:
    """The library and torch versions and a hash of the source that decides a result.

    With ``module`` (e.g. ``"spectral_precond.sweeps"``) only that module and the
    package modules it imports are hashed, so that editing, say, the plotting code
    does not discard stored training runs; without it, every source file. A module's
    C sources, named after it (``_fused_step.c`` for ``_fused``), count with it.
    """
    from . import __version__

    names = (module_closure(module.rsplit(".", 1)[-1]) if module
             else sorted(p.stem for p in _SOURCE.glob("*.py")))
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update((_SOURCE / f"{name}.py").read_bytes())
        for companion in sorted(_SOURCE.glob(f"{name}_*.c")):
            digest.update(companion.name.encode())
            digest.update(companion.read_bytes())
    return f"{__version__}+torch{torch.__version__}+{digest.hexdigest()[:16]}"


def _canonical(value: Any):
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().double().flatten().tolist(), "shape": list(value.shape)}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return "nan"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe {value!r} ({type(value).__name__}) in a cache key")


def config_key(config: dict, module: str | None = None) -> str:
    """Hash of ``config`` (JSON-able values, tensors and dtypes allowed) and the library.

    ``module`` names the module whose code produces the result (see
    :func:`library_fingerprint`); all of the library's source counts without it.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    text = json.dumps({"config": _canonical(config), "library": library_fingerprint(module)},
                      sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Store:
    """A folder of results, one file per key."""

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def get(self, key: str):
        path = self.path(key)
        if not path.exists():
            return None
        return torch.load(path, weights_only=False)

    def put(self, key: str, value) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(value, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path(key)


def default_store() -> Store | None:
    """``$BOOK_CACHE`` if set (``off`` disables caching), else ``.sweep-cache/``."""
    folder = os.environ.get("BOOK_CACHE", ".sweep-cache")
    return None if folder.strip().lower() in ("", "off", "0", "none") else Store(Path(folder))


def progress_enabled() -> bool:
    """Progress bars show for people, not for CI, nbval or the book build."""
    if os.environ.get("BOOK_PROGRESS", "").strip() == "0":
        return False
    return os.environ.get("BOOK_PROFILE", "paper") != "ci" and not os.environ.get("CI")


@dataclass
class RunReport:
    """How a call to :func:`run_units` got its results."""

    computed: list[int]
    reused: list[int]


def run_units(
    fn: Callable,
    units: Sequence[tuple[dict, tuple]],
    store: Store | None = None,
    executor: Executor | None = None,
    description: str = "units",
) -> tuple[list, RunReport]:
    """``fn(*args)`` for each unit ``(config, args)``, reusing stored results.

    ``fn`` must be a module-level function (so that process pools and Dask can send
    it). Each finished result is stored as soon as it arrives, before the next is
    awaited. Returns the results in the order of ``units`` and a :class:`RunReport`.
    """
    from tqdm.std import tqdm

    # Results of a function of this package depend on its module and what it imports.
    module = fn.__module__ if fn.__module__.startswith(__package__ + ".") else None
    keys = [config_key(config, module) for config, _ in units]
    results: list = [None] * len(units)
    reused, todo = [], []
    for i, key in enumerate(keys):
        cached = store.get(key) if store is not None else None
        if cached is not None:
            results[i] = cached
            reused.append(i)
        else:
            todo.append(i)
    bar = tqdm(total=len(units), initial=len(reused), desc=description, unit="unit",
               disable=not progress_enabled(), file=sys.stderr)
    try:
        if executor is None:
            for i in todo:
                results[i] = fn(*units[i][1])
                if store is not None:
                    store.put(keys[i], results[i])
                bar.update()
        else:
            futures = {executor.submit(fn, *units[i][1]): i for i in todo}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if store is not None:
                    store.put(keys[i], results[i])
                bar.update()
    finally:
        bar.close()
    return results, RunReport(computed=todo, reused=reused)


@contextmanager
def dask_executor(address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1):
    """A Dask executor: a new ``LocalCluster`` by default, or the scheduler at ``address``.

    ``address`` is a scheduler address such as ``"tcp://10.0.0.5:8786"`` for a real
    cluster. Needs the ``distributed`` package.
    """
    from distributed import Client, LocalCluster

    if address is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(address)
    try:
        yield client.get_executor()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
