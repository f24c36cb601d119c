"""The atlas of a dictionary's latents against the atlas of the same layer's neurons (issue 22's target: a 16 x d_in
SAE's atlas within 2x the time of the layer's neuron atlas).

    python benchmarks/bench_sae_atlas.py                          # default model, layer 2, 2,000 windows of 64 tokens
    python benchmarks/bench_sae_atlas.py --windows 300 --steps 200   # a quick run of the same path

It trains a standard SAE of `--expansion` x d_model latents (default 16 x 128 = 2,048) on the layer's MLP input
(`nbutils.lm_saes`; training time is not part of the ratio), writes it as a SAELens folder, then builds, in one
process and one after the other, the neuron atlas of that layer and the atlas of the SAE's latents over the same
windows (fresh folders, no cache). It prints each build's time and steps, peak RSS, and the ratio.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000, help="SAE training steps (batch 256)")
    args = parser.parse_args()

    from nbutils import atlas, data, dictionary, lm_saes, models
    from nbutils.sae import SAEConfig

    model = models.load_model()
    windows = data.corpus_windows(model, args.windows, 64)
    x = lm_saes.layer_inputs(model, windows, args.layer)
    config = SAEConfig(n_latents=args.expansion * model.cfg.d_model, l1_coef=0.03, steps=args.steps)
    (sae,) = lm_saes.layer_saes(model, x, args.layer, [config], workers=1, progress=False)
    del x
    with tempfile.TemporaryDirectory() as tmp:
        folder = dictionary.save_dictionary(sae, Path(tmp) / "sae")
        print(f"SAE {sae.d_in} -> {sae.d_sae} latents at {sae.hook_name}, trained in {sae.cfg['nbutils_train_seconds']} s")
        seconds = {}
        for name, kwargs in (("neurons", {"layers": [args.layer]}), ("latents", {"sae": folder})):
            started = time.perf_counter()
            built = atlas.build_atlas(model, windows, out=Path(tmp) / name, cache_dir=Path(tmp) / "cache",
                                      progress=False, **kwargs)
            seconds[name] = time.perf_counter() - started
            steps = {s: round(v["seconds"], 1) for s, v in built.manifest["steps"].items()}
            n = built.sql("SELECT count(*) AS units, sum(n_examples) AS examples FROM neurons").iloc[0]
            print(f"{name}: {seconds[name]:.1f} s, {int(n['units'])} units, {int(n['examples'])} examples; steps {steps}; "
                  f"peak RSS so far {_peak_rss_gb():.2f} GB")
    print(f"latent atlas / neuron atlas time: {seconds['latents'] / seconds['neurons']:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
