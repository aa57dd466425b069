"""How time and memory grow with the number of models, dx, N, the step count and the
size of the test set.

    python benchmarks/scaling.py

Each point runs in a fresh subprocess so that its peak resident memory is its own.
Writes results/scaling.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import machine, write

POINT = r"""
import json, resource, sys, time
sys.path.insert(0, {here!r})
import torch
from throughput import batch
import spectral_precond as sp
models, dx, n_train, steps, n_test = {models}, {dx}, {n_train}, {steps}, {n_test}
X, y, P, params = batch(models, dx=dx, n_train=n_train)
test = ()
if n_test:
    gen = sp.generator(1, "bench-test")
    test = (torch.randn(1, n_test, dx, generator=gen), torch.randn(1, models, n_test, generator=gen))
t0 = time.perf_counter()
sp.train(X, y, P, params, sp.TrainConfig(n_steps=steps, n_log=100), *test)
elapsed = time.perf_counter() - t0
print(json.dumps({{"seconds": elapsed,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

GRID = (
    [("models", dict(models=m, dx=10, n_train=200, steps=200, n_test=0)) for m in (8, 32, 128, 512)]
    + [("dx", dict(models=32, dx=d, n_train=200, steps=40, n_test=0)) for d in (10, 100, 1000)]
    + [("n_train", dict(models=32, dx=10, n_train=n, steps=200, n_test=0)) for n in (100, 200, 400, 800)]
    + [("steps", dict(models=32, dx=10, n_train=200, steps=s, n_test=0)) for s in (100, 1000, 4000)]
    # With a test set scored at the 100 logged steps; its inputs and labels take
    # 4 x 43 bytes per point, the activations of its blocks a fixed amount.
    + [("n_test", dict(models=32, dx=10, n_train=200, steps=200, n_test=n)) for n in (1_000, 10_000, 40_000)]
)


def main():
    here = str(Path(__file__).resolve().parent)
    rows = []
    for axis, point in GRID:
        code = POINT.format(here=here, **point)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        row = {"axis": axis, **point, **json.loads(out.stdout.strip().splitlines()[-1])}
        row["us_per_model_step"] = 1e6 * row["seconds"] / (point["models"] * point["steps"])
        rows.append(row)
        print(f"{axis:8s} models={point['models']:4d} dx={point['dx']:5d} N={point['n_train']:4d} "
              f"steps={point['steps']:5d} n_test={point['n_test']:6d}: {row['seconds']:7.2f} s "
              f"({row['us_per_model_step']:7.0f} us per model-step), peak {row['peak_rss_mib']:6.0f} MiB")
    print(f"-> {write('scaling', {'machine': machine(), 'rows': rows})}")


if __name__ == "__main__":
    main()
