"""Sparse dictionaries (SAEs and transcoders) in SAELens's folder format, and their latents as units like neurons.

A latent is a unit like an MLP neuron: its pre-activation is a dot product of an input vector `u` with an encoder
column plus a bias, so the neuron-embedding method carries over exactly.

**The folder** (what SAELens writes and reads): `cfg.json` and `sae_weights.safetensors`, read here with
`json` and `safetensors` only (the `sae-lens` package pins `transformer-lens<4`, which conflicts with ours).

- Weights: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_out]`, `b_dec [d_out]` (`d_out = d_in` for an
  SAE), and per architecture `threshold [d_sae]`, `b_gate`, `b_mag`, `r_mag [d_sae]` (gated: no `b_enc`),
  `W_skip [d_out, d_in]`.
- Config: `architecture`, `d_in`, `d_sae`, `apply_b_dec_to_input`, `normalize_activations`,
  `metadata.hook_name` (older folders: `meta.hook_name` or a top-level `hook_name`), and `k`,
  `rescale_acts_by_decoder_norm`, `d_out`, `metadata.hook_name_out` / `hook_name_out` where they apply.

**The encoder input** is `u = norm(x) - b_dec` when `apply_b_dec_to_input`, else `u = norm(x)`; transcoders never
subtract `b_dec` (it lives in the output space). `norm` (`normalize_activations`) is `"none"`,
`"expected_average_only_in"` (a constant factor that SAELens folds into the weights before inference: the identity
here, as in SAELens at inference), `"constant_norm_rescale"` (`x * sqrt(d_in) / |x|`, per token) or `"layer_norm"`
(`(x - mean) / (std + 1e-5)` per token, `std` with Bessel's correction as `torch.std`).

**Per architecture** (`ARCHITECTURES`), with `pre = u @ W_enc + b_enc`:

- `"standard"`, `"transcoder"`, `"skip_transcoder"`: `f = relu(pre)`;
- `"jumprelu"`, `"jumprelu_transcoder"`: `f = relu(pre) * (pre > threshold)`;
- `"topk"`: the `k` largest of `pre` per token, through a ReLU, the rest 0; with `rescale_acts_by_decoder_norm`
  the ranked value is `pre * |W_dec[j]|`, and that is the activation;
- `"gated"`: a gate `g = u @ W_enc + b_gate` and a magnitude `m = u @ (W_enc * exp(r_mag)) + b_mag`:
  `f = (g > 0) * relu(m)`.

**Latent embedding** of latent j at a token: `e = u ⊙ W_enc[:, j]` `[d_in]`. Invariant: `e.sum() + bias[j]` is the
pre-activation, with `bias = b_enc` (`b_gate` for gated, where the sum is the gate). For a gated SAE the magnitude
is a scaled sum of the same embedding: `exp(r_mag[j]) * e.sum() + b_mag[j] = m_j`. Top-k collection ranks the
latent's activation `f` (after threshold or top-k), and the embedding is taken of its pre-activation.

**On a model.** `metadata.hook_name` is mapped to the bridge's hook by `models.saelens_hook` (the one place naming
hooks); `d_in` must be that hook's width. `hook_inputs` reads `x` there, `collect_latent_top` streams every latent's
top-k over a corpus, `latent_examples` gathers every latent's example embeddings for `clustering.polysemy_table`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from nbutils import activations, clustering
from nbutils import cache as _cache
from nbutils._validation import check_index_array, check_int_range, check_path, check_positive_int, fail
from nbutils.models import check_windows, hook_name, hook_width, saelens_hook

__all__ = [
    "ARCHITECTURES",
    "NORMALIZATIONS",
    "CFG_FILE",
    "WEIGHTS_FILE",
    "Dictionary",
    "load_dictionary",
    "save_dictionary",
    "from_sae",
    "attach",
    "hook_inputs",
    "hook_activations",
    "encoder_inputs",
    "latent_embeddings",
    "collect_latent_top",
    "latent_examples",
    "reconstruction_metrics",
]

ARCHITECTURES = ("standard", "jumprelu", "topk", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_LN_EPS = 1e-5

# Weights each architecture needs beyond W_enc, W_dec, b_dec.
_EXTRA_WEIGHTS = {
    "standard": ("b_enc",),
    "jumprelu": ("b_enc", "threshold"),
    "topk": ("b_enc",),
    "gated": ("b_gate", "b_mag", "r_mag"),
    "transcoder": ("b_enc",),
    "skip_transcoder": ("b_enc", "W_skip"),
    "jumprelu_transcoder": ("b_enc", "threshold"),
}


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A sparse dictionary's weights and settings (module docstring for the meaning of each).

    Attributes:
        architecture: one of `ARCHITECTURES`.
        W_enc: `[d_in, d_sae]`; W_dec: `[d_sae, d_out]`; b_dec: `[d_out]`.
        b_enc: `[d_sae]` (None for gated); threshold, b_gate, b_mag, r_mag: `[d_sae]` or None;
            W_skip: `[d_out, d_in]` or None.
        k: latents kept per token (`"topk"`), else None.
        rescale_acts_by_decoder_norm: `"topk"` ranks `pre * |W_dec[j]|`.
        apply_b_dec_to_input: subtract `b_dec` from the (normalised) input (never for transcoders).
        normalize_activations: one of `NORMALIZATIONS`.
        hook_name: the SAELens hook it reads (`blocks.3.ln2.hook_normalized`); hook_name_out: a transcoder's output.
        cfg: the whole `cfg.json` as read (or as it will be written).
        weights_hash: sha256 of the weights file ("" before it is written).
    """

    architecture: str
    W_enc: Float[Tensor, "d_in d_sae"]
    W_dec: Float[Tensor, "d_sae d_out"]
    b_dec: Float[Tensor, "d_out"]
    b_enc: Float[Tensor, "d_sae"] | None = None
    threshold: Float[Tensor, "d_sae"] | None = None
    b_gate: Float[Tensor, "d_sae"] | None = None
    b_mag: Float[Tensor, "d_sae"] | None = None
    r_mag: Float[Tensor, "d_sae"] | None = None
    W_skip: Float[Tensor, "d_out d_in"] | None = None
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    hook_name: str = ""
    hook_name_out: str | None = None
    cfg: dict = field(default_factory=dict)
    weights_hash: str = ""

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def bias(self) -> Float[Tensor, "d_sae"]:
        """The bias of the pre-activation that the embedding sums to: `b_enc`, or `b_gate` for gated."""
        return self.b_gate if self.architecture == "gated" else self.b_enc  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """`weights_hash` (sha256 of the weights file) when read from or written to a folder, else a sha256 of the
        tensors' float32 bytes and the config's architecture settings."""
        if self.weights_hash:
            return self.weights_hash
        digest = hashlib.sha256(json.dumps([self.architecture, self.k, self.rescale_acts_by_decoder_norm,
                                            self.apply_b_dec_to_input, self.normalize_activations]).encode())
        for name, tensor in sorted(self.weights().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def weights(self) -> dict[str, Tensor]:
        """The tensors as SAELens names them (those the architecture has)."""
        names = ("W_enc", "W_dec", "b_dec") + _EXTRA_WEIGHTS[self.architecture]
        return {name: getattr(self, name) for name in names}

    # ----------------------------------------------------------------------------------------------
    # Encoding

    def normalize(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """`norm(x)` per token (`normalize_activations`)."""
        if self.normalize_activations == "constant_norm_rescale":
            return x * (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + _LN_EPS)
        return x

    def encoder_input(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """`u = norm(x) - b_dec` (`apply_b_dec_to_input`, never for transcoders), else `norm(x)`."""
        u = self.normalize(x.to(self.W_enc.dtype))
        return u - self.b_dec if self.apply_b_dec_to_input and not self.is_transcoder else u

    def pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations `u @ W_enc + bias` (the gate for gated): what the latent embeddings sum to."""
        return self.encoder_input(x) @ self.W_enc + self.bias

    def magnitude_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """A gated SAE's magnitude path `u @ (W_enc * exp(r_mag)) + b_mag`."""
        if self.architecture != "gated":
            fail("architecture", "be 'gated' for a magnitude path", repr(self.architecture))
        return self.encoder_input(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations `f` (module docstring, per architecture)."""
        pre = self.pre(x)
        arch = self.architecture
        if arch == "gated":
            return (pre > 0).to(pre.dtype) * F.relu(self.magnitude_pre(x))
        if arch in ("jumprelu", "jumprelu_transcoder"):
            return F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if arch == "topk":
            ranked = pre * self.W_dec.norm(dim=-1) if self.rescale_acts_by_decoder_norm else pre
            top = ranked.topk(min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(ranked).scatter(-1, top.indices, F.relu(top.values))
        return F.relu(pre)

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """`f @ W_dec + b_dec` in the normalised space (a `"topk"` SAE with decoder-norm rescaling first divides
        `f` by the decoder norms)."""
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The whole forward pass: decode, undo the input normalisation (SAEs), add the skip path (skip transcoder)."""
        out = self.decode(self.encode(x))
        x = x.to(self.W_enc.dtype)
        if not self.is_transcoder and self.normalize_activations == "constant_norm_rescale":
            out = out / (math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True))
        elif not self.is_transcoder and self.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            out = out * centred.std(dim=-1, keepdim=True) + x.mean(dim=-1, keepdim=True)
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    def embeddings(self, x: Float[Tensor, "n d_in"], latent: int) -> Float[Tensor, "n d_in"]:
        """Latent embeddings `u ⊙ W_enc[:, latent]`; `e.sum(-1) + bias[latent]` is the pre-activation."""
        latent = check_int_range("latent", latent, 0, self.d_sae - 1, what=f"for this dictionary (d_sae {self.d_sae})")
        return self.encoder_input(x) * self.W_enc[:, latent]


# --------------------------------------------------------------------------------------------------
# The folder: read, check, write


def _cfg_error(field_name: str, must: str, got: Any) -> NoReturn:
    fail(field_name, must, got, f"Fix `{field_name}` in {CFG_FILE}.")


def _hook_of(cfg: dict, key: str) -> str | None:
    for holder in (cfg.get("metadata"), cfg.get("meta"), cfg):
        if isinstance(holder, dict) and holder.get(key) is not None:
            return holder[key]
    return None



def _check_tensor(name: str, tensor: Tensor, shape: tuple[int, ...], why: str) -> Tensor:
    if tuple(tensor.shape) != shape:
        fail(name, f"have shape {list(shape)} ({why} in {CFG_FILE})", list(tensor.shape),
             f"The weights in {WEIGHTS_FILE} and {CFG_FILE} disagree.")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        fail(name, "be finite", f"{bad} NaN or inf values in {WEIGHTS_FILE}", "The folder's weights are corrupt.")
    return tensor.float()


def _from_parts(cfg: dict, weights: dict[str, Tensor], weights_hash: str = "") -> Dictionary:
    """Check a config and its weights against each other and build the `Dictionary`."""
    arch = cfg.get("architecture", "standard")  # SAELens's folders before 2025 have no architecture: standard
    if arch not in ARCHITECTURES:
        _cfg_error("architecture", "be one of " + ", ".join(repr(a) for a in ARCHITECTURES), repr(arch))
    sizes = {}
    for name in ("d_in", "d_sae") + (("d_out",) if arch in TRANSCODERS else ()):
        value = cfg.get(name, cfg.get("d_in") if name == "d_out" else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _cfg_error(name, "be an integer >= 1", repr(value))
        sizes[name] = value
    d_in, d_sae = sizes["d_in"], sizes["d_sae"]
    d_out = sizes.get("d_out", d_in)
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALIZATIONS:
        _cfg_error("normalize_activations", "be one of " + ", ".join(repr(n) for n in NORMALIZATIONS), repr(norm))
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        _cfg_error("apply_b_dec_to_input", "be true or false", repr(apply_b_dec))
    k = None
    if arch == "topk":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            _cfg_error("k", f"be an integer in 1..{d_sae} (d_sae) for a topk dictionary", repr(k))
    hook = _hook_of(cfg, "hook_name")
    if not isinstance(hook, str) or not hook:
        _cfg_error("metadata.hook_name", "name the hook the dictionary reads (e.g. 'blocks.3.hook_resid_pre')",
                   repr(hook))
    shapes = {"W_enc": ((d_in, d_sae), "[d_in, d_sae]"), "W_dec": ((d_sae, d_out), "[d_sae, d_out]"),
              "b_dec": ((d_out,), "[d_out]"), "W_skip": ((d_out, d_in), "[d_out, d_in]")}
    checked = {}
    for name in ("W_enc", "W_dec", "b_dec") + _EXTRA_WEIGHTS[arch]:
        if name not in weights:
            fail(name, f"be in {WEIGHTS_FILE} for architecture {arch!r}", f"the tensors {sorted(weights)}",
                 "The folder is incomplete or its architecture is wrong.")
        shape, why = shapes.get(name, ((d_sae,), "[d_sae]"))
        checked[name] = _check_tensor(name, weights[name], shape, why)
    return Dictionary(architecture=arch, **checked, k=k,
                      rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                      apply_b_dec_to_input=apply_b_dec, normalize_activations=norm, hook_name=hook,
                      hook_name_out=_hook_of(cfg, "hook_name_out"), cfg=cfg, weights_hash=weights_hash)


def load_dictionary(path: str | os.PathLike) -> Dictionary:
    """Read a SAELens folder (`cfg.json` + `sae_weights.safetensors`) and check it.

    Raises:
        FileNotFoundError: the folder, its `cfg.json` or its weights file is missing.
        ValueError: naming the field: an unknown architecture or normalisation, a missing or malformed setting
            (`d_in`, `d_sae`, `k`, `metadata.hook_name`), a missing tensor, a tensor whose shape disagrees with
            the config, NaN or inf weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = check_path("path", path, what="a SAELens folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"`path` must be a SAELens folder ({CFG_FILE} + {WEIGHTS_FILE}); {folder} is not a folder.")
    for name in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a SAELens folder: it has no {name}.")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"`{CFG_FILE}` must be JSON; {folder / CFG_FILE} is not ({err}).") from None
    if not isinstance(cfg, dict):
        fail(CFG_FILE, "hold a JSON object", type(cfg).__name__)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"`{WEIGHTS_FILE}` must be a safetensors file; {folder / WEIGHTS_FILE} is not ({err}).") from None
    return _from_parts(cfg, weights, _cache.file_fingerprint(folder / WEIGHTS_FILE))


def save_dictionary(dictionary: Dictionary, path: str | os.PathLike) -> Dictionary:
    """Write `dictionary` as a SAELens folder (`cfg.json` + `sae_weights.safetensors`, float32) that SAELens's
    `SAE.load_from_disk` reads; files are written to temporary names, then renamed. Returns it with its
    `weights_hash`."""
    from safetensors.torch import save_file

    folder = check_path("path", path, what="a folder")
    folder.mkdir(parents=True, exist_ok=True)
    d = dictionary
    cfg = {**d.cfg, "architecture": d.architecture, "d_in": d.d_in, "d_sae": d.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": d.apply_b_dec_to_input,
           "normalize_activations": d.normalize_activations, "reshape_activations": "none"}
    cfg["metadata"] = {**cfg.get("metadata", {}), "hook_name": d.hook_name}
    if d.k is not None:
        cfg["k"] = d.k
        cfg["rescale_acts_by_decoder_norm"] = d.rescale_acts_by_decoder_norm
    if d.is_transcoder:
        cfg["d_out"] = d.d_out
        if d.hook_name_out:
            cfg["metadata"]["hook_name_out"] = d.hook_name_out
            cfg["hook_name_out"] = d.hook_name_out
    weights = {name: t.detach().float().contiguous().cpu() for name, t in d.weights().items()}
    tmp_w, tmp_c = folder / (WEIGHTS_FILE + ".tmp"), folder / (CFG_FILE + ".tmp")
    save_file(weights, str(tmp_w))
    tmp_c.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp_w, folder / WEIGHTS_FILE)
    os.replace(tmp_c, folder / CFG_FILE)
    return _from_parts(cfg, weights, _cache.file_fingerprint(folder / WEIGHTS_FILE))


def from_sae(sae: Any, hook: str, *, model_name: str = "", extra: dict | None = None) -> Dictionary:
    """A standard-architecture `Dictionary` from the package's trained SAE (`nbutils.sae.SAE`): `W_enc = W_e.T`,
    `W_dec = W_d.T`, `b_enc = b_e`, `b_dec = b_d`, `b_dec` subtracted from the input, no normalisation.

    Args:
        sae: an `nbutils.sae.SAE`.
        hook: the SAELens hook name it reads (`blocks.1.ln2.hook_normalized`).
        model_name: recorded in `metadata.model_name`.
        extra: more top-level config entries (SAELens ignores keys it does not know), e.g. the training settings.
    """
    with torch.no_grad():
        weights = {"W_enc": sae.W_e.detach().T.contiguous(), "W_dec": sae.W_d.detach().T.contiguous(),
                   "b_enc": sae.b_e.detach().clone(), "b_dec": sae.b_d.detach().clone()}
    cfg = {**(extra or {}), "architecture": "standard", "d_in": int(sae.d_in), "d_sae": int(sae.n_latents),
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": hook, "model_name": model_name}}
    return _from_parts(cfg, weights)


# --------------------------------------------------------------------------------------------------
# On a model


def attach(model: Any, dictionary: Dictionary) -> tuple[int, str]:
    """Check `dictionary` against `model` and return the `(layer, kind)` of the hook it reads
    (`models.hook_name(layer, kind, model)`).

    Raises:
        ValueError: `metadata.hook_name` (or `hook_name_out`) is not a hook of this model, or `d_in` (`d_out`) is
            not that hook's width.
    """
    if not isinstance(dictionary, Dictionary):
        raise TypeError(f"`dictionary` must be an nbutils.dictionary.Dictionary (`load_dictionary`); got "
                        f"{type(dictionary).__name__}.")
    layer, kind = saelens_hook(model, dictionary.hook_name)
    width = hook_width(model, kind)
    if dictionary.d_in != width:
        fail("d_in", f"be {width}, the width of {dictionary.hook_name!r} in this model", dictionary.d_in,
             "Load the model the dictionary was trained on.")
    if dictionary.is_transcoder and dictionary.hook_name_out:
        _, kind_out = saelens_hook(model, dictionary.hook_name_out, field="metadata.hook_name_out")
        if dictionary.d_out != hook_width(model, kind_out):
            fail("d_out", f"be {hook_width(model, kind_out)}, the width of {dictionary.hook_name_out!r} in this model",
                 dictionary.d_out, "Load the model the dictionary was trained on.")
    return layer, kind


@torch.inference_mode()
def hook_inputs(model: Any, tokens: Int[Tensor, "batch pos"], layer: int, kind: str) -> Float[Tensor, "batch pos d"]:
    """One forward pass of `tokens` up to block `layer`, reading the hook `models.hook_name(layer, kind, model)`
    as float32 on the CPU. No input checks: callers check."""
    name = hook_name(layer, kind, model)
    device = next(model.parameters()).device
    stop = layer + 1 if layer + 1 < model.cfg.n_layers else None
    _, cache = model.run_with_cache(tokens.to(device), names_filter=[name], stop_at_layer=stop)
    return cache[name].reshape(tokens.shape[0], tokens.shape[1], -1).float().cpu()


def hook_activations(
    model: Any, windows: Int[Tensor, "n_windows window"], layer: int, kind: str, *, batch_size: int = 64,
    progress: bool = False,
) -> Float[Tensor, "n_tokens d"]:
    """Every token's vector at one hook (`models.hook_name` kind), e.g. a dictionary's training data.

    Returns:
        `[n_windows * window, d]` float32, window-major (token `p` of window `w` is row `w * window + p`).
    """
    from tqdm.auto import tqdm

    windows = check_windows(model, windows)
    batch_size = check_positive_int("batch_size", batch_size)
    parts = [hook_inputs(model, windows[s : s + batch_size], layer, kind)
             for s in tqdm(range(0, len(windows), batch_size), desc="reading activations", disable=not progress)]
    return torch.cat(parts).reshape(-1, parts[0].shape[-1])  # [n_windows * window, d]


def _check_inputs(inputs: Any, windows: Tensor, d_in: int) -> Tensor:
    """`inputs` must be the hook's vectors of every token of `windows`: `[n_windows, window, d_in]`, finite."""
    if not isinstance(inputs, Tensor) or tuple(inputs.shape) != (*windows.shape, d_in):
        fail("inputs", f"be the hook's vectors of every token of `windows`, a tensor {[*windows.shape, d_in]}",
             list(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__,
             "Read them with `hook_activations(...).reshape(n_windows, window, -1)`, or pass None.")
    return inputs.float()


def encoder_inputs(
    model: Any, windows: Int[Tensor, "n_windows window"], dictionary: Dictionary, window_ids: Any, positions: Any,
    *, batch_size: int = 64, inputs: Float[Tensor, "n_windows window d_in"] | None = None,
) -> Float[Tensor, "n d_in"]:
    """The dictionary's encoder input `u` (module docstring) at each (window, position); each needed window runs
    once, up to the dictionary's block, unless `inputs` already holds the hook's vectors of every token."""
    layer, kind = attach(model, dictionary)
    windows = check_windows(model, windows)
    batch_size = check_positive_int("batch_size", batch_size)
    wid = torch.from_numpy(check_index_array("window_ids", window_ids, windows.shape[0]))
    pos = torch.from_numpy(check_index_array("positions", positions, windows.shape[1]))
    if len(wid) != len(pos):
        fail("positions", f"have one entry per window id ({len(wid)})", len(pos))
    if inputs is not None:
        return dictionary.encoder_input(_check_inputs(inputs, windows, dictionary.d_in)[wid, pos])  # [n, d_in]
    unique, inverse = torch.unique(wid, return_inverse=True)  # each window runs once
    parts = [hook_inputs(model, windows[unique[s : s + batch_size]], layer, kind) for s in range(0, len(unique), batch_size)]
    x = torch.cat(parts)[inverse, pos] if parts else torch.zeros(0, dictionary.d_in)  # [n, d_in]
    return dictionary.encoder_input(x)


def latent_embeddings(
    model: Any, windows: Int[Tensor, "n_windows window"], dictionary: Dictionary, latent: int, window_ids: Any,
    positions: Any, *, batch_size: int = 64,
) -> Float[Tensor, "n d_in"]:
    """Latent embeddings `u ⊙ W_enc[:, latent]` at each (window, position); `e.sum(-1) + dictionary.bias[latent]`
    is the latent's pre-activation there."""
    latent = check_int_range("latent", latent, 0, dictionary.d_sae - 1, what=f"for this dictionary (d_sae {dictionary.d_sae})")
    u = encoder_inputs(model, windows, dictionary, window_ids, positions, batch_size=batch_size)
    return u * dictionary.W_enc[:, latent]


def collect_latent_top(
    model: Any, windows: Int[Tensor, "n_windows window"], dictionary: Dictionary, *, k: int = 128,
    frac: float = 0.75, batch_size: int = 64, progress: bool = True,
    inputs: Float[Tensor, "n_windows window d_in"] | None = None,
) -> activations.TopActivations:
    """The top-k examples of every latent, ranked by its activation `f` (after threshold or top-k), in one
    streaming pass over `windows` (`activations.collect_top_units`, in memory). With `inputs` (the hook's vectors
    of every token of `windows`) the model is not run.

    Returns:
        `TopActivations` with `act [1, d_sae, k]` and `layers=(layer,)`: its tables have the hook's layer as
        `layer` and the latent as `neuron`.
    """
    layer, kind = attach(model, dictionary)
    windows = check_windows(model, windows)
    if inputs is not None:
        inputs = _check_inputs(inputs, windows, dictionary.d_in)

    def latent_acts(start: int, stop: int) -> Tensor:
        x = hook_inputs(model, windows[start:stop], layer, kind) if inputs is None else inputs[start:stop]
        return dictionary.encode(x)  # [stop - start, window, d_sae]

    return activations.collect_top_units(latent_acts, windows, dictionary.d_sae, k=k, frac=frac, batch_size=batch_size,
                                         progress=progress, desc="collecting latents' top activations", layer=layer)


def latent_examples(
    model: Any, windows: Int[Tensor, "n_windows window"], dictionary: Dictionary, top: activations.TopActivations,
    *, batch_size: int = 64, inputs: Float[Tensor, "n_windows window d_in"] | None = None,
) -> clustering.LayerExamples:
    """Every latent's examples (`collect_latent_top`) with their encoder inputs `u`, read in one batched pass, as
    `clustering.LayerExamples` (`h = u`, `W = W_enc`, `b = bias`): pass it as `examples=` to
    `clustering.polysemy_table` to cluster the latents as neurons are clustered."""
    layer, _ = attach(model, dictionary)
    windows = check_windows(model, windows)
    if top.layers != (layer,) or top.d_mlp != dictionary.d_sae:
        fail("top", f"hold the top-k of this dictionary's {dictionary.d_sae} latents (`collect_latent_top`)",
             f"{top.n_layers} layers of {top.d_mlp} units")
    ex = top.examples
    n_pos = windows.shape[1]
    key = ex["window"].to_numpy() * n_pos + ex["pos"].to_numpy()  # one key per (window, pos)
    unique, inverse = np.unique(key, return_inverse=True)
    u = encoder_inputs(model, windows, dictionary, unique // n_pos, unique % n_pos, batch_size=batch_size,
                       inputs=inputs)
    bounds = np.searchsorted(ex["neuron"].to_numpy(), np.arange(dictionary.d_sae + 1))
    return clustering.LayerExamples(layer=layer, examples=ex, keys=unique, h=u.numpy().astype(np.float64),
                                    inverse=inverse.reshape(-1), bounds=bounds,
                                    W=dictionary.W_enc.numpy().astype(np.float64),
                                    b=dictionary.bias.numpy().astype(np.float64), n_pos=n_pos)


def reconstruction_metrics(dictionary: Dictionary, x: Float[Tensor, "n d_in"], *,
                           target: Float[Tensor, "n d_out"] | None = None, batch_size: int = 4096) -> dict[str, float]:
    """How well the dictionary reconstructs (SAE: `x`; transcoder: `target`) and how sparse it is.

    Returns:
        `fvu` (fraction of variance unexplained: squared error over the total variance of the target around its
        mean), `mse`, `l0` (mean active latents per token), `dead_frac` (latents never active on `x`).
    """
    x = x.float()
    target = x if target is None else target.float()
    err, l0, ever = 0.0, 0.0, torch.zeros(dictionary.d_sae, dtype=torch.bool)
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            f = dictionary.encode(x[s : s + batch_size])
            err += float(((dictionary.reconstruct(x[s : s + batch_size]) - target[s : s + batch_size]) ** 2).sum())
            active = f != 0
            l0 += float(active.sum())
            ever |= active.any(0)
    total = float(((target - target.mean(0)) ** 2).sum())
    return {"fvu": err / total, "mse": err / target.numel(), "l0": l0 / len(x), "dead_frac": float((~ever).float().mean())}
