"""SAELens folders: every architecture against a reference encode, the latent-embedding invariant, the hook mapping,
top-k over latents against brute force, the writer, and one clear error per kind of bad folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nbutils import clustering, dictionary, models, sae

D_IN, D_SAE, D_OUT = 12, 40, 9
NORMS = ("none", "layer_norm", "constant_norm_rescale")


def _random_folder(path, arch, *, norm="none", apply_b_dec=True, d_in=D_IN, d_sae=D_SAE, d_out=D_OUT,
                   hook="blocks.1.ln2.hook_normalized", seed=0):
    """Write a random dictionary of `arch` in SAELens's format (nonzero b_dec, thresholds and r_mag)."""
    g = torch.Generator().manual_seed(seed)
    out = d_out if arch in dictionary.TRANSCODERS else d_in
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
         "W_dec": torch.randn(d_sae, out, generator=g) / math.sqrt(d_sae),
         "b_dec": torch.randn(out, generator=g)}
    if arch == "gated":
        w.update(b_gate=0.3 * torch.randn(d_sae, generator=g), b_mag=0.3 * torch.randn(d_sae, generator=g),
                 r_mag=0.5 * torch.randn(d_sae, generator=g))
    else:
        w["b_enc"] = 0.3 * torch.randn(d_sae, generator=g)
    if arch in ("jumprelu", "jumprelu_transcoder"):
        w["threshold"] = 0.4 * torch.rand(d_sae, generator=g) + 0.05
    if arch == "skip_transcoder":
        w["W_skip"] = 0.1 * torch.randn(out, d_in, generator=g)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": norm, "metadata": {"hook_name": hook}}
    if arch == "topk":
        cfg.update(k=7, rescale_acts_by_decoder_norm=True)
    if arch in dictionary.TRANSCODERS:
        cfg["d_out"] = out
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return cfg, w


def _reference(cfg, w, x):
    """Encode written out per architecture in float64: (activations, pre-activation, gated magnitude or None)."""
    w = {k: v.double() for k, v in w.items()}
    x = x.double()
    if cfg["normalize_activations"] == "constant_norm_rescale":
        x = x * math.sqrt(cfg["d_in"]) / x.norm(dim=-1, keepdim=True)
    elif cfg["normalize_activations"] == "layer_norm":
        c = x - x.mean(-1, keepdim=True)
        x = c / (c.std(-1, keepdim=True) + 1e-5)
    arch = cfg["architecture"]
    if cfg["apply_b_dec_to_input"] and arch not in dictionary.TRANSCODERS:
        x = x - w["b_dec"]
    if arch == "gated":
        gate = x @ w["W_enc"] + w["b_gate"]
        mag = x @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
        return (gate > 0) * mag.clamp(min=0), gate, mag
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch in ("jumprelu", "jumprelu_transcoder"):
        return torch.where(pre > w["threshold"], pre.clamp(min=0), 0.0), pre, None
    if arch == "topk":
        ranked = pre * w["W_dec"].norm(dim=-1)
        keep = ranked.argsort(dim=-1, descending=True)[:, : cfg["k"]]
        f = torch.zeros_like(ranked)
        rows = torch.arange(len(x))[:, None]
        f[rows, keep] = ranked[rows, keep].clamp(min=0)
        return f, pre, None
    return pre.clamp(min=0), pre, None


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", dictionary.ARCHITECTURES)
def test_every_architecture_matches_the_reference_and_the_invariant(tmp_path, arch, norm):
    cfg, w = _random_folder(tmp_path / "sae", arch, norm=norm)
    d = dictionary.load_dictionary(tmp_path / "sae")
    x = 2.0 * torch.randn(64, D_IN) + 0.5
    f_ref, pre_ref, mag_ref = _reference(cfg, w, x)
    f = d.encode(x)
    assert ((f != 0) == (f_ref != 0)).all()
    assert torch.allclose(f.double(), f_ref, atol=1e-5 * float(f_ref.abs().max()))
    scale = float(pre_ref.abs().max())
    for latent in (0, 17, D_SAE - 1):
        e = d.embeddings(x, latent)  # [64, D_IN]
        err = (e.sum(-1).double() + float(d.bias[latent]) - pre_ref[:, latent]).abs().max() / scale
        assert err <= 1e-5, (arch, norm, latent, float(err))  # the invariant e.sum() + bias == pre-activation
        if arch == "gated":  # the magnitude path is a scaled sum of the same embedding
            mag = e.sum(-1).double() * float(d.r_mag[latent].exp()) + float(d.b_mag[latent])
            assert (mag - mag_ref[:, latent]).abs().max() / float(mag_ref.abs().max()) <= 1e-5


