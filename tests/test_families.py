"""Every supported model family: small random models built from `transformers` configs (no download), with the
default tokenizer, saved to a temporary folder and booted with `models.load_model(path)`.

For each family: the invariant `e.sum() + b == pre-activation` in every convention, h is the vector the MLP's
input projection multiplies (read by the model's own modules), the norm fold against the model's own hooks,
the neuron outputs against `hook_post`, top-k against brute force, and the polysemy table and the explorer end
to end.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import transformers

from nbutils import _env, activations, clustering, embeddings, explorer, mlp_forward, models, passes, residuals

TOL = 1e-4  # float32: sums of 64 products of O(1) numbers
D_MODEL, N_LAYERS, D_MLP, N_CTX = 64, 2, 128, 64
K, FRAC = 8, 0.5


def _configs(vocab: int, eot: int) -> dict[str, transformers.PretrainedConfig]:
    ids = dict(vocab_size=vocab, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    heads = dict(num_attention_heads=4, max_position_embeddings=N_CTX)
    return {
        "gpt2": transformers.GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=N_CTX, n_inner=D_MLP,
                                        activation_function="gelu_new", **ids),
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, intermediate_size=D_MLP,
                                               use_parallel_residual=True, **heads, **ids),
        "gptj": transformers.GPTJConfig(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=N_CTX, n_inner=D_MLP,
                                        rotary_dim=8, **ids),
        "llama": transformers.LlamaConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, intermediate_size=D_MLP,
                                          num_key_value_heads=2, **heads, **ids),
        "gemma2": transformers.Gemma2Config(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, intermediate_size=D_MLP,
                                            num_key_value_heads=2, head_dim=16, **heads, **ids),
        "opt": transformers.OPTConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, ffn_dim=D_MLP,
                                      word_embed_proj_dim=D_MODEL, **heads, **ids),
        "opt_post_norm": transformers.OPTConfig(hidden_size=D_MODEL, num_hidden_layers=1, ffn_dim=D_MLP,
                                                word_embed_proj_dim=D_MODEL, do_layer_norm_before=False,
                                                **heads, **ids),
    }


FAMILIES = ["gpt2", "gpt_neox", "gptj", "llama", "gemma2", "opt"]
GATED = {"llama", "gemma2"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    """Save each family's random model (norm scales and every bias perturbed, so folding is not trivial)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(_env.DEFAULT_MODEL_DIR)
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for i, (name, config) in enumerate(_configs(len(tokenizer), tokenizer.eos_token_id).items()):
        torch.manual_seed(i)
        hf = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 1:  # norm weights and biases, projection biases
                    p.add_(0.3 * torch.randn_like(p))
        hf.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def loaded(family_dirs) -> dict:
    """Each family's bridge, loaded once, with its windows and top-k collection (filled lazily)."""
    return {}


def _get(loaded: dict, family_dirs: dict, name: str) -> dict:
    if name not in loaded:
        model = models.load_model(family_dirs[name])
        windows = torch.randint(0, model.cfg.d_vocab, (24, 16), generator=torch.Generator().manual_seed(0))  # [24, 16]
        top = activations.collect_top_activations(model, windows, k=K, frac=FRAC, batch_size=8, use_cache=False,
                                                  progress=False)
        loaded[name] = dict(model=model, windows=windows, top=top)
    return loaded[name]


@pytest.fixture(params=FAMILIES)
def fam(request, loaded, family_dirs) -> dict:
    return dict(_get(loaded, family_dirs, request.param), name=request.param)


def _examples(windows, n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, windows.shape[0], n), rng.integers(0, windows.shape[1], n)


def test_family_is_recognised(fam):
    model = fam["model"]
    assert models.is_gated(model) == (fam["name"] in GATED)
    assert embeddings.embedding_kind(model) == ("gate" if fam["name"] in GATED else "in")
    assert mlp_forward.mlp_forward(model, plain_hf=True).engine == "plain_hf"  # the fast path is used on every family
    kinds = ("mlp_in", "ln_normalized", "pre", "post") + (("pre_linear",) if models.is_gated(model) else ())
    for layer in range(model.cfg.n_layers):
        for kind in kinds:
            assert models.hook_name(layer, kind, model) in model.hook_dict, (layer, kind)


def _read(model, windows, layers, kinds, plain_hf, store=None):
    got: dict = {}

    def on_layer(layer, read, lo, hi):
        for kind, t in read.items():
            got.setdefault((layer, kind), []).append(t.clone())

    passes.read_layers(model, windows, layers, kinds, on_layer, batch_size=7, plain_hf=plain_hf, residuals=store)
    return {key: torch.cat(parts) for key, parts in got.items()}


