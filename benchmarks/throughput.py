"""Throughput of the batched trainer against this machine's roofline.

    python benchmarks/throughput.py [--steps 300] [--models 1 8 64 256] [--rounds 3]

Measures the float32 matrix-product peak (the faster of torch's and NumPy's BLAS) and
the memory bandwidth, then trains B models that share one data set (the paper's sizes:
N = 200, width 500, dx = 10) and reports model-steps per second and the fraction of
the roofline bound, the larger of FLOPs / peak and bytes / bandwidth. It does so in
several rounds, each measuring the peak again, and reports the medians. Each round
also trains 64 models without the fused step (with NumPy's and with torch's
products), and 64 models split over one single-threaded process per core, which
shows what the hardware gives without the cost of running Python threads side by
side. A profile of one run at 64 models (on one thread, with the fused kernel and
the NumPy products labelled) shows where the time goes. Writes
results/throughput.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import spectral_precond as sp
from common import PAPER, machine, matmul_peaks, memory_bandwidth, step_bytes, step_flops, write


def batch(n_models: int, dx: int = 10, n_train: int = PAPER["n_train"], width: int = PAPER["width"]):
    gen = sp.generator(0, "bench")
    X = torch.randn(1, n_train, dx, generator=gen)
    y = torch.randn(1, n_models, n_train, generator=gen)
    P = torch.eye(dx)
    params = sp.kaiming_init(np.arange(n_models).reshape(1, n_models), dx, width).to(torch.float32)
    return X, y, P, params


def run(n_models: int, steps: int, products: str = "numpy", fused: bool = True, **sizes) -> float:
    """Model-steps/s of ``n_models`` trained at once, with the fused CPU step or not,
    and the CPU products of ``products``."""
    X, y, P, params = batch(n_models, **sizes)
    config = sp.TrainConfig(n_steps=steps, log_steps=[steps])
    settings = sp.training.CPU_PRODUCTS, sp.training.FUSED_CPU_STEP
    sp.training.CPU_PRODUCTS, sp.training.FUSED_CPU_STEP = products, fused
    try:
        sp.train(X, y, P, params, sp.TrainConfig(n_steps=5, log_steps=[5]))
        t0 = time.perf_counter()
        sp.train(X, y, P, params, config)
        return n_models * steps / (time.perf_counter() - t0)
    finally:
        sp.training.CPU_PRODUCTS, sp.training.FUSED_CPU_STEP = settings


CHILD = r"""
import sys, time
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
import spectral_precond as sp
from throughput import batch
X, y, P, params = batch({models})
sp.train(X, y, P, params, sp.TrainConfig(n_steps=5, log_steps=[5]))
time.sleep(max(0.0, {start_at} - time.time()))
t0 = time.perf_counter()
sp.train(X, y, P, params, sp.TrainConfig(n_steps={steps}, log_steps=[{steps}]))
print({models} * {steps} / (time.perf_counter() - t0))
"""


def separate_processes(n_models: int, steps: int) -> float:
    """Model-steps/s of ``n_models`` split over one single-threaded process per core.

    The processes start their timed runs at the same moment. Set beside the worker
    threads of one process, this separates what the hardware gives from what
    running Python threads side by side costs.
    """
    cores = torch.get_num_threads()
    code = CHILD.format(here=str(Path(__file__).resolve().parent), models=n_models // cores,
                        steps=steps, start_at=time.time() + 15)
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                for _ in range(cores)]
    return sum(float(child.communicate()[0].strip().splitlines()[-1]) for child in children)


def _product_name(out: torch.Tensor) -> str:
    """The profile's name for one of the trainer's NumPy products, from its output shape."""
    if out.ndim == 2:
        return "first-layer product (NumPy)"
    return "head (NumPy)" if out.shape[-1] == 1 else "backward product (NumPy)"


def profile_one_thread(n_models: int, steps: int = 100, top: int = 9) -> list[dict]:
    """Shares of one thread's time by operation, for ``n_models`` models.

    The profiler records the calling thread only, so the chunks run serially on one
    thread. It sees torch's operations; the fused kernel and the NumPy products are
    labelled for it by wrapping the functions that the trainer makes for them.
    """
    make, make_fused = sp.training._product, sp.training._fused.step_function

    def label(function, name):
        def call():
            with record_function(name):
                function()
        return call

    def labelled(a, b, out, backend):
        return label(make(a, b, out, backend), _product_name(out))

    def labelled_fused(*args, **kwargs):
        return label(make_fused(*args, **kwargs), "fused step kernel (C)")

    X, y, P, params = batch(n_models)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sp.training._product, sp.training._fused.step_function = labelled, labelled_fused
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sp.train(X, y, P, params, sp.TrainConfig(n_steps=steps, log_steps=[steps]))
    finally:
        sp.training._product, sp.training._fused.step_function = make, make_fused
        torch.set_num_threads(threads)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
            for e in events[:top]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--models", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    info = machine()
    dx, n_train, width = 10, PAPER["n_train"], PAPER["width"]
    flops, nbytes = step_flops(width, n_train, dx), step_bytes(width, n_train, dx)
    # The clock of a shared or turbo-boosted CPU drifts: each round measures the peak
    # and the bandwidth again, right before its throughput runs, and each round's
    # fraction is taken against its own bound. The table gives the medians.
    rounds = []
    for k in range(args.rounds):
        peaks, bandwidth = matmul_peaks(), memory_bandwidth()
        peak = max(peaks.values())
        bound = max(flops / (peak * 1e9), nbytes / (bandwidth * 1e9))   # s per model-step
        rates = {B: run(B, args.steps) for B in args.models}
        blas = run(64, args.steps, fused=False)
        torch_products = run(64, args.steps, products="torch", fused=False)
        processes = separate_processes(64, args.steps)
        rounds.append({"peak_gflops": peak, "peak_gflops_by_library": peaks,
                       "bandwidth_gbs": bandwidth, "bound_s": bound,
                       "rates": rates, "numpy_products_64": blas,
                       "torch_products_64": torch_products, "processes_64": processes})
        print(f"round {k + 1}: peak {peak:.0f} GFLOP/s (torch {peaks['torch']:.0f}, "
              f"numpy {peaks['numpy']:.0f}), bandwidth {bandwidth:.1f} GB/s, "
              + ", ".join(f"{B}: {rate:.0f}" for B, rate in rates.items()) + " model-steps/s"
              + f"; 64 models without the fused step: {blas:.0f} (NumPy's products), "
              + f"{torch_products:.0f} (torch's)"
              + f", in separate processes: {processes:.0f}")
    peak = float(np.median([r["peak_gflops"] for r in rounds]))
    peak_by_library = {lib: float(np.median([r["peak_gflops_by_library"][lib] for r in rounds]))
                       for lib in rounds[0]["peak_gflops_by_library"]}
    bandwidth = float(np.median([r["bandwidth_gbs"] for r in rounds]))
    bound = max(flops / (peak * 1e9), nbytes / (bandwidth * 1e9))
    print(f"median peak {peak:.0f} GFLOP/s, bandwidth {bandwidth:.1f} GB/s; one model-step: "
          f"{flops / 1e6:.2f} MFLOP, {nbytes / 1e3:.0f} kB -> roofline {1 / bound:.0f} model-steps/s")
    rows = []
    for B in args.models:
        rates = [r["rates"][B] for r in rounds]
        fractions = [r["rates"][B] * r["bound_s"] for r in rounds]
        rate = float(np.median(rates))
        rows.append({"models": B, "model_steps_per_s": rate, "gflops": rate * flops / 1e9,
                     "roofline_fraction": float(np.median(fractions)),
                     "roofline_fraction_range": [min(fractions), max(fractions)],
                     "model_steps_per_s_range": [min(rates), max(rates)]})
        print(f"{B:4d} models: {rate:8.0f} model-steps/s, {rate * flops / 1e9:5.1f} GFLOP/s, "
              f"{100 * rows[-1]['roofline_fraction']:4.0f} % of roofline "
              f"({100 * min(fractions):.0f} to {100 * max(fractions):.0f} % over {len(rounds)} rounds)")

    processes = {
        "model_steps_per_s": float(np.median([r["processes_64"] for r in rounds])),
        "roofline_fraction": float(np.median([r["processes_64"] * r["bound_s"] for r in rounds])),
        "threads": float(np.median([r["rates"][64] for r in rounds])) if 64 in args.models else None,
    }
    def median_64(key):
        return {
            "model_steps_per_s": float(np.median([r[key] for r in rounds])),
            "roofline_fraction": float(np.median([r[key] * r["bound_s"] for r in rounds])),
        }

    numpy_products, torch_products = median_64("numpy_products_64"), median_64("torch_products_64")
    for name, rate in (("NumPy's", numpy_products), ("torch's", torch_products)):
        print(f"64 models without the fused step, with {name} products: "
              f"{rate['model_steps_per_s']:.0f} model-steps/s "
              f"({100 * rate['roofline_fraction']:.0f} % of roofline)")
    print(f"64 models, one single-threaded process per core: "
          f"{processes['model_steps_per_s']:.0f} model-steps/s "
          f"({100 * processes['roofline_fraction']:.0f} % of roofline)")

    breakdown = profile_one_thread(64)
    for row in breakdown:
        print(f"  {row['op']:30s} {100 * row['share']:5.1f} %  ({row['calls']} calls)")
    path = write("throughput", {
        "machine": info, "peak_gflops": peak, "peak_gflops_by_library": peak_by_library,
        "bandwidth_gbs": bandwidth,
        "flops_per_model_step": flops, "bytes_per_model_step": nbytes,
        "roofline_model_steps_per_s": 1 / bound, "rows": rows, "profile_64_models": breakdown,
        "processes_64": processes, "numpy_products_64": numpy_products,
        "torch_products_64": torch_products,
        "rounds": [{**r, "rates": {str(B): v for B, v in r["rates"].items()}} for r in rounds],
    })
    print(f"-> {path}")


if __name__ == "__main__":
    main()
