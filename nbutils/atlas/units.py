"""What the build reads for one layer's units: the MLP's neurons, or the latents of a sparse dictionary.

Per unit kind, the build needs where the embedding's input vector is read and how (`h`: the norm's output for
neurons; the dictionary's encoder input `u` for latents), the weight columns and bias that the embedding multiplies and
sums to (`weights`), and where the activation that ranks examples is read and how (`act`: `hook_post` for neurons;
the dictionary's encode of its hook's vector for latents). A dictionary covers one layer: the block of its hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from nbutils import embeddings

__all__ = ["Units", "NEURONS"]


@dataclass(frozen=True)
class Units:
    """The units of an atlas: the MLP's neurons (`dictionary=None`) or a `dictionary.Dictionary`'s latents."""

    dictionary: Any = None

    def count(self, model: Any) -> int:
        """Units per layer: `d_mlp`, or the dictionary's `d_sae`."""
        return int(model.cfg.d_mlp) if self.dictionary is None else self.dictionary.d_sae

    def d_in(self, model: Any) -> int:
        """Length of the embedding: `d_model`, or the dictionary's `d_in`."""
        return int(model.cfg.d_model) if self.dictionary is None else self.dictionary.d_in

    def kinds(self, model: Any, fold_ln: bool) -> tuple[str, str]:
        """The hooks (`models.hook_name` kinds) of the input vector and of the activation; one for latents."""
        if self.dictionary is None:
            return ("ln_normalized" if fold_ln else "mlp_in"), "post"
        from nbutils.dictionary import attach

        _, kind = attach(model, self.dictionary)
        return kind, kind

    def h(self, t: Tensor) -> Tensor:
        """The embedding's input vector from the first hook's tensor `[..., d]`."""
        return t if self.dictionary is None else self.dictionary.encoder_input(t.float())

    def act(self, t: Tensor) -> Tensor:
        """The units' activations `[..., n_units]` from the second hook's tensor."""
        return t if self.dictionary is None else self.dictionary.encode(t.float())

    def weights(self, model: Any, layer: int, fold_ln: bool) -> tuple[np.ndarray, np.ndarray]:
        """`W [d_in, n_units]` and `b [n_units]` (float64): `h ⊙ W[:, j]` sums, plus `b[j]`, to unit j's
        pre-activation (for latents: `W_enc` and `b_enc`, or `b_gate` for a gated SAE)."""
        if self.dictionary is None:
            W, b = embeddings.mlp_in_weights(model, layer, fold_ln=fold_ln)
        else:
            W, b = self.dictionary.W_enc, self.dictionary.bias
        return W.numpy().astype(np.float64), b.numpy().astype(np.float64)


NEURONS = Units()
