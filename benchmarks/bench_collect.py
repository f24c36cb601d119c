"""Collection throughput against a bare forward pass of the same weights, and peak memory for N and 10×N windows.

    python benchmarks/bench_collect.py                     # defaults: 1024 windows × 7 rounds, N = 1000
    python benchmarks/bench_collect.py --windows 256 --rounds 3 --n 200
    python benchmarks/bench_collect.py --model PATH         # any Hugging Face model folder the bridge boots
    python benchmarks/bench_collect.py --model smollm2-135m --windows 256 --rounds 3 --no-memory   # the real model
    python benchmarks/bench_collect.py --random-family llama --no-memory   # a random 4-layer, d_model 256 model

`--random-family` (gpt2, gpt_neox, gptj, llama, gemma2, opt) builds a randomly initialised model of that family
from a `transformers` config (4 layers, d_model 256, d_mlp 1024) with the default tokenizer, in a temporary folder.

Throughput: on the same windows and batch size, one run times, in interleaved rounds (so load from other
processes hits every method alike),

- `hf_full`: the plain Hugging Face model loaded with `transformers` from the model folder, no hooks, logits
  computed (the bare forward pass);
- `hf_body`: the same model's transformer body only (`base_model`: no unembedding): the layers collection
  actually needs to run;
- `collect`: `activations.collect_top_activations` (no cache), which stops after the last MLP;
- `collect_bridge`: the same through the TransformerBridge's hooks (`plain_hf=False`), to show the bridge's cost.

It prints tokens/s per method and the ratios of each collection to hf_full and hf_body: the median over rounds of
the ratio within a round (the headline: methods timed back to back share the machine's load), the ratio of the
fastest rounds, and the ratio of process CPU time.

Memory: each size runs in a fresh process that loads the model and windows, then collects (and builds the
tables); it prints the peak resident set size before and after collection, and the growth during it.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from nbutils import _env, activations, data, mlp_forward, models, pretrained


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _random_family(family: str, out: str) -> str:
    """Save a random 4-layer, d_model 256 model of `family` with the default tokenizer into `out`."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(_env.DEFAULT_MODEL_DIR)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.eos_token_id)
    d, layers, d_mlp, heads, ctx = 256, 4, 1024, 4, 128
    common = dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=d_mlp, num_attention_heads=heads,
                  max_position_embeddings=ctx, **ids)
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, n_positions=ctx, n_inner=d_mlp,
                                                activation_function="gelu_new", **ids),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common),
        "gptj": lambda: transformers.GPTJConfig(n_embd=d, n_layer=layers, n_head=heads, n_positions=ctx,
                                                n_inner=d_mlp, rotary_dim=32, **ids),
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **common),
        "gemma2": lambda: transformers.Gemma2Config(num_key_value_heads=2, head_dim=64, **common),
        "opt": lambda: transformers.OPTConfig(hidden_size=d, num_hidden_layers=layers, ffn_dim=d_mlp,
                                              num_attention_heads=heads, max_position_embeddings=ctx,
                                              word_embed_proj_dim=d, **ids),
    }
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(configs[family]()).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _throughput(model_path: str | None, n_windows: int, rounds: int, batch_size: int, window: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = models.load_model(model_path)
    folder = pretrained.local_folder(model_path) if model_path in pretrained.PRETRAINED else model_path
    hf = AutoModelForCausalLM.from_pretrained(folder or _env.DEFAULT_MODEL_DIR).eval()
    windows = data.corpus_windows(model, n_windows, window)  # [n_windows, window]

    def forward(fn) -> None:
        with torch.inference_mode():
            for start in range(0, n_windows, batch_size):
                fn(windows[start : start + batch_size])

    methods = {
        "hf_full": lambda: forward(lambda batch: hf(batch)),
        "hf_body": lambda: forward(lambda batch: hf.base_model(input_ids=batch, use_cache=False)),
        "collect": lambda: activations.collect_top_activations(
            model, windows, batch_size=batch_size, use_cache=False, progress=False
        ),
        "collect_bridge": lambda: activations.collect_top_activations(
            model, windows, batch_size=batch_size, use_cache=False, progress=False, plain_hf=False
        ),
    }
    for run in methods.values():  # warm-up
        run()
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            methods[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    tokens = windows.numel()
    result = {"tokens_per_round": tokens, "speeds": {}, "ratios": {},
              "engine": mlp_forward.mlp_forward(model, plain_hf=True).engine}
    for name in methods:
        result["speeds"][name] = {"median": tokens / statistics.median(wall[name]), "best": tokens / min(wall[name])}
    for collect in ("collect", "collect_bridge"):
        for base in ("hf_full", "hf_body"):
            paired = [b / c for b, c in zip(wall[base], wall[collect])]  # same round: same load from other processes
            result["ratios"][f"{collect} / {base}"] = {
                "paired_median": statistics.median(paired),
                "best": min(wall[base]) / min(wall[collect]),
                "cpu_time": sum(cpu[base]) / sum(cpu[collect]),
            }
    return result


def _memory(model_path: str | None, n_windows: int, batch_size: int, window: int) -> dict:
    model = models.load_model(model_path)
    windows = data.corpus_windows(model, n_windows, window)
    gc.collect()
    reset = _reset_peak()
    before = _status_mb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    top = activations.collect_top_activations(model, windows, batch_size=batch_size, use_cache=False, progress=False)
    _ = top.examples, top.neurons
    peak = _status_mb("VmHWM")  # peak since the reset: the collection and its tables
    return {"n_windows": n_windows, "rss_before_mb": before, "peak_mb": peak, "growth_mb": peak - before,
            "peak_is_collection_only": reset, "n_examples": len(top.examples)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=1024, help="windows per throughput round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--n", type=int, default=1000, help="N for the memory comparison (N and 10×N windows)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=64, help="tokens per window")
    parser.add_argument("--model", default=None, help="Hugging Face model folder or an offline "
                        "name such as smollm2-135m (default: the offline default)")
    parser.add_argument("--random-family", default=None, help="benchmark a random 4-layer, d_model 256 model of "
                        "this family: gpt2, gpt_neox, gptj, llama, gemma2 or opt")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--memory-only", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)

    if args.memory_only is not None:
        print(json.dumps(_memory(args.model, args.memory_only, args.batch_size, args.window)))
        return
    if args.random_family is not None:
        import tempfile

        tmp = tempfile.mkdtemp(prefix=f"bench_{args.random_family}_")
        args.model = _random_family(args.random_family, tmp)

    model_name = args.model or "the offline default"
    print(f"model: {model_name}; torch threads: {torch.get_num_threads()}, batch size {args.batch_size}, "
          f"window {args.window} tokens")
    bench = _throughput(args.model, args.windows, args.rounds, args.batch_size, args.window)
    print(f"collection engine: {bench['engine']}")
    print(f"\nthroughput: {args.windows} windows ({bench['tokens_per_round']} tokens) per round, "
          f"{args.rounds} interleaved rounds (tokens/s)")
    for name, s in bench["speeds"].items():
        print(f"  {name:14s} best round {s['best']:8.0f}   median round {s['median']:8.0f}")
    print("  collection throughput / bare forward throughput:")
    print("    paired median = median over rounds of the ratio within a round (methods in one round share the")
    print("    machine's load); best = ratio of the fastest rounds; cpu = ratio of process CPU time")
    for name, r in bench["ratios"].items():
        print(f"  {name:24s}: paired median {r['paired_median']:.2f}   best {r['best']:.2f}   "
              f"cpu {r['cpu_time']:.2f}")

    if args.no_memory:
        return
    print("\npeak memory (resident set size, MB), each size in a fresh process")
    rows = []
    for n in (args.n, 10 * args.n):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-only", str(n), "--batch-size", str(args.batch_size),
             "--window", str(args.window)] + (["--model", args.model] if args.model else []),
            check=True, capture_output=True, text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in rows:
        print(f"  {row['n_windows']:6d} windows: RSS before collection {row['rss_before_mb']:7.1f}, peak during "
              f"collection {row['peak_mb']:7.1f}, growth {row['growth_mb']:6.1f}  ({row['n_examples']} examples)")
    if not rows[0]["peak_is_collection_only"]:
        print("  (this kernel does not reset the peak: peaks include loading the corpus)")
    print(f"  peak 10×N / N: {rows[1]['peak_mb'] / rows[0]['peak_mb']:.3f}   "
          f"growth 10×N - N: {rows[1]['growth_mb'] - rows[0]['growth_mb']:+.1f} MB")


if __name__ == "__main__":
    main()
