"""Which embedding kind of a gated MLP ("gate", "up", "both") separates a virtual neuron's sources best.

    python benchmarks/bench_gated_kinds.py     # Llama, Gemma 2 and the GPT-2 reference, 4 layers, d_model 256
    python benchmarks/bench_gated_kinds.py --families llama --windows 400 --virtual 30

The weights are random: no trained gated model is available offline, so each family's model is built from a
`transformers` config (default initialisation, fixed seed) with the package's default tokenizer. The figures
show how the kinds separate the sources on this construction, on a random network's activations over real
text, not how they behave on a trained model.

Per family, over the offline corpus windows (`data.corpus_windows`): top-k collection of every layer, virtual
neurons per layer (`evaluation.make_virtual_neurons`: each reads 2-4 monosemantic neurons; gate and up
combined, activation `act(g_v) * u_v`), their top examples (`evaluation.collect_virtual_examples`), each
example labelled by the source whose scaled `act(g_i) * u_i` is largest, and the clusters of the default
method (`clustering.DEFAULT_METHOD`) scored in the embedding space of each kind
(`evaluation.score_virtual_neurons(..., kind=...)`), beside plain `h` and the activation pattern (which do not
depend on the kind). It prints, per layer and overall, the mean ARI, V-measure and 5-nearest-neighbour
accuracy (with the majority baseline and `own_share`) over the virtual neurons whose scored examples come
from two or more sources, how many that is, and the paired difference of each kind's ARI from the gate's
(mean and standard error over virtual neurons; sources are shared between virtual neurons, so these are not
independent draws and the standard error is optimistic). A random GPT-2 of the same shape (plain MLP, one
kind) runs through the same pipeline as a reference for what this construction recovers on random weights.
A virtual neuron's examples are kept down to 0.5 of its maximum (`--virtual-frac`): on random weights its
activation is so peaked that at the default 0.75 it keeps about five.

Measured with the defaults (2,000 windows of 64 tokens, 240 virtual neurons per family, 7 minutes on 2 shared
cores), mean ARI over all layers: Llama gate 0.077, up 0.079, both 0.076, h 0.081; Gemma 2 gate 0.036, up
0.041, both 0.041, h 0.044; paired differences from gate within 0.005 (standard error 0.004), no kind ahead
in every layer. The GPT-2 reference reaches 0.260 (h 0.244): on random weights the gated virtual neurons are
much harder to separate in any space, so these figures cannot rank the kinds; they only show that no kind
stands out here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pandas as pd

KINDS = ("gate", "up", "both")


def _model(family: str, tokenizer, folder: str, *, n_layers: int, d_model: int, d_mlp: int, n_ctx: int):
    """A random gated model of `family` saved to `folder` and loaded with `models.load_model`."""
    import torch
    import transformers

    from nbutils import models

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.eos_token_id)
    shape = dict(hidden_size=d_model, num_hidden_layers=n_layers, intermediate_size=d_mlp, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=n_ctx)
    if family == "gpt2":  # the plain-MLP reference
        config = transformers.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=n_ctx, n_inner=d_mlp,
                                         activation_function="gelu_new", **ids)
    elif family == "llama":
        config = transformers.LlamaConfig(**shape, **ids)
    else:
        config = transformers.Gemma2Config(**shape, head_dim=d_model // 4, **ids)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return models.load_model(folder)


def _run_family(family: str, args: argparse.Namespace) -> pd.DataFrame:
    import transformers

    from nbutils import _env, activations, clustering, data, evaluation, models

    tokenizer = transformers.AutoTokenizer.from_pretrained(_env.DEFAULT_MODEL_DIR)
    with tempfile.TemporaryDirectory() as folder:
        model = _model(family, tokenizer, folder, n_layers=args.layers, d_model=args.d_model, d_mlp=args.d_mlp,
                       n_ctx=args.window)
        windows = data.corpus_windows(model, n_windows=args.windows, window=args.window)
        top = activations.collect_top_activations(model, windows, k=args.k, frac=args.frac, use_cache=False)
        virtual = []
        for layer in range(model.cfg.n_layers):
            try:
                virtual.append(evaluation.make_virtual_neurons(model, windows, top, layer, args.virtual,
                                                               min_examples=args.min_examples))
            except ValueError as error:  # too few monosemantic sources in this layer: said, not hidden
                print(f"{family} layer {layer}: no virtual neurons: {error}")
                continue
            v = virtual[-1]
            print(f"{family} layer {layer}: {v.n_virtual} virtual neurons from {v.sources.neuron.nunique()} "
                  f"source neurons")
        examples = evaluation.collect_virtual_examples(model, windows, virtual, k=args.k, frac=args.virtual_frac)
        grid = {clustering.DEFAULT_METHOD: [clustering.DEFAULT_THRESHOLDS[clustering.DEFAULT_METHOD]]}
        kinds = KINDS if models.is_gated(model) else ("in",)
        parts = [evaluation.score_virtual_neurons(model, windows, v, examples, grid, kind=kind, progress=True)
                 for v in virtual for kind in kinds]
    return pd.concat(parts, ignore_index=True).assign(family=family)


def _table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean scores per space (each kind's embedding, h, pattern) of one group of virtual neurons."""
    emb = scores[scores.space == "embedding"].assign(space=lambda d: "embedding:" + d.kind)
    other = scores[(scores.space != "embedding") & (scores.kind == scores.kind.iloc[0])]  # the same for every kind
    return pd.concat([emb, other]).groupby("space", sort=False).agg(
        n_virtual=("virtual", "size"), ari=("ari", "mean"), v_measure=("v_measure", "mean"),
        knn=("knn_accuracy", "mean"), majority=("majority", "mean"), own_share=("own_share", "mean"))


