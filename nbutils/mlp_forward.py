"""How batches run up to the MLP activations: through a plain Hugging Face model that shares the bridge's parameters,
or through the bridge's own hooks.

The plain model (same tensors, so edits to the bridge's weights are seen) skips the bridge's per-hook-point work
(its LayerNorm and attention re-implementations). Its activation modules are found per family: the output of
the MLP's activation module for GPT-2 (`HF_MLP_ACT`), the input of the down projection for every other family
(`down_projection_paths`). Both give the bridge's `hook_post` (tested per family). When the plain model cannot be
rebuilt from the bridge's parameters, `mlp_forward` falls back to the bridge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["HF_MLP_ACT", "MlpForward", "down_projection_paths", "mlp_forward"]

# The Hugging Face module whose output is the bridge's `hook_post` (the neuron activation), per model type. Other
# families read the input of the MLP's down projection (`down_projection_paths`), which is the same tensor.
HF_MLP_ACT = {"gpt2": "transformer.h.{layer}.mlp.act"}


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


def down_projection_paths(model: Any, inner: Any) -> list[str] | None:
    """Hugging Face module path of each layer's MLP down projection (the bridge's `blocks[l].mlp.out`), whose
    input is the neuron activation; `None` if the bridge does not expose one."""
    names = {id(module): name.replace("._original_component", "") for name, module in inner.named_modules()}
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

    from transformers import AutoModelForCausalLM

    tensors: dict[str, Tensor] = {}  # the bridge's parameters under their Hugging Face names
    for name, t in itertools.chain(inner.named_parameters(remove_duplicate=False),
                                   inner.named_buffers(remove_duplicate=False)):
        tensors.setdefault(name.replace("._original_component", ""), t)
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
    modules = tuple(plain.get_submodule(p) for p in paths)
    return MlpForward(model, n_layers, plain, modules, reads_input=path is None)
