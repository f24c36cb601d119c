"""Model loading, hook names, the default model's quality, and no network on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nbutils import _env, data, models


def test_default_model_shape(model):
    assert model.cfg.n_layers == 4
    assert model.cfg.d_mlp == 4 * model.cfg.d_model
    assert model.cfg.act_fn.startswith("gelu")


def test_hook_names_exist_in_the_model(model):
    for layer in range(model.cfg.n_layers):
        for kind in ("mlp_in", "ln_normalized", "pre", "post"):
            assert models.hook_name(layer, kind) in model.hook_dict


def test_load_local_folder_by_path():
    bridge = models.load_model(str(_env.DEFAULT_MODEL_DIR))
    assert bridge.cfg.n_layers == 4


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        models.load_model(tmp_path)


def test_hub_name_offline_fails_fast_and_names_default(monkeypatch):
    monkeypatch.setattr(_env, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match=r"hub is not reachable.*load_model\(\)"):
        models.load_model("gpt2")


def test_model_is_clearly_better_than_unigram(model):
    """The neurons of a model no better than unigram statistics would mean nothing."""
    card = json.loads((_env.DEFAULT_MODEL_DIR / "training.json").read_text())
    heldout = data.corpus_windows(model, n_windows=200, window=64, split="heldout")
    loss = models.heldout_loss(model.original_model, heldout)
    unigram = models.unigram_loss(data.corpus_tokens(model, "train"), heldout, model.cfg.d_vocab)
    print(f"held-out loss {loss:.3f} nats vs unigram {unigram:.3f} (card: {card['heldout_loss']} vs {card['unigram_heldout_loss']})")
    assert loss < unigram - 1.0
    assert card["heldout_loss"] < card["unigram_heldout_loss"] - 1.0


def test_unigram_loss_by_hand():
    train = torch.tensor([0, 0, 1])  # counts + 1: [3, 2, 1] / 6
    windows = torch.tensor([[2, 0, 1]])  # targets 0 and 1
    expected = -(torch.tensor(3 / 6).log() + torch.tensor(2 / 6).log()) / 2
    assert models.unigram_loss(train, windows, 3) == pytest.approx(float(expected))


def test_import_never_touches_the_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network touched on import')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "import nbutils\n"
        "from nbutils import data, models, embeddings\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout


@pytest.mark.parametrize(
    ("fn", "arg", "match"),
    [
        (models.check_layer, 4, r"`layer` must be in 0\.\.3 for this model; got 4"),
        (models.check_layer, -1, r"`layer` must be in 0\.\.3"),
        (models.check_neuron, 512, r"`neuron` must be in 0\.\.511"),
    ],
)
def test_layer_and_neuron_ranges(model, fn, arg, match):
    with pytest.raises(ValueError, match=match):
        fn(model, arg)


@pytest.mark.parametrize(
    ("windows", "match"),
    [
        (torch.zeros(0, 8, dtype=torch.long), r"non-empty 2-D tensor"),
        (torch.zeros(8, dtype=torch.long), r"non-empty 2-D tensor"),
        (torch.full((2, 8), 5000), r"token ids in 0\.\.4095"),
        (torch.zeros(2, 8), r"integer token ids"),
        (torch.zeros(2, 65, dtype=torch.long), r"at most 64 tokens"),
    ],
)
def test_bad_windows(model, windows, match):
    with pytest.raises(ValueError, match=match):
        models.check_windows(model, windows)