def test_replay_from_the_residual_store_is_the_forward(fam, tmp_path):
    """The collection fills a residual store; the layers pass replayed from it reads what the forward reads, bit
    for bit, and the cross activations computed from it agree with the forward's activations. OPT's layers run
    their MLP without an MLP module, so its store is unusable and the passes run the model (same numbers)."""
    from nbutils.atlas.similar_features import _stored_cross_acts

    model, windows = fam["model"], fam["windows"]
    store = residuals.ResidualStore.create(model, windows, tmp_path)
    activations.collect_top_activations(model, windows, k=4, batch_size=7, use_cache=False, progress=False,
                                        residuals=store)
    assert store.usable == (fam["name"] != "opt")
    layers = list(range(model.cfg.n_layers))
    forward = _read(model, windows, layers, mlp_forward.PLAIN_KINDS, plain_hf=True)
    replayed = _read(model, windows, layers, mlp_forward.PLAIN_KINDS, plain_hf=True, store=store)
    assert replayed.keys() == forward.keys()
    for key, t in forward.items():
        assert torch.equal(replayed[key], t), key
    if not store.usable:
        return
    rng = np.random.default_rng(0)
    n = 300
    window, pos = rng.integers(0, len(windows), n), rng.integers(0, windows.shape[1], n)
    layer, neuron = rng.integers(0, model.cfg.n_layers, n), rng.integers(0, model.cfg.d_mlp, n)
    got = _stored_cross_acts(model, store, window, pos, layer, neuron, chunk=64)
    expected = np.array([forward[(l, "post")][w, p, j].item() for w, p, l, j in zip(window, pos, layer, neuron)])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_plain_pass_reads_the_bridge_hooks(fam):
    """`passes.read_layers` on the plain model (the MLP's input, its normalised input, its activation) gives what
    the bridge's hooks give, every layer, also when only the deepest layer is read (the pass stops there)."""
    model, windows = fam["model"], fam["windows"]
    kinds, layers = mlp_forward.PLAIN_KINDS, list(range(model.cfg.n_layers))
    assert mlp_forward.plain_taps(mlp_forward.mlp_forward(model, plain_hf=True), layers, kinds) is not None
    assert mlp_forward.plain_taps(mlp_forward.mlp_forward(model, plain_hf=True), layers, ("pre",)) is None
    bridge = _read(model, windows, layers, kinds, plain_hf=False)
    plain = _read(model, windows, layers, kinds, plain_hf=True)
    assert plain.keys() == bridge.keys() == {(layer, kind) for layer in layers for kind in kinds}
    for key, t in bridge.items():
        assert plain[key].shape == t.shape == (len(windows), windows.shape[1], t.shape[-1]), key
        torch.testing.assert_close(plain[key], t, rtol=1e-5, atol=1e-5)
    deepest = _read(model, windows, layers[-1:], kinds[::-1], plain_hf=True)
    for key, t in deepest.items():
        assert torch.equal(t, plain[key]), key


