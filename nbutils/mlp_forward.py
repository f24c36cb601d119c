"""How batches run up to the MLP activations: through a plain Hugging Face model that shares the bridge's parameters,
or through the bridge's own hooks.

The plain model (same tensors, so edits to the bridge's weights are seen) skips the bridge's per-hook-point work
(its LayerNorm and attention re-implementations). Its activation modules are found per family: the output of
the MLP's activation module for GPT-2 (`HF_MLP_ACT`), the input of the down projection for every other family
(`down_projection_paths`). Both give the bridge's `hook_post` (tested per family). When the plain model cannot be
rebuilt from the bridge's parameters, `mlp_forward` falls back to the bridge. GPT-2's `gelu_new` runs in place in
the plain model (`gelu_new`: the same operations, the same bits, a third less time).

`plain_taps` finds, on the plain model, the tensors of the hooks a pass reads (`PLAIN_KINDS`): the MLP's input is
the input of its in-projection, the normalised vector is the MLP norm's input normalised here, as the bridge's
`hook_normalized` does. Other hooks run through the bridge.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["HF_MLP_ACT", "PLAIN_KINDS", "MlpForward", "StopForward", "Tap", "down_projection_paths", "mlp_forward",
           "normalized", "plain_taps", "run_plain"]

# The Hugging Face module whose output is the bridge's `hook_post` (the neuron activation), per model type. Other
# families read the input of the MLP's down projection (`down_projection_paths`), which is the same tensor.
HF_MLP_ACT = {"gpt2": "transformer.h.{layer}.mlp.act"}

PLAIN_KINDS = ("mlp_in", "ln_normalized", "post")  # the hook kinds (`models.HOOK_KINDS`) the plain model can show


class StopForward(Exception):
    """Raised by a hook when nothing after it is needed; `run_plain` catches it."""


@dataclass(frozen=True)
class MlpForward:
    """How batches run: through the bridge's hooks, or through a plain Hugging Face model that shares the
    bridge's parameters (same tensors, so edits to the bridge's weights are seen) with PyTorch forward hooks
    on its MLP activation modules. The plain model skips the bridge's per-hook-point work (its LayerNorm
    and attention re-implementations); a test checks that both give the same activations."""

    model: Any
    n_layers: int
    plain: Any = None  # the plain Hugging Face model, or None for the bridge
    act_modules: tuple = ()
    reads_input: bool = False  # the activation is the modules' input (down projections), not their output

    @property
    def engine(self) -> str:
        return "plain_hf" if self.plain is not None else "bridge"


def _hf_names(inner: Any) -> dict[int, str]:
    """`{id(module): Hugging Face module path}` for every module of the bridge's wrapped model `inner`, also
    under the bridge's wrappers (their `._original_component` dropped from the path)."""
    return {id(module): name.replace("._original_component", "") for name, module in inner.named_modules()}


def down_projection_paths(model: Any, inner: Any) -> list[str] | None:
    """Hugging Face module path of each layer's MLP down projection (the bridge's `blocks[l].mlp.out`), whose
    input is the neuron activation; `None` if the bridge does not expose one."""
    names = _hf_names(inner)
    try:
        paths = [names.get(id(model.blocks[layer].mlp.out)) for layer in range(model.cfg.n_layers)]
    except AttributeError:
        return None
    return None if None in paths else paths


def mlp_forward(model: Any, plain_hf: bool) -> MlpForward:
    """The plain path when asked for and the plain model shares every parameter with the bridge, else the bridge."""
    n_layers = model.cfg.n_layers
    inner = getattr(model, "original_model", None)
    config = getattr(inner, "config", None)
    if not plain_hf or config is None:
        return MlpForward(model, n_layers)
    path = HF_MLP_ACT.get(getattr(config, "model_type", None))
    paths = [path.format(layer=layer) for layer in range(n_layers)] if path else down_projection_paths(model, inner)
    if paths is None:
        return MlpForward(model, n_layers)
    import itertools

    tensors: dict[str, Tensor] = {}  # the bridge's parameters under their Hugging Face names
    for name, t in itertools.chain(inner.named_parameters(remove_duplicate=False),
                                   inner.named_buffers(remove_duplicate=False)):
        tensors.setdefault(name.replace("._original_component", ""), t)
    shared = tuple(id(t) for t in tensors.values())  # the plain model holds these tensors: no id is reused
    built = _PLAIN.get(model)
    if built is None or built[0] != shared:  # first use, or a parameter of the bridge was replaced
        forward = _plain_forward(model, config, tensors, paths, path is None)
        built = _PLAIN[model] = (shared, forward.plain, forward.act_modules, forward.reads_input)
    return MlpForward(model, n_layers, *built[1:])