def test_without_b_dec_on_the_input_and_transcoders_never_subtract_it(tmp_path):
    cfg, w = _random_folder(tmp_path / "a", "standard", apply_b_dec=False)
    x = torch.randn(16, D_IN)
    d = dictionary.load_dictionary(tmp_path / "a")
    assert torch.allclose(d.pre(x).double(), _reference(cfg, w, x)[1], atol=1e-5)
    assert torch.allclose(d.encoder_input(x), x)
    _random_folder(tmp_path / "t", "transcoder", d_out=D_OUT)
    t = dictionary.load_dictionary(tmp_path / "t")
    assert t.is_transcoder and t.d_out == D_OUT and torch.allclose(t.encoder_input(x), x)


def test_reconstruction_undoes_the_normalisation(tmp_path):
    """An SAE whose code is exact (W_dec = W_enc^-1 on the normalised input, no sparsity loss) gives back x."""
    for norm in NORMS:
        folder = tmp_path / norm
        _random_folder(folder, "standard", norm=norm, d_sae=D_IN)
        w = dict(zip(("W_enc", "b_enc"), (torch.eye(D_IN), torch.full((D_IN,), 100.0))))
        w.update(W_dec=torch.eye(D_IN), b_dec=torch.full((D_IN,), -100.0))  # f = u + 100 > 0, decode subtracts it back
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg["apply_b_dec_to_input"] = False
        (folder / "cfg.json").write_text(json.dumps(cfg))
        save_file(w, str(folder / "sae_weights.safetensors"))
        d = dictionary.load_dictionary(folder)
        x = 3.0 * torch.randn(8, D_IN) + 1.0
        assert torch.allclose(d.reconstruct(x), x, atol=1e-3), norm


def test_save_round_trip_and_from_sae(tmp_path):
    _random_folder(tmp_path / "g", "gated", norm="layer_norm")
    d = dictionary.load_dictionary(tmp_path / "g")
    again = dictionary.save_dictionary(d, tmp_path / "copy")
    back = dictionary.load_dictionary(tmp_path / "copy")
    assert back.weights_hash == again.weights_hash and len(back.weights_hash) == 64
    for name, t in d.weights().items():
        assert torch.equal(getattr(back, name), t), name
    assert back.normalize_activations == "layer_norm" and back.hook_name == d.hook_name
    trained = sae.SAE(D_IN, D_SAE, seed=3)
    with torch.no_grad():
        trained.b_d.copy_(torch.randn(D_IN))
        trained.b_e.copy_(torch.randn(D_SAE))
    saved = dictionary.save_dictionary(dictionary.from_sae(trained, "blocks.1.ln2.hook_normalized",
                                                           extra={"nbutils_sae_config": {"l1_coef": 0.1}}),
                                       tmp_path / "mine")
    loaded = dictionary.load_dictionary(tmp_path / "mine")
    x = torch.randn(10, D_IN)
    assert torch.allclose(loaded.pre(x), trained.pre(x), atol=1e-5)
    assert torch.allclose(loaded.reconstruct(x), trained(x), atol=1e-5)
    assert loaded.cfg["nbutils_sae_config"] == {"l1_coef": 0.1} and saved.weights_hash == loaded.weights_hash


def test_saelens_hook_names_map_to_the_bridge(model, windows):
    tokens = windows[:2]
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
             "blocks.1.hook_attn_out", "blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post"]
    _, cache = model.run_with_cache(tokens, names_filter=names)  # the bridge's own aliases of these names
    for name in names:
        layer, kind = models.saelens_hook(model, name)
        assert layer == 1
        assert torch.allclose(dictionary.hook_inputs(model, tokens, layer, kind), cache[name].float()), name
    # SAELens's hook_mlp_in is the MLP branch's input before ln2 (HookedTransformer's), i.e. resid_mid
    assert models.saelens_hook(model, "blocks.2.hook_mlp_in") == (2, "resid_mid")


