"""Scale-out on Ray: overhead against one process, merge cost by number of shards, per-token cost of GPT-2 small.

    python benchmarks/bench_scale.py                         # 2000 windows x 64 tokens, k 128, 3 rounds
    python benchmarks/bench_scale.py --windows 500 --rounds 2 --no-atlas --no-gpt2

1. **Overhead**, with the same cores in total: `scale.collect_ray` on a local Ray cluster of 2 CPUs (2 workers x
   1 torch thread) against `activations.collect_top_activations` in this process with 2 torch threads, over the
   same windows. Each round starts from an empty cache folder (both write their results to the cache). Rounds
   alternate the two, so load from other processes hits both alike; it prints tokens/s and the paired ratio
   (Ray / in-process, median over rounds). Worker start (import, model and corpus load) is timed apart, in the
   first call, since a standing cluster pays it once. With `--atlas`, the whole atlas build is timed once each way.
2. **Merge cost**: merging 2, 8 and 32 shards of GPT-2-small-shaped state (12 x 3,072 neurons, k = 128, random)
   as the pairwise tree does it (n - 1 merge tasks, each: unpack, `activations.merge`, pack), in this process;
   seconds, seconds per merge, bytes per shard as sent between workers.
3. **Per-token cost of GPT-2 small**: collection tokens/s of a randomly initialised GPT-2-small-shaped model
   (from a config, no download) against the default model, beside the ratio of their FLOPs per token.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import tempfile
import time

import torch

from nbutils import activations, atlas, data, models, scale


def _flops_per_token(n_layers: int, d_model: int, d_mlp: int, window: int) -> float:
    """Forward FLOPs per token up to the last MLP: the weight products (QKV, output, MLP in and out) and the
    causal attention over `window / 2` positions on average (scores and values)."""
    weights = 4 * d_model * d_model + 2 * d_model * d_mlp  # multiply-adds per token per layer
    attention = window * d_model  # (window / 2) * d_model for scores, as many for values
    return 2.0 * n_layers * (weights + attention)


def _overhead(args: argparse.Namespace, model, windows) -> dict:
    spec = scale.CorpusSpec(n_windows=args.windows, window=args.window)
    options = dict(k=args.k, frac=0.75, batch_size=64)
    tokens = windows.numel()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        scale.collect_ray(None, spec, shards=args.shards, cache_dir=f"{tmp}/warm", progress=False, **options)
        cold = time.perf_counter() - start
        wall: dict[str, list[float]] = {"in_process": [], "ray": []}
        for r in range(args.rounds):
            order = ["in_process", "ray"] if r % 2 == 0 else ["ray", "in_process"]
            for name in order:
                folder = f"{tmp}/{name}{r}"
                start = time.perf_counter()
                if name == "ray":
                    top = scale.collect_ray(None, spec, shards=args.shards, cache_dir=folder, progress=False, **options)
                else:
                    ref = activations.collect_top_activations(model, windows, cache_dir=folder, progress=False, **options)
                wall[name].append(time.perf_counter() - start)
        same = all(torch.equal(getattr(top, n), getattr(ref, n)) for n in ("act", "window", "pos"))
    paired = [a / b for a, b in zip(wall["in_process"], wall["ray"])]  # Ray speed / in-process speed, same round
    return {"tokens": tokens, "cold": cold, "wall": wall, "paired": paired, "same": same}


def _atlas_times(args: argparse.Namespace, model, windows) -> dict:
    spec = scale.CorpusSpec(n_windows=args.windows, window=args.window)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        one = atlas.build_atlas(model, windows, k=args.k, out=f"{tmp}/one", cache_dir=f"{tmp}/c1", progress=False)
        out["in_process"] = time.perf_counter() - start
        start = time.perf_counter()
        two = scale.build_atlas_ray(None, spec, shards=args.shards, k=args.k, out=f"{tmp}/ray", cache_dir=f"{tmp}/c2",
                                    progress=False)
        out["ray"] = time.perf_counter() - start
        out["same_key"] = one.manifest["key_hash"] == two.manifest["key_hash"]
        out["steps"] = {name: (one.manifest["steps"][name].get("seconds", 0.0),
                               two.manifest["steps"][name].get("seconds", 0.0)) for name in one.manifest["steps"]}
    return out


def _random_state(n_layers: int, d_mlp: int, k: int, shard: int, windows_per_shard: int, gen: torch.Generator
                  ) -> activations.TopActivations:
    """A random collection of one shard: sorted activations, distinct window ids inside the shard's range."""
    act = torch.rand(n_layers, d_mlp, k, generator=gen).sort(dim=-1, descending=True).values
    stride = windows_per_shard // k
    window = shard * windows_per_shard + torch.arange(k) * stride + torch.randint(0, stride, (n_layers, d_mlp, k),
                                                                                   generator=gen)
    pos = torch.randint(0, 64, (n_layers, d_mlp, k), generator=gen)
    settings = activations.CollectSettings(k=k)
    start = shard * windows_per_shard
    return activations.TopActivations(act, window, pos, settings=settings, n_windows=windows_per_shard,
                                      window_ranges=((start, start + windows_per_shard),), model_id="random",
                                      corpus_id=str(shard))


