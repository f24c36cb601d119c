"""Neurons per second of `clustering.polysemy_table` for whole layers of the default model, every method.

    python benchmarks/bench_cluster.py                          # 2000 windows, k 128 and 256, layers 0 and 3
    python benchmarks/bench_cluster.py --windows 500 --k 128 --layers 1 --threads 2

For each k the top examples are collected once (cached), then for each layer and method one call of
`polysemy_table` is timed end to end: the batched pass that reads the pre-MLP vectors h of all the layer's
examples, the neuron embeddings `h ⊙ w` and the clustering of all d_mlp neurons. The pass that reads h is
also timed alone, so the split between the model and the clustering shows. It prints one line per
(k, layer, method) and the load average, since other processes on the machine slow every number alike.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from nbutils import activations, clustering, data, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=2000, help="corpus windows of 64 tokens")
    parser.add_argument("--k", default="128,256", help="examples per neuron, comma-separated")
    parser.add_argument("--layers", default="0,3", help="layers, comma-separated")
    parser.add_argument("--methods", default=",".join(clustering.METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = models.load_model()
    windows = data.corpus_windows(model, n_windows=args.windows, window=64)
    d_mlp = model.cfg.d_mlp
    print(f"{args.windows} windows x 64 tokens; d_mlp {d_mlp}; torch threads {torch.get_num_threads()}; "
          f"cores {os.cpu_count()}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'k':>4} {'layer':>5} {'method':>13} {'examples':>8} {'windows':>7} {'h pass s':>8} "
          f"{'total s':>8} {'neurons/s':>9} {'clusters':>8}")
    for k in [int(x) for x in args.k.split(",")]:
        top = activations.collect_top_activations(model, windows, k=k, progress=False)
        for layer in [int(x) for x in args.layers.split(",")]:
            ex = top.examples[top.examples.layer == layer]
            key = np.unique(ex.window.to_numpy() * 64 + ex.pos.to_numpy())
            start = time.perf_counter()
            clustering._pre_mlp_vectors(model, windows, layer, key // 64, key % 64, fold_ln=True)
            h_seconds = time.perf_counter() - start
            for method in args.methods.split(","):
                start = time.perf_counter()
                table = clustering.polysemy_table(model, windows, top, layer, method=method)
                seconds = time.perf_counter() - start
                print(f"{k:>4} {layer:>5} {method:>13} {len(ex):>8} {len(np.unique(key // 64)):>7} "
                      f"{h_seconds:>8.1f} {seconds:>8.1f} {d_mlp / seconds:>9.1f} "
                      f"{table.n_clusters.mean():>8.2f}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
