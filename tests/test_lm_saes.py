"""SAEs on a language model layer: trained, written in SAELens's format, compared with the layer's neurons."""

from __future__ import annotations

import numpy as np
import torch

from nbutils import activations, dictionary, embeddings, lm_saes
from nbutils.sae import SAEConfig

LAYER = 1


def test_layer_saes_round_trip_and_polysemy_tables(tmp_path, model, windows):
    x = lm_saes.layer_inputs(model, windows, LAYER)  # [n_windows * window, d_model]
    # h is the vector the folded input weights multiply: the neurons' pre-activations come back from it
    W, b = embeddings.mlp_in_weights(model, LAYER)
    pre = embeddings.pre_activations(model, windows, LAYER, [3, 5], [7, 0])
    assert torch.allclose(x[[3 * windows.shape[1] + 7, 5 * windows.shape[1]]] @ W + b, pre, atol=1e-4)
    configs = [SAEConfig(n_latents=48, steps=30, mono_coef=coef, mono_start=10) for coef in (0.0, 3.0)]
    standard, ne = lm_saes.layer_saes(model, x, LAYER, configs, workers=1, progress=False)
    assert standard.hook_name == "blocks.1.ln2.hook_normalized"
    assert standard.cfg["nbutils_sae_config"]["mono_coef"] == 0.0 and ne.cfg["nbutils_sae_config"]["mono_coef"] == 3.0
    saved = dictionary.save_dictionary(ne, tmp_path / "ne")
    back = dictionary.load_dictionary(tmp_path / "ne")
    assert back.weights_hash == saved.weights_hash and torch.equal(back.encode(x[:100]), ne.encode(x[:100]))
    top = activations.collect_top_activations(model, windows, k=16, use_cache=False, progress=False)
    units = {"MLP neurons": lm_saes.unit_polysemy(model, windows, LAYER, top=top, k=16),
             "NE-SAE": lm_saes.unit_polysemy(model, windows, LAYER, ne, k=16,
                                             inputs=x.reshape(len(windows), windows.shape[1], -1))}
    assert len(units["MLP neurons"]) == model.cfg.d_mlp and len(units["NE-SAE"]) == 48
    table = lm_saes.compare(units, {"NE-SAE": ne}, x).set_index("units")
    assert np.isnan(table.loc["MLP neurons", "fvu"])
    assert table.loc["NE-SAE", "fvu"] == dictionary.reconstruction_metrics(ne, x)["fvu"]
    assert table.loc["NE-SAE", "live"] == int((~units["NE-SAE"]["dead"]).sum())