def _merge_cost(n_shards: int, gen: torch.Generator) -> dict:
    """Merge `n_shards` random states pairwise as a tree, streaming (at most log2(n) + 1 states held at once)."""
    stack: list[tuple[int, object]] = []  # (level, packed state), a binary counter
    seconds, merges, size, packed_size = 0.0, 0, 0, 0
    for shard in range(n_shards):
        state = _random_state(12, 3072, 128, shard, 2560, gen)
        item = (0, scale._pack(state))  # as the shard tasks return it
        if shard == 0:
            size, packed_size = len(pickle.dumps(state, protocol=5)), len(pickle.dumps(item[1], protocol=5))
        while stack and stack[-1][0] == item[0]:
            level, other = stack.pop()
            start = time.perf_counter()
            item = (level + 1, scale._merge(other, item[1]))  # what a merge task runs: unpack, merge, pack
            seconds += time.perf_counter() - start
            merges += 1
        stack.append(item)
    while len(stack) > 1:
        _, b = stack.pop()
        level, a = stack.pop()
        start = time.perf_counter()
        stack.append((level + 1, scale._merge(a, b)))
        seconds += time.perf_counter() - start
        merges += 1
    return {"shards": n_shards, "merges": merges, "seconds": seconds, "bytes_per_shard": size,
            "packed_bytes_per_shard": packed_size}


