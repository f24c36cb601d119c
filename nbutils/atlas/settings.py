"""What an atlas's content depends on (`AtlasSettings`), the table of one layer's step, and the format's constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from nbutils import activations, clustering
from nbutils._validation import check_choice, check_int_range

__all__ = ["FORMAT", "TABLES", "TEXT_CONTEXT", "CROSS_MEMBERS", "LABEL_TOKENS", "AtlasSettings", "key_settings",
           "LayerTables"]

FORMAT = 2  # bump when a table changes meaning (2: band samples per layer)
TABLES = ("neurons", "examples", "contexts", "features", "similar", "windows", "vocab", "top")
TEXT_CONTEXT = 12  # tokens of text stored per example, ending at the activating token
CROSS_MEMBERS = 16  # examples of a feature on which a similar feature's neuron is run
LABEL_TOKENS = 3  # tokens named in a label


@dataclass(frozen=True)
class AtlasSettings:
    """Everything that changes an atlas's content (part of its key, saved in its manifest).

    Attributes:
        k, frac, batch_size: the collection (`activations.CollectSettings`).
        method, threshold: the clustering (`clustering.cluster`); `None` resolves to the defaults.
        space: what each neuron's examples are clustered as (`clustering.SPACES`): `"embedding"`, the neuron
            embedding `h ⊙ w` (default), or `"h"`, the pre-MLP vector. The features' vectors (and so the similar
            features) are in the same space.
        fold_ln: LayerNorm convention of the embeddings (`embeddings`).
        min_size: smallest cluster that is a feature.
        n_similar: similar features kept per feature.
        shown: examples per cluster tab whose context activations are stored (central first, then by act).
        before, after: tokens of stored context before and after the activating token.
        bands, per_band: examples below the top: `per_band` tokens sampled in each of `bands` equal-width
            activation bands of (0, max] of every neuron (`bands.collect_band_samples`); `bands=0` skips them.
    """

    k: int = 128
    frac: float = 0.75
    batch_size: int = 64
    method: str | None = None
    threshold: float | int | None = None
    space: str = "embedding"
    fold_ln: bool = True
    min_size: int = 3
    n_similar: int = 5
    shown: int = 20
    before: int = 20
    after: int = 10
    bands: int = 10
    per_band: int = 8

    def __post_init__(self) -> None:
        activations.CollectSettings(k=self.k, frac=self.frac, batch_size=self.batch_size)  # checks them
        method = check_choice("method", clustering.DEFAULT_METHOD if self.method is None else self.method,
                              clustering.METHODS)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "threshold", clustering._check_threshold(method, self.threshold))
        check_choice("space", self.space, clustering.SPACES)
        if not isinstance(self.fold_ln, bool):
            raise TypeError(f"`fold_ln` must be True or False; got {self.fold_ln!r}.")
        check_int_range("min_size", self.min_size, 1, 10**6)
        check_int_range("n_similar", self.n_similar, 1, 1000)
        check_int_range("shown", self.shown, 1, 10**6)
        check_int_range("before", self.before, 0, 10**6)
        check_int_range("after", self.after, 0, 10**6)
        check_int_range("bands", self.bands, 0, 1000, what="(0: no band samples)")
        check_int_range("per_band", self.per_band, 1, 100_000)


def key_settings(settings: AtlasSettings) -> dict:
    """The settings as they enter an atlas's key: every field, except `space` at its default, so atlases built
    before `space` existed keep their keys."""
    out = asdict(settings)
    if out["space"] == "embedding":
        del out["space"]
    return out


@dataclass
class LayerTables:
    """The `clusters` step of one layer: plain tables, picklable (a remote worker can return it)."""

    layer: int
    neurons: pd.DataFrame
    examples: pd.DataFrame
    contexts: pd.DataFrame
    vectors: pd.DataFrame
    bands: pd.DataFrame | None = None
