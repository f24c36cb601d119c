"""Offline corpus and token windows."""

from __future__ import annotations

import pytest
import torch

from nbutils import _env, data


def test_windows_are_deterministic_and_shaped(model):
    a = data.corpus_windows(model, n_windows=20, window=16)
    b = data.corpus_windows(model, n_windows=20, window=16)
    assert a.shape == (20, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    # the first windows of a longer request are the same windows
    assert torch.equal(data.corpus_windows(model, n_windows=40, window=16)[:20], a)


def test_splits_do_not_overlap():
    train = set(data._split_documents(data.OFFLINE_SOURCE, "train"))
    heldout = set(data._split_documents(data.OFFLINE_SOURCE, "heldout"))
    assert heldout and train
    assert not train & heldout, "a document is both in the train and the held-out split"
    share = len(heldout) / (len(train) + len(heldout))
    assert abs(share - data.HELDOUT_SHARE) < 0.01


def test_corpus_is_real_english_text():
    docs = data.corpus_documents()
    n_chars = sum(map(len, docs))
    assert len(docs) > 10_000 and n_chars > 3_000_000
    joined = " ".join(docs[:500]).lower()
    for word in (" the ", " and ", " of "):
        assert word in joined


def test_tokenizer_round_trips_text(model):
    text = "Murphy's law: anything that can go wrong, will — even in `print(x)`.\n\tTabs & ünïcode."
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    assert model.tokenizer.decode(ids) == text
    windows = data.corpus_windows(model, n_windows=3, window=16)
    texts = data.windows_to_text(model, windows)
    assert [model.tokenizer.encode(t, add_special_tokens=False) for t in texts] != []
    assert all(isinstance(t, str) and t for t in texts)


def test_too_many_windows_says_how_many(model):
    available = len(data.corpus_tokens(model, "heldout")) // 64
    with pytest.raises(ValueError, match=rf"`n_windows` must be at most {available} for split 'heldout'"):
        data.corpus_windows(model, n_windows=available + 1, window=64, split="heldout")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_windows": 0}, r"`n_windows` must be a positive integer"),
        ({"n_windows": 2, "window": 1000}, r"`window` must be in 2\.\.64"),
        ({"n_windows": 2, "split": "test"}, r"`split` must be one of 'train', 'heldout'"),
        ({"n_windows": 2, "source": "nonsense"}, r"`source` must be 'offline'"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.corpus_windows(model, **kwargs)


def test_web_source_offline_names_the_default(model, monkeypatch):
    monkeypatch.setattr(_env, "hub_reachable", lambda timeout=3.0: False)
    data.corpus_documents.cache_clear()
    with pytest.raises(ConnectionError, match=r"not reachable.*source='offline'"):
        data.corpus_windows(model, n_windows=2, source="pile-10k")


def test_dataset_loading_path_on_a_local_dataset(model, tmp_path):
    """The web-text code path (datasets, `text` column, fixed shuffle), fed a local folder instead of the hub."""
    import json

    texts = [f"Document number {i} says hello to the reader of the neuron." for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    docs = data.corpus_documents(str(tmp_path))
    assert sorted(docs) == sorted(texts)
    assert list(docs) != texts  # shuffled with the fixed seed
    windows = data.corpus_windows(model, n_windows=4, window=16, source=str(tmp_path))
    assert windows.shape == (4, 16)
    assert "Document number" in data.windows_to_text(model, windows)[0] + data.windows_to_text(model, windows)[1]


def test_source_from_environment(model, monkeypatch):
    monkeypatch.setenv("NBUTILS_SOURCE", "nonsense")
    with pytest.raises(ValueError, match=r"`source` must be 'offline'"):
        data.corpus_windows(model, n_windows=2)