def test_invariant_every_convention(fam):
    """e.sum() + b == the pre-activation read from the model's hook, every layer, norm convention and kind."""
    model, windows = fam["model"], fam["windows"]
    wid, pos = _examples(windows)
    kinds = ("gate", "up", "both") if models.is_gated(model) else ("in",)
    errors = {}
    for layer in range(model.cfg.n_layers):
        for fold_ln in (True, False):
            for kind in kinds:
                W, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)
                h = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=fold_ln, kind=kind)
                pre = embeddings.pre_activations(model, windows, layer, wid, pos, kind=kind)
                errors[(layer, fold_ln, kind)] = (h @ W + b - pre).abs().max().item()  # every neuron at once
    layer = model.cfg.n_layers - 1
    for fold_ln in (True, False):
        for kind in kinds:
            _, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln, kind=kind)
            pre = embeddings.pre_activations(model, windows, layer, wid, pos, kind=kind)
            e = embeddings.neuron_embeddings(model, windows, layer, 5, wid, pos, fold_ln=fold_ln, kind=kind)
            errors[(layer, fold_ln, kind, 5)] = (e.sum(-1) + b[5] - pre[:, 5]).abs().max().item()
    print(fam["name"], "max invariant error", f"{max(errors.values()):.1e}")
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("name", sorted(GATED))
def test_gated_both_is_gate_then_up(name, loaded, family_dirs):
    """kind="both": first half + b_gate = the gate pre-activation, second half + b_up = the up projection."""
    f = _get(loaded, family_dirs, name)
    model, windows = f["model"], f["windows"]
    wid, pos = _examples(windows, n=12, seed=1)
    layer, neuron, d = 1, 17, model.cfg.d_model
    both = embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, kind="both")  # [n, 2 * d_model]
    for half, kind in ((both[:, :d], "gate"), (both[:, d:], "up")):
        assert torch.equal(half, embeddings.neuron_embeddings(model, windows, layer, neuron, wid, pos, kind=kind))
        _, b = embeddings.mlp_in_weights(model, layer, kind=kind)
        pre = embeddings.pre_activations(model, windows, layer, wid, pos, kind=kind)[:, neuron]
        assert (half.sum(-1) + b[neuron] - pre).abs().max() <= TOL
    # the gate is what the nonlinearity reads: act(gate) * up is hook_post
    g = embeddings.pre_activations(model, windows, layer, wid, pos, kind="gate")
    u = embeddings.pre_activations(model, windows, layer, wid, pos, kind="up")
    post = embeddings._gather(model, windows, layer, wid, pos, ("post",), 64)["post"]
    torch.testing.assert_close(embeddings.activation_fn(model)(g) * u, post, atol=1e-5, rtol=1e-5)


def test_h_is_what_the_input_projection_multiplies(fam):
    """h (fold_ln=False) equals the input of the model's own input projection(s), captured by a PyTorch hook on
    the Hugging Face module; for parallel blocks (GPT-NeoX, GPT-J) that is the MLP's own normalised input."""
    model, windows = fam["model"], fam["windows"]
    wid, pos = _examples(windows, n=12, seed=2)
    layer = model.cfg.n_layers - 1
    mlp = model.blocks[layer].mlp
    names = ["in", "gate"] if models.is_gated(model) else ["in"]
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(mlp, n).original_component.register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    try:
        with torch.inference_mode():
            model(windows[torch.as_tensor(wid)], return_type=None)
    finally:
        for handle in handles:
            handle.remove()
    h = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=False)
    for n in names:
        x = seen[n].reshape(len(wid), windows.shape[1], -1)[torch.arange(len(wid)), torch.as_tensor(pos)]
        torch.testing.assert_close(h, x.float(), atol=1e-6, rtol=1e-6)
    if fam["name"] in ("gpt_neox", "gptj"):  # parallel: the block input's norm, not the attention output
        assert model.cfg.parallel_attn_mlp


def test_norm_fold_against_the_models_hooks(fam):
    """The raw MLP input is the normalised vector times the norm's effective scale (Gemma: 1 + γ) plus its bias,
    and the normalised vector is centred for LayerNorm only."""
    model, windows = fam["model"], fam["windows"]
    wid, pos = _examples(windows, n=12, seed=3)
    layer = 0
    ln = models.mlp_norm(model, layer)
    gamma = ln.w.detach().float() + (1.0 if fam["name"] == "gemma2" else 0.0)
    beta = ln.b.detach().float() if getattr(ln, "b", None) is not None else torch.zeros_like(gamma)
    n = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=True)
    raw = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos, fold_ln=False)
    torch.testing.assert_close(n * gamma + beta, raw, atol=1e-5, rtol=1e-5)
    rms_norm = model.cfg.normalization_type == "RMS"
    assert rms_norm == (fam["name"] in GATED)
    if rms_norm:
        # mean square 1 - eps / (mean x² + eps): eps is not negligible against tiny random embeddings
        torch.testing.assert_close(n.pow(2).mean(-1), torch.ones(len(n)), atol=1e-2, rtol=0)
    else:
        torch.testing.assert_close(n.mean(-1), torch.zeros(len(n)), atol=1e-5, rtol=0)