# each bridge's plain model (None: the bridge's own forward), its activation modules and how they show the
# activation, with the ids of the tensors it shares: built once (tens of ms) and dropped with the bridge; the values
# do not refer to the bridge, which would keep it alive
_PLAIN: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def _plain_forward(model: Any, config: Any, tensors: dict[str, Tensor], paths: list[str], reads_input: bool
                   ) -> MlpForward:
    """The plain Hugging Face model of `config` on the bridge's `tensors` (no copy), or the bridge's own forward
    when a tensor is missing."""
    import itertools

    from transformers import AutoModelForCausalLM

    n_layers = model.cfg.n_layers
    with torch.device("meta"):  # no memory, no initialisation: every tensor is assigned below
        plain = AutoModelForCausalLM.from_config(config)
    wanted = list(plain.state_dict())
    if any(name not in tensors for name in wanted):
        return MlpForward(model, n_layers)
    plain.load_state_dict({name: tensors[name] for name in wanted}, strict=True, assign=True)
    for name, buffer in plain.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        if buffer.is_meta and name in tensors:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner)._buffers[attr] = tensors[name]
    if any(t.is_meta for t in itertools.chain(plain.parameters(), plain.buffers())):
        return MlpForward(model, n_layers)
    plain.eval()
    _gelu_new_in_place(plain)
    modules = tuple(plain.get_submodule(p) for p in paths)
    return MlpForward(model, n_layers, plain, modules, reads_input=reads_input)


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's `gelu_new`, `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x³)))`, by the same operations in the same order
    as Hugging Face's `NewGELUActivation` (so the same bits), five of them in place: two new tensors instead of seven,
    which takes a third less time on CPUs. `x` is not changed. Needs no gradient (a pass runs in inference mode)."""
    inner = torch.pow(x, 3.0).mul_(0.044715).add_(x).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
    return torch.mul(x, 0.5).mul_(inner)


def _gelu_new_in_place(plain: Any) -> None:
    """Give the plain model's `NewGELUActivation` modules (GPT-2, GPT-J) the in-place `gelu_new` when no gradient is
    needed."""
    from transformers.activations import NewGELUActivation

    def forward(self: Any, x: Tensor) -> Tensor:
        return NewGELUActivation.forward(self, x) if torch.is_grad_enabled() and x.requires_grad else gelu_new(x)

    for module in plain.modules():
        if type(module) is NewGELUActivation:
            module.forward = forward.__get__(module)


def run_plain(forward: MlpForward, batch: Tensor) -> None:
    """Run `batch` `[batch, pos]` through the plain model's body (no unembedding), until a hook raises
    `StopForward` or the last block ends."""
    try:
        forward.plain.base_model(input_ids=batch, use_cache=False)
    except StopForward:
        pass


def normalized(x: Tensor, rms: bool, eps: float) -> Tensor:
    """A norm's output before its scale and bias, in float32, as the bridge's `hook_normalized`:
    `(x - mean) / sqrt(var + eps)` for LayerNorm, `x / sqrt(mean(x²) + eps)` for RMSNorm. `x` `[..., d]`."""
    x = x.float()
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass(frozen=True)
class Tap:
    """Where the plain model shows one hook's tensor: a module's input or output, normalised or as is."""

    module: Any
    reads_input: bool
    norm: tuple[bool, float] | None = None  # (RMS norm, eps): the module's input, normalised (`normalized`)

    def register(self, fn: Callable[[Tensor], None]) -> Any:
        """Call `fn(tensor)` each time the module runs; returns the handle to remove."""
        if not self.reads_input:
            return self.module.register_forward_hook(lambda module, args, out: fn(out))
        if self.norm is None:
            return self.module.register_forward_pre_hook(lambda module, args: fn(args[0]))
        rms, eps = self.norm
        return self.module.register_forward_pre_hook(lambda module, args: fn(normalized(args[0], rms, eps)))


def plain_taps(forward: MlpForward, layers: Sequence[int], kinds: Sequence[str]) -> dict[tuple[int, str], Tap] | None:
    """`{(layer, kind): Tap}` on the plain model for every layer and kind, or `None` when the plain model is not
    in use or a kind is not in `PLAIN_KINDS` (then the pass runs through the bridge)."""
    if forward.plain is None or any(kind not in PLAIN_KINDS for kind in kinds):
        return None
    from nbutils.models import mlp_norm

    model = forward.model
    names = _hf_names(model.original_model)
    taps: dict[tuple[int, str], Tap] = {}
    for layer in layers:
        for kind in kinds:
            if kind == "post":
                taps[layer, kind] = Tap(forward.act_modules[layer], forward.reads_input)
                continue
            bridge = getattr(model.blocks[layer].mlp, "in", None) if kind == "mlp_in" else mlp_norm(model, layer)
            original = getattr(bridge, "original_component", bridge)
            path = names.get(id(original))
            if path is None:
                return None
            norm = None
            if kind == "ln_normalized":
                eps = next((getattr(original, a) for a in ("eps", "variance_epsilon") if hasattr(original, a)),
                           getattr(model.cfg, "eps", 1e-5))
                norm = (bool(getattr(bridge, "uses_rms_norm", False)), float(eps))
            taps[layer, kind] = Tap(forward.plain.get_submodule(path), True, norm)
    return taps
