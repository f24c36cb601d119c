"""Bad input across the public API, as one table: each row calls a public function with one clearly invalid
argument and names the exception (`ValueError` / `TypeError` from `nbutils._validation`) and a pattern that the
message must match, which names the argument. A new public function joins by adding rows to `CASES`.

Each row is `(function, kwargs, exception, pattern)`; `kwargs` is a function of the fixtures `c` (model,
windows, a small collection `top`, a file path) returning the keyword arguments of the call.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch

from nbutils import (activations, cache, clustering, dictionary, embeddings, importance, models, recovery,
                     representations, sae, similar, viz)

FLOAT = r"must hold integers; got 0\.5 \(floats are never rounded\)"


def _tokens(c: Any) -> dict:
    return {"model": c.model, "tokens": c.windows[0], "pos": 5, "layer": 1, "neuron": 3}


def _ids(c: Any, **override: Any) -> dict:
    """Arguments of `embeddings.pre_mlp_vectors` and friends, with `override` replacing some."""
    return {"model": c.model, "windows": c.windows, "layer": 1, "window_ids": [0, 1], "positions": [2, 3], **override}


def _text(c: Any, **override: Any) -> dict:
    return {"model": c.model, "windows": c.windows, "window_ids": [0, 1], "positions": [2, 3], **override}


def _html(**override: Any) -> dict:
    return {"tokens": ["a", "b"], "values": [0.5, 1.0], **override}


def _collect(c: Any, **override: Any) -> dict:
    return {"model": c.model, "windows": c.windows[:8], "k": 4, "progress": False, **override}


CASES: list[tuple[Callable, Callable[[Any], dict], type[Exception], str]] = [
    # float window ids or positions, never truncated; boolean masks are not indices
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, window_ids=[0.5, 1]), TypeError, rf"`window_ids` {FLOAT}"),
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, positions=[2, 0.5]), TypeError, rf"`positions` {FLOAT}"),
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, window_ids=np.array([True, False])), TypeError,
     r"`window_ids` must hold integer indices; got booleans"),
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, window_ids=[0, 48]), ValueError,
     r"`window_ids` must hold values in 0\.\.47; got 48"),
    (embeddings.pre_activations, lambda c: _ids(c, positions=torch.tensor([0.5, 1.0])), TypeError,
     rf"`positions` {FLOAT}"),
    (embeddings.neuron_embeddings, lambda c: _ids(c, neuron=3, window_ids=[0.5, 1]), TypeError,
     rf"`window_ids` {FLOAT}"),
    (embeddings.embed, lambda c: {"h": torch.ones(2, 4), "W_in": torch.ones(4, 3), "neuron": 1.5}, TypeError,
     r"`neuron` must be an integer"),
    (embeddings.embed, lambda c: {"h": torch.ones(2, 4), "W_in": torch.ones(4, 3), "neuron": 3}, ValueError,
     r"`neuron` must be in 0\.\.2 \(a column of `W_in`\); got 3"),
    (activations.neuron_activations, lambda c: {"model": c.model, "windows": c.windows, "layer": 0, "neuron": 1,
                                                "window_ids": [0.5]}, TypeError, rf"`window_ids` {FLOAT}"),
    (clustering.example_text, lambda c: _text(c, window_ids=[0.5, 1]), TypeError, rf"`window_ids` {FLOAT}"),
    (clustering.example_text, lambda c: _text(c, positions=[2, 0.5]), TypeError, rf"`positions` {FLOAT}"),
    (clustering.example_text, lambda c: _text(c, positions=[2, 32]), ValueError,
     r"`positions` must hold values in 0\.\.31; got 32"),
    (importance.token_importance, lambda c: {**_tokens(c), "pos": 2.5}, TypeError, r"`pos` must be an integer"),
    (importance.ablation_drops, lambda c: {**_tokens(c), "replacement": 1.5}, TypeError,
     r"`replacement` must be an integer"),
    (viz.umap_plot, lambda c: {"e": np.eye(4), "labels": [0, 0, 1, 1], "central": [0.5, 2]}, TypeError,
     rf"`central` {FLOAT}"),
    (viz.tokens_html, lambda c: _html(highlight=0.5), TypeError, r"`highlight` must be an integer"),
    # a negative (or zero) context
    (clustering.example_text, lambda c: _text(c, context=-1), ValueError, r"`context` must be in 1\.\..*; got -1"),
    (clustering.example_text, lambda c: _text(c, context=0), ValueError, r"`context` must be in 1\.\..*; got 0"),
    (clustering.neuron_clusters, lambda c: {"model": c.model, "windows": c.windows, "top": c.top, "layer": 1,
                                            "neuron": c.live_neuron, "context": -3}, ValueError,
     r"`context` must be in 1\.\..*; got -3"),
    # a colour scale that is NaN, infinite or not positive
    (viz.tokens_html, lambda c: _html(max_value=float("nan")), ValueError,
     r"`max_value` must be a finite number > 0; got nan"),
    (viz.tokens_html, lambda c: _html(max_value=float("inf")), ValueError,
     r"`max_value` must be a finite number > 0; got inf"),
    (viz.tokens_html, lambda c: _html(max_value=-1.0), ValueError, r"`max_value` must be a finite number > 0; got -1"),
    (viz.tokens_html, lambda c: _html(max_value="big"), TypeError, r"`max_value` must be a number"),
    (viz.tokens, lambda c: _html(max_value=float("nan"), backend="html"), ValueError, r"`max_value` must be a finite"),
    (viz.tokens_html, lambda c: _html(values=[0.5, float("nan")]), ValueError, r"`values` must be finite"),
    # nearest neighbours of a single row: there are none
    (similar.nearest_neighbours, lambda c: {"x": np.ones((1, 4)), "k": 1}, ValueError,
     r"`x` must have at least 2 rows; got 1"),
    (similar.nearest_neighbours, lambda c: {"x": np.eye(3), "k": 3}, ValueError, r"`k` must be in 1\.\.2"),
    # batch_size = 0 (or not an integer), checked before any work
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, batch_size=0), ValueError,
     r"`batch_size` must be an integer >= 1; got 0"),
    (embeddings.pre_activations, lambda c: _ids(c, batch_size=-2), ValueError, r"`batch_size` must be an integer >= 1"),
    (embeddings.neuron_embeddings, lambda c: _ids(c, neuron=0, batch_size=0), ValueError,
     r"`batch_size` must be an integer >= 1"),
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, batch_size=2.0), TypeError, r"`batch_size` must be an integer"),
    (activations.neuron_activations, lambda c: {"model": c.model, "windows": c.windows, "layer": 0, "neuron": 1,
                                                "batch_size": 0}, ValueError, r"`batch_size` must be in 1\.\."),
    (activations.collect_top_activations, lambda c: _collect(c, batch_size=0, use_cache=False), ValueError,
     r"`batch_size` must be in 1\.\."),
    (importance.neuron_activations, lambda c: {"model": c.model, "windows": c.windows, "layer": 0, "neuron": 1,
                                               "batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1"),
    (clustering.layer_examples, lambda c: {"model": c.model, "windows": c.windows, "top": c.top, "layer": 1,
                                           "batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1"),
    (clustering.polysemy_table, lambda c: {"model": c.model, "windows": c.windows, "top": c.top, "layer": 1,
                                           "batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1"),
    (similar.layer_features, lambda c: {"model": c.model, "windows": c.windows, "top": c.top, "layer": 1,
                                        "batch_size": 0}, ValueError, r"`batch_size` must be an integer >= 1"),
    (models.heldout_loss, lambda c: {"hf_model": c.model.original_model, "windows": c.windows, "batch_size": 0},
     ValueError, r"`batch_size` must be an integer >= 1"),
    (viz.figure_png, lambda c: {"fig": None, "dpi": 0}, ValueError, r"`dpi` must be an integer >= 1"),
    # a cache folder that is a file, lies under a file, or is not a path
    (activations.collect_top_activations, lambda c: _collect(c, cache_dir=c.file), ValueError,
     r"`cache_dir` must be a folder; got the existing file .*a_file"),
    (activations.collect_top_activations, lambda c: _collect(c, cache_dir=c.file / "sub"), ValueError,
     r"`cache_dir` must be a folder that can be created; got .*a_file/sub, which lies under the file .*a_file"),
    (activations.collect_top_activations, lambda c: _collect(c, cache_dir=123), TypeError,
     r"`cache_dir` must be a path \(str or pathlib.Path\); got int 123"),
    (cache.Run, lambda c: {"kind": "x", "key": {}, "cache_dir": c.file}, ValueError, r"`cache_dir` must be a folder"),
    # a model that is neither a name nor a folder
    (models.load_model, lambda c: {"name": 123}, TypeError,
     r"`name` must be a model name or folder \(str or pathlib.Path\); got int 123"),
    (models.load_model, lambda c: {"name": ["gpt2"]}, TypeError, r"`name` must be a model name or folder"),
    # earlier classes, kept here so that the table covers them
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, layer=7), ValueError,
     r"`layer` must be in 0\.\.3 for this model; got 7"),
    (embeddings.neuron_embeddings, lambda c: _ids(c, neuron=512), ValueError, r"`neuron` must be in 0\.\.511"),
    (embeddings.pre_mlp_vectors, lambda c: _ids(c, window_ids=[0]), ValueError,
     r"`window_ids` and `positions` must have the same length"),
    (clustering.cluster, lambda c: {"e": np.ones(4)}, ValueError, r"`e` must be 2-D"),
    (clustering.cluster, lambda c: {"e": np.eye(4), "method": "kmeans"}, ValueError, r"`method` must be one of"),
    (clustering.polysemy_table, lambda c: {"model": c.model, "windows": c.windows, "top": c.top.examples, "layer": 1},
     TypeError, r"`top` must be a TopActivations"),
    (viz.layout_2d, lambda c: {"e": np.eye(3), "min_dist": -1.0}, ValueError,
     r"`min_dist` must be in \[0\.0, 100\.0\]"),
    # sparse dictionaries (SAELens folders; more in tests/test_dictionary.py)
    (dictionary.latent_embeddings, lambda c: _latents(c, window_ids=[0.5, 1]), TypeError, rf"`window_ids` {FLOAT}"),
    (dictionary.latent_embeddings, lambda c: _latents(c, latent=16), ValueError,
     r"`latent` must be in 0\.\.15 for this dictionary \(d_sae 16\); got 16"),
    (dictionary.latent_embeddings, lambda c: _latents(c, positions=[1]), ValueError,
     r"`positions` must have one entry per window id \(2\); got 1"),
    (dictionary.collect_latent_top, lambda c: {"model": c.model, "windows": c.windows, "dictionary": c.dictionary,
                                               "inputs": torch.zeros(2, 3, 128)}, ValueError,
     r"`inputs` must be the hook's vectors of every token of `windows`"),
    (dictionary.attach, lambda c: {"model": c.model, "dictionary": c.file}, TypeError,
     r"`dictionary` must be an nbutils\.dictionary\.Dictionary"),
    (dictionary.load_dictionary, lambda c: {"path": c.file}, FileNotFoundError, r"`path` must be a SAELens folder"),
    (clustering.cluster, lambda c: {"e": np.eye(4), "method": "leiden", "threshold": -1}, ValueError,
     r"`threshold` must be in \(0\.0, 100\.0\]; got -1"),
    (representations.neuron_embedding, lambda c: {"h": np.eye(4), "w": np.ones(5)}, ValueError,
     r"`w` must be one weight per column of `h`"),
    (recovery.layer_tokens, lambda c: {"model": c.model, "windows": c.windows, "layer": 1, "n_tokens": 10**9},
     ValueError, r"`n_tokens` must be in 2\.\.1536; got 1000000000"),
    (recovery.score_cases, lambda c: {"cases": [], "spaces": recovery.layer_spaces(), "margin": 0.0}, ValueError,
     r"`margin` must be in \(0\.0, 1\.0\]; got 0\.0"),
    (recovery.score_cases, lambda c: {"cases": [], "spaces": {}}, ValueError,
     r"`spaces` must name at least one representation"),
]


def _latents(c: Any, **override: Any) -> dict:
    return {"model": c.model, "windows": c.windows, "dictionary": c.dictionary, "latent": 3, "window_ids": [0, 1],
            "positions": [2, 3], **override}


@pytest.fixture(scope="module")
def c(model, windows, tmp_path_factory) -> SimpleNamespace:
    top = activations.collect_top_activations(model, windows, k=8, use_cache=False, progress=False)
    live = int(top.neurons.query("layer == 1 and n_examples >= 2")["neuron"].iloc[0])
    file = tmp_path_factory.mktemp("bad_inputs") / "a_file"
    file.write_text("not a folder")
    sparse = dictionary.from_sae(sae.SAE(model.cfg.d_model, 16), "blocks.1.ln2.hook_normalized")
    return SimpleNamespace(model=model, windows=windows, top=top, live_neuron=live, file=file, dictionary=sparse)


def _case_id(case: tuple) -> str:
    function, _, error, pattern = case
    argument = pattern.split("`")[1] if "`" in pattern else "?"
    return f"{function.__module__.split('.')[-1]}.{function.__name__}-{argument}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_bad_input_gets_a_clear_error_naming_the_argument(c, case):
    function, kwargs, error, pattern = case
    with pytest.raises(error, match=pattern) as raised:
        function(**kwargs(c))
    assert raised.type is error  # the exact class: no subclass from deep inside (e.g. FileExistsError)
    assert "`" in str(raised.value)  # names the argument in the one message form


def test_the_environment_variable_naming_a_file_is_named(monkeypatch, c):
    monkeypatch.setenv("NBUTILS_CACHE", str(c.file))
    with pytest.raises(ValueError, match=r"`NBUTILS_CACHE` must be a folder; got the existing file"):
        activations.collect_top_activations(c.model, c.windows[:8], k=4, progress=False)


def test_whole_floats_and_integer_tensors_are_accepted(c):
    """Indices stored as floats without a fraction (e.g. a pandas column after a merge) lose nothing."""
    as_int = embeddings.pre_mlp_vectors(c.model, c.windows, 1, [0, 1], [2, 3])
    as_float = embeddings.pre_mlp_vectors(c.model, c.windows, 1, np.array([0.0, 1.0]), torch.tensor([2, 3]))
    torch.testing.assert_close(as_int, as_float)
    assert clustering.example_text(c.model, c.windows, [0], [3], context=2) == \
        [c.model.tokenizer.decode(c.windows[0, 2:4].tolist())]