def test_latents_on_the_model_invariant_top_k_and_polysemy(tmp_path, model, windows):
    _random_folder(tmp_path / "j", "jumprelu", d_in=model.cfg.d_model, d_sae=24, norm="layer_norm")
    d = dictionary.load_dictionary(tmp_path / "j")
    assert dictionary.attach(model, d) == (1, "ln_normalized")
    top = dictionary.collect_latent_top(model, windows, d, k=8, frac=0.5, batch_size=16, progress=False)
    # brute force: every latent's activation on every token, its max per window, top 8 windows
    x = dictionary.hook_activations(model, windows, 1, "ln_normalized").reshape(len(windows), windows.shape[1], -1)
    f = d.encode(x)  # [n_windows, window, d_sae]
    best, where = f.max(dim=1)  # [n_windows, d_sae]
    for latent in range(d.d_sae):
        order = np.lexsort((np.arange(len(windows)), -best[:, latent].numpy()))[:8]
        assert torch.allclose(top.act[0, latent], best[order, latent])
        filled = best[order, latent] > 0
        assert (top.window[0, latent][filled].numpy() == order[filled.numpy()]).all()
        assert (top.pos[0, latent][filled] == where[order, latent][filled]).all()
    given = dictionary.collect_latent_top(model, windows, d, k=8, frac=0.5, batch_size=16, progress=False, inputs=x)
    assert torch.equal(given.window, top.window) and torch.allclose(given.act, top.act, atol=1e-5)
    with pytest.raises(ValueError, match=r"`inputs` must be the hook's vectors of every token of `windows`"):
        dictionary.collect_latent_top(model, windows, d, k=8, inputs=x[:, :5])
    ex = top.examples
    latent = int(ex["neuron"].value_counts().index[0])
    rows = ex[ex["neuron"] == latent]
    e = dictionary.latent_embeddings(model, windows, d, latent, rows["window"], rows["pos"])
    pre = d.pre(x[torch.tensor(rows["window"].to_numpy()), torch.tensor(rows["pos"].to_numpy())])[:, latent]
    assert ((e.sum(-1) + d.bias[latent] - pre).abs().max() / pre.abs().max()) <= 1e-5
    lx = dictionary.latent_examples(model, windows, d, top)
    assert np.allclose(lx.embeddings(latent), e.numpy(), atol=1e-5)
    assert np.allclose(dictionary.latent_examples(model, windows, d, top, inputs=x).h, lx.h, atol=1e-5)
    table = clustering.polysemy_table(model, windows, top, 1, examples=lx)
    assert len(table) == d.d_sae and (table["layer"] == 1).all()
    assert (table["n_examples"].to_numpy() == top.neurons["n_examples"].to_numpy()).all()


