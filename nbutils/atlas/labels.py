"""Token text and readable labels: what the examples of a neuron or a feature share."""

from __future__ import annotations

import json
from typing import Any, Iterable

import pandas as pd

from nbutils.atlas.settings import LABEL_TOKENS

__all__ = ["vocab_of", "decode_texts", "token_labels", "token_label"]


def vocab_of(model: Any) -> list[str]:
    """The text of every token id (decoded one at a time, as `to_str_tokens` shows them); cached on the model."""
    cached = getattr(model, "_nbutils_vocab", None)
    if cached is None:
        tokenizer = model.tokenizer
        cached = decode_texts(tokenizer, [[i] for i in range(model.cfg.d_vocab)])
        try:
            model._nbutils_vocab = cached
        except AttributeError:
            pass
    return cached


def decode_texts(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    """`tokenizer.batch_decode(ids)`, by the fast tokenizer's own batch decoder when that is the same (no clean-up
    of spaces to apply): several times faster on hundreds of thousands of short texts."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.batch_decode(ids)
    return backend.decode_batch(ids, skip_special_tokens=False)


def _show(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)  # quotes make leading spaces and newlines visible


def token_labels(table: pd.DataFrame, keys: list[str], *, n: int = LABEL_TOKENS) -> pd.Series:
    """`token_label` of every group of `table` (rows with a `token` column) grouped by `keys`, vectorised."""
    counts = table.groupby(keys + ["token"], sort=False).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby(keys)["count"].transform("sum")
    counts = counts.sort_values(keys + ["count", "token"], ascending=[True] * len(keys) + [False, True], kind="stable")
    top = counts.groupby(keys, sort=False).head(n)
    parts = top["token"].map(_show) + " " + (100 * top["share"]).map("{:.0f}%".format)
    return parts.groupby([top[k] for k in keys], sort=True).agg(" · ".join)


def token_label(tokens: Iterable[str], *, n: int = LABEL_TOKENS) -> str:
    """A short summary of what examples share: their most common activating tokens with their shares.

    `token_label([" the", " the", " a"])` is `'" the" 67% · " a" 33%'`; empty input gives `""`.
    """
    table = pd.DataFrame({"group": 0, "token": pd.Series(list(tokens), dtype=object)})
    labels = token_labels(table, ["group"], n=n)
    return str(labels.iloc[0]) if len(labels) else ""
