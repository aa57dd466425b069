"""Shared pieces of the benchmarks: machine description, peaks, the paper's batch."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import spectral_precond as sp

RESULTS = Path(__file__).resolve().parent / "results"
PAPER = dict(n_samples=10_000, n_train=200, width=500, n_steps=10_000, lr=1e-2, weight_decay=1e-6)
PS = [-1.0, -0.5, 0.0, 0.5, 1.0]
SNRS = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy_blas": ", ".join(f"{lib['internal_api']} {lib['version']}"
                                for lib in threadpool_info() if lib["user_api"] == "blas"),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # What runs a float32 step at the paper's dx = 10 here: the fused kernel
        # (with the instruction set it was built for) or the products' library.
        "training_step": sp.training.step_kernel(torch.float32, "cpu", 10),
        "fused_kernel": sp.training._fused.kernel().reason,
    }


def best_time(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peaks(n: int = 2048) -> dict[str, float]:
    """float32 GFLOP/s of one large square product with all threads, by library.

    The machine's peak is the larger: torch's MKL and NumPy's OpenBLAS differ by
    tens of per cent on some CPUs, and the trainer uses NumPy's on the CPU.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    a_, b_, out_ = a.numpy(), b.numpy(), out.numpy()
    torch_s = best_time(lambda: torch.mm(a, b, out=out))
    # The trainer leaves NumPy's BLAS on one thread: give it all of torch's for this.
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        numpy_s = best_time(lambda: np.matmul(a_, b_, out=out_))
    return {"torch": 2 * n**3 / torch_s / 1e9, "numpy": 2 * n**3 / numpy_s / 1e9}


def memory_bandwidth(mib: int = 512) -> float:
    """GB/s of a large copy (bytes read plus bytes written)."""
    x = torch.empty(mib * 2**20 // 4).uniform_()
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_time(lambda: y.copy_(x)) / 1e9


def step_flops(width: int, n_train: int, dx: int) -> float:
    """Floating-point operations of one training step of one model: the useful work.

    The trainer pads the ``dx + 1`` input columns with zeros (to 12 for dx = 10);
    the products with those zeros are not counted.
    """
    forward = 2 * width * n_train * (dx + 1)         # Z = [W1 | b1] [X | 1]^T
    head = 2 * width * n_train                       # f = W2 relu(Z)
    backward = 2 * width * n_train * (dx + 1)        # 1[Z > 0] (d * [X | 1])
    small = 2 * width * dx * dx + 10 * width * (dx + 1) + 4 * width * n_train  # P, updates, ReLU
    return forward + head + backward + small


def step_bytes(width: int, n_train: int, dx: int) -> float:
    """Bytes one step of one model must move to and from main memory, at least.

    Parameters are read and written once; the inputs and labels are read once. The
    activations (width x n_train) need not leave the cache and are not counted.
    """
    params = width * (dx + 2) + 1
    return 4 * (2 * params + n_train * (dx + 1) + n_train + dx * dx)


def paper_batch(seeds, ps=PS, snrs=SNRS, cases=("high", "low"), dtype=torch.float32):
    """The paper's synthetic sweep as one (G, M) batch: groups = (case, seed),
    models = (p, snr). Returns tensors, the config list and the per-group test sets."""
    makers = {"high": sp.case_high, "low": sp.case_low}
    Xs, ys, Xts, yts, Ps, configs = [], [], [], [], [], []
    for case_name in cases:
        case = makers[case_name]()
        P_case = torch.stack([sp.population_power(case.inputs, p) for p in ps])
        for seed in seeds:
            data = sp.make_regression_data(
                case.inputs, case.teacher(sp.generator(seed, "teacher")),
                PAPER["n_samples"], PAPER["n_train"], snrs, sp.generator(seed, "data"), dtype,
            )
            Xs.append(data.X_train)
            Xts.append(data.X_test)
            ys.append(data.y_train.repeat(len(ps), 1))       # models ordered (p, snr)
            yts.append(data.y_test.repeat(len(ps), 1))
            Ps.append(P_case.repeat_interleave(len(snrs), dim=0))
            configs.append([(case_name, seed, p, s) for p in ps for s in snrs])
    G, M = len(Xs), len(ps) * len(snrs)
    seeds_grid = np.arange(G * M).reshape(G, M)
    params = sp.kaiming_init(seeds_grid, 10, PAPER["width"]).to(dtype)
    return (torch.stack(Xs), torch.stack(ys), torch.stack(Ps).to(dtype), params,
            torch.stack(Xts), torch.stack(yts), configs)


def write(name: str, payload: dict) -> Path:
    """Write ``payload`` atomically; the load average now shows whether others ran too."""
    if "machine" in payload:
        payload["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
