"""Training cost of the MNIST MLP and of standard vs. neuron-embedding SAEs, measured in one run.

    python benchmarks/bench_mnist.py                 # 3000 SAE steps, 3 interleaved rounds
    python benchmarks/bench_mnist.py --steps 800 --rounds 2

Each round trains the standard SAE (mono_coef 0) and the neuron-embedding SAE (`mnist.NE_SAE_MONO_COEF`,
term on from step 200) on the offline MNIST sample one at a time, interleaved so load from other processes
hits both alike. It prints seconds per SAE (median and best round) and the ratio NE / standard; then it
trains the same SAEs at once with `mnist.train_saes` (one process per core) and prints that wall time
against the sum of the one-by-one runs (the SAEs are identical, checked). Last, the time of `sae_metrics`
and `sae_diagnostics` on the 1,000 test digits, plus the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nbutils import mnist
from nbutils._env import available_cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="SAE training steps")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    print(f"cores {available_cores()}; load average at start {os.getloadavg()[0]:.1f}")
    X_tr, y_tr, X_te, y_te = mnist.load_mnist()
    start = time.perf_counter()
    mlp = mnist.train_mlp(X_tr, y_tr, progress=False)
    print(f"MLP 784-64-10, 30 epochs on {len(X_tr)} digits: {time.perf_counter() - start:.1f} s, "
          f"test accuracy {mnist.mlp_accuracy(mlp, X_te, y_te):.3f}")
    settings = [{"mono_coef": coef, "steps": args.steps, "seed": seed}
                for seed in range(args.rounds) for coef in (0.0, mnist.NE_SAE_MONO_COEF)]
    seconds: dict[str, list[float]] = {"standard": [], "neuron-embedding": []}
    one_by_one = []
    start = time.perf_counter()
    for kwargs in settings:
        sae = mnist.train_sae(mlp, X_tr, progress=False, **kwargs)
        seconds["standard" if kwargs["mono_coef"] == 0 else "neuron-embedding"].append(sae.train_seconds)
        one_by_one.append(sae)
    serial = time.perf_counter() - start
    for name, values in seconds.items():
        print(f"{name:>17} SAE, {args.steps} steps: median {statistics.median(values):.1f} s, best {min(values):.1f} s")
    ratio = statistics.median(seconds["neuron-embedding"]) / statistics.median(seconds["standard"])
    print(f"ratio neuron-embedding / standard (median): {ratio:.2f}")
    start = time.perf_counter()
    at_once = mnist.train_saes(mlp, X_tr, settings, progress=False)
    parallel = time.perf_counter() - start
    same = all(torch.equal(a.W_e, b.W_e) and torch.equal(a.W_d, b.W_d) for a, b in zip(at_once, one_by_one))
    print(f"{len(settings)} SAEs one by one {serial:.1f} s, at once with train_saes ({min(available_cores(), len(settings))} "
          f"processes) {parallel:.1f} s: ratio {serial / parallel:.2f}; identical SAEs: {same}")
    start = time.perf_counter()
    mnist.sae_metrics(mlp, sae, X_te, y_te)
    middle = time.perf_counter()
    mnist.sae_diagnostics(mlp, sae, X_te, y_te)
    print(f"sae_metrics {middle - start:.2f} s, sae_diagnostics {time.perf_counter() - middle:.2f} s "
          f"on {len(X_te)} test digits; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