def test_neuron_outputs_are_hook_post(fam):
    """`embeddings.neuron_outputs` (from h, tensor or numpy) and `embeddings.mlp_activation` give `hook_post`."""
    model, windows = fam["model"], fam["windows"]
    wid, pos = _examples(windows, n=16, seed=4)
    for layer in range(model.cfg.n_layers):
        h = embeddings.pre_mlp_vectors(model, windows, layer, wid, pos)
        read = embeddings._gather(model, windows, layer, wid, pos, ("post", "pre"), 64)
        torch.testing.assert_close(embeddings.neuron_outputs(model, layer, h), read["post"], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(embeddings.neuron_outputs(model, layer, h.numpy()), read["post"].numpy(), atol=1e-5)
        up = embeddings.pre_activations(model, windows, layer, wid, pos, kind="up").numpy() if fam["name"] in GATED else None
        np.testing.assert_allclose(embeddings.mlp_activation(model, read["pre"].numpy(), up), read["post"].numpy(),
                                   atol=1e-5)


def test_topk_equals_brute_force(fam):
    """The streaming top-k equals sorting the full activation matrix; for gated MLPs the brute force is computed
    from the gate and up hooks (act(g) * u), independently of the hook the collection reads."""
    model, windows, top = fam["model"], fam["windows"], fam["top"]
    n_layers = model.cfg.n_layers
    names = [models.hook_name(l, k) for l in range(n_layers) for k in ("pre", "pre_linear", "post")
             if k != "pre_linear" or models.is_gated(model)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(windows, names_filter=names)
    act_fn = embeddings.activation_fn(model)
    bridge = activations.collect_top_activations(model, windows, k=K, frac=FRAC, batch_size=8, use_cache=False,
                                                 progress=False, plain_hf=False)
    for layer in range(n_layers):
        if models.is_gated(model):
            full = act_fn(cache[models.hook_name(layer, "pre")]) * cache[models.hook_name(layer, "pre_linear")]
        else:
            full = act_fn(cache[models.hook_name(layer, "pre")])
        full = full.float()  # [n_windows, pos, d_mlp]
        best, where = full.max(dim=1)  # [n_windows, d_mlp]
        act, window = best.T.topk(K + 1, dim=-1)  # [d_mlp, K + 1]
        torch.testing.assert_close(top.act[layer], act[:, :K], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bridge.act[layer], act[:, :K], atol=1e-5, rtol=1e-5)
        # a slot's window is determined where its activation is apart from both neighbours' (no near-tie)
        gaps = (act[:, :-1] - act[:, 1:]).abs() > 1e-5  # [d_mlp, K]
        clear = gaps & torch.cat([torch.ones(len(act), 1, dtype=torch.bool), gaps[:, :-1]], dim=1)  # [d_mlp, K]
        assert clear.float().mean() > 0.5
        for result in (top, bridge):
            assert torch.equal(result.window[layer][clear], window[:, :K][clear])
            assert torch.equal(result.pos[layer][clear], where.T.gather(1, window[:, :K])[clear])


def test_polysemy_table_and_explorer_end_to_end(fam, tmp_path):
    model, windows, top = fam["model"], fam["windows"], fam["top"]
    layer = model.cfg.n_layers - 1
    table = clustering.polysemy_table(model, windows, top, layer)
    assert len(table) == model.cfg.d_mlp
    live = table[~table["dead"]]
    assert len(live) > 0 and (live["n_examples"] >= 1).all() and (live["n_clusters"] >= 1).all()
    if list(inspect.signature(explorer.neuron_explorer).parameters)[0] == "model":
        widget = explorer.neuron_explorer(model, windows, top, layer=layer)
    else:  # the explorer reads a feature atlas
        from nbutils import atlas

        built = atlas.build_atlas(model, windows, k=K, frac=FRAC, out=tmp_path / "atlas", progress=False)
        widget = explorer.neuron_explorer(built)
    assert widget.children


def test_bad_kind_and_post_norm_fold(loaded, family_dirs):
    gpt2, llama = _get(loaded, family_dirs, "gpt2")["model"], _get(loaded, family_dirs, "llama")["model"]
    with pytest.raises(ValueError, match=r"`kind` must be one of 'in' for this model, a plain MLP"):
        embeddings.mlp_in_weights(gpt2, 0, kind="gate")
    with pytest.raises(ValueError, match=r"`kind` must be one of 'gate', 'up', 'both' for this model"):
        embeddings.mlp_in_weights(llama, 0, kind="in")
    with pytest.raises(ValueError, match=r"`up` must be given for a gated MLP"):
        embeddings.mlp_activation(llama, np.zeros((2, 3)))
    post = models.load_model(family_dirs["opt_post_norm"])  # OPT-350m style: the norm comes after the MLP
    windows = torch.randint(0, post.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(0))  # [4, 8]
    with pytest.raises(ValueError, match=r"`fold_ln` must be False for this model"):
        embeddings.pre_mlp_vectors(post, windows, 0, [0, 1], [3, 4])
    with pytest.raises(ValueError, match=r"`fold_ln` must be False for this model"):
        embeddings.mlp_in_weights(post, 0)