def _gpt2_small_speed(args: argparse.Namespace, tiny, tiny_windows) -> dict:
    """Collection tokens/s of a random GPT-2-small-shaped model (saved to a temporary folder with the default
    model's tokenizer) and of the default model (8x more windows), on the same corpus, 2 torch threads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nbutils import _env

    config = AutoConfig.from_pretrained(_env.DEFAULT_MODEL_DIR)
    config.update({"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None, "n_positions": 1024,
                   "vocab_size": 50257})
    out = {}

    def speed(model, n: int) -> float:
        """Tokens/s from the time difference between n and 2n windows: the fixed cost of a call (weight
        fingerprint, setting up the forward) cancels out."""
        n, times = min(n, len(tiny_windows) // 2), []
        for m in (n, 2 * n):
            start = time.perf_counter()
            activations.collect_top_activations(model, tiny_windows[:m], use_cache=False, progress=False)
            times.append(time.perf_counter() - start)
        return n * tiny_windows.shape[1] / (times[1] - times[0])

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(_env.DEFAULT_MODEL_DIR / name, tmp)
        big = models.load_model(tmp)
        for label, model, n in (("gpt2_small", big, args.gpt2_windows), ("default", tiny, 8 * args.gpt2_windows)):
            out[label] = speed(model, n)
            cfg = model.cfg
            out[label + "_flops"] = _flops_per_token(cfg.n_layers, cfg.d_model, cfg.d_mlp, tiny_windows.shape[1])
        del big
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=2000, help="corpus windows (default 2000)")
    parser.add_argument("--window", type=int, default=64, help="tokens per window")
    parser.add_argument("--k", type=int, default=128, help="examples per neuron")
    parser.add_argument("--shards", type=int, default=2, help="shards of the Ray collection (default 2: one per worker)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True, help="part 1")
    parser.add_argument("--atlas", action=argparse.BooleanOptionalAction, default=True, help="time whole atlas builds")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True, help="part 2")
    parser.add_argument("--gpt2", action=argparse.BooleanOptionalAction, default=True,
                        help="measure a GPT-2-small-shaped model's collection speed")
    parser.add_argument("--gpt2-windows", type=int, default=64,
                        help="GPT-2-small speed from the time of 2n minus n windows (default n = 64)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    model = models.load_model()
    windows = data.corpus_windows(model, n_windows=args.windows, window=args.window)
    print(f"{args.windows} windows x {args.window} tokens, k {args.k}; cores {os.cpu_count()}; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    if args.overhead:
        _part_overhead(args, model, windows)
    if args.merge:
        _part_merge()
    if args.gpt2:
        _part_gpt2(args, model, windows)


def _part_overhead(args: argparse.Namespace, model, windows) -> None:
    start = time.perf_counter()
    session = scale.connect(num_cpus=2)
    print(f"\n1. overhead (local Ray cluster of 2 CPUs started in {time.perf_counter() - start:.1f} s)")
    o = _overhead(args, model, windows)
    print(f"  first Ray call (2 workers start, load the model and corpus, collect): {o['cold']:.1f} s")
    for name, times in o["wall"].items():
        speeds = ", ".join(f"{o['tokens'] / t:,.0f}" for t in times)
        label = "in-process, 1 process x 2 threads" if name == "in_process" else f"Ray, 2 workers x 1 thread, {args.shards} shards"
        print(f"  {label:45s} tokens/s per round: {speeds}")
    print(f"  Ray / in-process tokens/s, paired median over rounds: {statistics.median(o['paired']):.2f} "
          f"(rounds: {', '.join(f'{p:.2f}' for p in o['paired'])}); identical result: {o['same']}")
    if args.atlas:
        a = _atlas_times(args, model, windows)
        print(f"  whole atlas build: in-process {a['in_process']:.1f} s, Ray {a['ray']:.1f} s (Ray includes its "
              f"collection; ratio of speeds {a['in_process'] / a['ray']:.2f}); same atlas key: {a['same_key']}")
        for name, (one, two) in a["steps"].items():
            print(f"    {name:22s} in-process {one:7.1f} s   Ray {two:7.1f} s")
    session.close()


def _part_merge() -> None:
    print("\n2. merge cost: GPT-2-small-shaped state (12 x 3,072 neurons, k 128), pairwise tree of n - 1 merges")
    gen = torch.Generator().manual_seed(0)
    for n in (2, 8, 32):
        m = _merge_cost(n, gen)
        print(f"  {n:3d} shards: {m['merges']:3d} merges in {m['seconds']:6.2f} s = {m['seconds'] / m['merges']:.3f} s "
              f"per merge; state per shard pickled {m['packed_bytes_per_shard'] / 1e6:.1f} MB as sent "
              f"({m['bytes_per_shard'] / 1e6:.1f} MB as a TopActivations)")


def _part_gpt2(args: argparse.Namespace, model, windows) -> None:
    g = _gpt2_small_speed(args, model, windows)
    print(f"\n3. per-token cost, collection in one process with 2 threads (time of 2n minus n windows; n = "
          f"{args.gpt2_windows} for GPT-2 small, {8 * args.gpt2_windows} for the default model)")
    print(f"  default model     {g['default']:9,.0f} tokens/s   {g['default_flops'] / 1e6:7.1f} MFLOP/token")
    print(f"  GPT-2-small shape {g['gpt2_small']:9,.0f} tokens/s   {g['gpt2_small_flops'] / 1e6:7.1f} MFLOP/token")
    print(f"  speed ratio {g['default'] / g['gpt2_small']:.0f}x; FLOP ratio {g['gpt2_small_flops'] / g['default_flops']:.0f}x; "
          f"10 M tokens of GPT-2 small at the measured speed: {1e7 / g['gpt2_small'] / 3600:.2f} h on these 2 cores")


if __name__ == "__main__":
    main()
