"""The streaming top-k of highly activating examples: order keys and the merge of candidates into a running state.

A slot of the state is an int64 *order key* (activation, then lower window id; `order_key`) and a position. The
state of `n_neurons` neurons is (key, pos) `[n_neurons, k]`, kept unsorted while candidates stream in and sorted
once at the end (`sorted_state`). Keys are unique, so the result does not depend on the order windows arrive in,
and two shards merge with the same operation. `nbutils.activations` runs the model and feeds the merge.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["EMPTY", "NO_WINDOW", "decode_key", "empty_state", "merge_topk", "order_key", "sorted_state"]

NO_WINDOW = -1  # window id of an empty slot (fewer windows seen than k)
EMPTY = torch.iinfo(torch.int64).min  # order key of an empty slot: below every real one


def order_key(act: Float[Tensor, "*shape"], window: Int[Tensor, "*shape"]) -> Int[Tensor, "*shape"]:
    """An int64 key ordering slots by act (desc) then window id (asc); empty slots (window -1) lowest.

    The float32 bits are mapped to integers of the same order and shifted into the high 32 bits; the
    inverted window id fills the low 32 bits. Keys are unique (a window gives a neuron one candidate), so
    `topk` over them has no ties and the result does not depend on the order windows arrive in.
    """
    bits = act.float().contiguous().view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # same order as the floats
    key = (bits.long() << 32) | (0xFFFFFFFF - window.clamp(min=0))
    return key.masked_fill(window < 0, EMPTY)


def decode_key(key: Int[Tensor, "*shape"]) -> tuple[Float[Tensor, "*shape"], Int[Tensor, "*shape"]]:
    """Invert `order_key`: (act, window), with (-inf, -1) for empty slots."""
    bits = (key >> 32).to(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # the mapping is its own inverse
    act = bits.view(torch.float32).clone()
    window = 0xFFFFFFFF - (key & 0xFFFFFFFF)
    empty = key == EMPTY
    return act.masked_fill(empty, float("-inf")), window.masked_fill(empty, NO_WINDOW)


def merge_topk(state: tuple[Tensor, Tensor], candidates: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Merge candidates into the running top-k, in place: one `topk` over the concatenated slots.

    Args:
        state: (key, pos) `[n_neurons, k]`, the running top-k of each neuron (unsorted).
        candidates: (key, pos) `[n_neurons, batch]`.

    Only the neurons with a candidate above their current k-th key take part: late in a long corpus most
    batches change few neurons.
    """
    key, pos = state
    cand_key, cand_pos = candidates
    enters = (cand_key > key.amin(dim=-1, keepdim=True)).any(dim=-1)  # [n_neurons]
    rows = torch.nonzero(enters).reshape(-1)
    if rows.numel() == 0:
        return state
    if rows.numel() == key.shape[0]:
        rows = slice(None)  # every neuron: no gather needed
    both_key = torch.cat([key[rows], cand_key[rows]], dim=-1)  # [n_rows, k + batch]
    both_pos = torch.cat([pos[rows], cand_pos[rows]], dim=-1)  # [n_rows, k + batch]
    top_key, idx = torch.topk(both_key, k=k, dim=-1, sorted=False)
    key[rows] = top_key
    pos[rows] = both_pos.gather(-1, idx)
    return state


def empty_state(n_neurons: int, k: int, device: Any) -> tuple[Tensor, Tensor]:
    """(key, pos) `[n_neurons, k]` with every slot empty."""
    return (torch.full((n_neurons, k), EMPTY, dtype=torch.long, device=device),
            torch.zeros((n_neurons, k), dtype=torch.int32, device=device))


def sorted_state(key: Tensor, pos: Tensor, n_layers: int) -> tuple[Tensor, Tensor, Tensor]:
    """(act, window, pos) `[n_layers, d_mlp, k]` on the CPU, each neuron's slots highest first."""
    key, order = key.cpu().sort(dim=-1, descending=True)
    pos = pos.cpu().gather(-1, order).long()
    act, window = decode_key(key)
    return tuple(t.reshape(n_layers, -1, t.shape[-1]) for t in (act, window, pos))  # type: ignore[return-value]
