"""The paper-sized sweep in one batched run, against the authors'-style loop.

    python benchmarks/sweep.py [--seeds 5] [--steps 10000] [--baseline-configs 3]
    python benchmarks/sweep.py --device cuda     # the sweep alone, on a GPU

Trains 5 p x 2 cases x 6 SNR x 5 seeds = 300 configurations for 10,000 full-batch
steps with train and test loss at about 100 log-spaced steps, and times it. On a
subset of the same configurations it times the authors'-style single-model loop
(torch.nn, autograd, first-layer gradient times P; ``reference_train``) with the
test loss at the same steps, and reports the ratio. It also times one configuration
with the test loss at every step (the authors' shipped setting) in both styles, and
the bound set by the test forward pass alone. Writes results/sweep.json.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

import spectral_precond as sp
from common import PAPER, best_time, machine, paper_batch, write


def device_sweep(args, info, X, y, P, params, Xt, yt):
    """The whole sweep on an accelerator, timed after one warm-up run."""
    on = [t.to(args.device) for t in (X, y, P, Xt, yt)]
    config = sp.TrainConfig(n_steps=args.steps, lr=PAPER["lr"],
                            weight_decay=PAPER["weight_decay"], n_log=100)

    def run():
        result = sp.train(*on[:3], params.to(device=args.device), config, *on[3:])
        torch.cuda.synchronize()
        return result

    run()
    t0 = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t0
    G, M = params.grid
    path = write(f"sweep-{args.device}", {
        "machine": info, "configurations": G * M, "steps": args.steps, "seconds": seconds,
        "diverged": int(result.diverged.sum())})
    print(f"{args.device}: {G * M} configurations in {seconds:.1f} s -> {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=PAPER["n_steps"])
    ap.add_argument("--baseline-configs", type=int, default=3)
    ap.add_argument("--every-step-steps", type=int, default=1000)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the sweep only)")
    args = ap.parse_args()
    info = machine()

    X, y, P, params, Xt, yt, configs = paper_batch(range(args.seeds))
    if args.device != "cpu":
        return device_sweep(args, info, X, y, P, params, Xt, yt)
    G, M = params.grid
    config = sp.TrainConfig(n_steps=args.steps, lr=PAPER["lr"], weight_decay=PAPER["weight_decay"], n_log=100)
    t0 = time.perf_counter()
    result = sp.train(X, y, P, params, config, Xt, yt)
    batched = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_models = G * M
    print(f"batched: {n_models} configurations x {args.steps} steps, "
          f"{len(result.steps)} logged steps: {batched:.1f} s, peak memory {peak_mib:.0f} MiB")

    # The authors'-style loop on a subset of the same configurations.
    picks = [(g, m) for g, m in [(0, 0), (G - 1, M - 1), (G // 2, M // 2)]][: args.baseline_configs]
    baseline_times = []
    for g, m in picks:
        t0 = time.perf_counter()
        losses, test_losses, _ = sp.reference_train(
            X[g], y[g, m], P[g, m], *params.model(g, m), n_steps=args.steps,
            lr=PAPER["lr"], weight_decay=PAPER["weight_decay"],
            X_test=Xt[g], y_test=yt[g, m], test_steps=result.steps,
        )
        baseline_times.append(time.perf_counter() - t0)
        final_gap = abs(test_losses[args.steps] - result.test_loss[g, m, -1].item())
        print(f"  authors' style, config {configs[g][m]}: {baseline_times[-1]:.1f} s; "
              f"|final test MSE difference| = {final_gap:.1e}")
    per_config = float(np.mean(baseline_times))

    # The shipped setting: the test loss at every step, one configuration.
    n_every = args.every_step_steps
    g, m = 0, 0
    t0 = time.perf_counter()
    sp.reference_train(X[g], y[g, m], P[g, m], *params.model(g, m), n_steps=n_every,
                       lr=PAPER["lr"], weight_decay=PAPER["weight_decay"], X_test=Xt[g], y_test=yt[g, m])
    authors_every = (time.perf_counter() - t0) / n_every
    one = sp.Params(*(t[g : g + 1, m : m + 1] for t in params.tensors()))
    every_cfg = sp.TrainConfig(n_steps=n_every, lr=PAPER["lr"], weight_decay=PAPER["weight_decay"],
                               log_steps=list(range(n_every + 1)))
    t0 = time.perf_counter()
    sp.train(X[g : g + 1], y[g : g + 1, m : m + 1], P[g : g + 1, m : m + 1], one, every_cfg,
             Xt[g : g + 1], yt[g : g + 1, m : m + 1])
    ours_every = (time.perf_counter() - t0) / n_every
    # The test forward pass alone, the faster of the library's two ways of computing
    # it: predict(), and the trainer's own test-set evaluation (its blocks and products).
    predict_only = best_time(lambda: sp.predict(one, Xt[g : g + 1]), repeat=20)
    run = sp.training._Run(X[g : g + 1], y[g : g + 1, m : m + 1], P[g : g + 1, m : m + 1].contiguous(),
                           one.clone(), every_cfg, every_cfg.schedule(), Xt[g : g + 1],
                           yt[g : g + 1, m : m + 1], None)
    chunk = next(run.chunks())
    torch.set_num_threads(1)              # as the trainer runs it
    evaluation_only = best_time(chunk.test_mse, repeat=20)
    torch.set_num_threads(info["torch_threads"])
    forward_only = min(predict_only, evaluation_only)
    print(f"test loss every step, per step: authors' style {authors_every * 1e3:.2f} ms, "
          f"batched trainer {ours_every * 1e3:.2f} ms, test forward alone {forward_only * 1e3:.2f} ms")

    payload = {
        "machine": info,
        "configurations": n_models,
        "steps": args.steps,
        "logged_steps": int(len(result.steps)),
        "batched_seconds": batched,
        "batched_peak_rss_mib": peak_mib,
        "baseline_configs": [list(map(str, configs[g][m])) for g, m in picks],
        "baseline_seconds_each": baseline_times,
        "baseline_seconds_extrapolated": per_config * n_models,
        "speedup": per_config * n_models / batched,
        "every_step": {
            "steps_timed": n_every,
            "authors_ms_per_step": authors_every * 1e3,
            "batched_ms_per_step": ours_every * 1e3,
            "test_forward_ms": forward_only * 1e3,
            "test_forward_ms_by_way": {"predict": predict_only * 1e3,
                                       "trainer_evaluation": evaluation_only * 1e3},
            "ratio": authors_every / ours_every,
            "bound_ratio": authors_every / forward_only,
        },
        "diverged": int(result.diverged.sum()),
    }
    path = write("sweep", payload)
    print(f"sweep: {batched:.0f} s batched vs {per_config * n_models:.0f} s authors' style "
          f"(extrapolated from {len(picks)} configurations): {payload['speedup']:.0f}x -> {path}")


if __name__ == "__main__":
    main()
