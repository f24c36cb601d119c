"""Peak memory of `bands.collect_band_samples` at N and 10 N windows: the sample must not grow with the corpus.

    python benchmarks/bench_bands.py                    # N = 400 windows of 64 tokens
    python benchmarks/bench_bands.py --windows 200 --bands 10 --per-band 8

Each size runs in a fresh process (so one run's peak cannot hide the other's) that loads the model, makes the
windows and the maxima (from a short top-k collection over the first N windows), records its resident set
size (RSS) before sampling, samples, and reports its peak RSS. The windows tensor itself grows with the corpus
(8 bytes per token), so its size is printed too; the sample's own memory is n_layers x d_mlp x bands x
per_band slots whatever the corpus. It prints one line per size and the ratio of the peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _child(n_windows: int, n_max: int, bands_: int, per_band: int) -> None:
    import torch

    from nbutils import activations, bands, data, models

    torch.set_num_threads(1)
    model = models.load_model()
    windows = data.corpus_windows(model, n_windows=n_windows, window=64)
    top = activations.collect_top_activations(model, windows[:n_max], k=1, use_cache=False, progress=False)
    before = _peak_mb()
    start = time.perf_counter()
    sample = bands.collect_band_samples(model, windows, top.max_act, bands=bands_, per_band=per_band, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(windows=n_windows, rss_before_mb=before, peak_mb=_peak_mb(), seconds=seconds,
                          windows_mb=windows.numel() * windows.element_size() / 2**20, rows=len(sample.table))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=400, help="N: corpus windows of 64 tokens")
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--per-band", type=int, default=8)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.windows, args.bands, args.per_band)
        return
    print(f"cores {os.cpu_count()}; load average at start {os.getloadavg()[0]:.1f}; bands {args.bands}, "
          f"per band {args.per_band}")
    print(f"{'windows':>8} {'RSS before MB':>13} {'peak RSS MB':>11} {'windows MB':>10} {'sample rows':>11} {'s':>6}")
    peaks = []
    for n in (args.windows, 10 * args.windows):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--windows", str(args.windows),
                              "--bands", str(args.bands), "--per-band", str(args.per_band)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks.append(r["peak_mb"])
        print(f"{r['windows']:>8} {r['rss_before_mb']:>13.0f} {r['peak_mb']:>11.0f} {r['windows_mb']:>10.1f} "
              f"{r['rows']:>11} {r['seconds']:>6.1f}", flush=True)
    print(f"peak RSS at 10 N / at N: {peaks[1] / peaks[0]:.3f}; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