# --------------------------------------------------------------------------------------------------
# Bad folders: one clear error each, naming the field


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        dictionary.load_dictionary(tmp_path / "nothing")
    _random_folder(tmp_path / "a", "standard")
    (tmp_path / "a" / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no cfg\.json"):
        dictionary.load_dictionary(tmp_path / "a")
    _random_folder(tmp_path / "b", "standard")
    (tmp_path / "b" / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no sae_weights\.safetensors"):
        dictionary.load_dictionary(tmp_path / "b")


@pytest.mark.parametrize("changes, match", [
    ({"architecture": "crosscoder"}, r"`architecture` must be one of 'standard'.*got 'crosscoder'"),
    ({"d_in": D_IN + 1}, r"`W_enc` must have shape \[13, 40\] \(\[d_in, d_sae\] in cfg\.json\); got \[12, 40\]"),
    ({"d_sae": "forty"}, r"`d_sae` must be an integer >= 1; got 'forty'\. Fix `d_sae` in cfg\.json"),
    ({"normalize_activations": "rms"}, r"`normalize_activations` must be one of 'none'"),
    ({"metadata": {}}, r"`metadata\.hook_name` must name the hook"),
    ({"architecture": "topk"}, r"`k` must be an integer in 1\.\.40 \(d_sae\) for a topk dictionary; got None"),
    ({"architecture": "jumprelu"}, r"`threshold` must be in sae_weights\.safetensors for architecture 'jumprelu'"),
])
def test_bad_config_names_the_field(tmp_path, changes, match):
    _random_folder(tmp_path / "a", "standard")
    _edit_cfg(tmp_path / "a", **changes)
    with pytest.raises(ValueError, match=match):
        dictionary.load_dictionary(tmp_path / "a")


def test_nan_weights_are_named(tmp_path):
    cfg, w = _random_folder(tmp_path / "a", "standard")
    w["b_enc"][3] = float("nan")
    save_file(w, str(tmp_path / "a" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"`b_enc` must be finite; got 1 NaN or inf values"):
        dictionary.load_dictionary(tmp_path / "a")


@pytest.mark.parametrize("hook, d_in, match", [
    ("blocks.1.ln2.hook_normalized", 64, r"`d_in` must be 128, the width of 'blocks\.1\.ln2\.hook_normalized'"),
    ("blocks.9.hook_resid_pre", 128, r"`metadata\.hook_name` must name a layer in 0\.\.3 \(this model\)"),
    ("blocks.1.attn.hook_z", 128, r"`metadata\.hook_name` must be a hook `blocks\.\{layer\}\.<suffix>`.*hook_z"),
    ("embed", 128, r"`metadata\.hook_name` must be a hook"),
    ("blocks.1.mlp.hook_pre_linear", 128, r"`metadata\.hook_name` must name a hook this model has"),
])
def test_dictionary_that_does_not_fit_the_model(tmp_path, model, hook, d_in, match):
    _random_folder(tmp_path / "a", "standard", d_in=d_in, hook=hook)
    d = dictionary.load_dictionary(tmp_path / "a")
    with pytest.raises(ValueError, match=match):
        dictionary.attach(model, d)


# --------------------------------------------------------------------------------------------------
# The atlas of a dictionary's latents


def test_atlas_of_latents_has_the_tables_of_neurons(tmp_path, model, windows):
    from nbutils import __main__ as cli
    from nbutils import atlas

    _random_folder(tmp_path / "sae", "jumprelu", d_in=model.cfg.d_model, d_sae=64)
    d = dictionary.load_dictionary(tmp_path / "sae")
    built = atlas.build_atlas(model, windows, k=8, sae=tmp_path / "sae", out=tmp_path / "atlas", progress=False)
    m = built.manifest
    assert m["units"] == "latents" and built.layers == [1] and built.d_mlp == 64
    assert m["dictionary"]["weights_hash"] == d.weights_hash and m["dictionary"]["cfg"] == d.cfg
    assert m["key"]["dictionary"]["weights_hash"] == d.weights_hash
    top = dictionary.collect_latent_top(model, windows, d, k=8, progress=False)
    neurons = built.table("neurons")
    assert len(neurons) == 64 and (neurons["layer"] == 1).all()
    assert (neurons["n_examples"].to_numpy() == top.neurons["n_examples"].to_numpy()).all()
    # a latent's clusters are the default clustering of its latent embeddings
    latent = int(built.most_polysemantic(1, min_examples=4)["neuron"].iloc[0])
    ex = built.neuron_examples(1, latent)
    e = dictionary.latent_embeddings(model, windows, d, latent, ex["window"], ex["pos"])
    assert (ex["cluster"].to_numpy() == clustering.cluster(e.numpy())).all()
    assert np.allclose(ex["act"], top.neuron_examples(1, latent)["act"])
    similar = built.table("similar")
    assert len(similar) and similar["cross_act"].notna().all() and (similar["neuron"] != similar["other_neuron"]).all()
    assert "latents of blocks.1.ln2.hook_normalized" in built.info()
    from nbutils import site

    assert (site.export_site(built, tmp_path / "site", progress=False) / "index.html").exists()  # the static site
    from nbutils import explorer

    view = explorer.Explorer(built)  # reads the stored tables; the model-based views are refused, not answered for a neuron
    assert view.neuron_data(1, latent).examples["neuron"].eq(latent).all()
    with pytest.raises(ValueError, match=r"`atlas` must be an atlas of MLP neurons for live re-clustering"):
        view.importance_of(1, latent, int(ex["window"].iloc[0]), int(ex["pos"].iloc[0]))
    # the same dictionary rebuilt reuses the atlas; another layer is refused
    assert atlas.build_atlas(model, windows, k=8, sae=d, out=tmp_path / "atlas", progress=False).manifest["steps"]
    with pytest.raises(ValueError, match=r"`layers` must be None or \[1\] with `sae`"):
        atlas.build_atlas(model, windows, k=8, sae=d, layers=[2], out=tmp_path / "other", progress=False)
    code = cli.main(["atlas", "build", "--windows", "24", "--window", "16", "--k", "4", "--quiet", "--sae",
                     str(tmp_path / "sae"), "--out", str(tmp_path / "cli")])
    assert code == 0 and atlas.Atlas.open(tmp_path / "cli").dictionary["d_sae"] == 64