def _paired(scores: pd.DataFrame) -> str:
    """Mean (standard error) of each kind's ARI minus the gate's, virtual neuron by virtual neuron."""
    if "gate" not in set(scores.kind):
        return "plain MLP (one kind)"
    emb = scores[scores.space == "embedding"].pivot_table(index=["layer", "virtual"], columns="kind", values="ari")
    words = []
    for kind in KINDS[1:]:
        d = (emb[kind] - emb["gate"]).to_numpy()
        words.append(f"{kind} - gate ARI {d.mean():+.3f} (se {d.std(ddof=1) / np.sqrt(len(d)):.3f}, "
                     f"{kind} higher on {(d > 0).mean():.0%}, lower on {(d < 0).mean():.0%})")
    return "; ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    families = ["llama", "gemma2", "gpt2"]
    parser.add_argument("--families", nargs="+", default=families, choices=families,
                        help="gpt2: a random plain-MLP model of the same shape, as a reference")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-mlp", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2000, help="corpus windows")
    parser.add_argument("--window", type=int, default=64, help="tokens per window")
    parser.add_argument("--k", type=int, default=64, help="top examples per neuron and per virtual neuron")
    parser.add_argument("--frac", type=float, default=0.75, help="keep examples >= frac x max (the default)")
    parser.add_argument("--virtual-frac", type=float, default=0.5,  # at 0.75: about 5 scored examples each
                        help="keep a virtual neuron's examples >= this x its max")
    parser.add_argument("--min-examples", type=int, default=10, help="fewest examples of a source neuron")
    parser.add_argument("--virtual", type=int, default=60, help="virtual neurons per layer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from nbutils import clustering

    torch.set_num_threads(args.threads)
    print(f"cores {os.cpu_count()}; load average at start {os.getloadavg()[0]:.1f}; random weights (default "
          f"initialisation, seed 0); {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}; "
          f"{args.windows} windows of {args.window} tokens; k {args.k}, frac {args.frac} (virtual neurons "
          f"{args.virtual_frac}); up to {args.virtual} virtual neurons per layer from sources with >= "
          f"{args.min_examples} examples; "
          f"clustering {clustering.DEFAULT_METHOD} {clustering.DEFAULT_THRESHOLDS[clustering.DEFAULT_METHOD]}")
    pd.set_option("display.width", 160)
    for family in args.families:
        start = time.perf_counter()
        scores = _run_family(family, args)
        multi = scores[scores.n_present >= 2]
        per = scores.drop_duplicates(["layer", "virtual"])
        print(f"\n=== {family} ({time.perf_counter() - start:.0f} s): {len(per)} virtual neurons with >= 2 scored "
              f"examples, {per.n_scored.mean():.1f} scored examples each on average; "
              f"{multi.groupby(['layer', 'virtual']).ngroups} with >= 2 sources among them, the ones below ===")
        for layer, part in multi.groupby("layer"):
            print(f"\nlayer {layer}: {_paired(part)}")
            print(_table(part).round(3).to_string())
        print(f"\nall layers: {_paired(multi)}")
        print(_table(multi).round(3).to_string())


if __name__ == "__main__":
    main()
