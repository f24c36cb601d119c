"""Tests of nbutils.representations: every split sums exactly to the pre-activation; bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbutils import representations, sae


@pytest.fixture(scope="module")
def dictionary() -> sae.SAE:
    s = sae.SAE(16, 64, seed=1)  # hand-built: the invariant holds for any weights
    with torch.no_grad():
        s.b_d.copy_(torch.linspace(-1, 1, 16))
        s.b_e.fill_(-0.5)  # some latents off on every input
    return s


def test_neuron_embedding_sums_to_the_dot_product():
    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(10, 16)), rng.normal(size=16)
    e = representations.neuron_embedding(h, w)
    assert e.shape == (10, 16)
    np.testing.assert_allclose(e.sum(axis=1), h @ w, rtol=1e-12, atol=1e-12)


def test_dictionary_terms_sum_to_the_dot_product(dictionary):
    rng = np.random.default_rng(1)
    h, w = rng.normal(size=(30, 16)), rng.normal(size=16)
    terms = representations.dictionary_terms(h, w, dictionary)
    assert terms.shape == (30, 65)  # one per latent, then the rest
    np.testing.assert_allclose(terms.sum(axis=1), h @ w, rtol=1e-9, atol=1e-9)
    code = representations.dictionary_code(h, dictionary)
    assert code.shape == (30, 64) and (code >= 0).all()
    off = code == 0
    assert off.any() and (terms[:, :-1][off] == 0).all()  # a latent that is off adds nothing
    reads = dictionary.W_d.detach().double().numpy().T @ w  # [64]
    np.testing.assert_allclose(terms[:, :-1], code * reads, rtol=1e-12)
    residual = h - code @ dictionary.W_d.detach().double().numpy().T - dictionary.b_d.detach().double().numpy()
    rest = (dictionary.b_d.detach().double().numpy() + residual) @ w  # what the code does not carry
    np.testing.assert_allclose(terms[:, -1], rest, rtol=1e-9, atol=1e-9)


def test_train_dictionary_reconstructs(dictionary):
    rng = np.random.default_rng(2)
    atoms = rng.normal(size=(8, 16))  # h made of one of 8 atoms at a time, with a little noise
    h = atoms[rng.integers(8, size=2000)] * rng.uniform(1, 2, size=(2000, 1)) + 0.05 * rng.normal(size=(2000, 16))
    learned = representations.train_dictionary(h, expansion=2, steps=600, seed=0)
    assert learned.n_latents == 32 and learned.d_in == 16
    with torch.no_grad():
        x = torch.as_tensor(h, dtype=torch.float32)
        fvu = float(((learned(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 0.2, fvu  # a sparse code of one-atom inputs; measured 0.005


def test_dictionaries_in_workers_are_the_ones_trained_alone():
    rng = np.random.default_rng(3)
    hs = [rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) * 2.0, rng.normal(size=(250, 8)) + 1.0]
    alone = [representations.train_dictionary(h, expansion=2, steps=60, seed=4) for h in hs]
    together = representations.train_dictionaries(hs, expansion=2, steps=60, seed=4, workers=2)
    for a, b in zip(alone, together):
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), name
    with pytest.raises(ValueError, match=r"hs\[1\]"):
        representations.train_dictionaries([hs[0], np.zeros(8)], workers=1)


def test_representation_errors(dictionary):
    h = np.zeros((4, 16))
    with pytest.raises(ValueError, match=r"`w` must be one weight per column of `h`, shape \(16,\); got shape \(3,\)"):
        representations.neuron_embedding(h, np.ones(3))
    with pytest.raises(ValueError, match=r"`h` must be 2-D \[n, d\]; got shape \(16,\)"):
        representations.dictionary_code(np.zeros(16), dictionary)
    with pytest.raises(ValueError, match=r"`sae` must read vectors of the width of `h` \(8\); got an SAE of d_in 16"):
        representations.dictionary_terms(np.zeros((4, 8)), np.ones(8), dictionary)
    with pytest.raises(TypeError, match="`sae` must be an nbutils.sae.SAE; got dict"):
        representations.dictionary_code(h, {})
    with pytest.raises(ValueError, match=r"`expansion` must be in 1..1024; got 0"):
        representations.train_dictionary(h, expansion=0)


def test_dictionary_l1_keeps_the_loss_balance_of_the_reference_at_any_scale_and_width():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(400, 128)) + 5.0  # centred RMS about 1 at the reference width: DICTIONARY_L1 itself
    assert representations.dictionary_l1(h) == pytest.approx(representations.DICTIONARY_L1, rel=0.03)
    assert representations.dictionary_l1(0.3 * h) == pytest.approx(0.3 * representations.dictionary_l1(h))
    wide = rng.normal(size=(400, 512))
    assert representations.dictionary_l1(wide) == pytest.approx(representations.dictionary_l1(h) * 128 / 512, rel=0.03)
    # why: h scaled by s with the decoder bias and the code scaled alike scales the loss by s² at the weight s·λ
    # (the squared error is a mean over dimensions, the L1 a sum over latents), so the same dictionary is optimal
    s, lam, model = 0.3, 0.01, sae.SAE(128, 256, seed=0)
    x = torch.as_tensor(h[:64], dtype=torch.float32)
    with torch.no_grad():
        f = model.encode(x)
        loss = torch.nn.functional.mse_loss(model.decode(f), x) + lam * f.sum() / len(x)
        model.b_d.mul_(s)
        scaled = torch.nn.functional.mse_loss(model.decode(s * f), s * x) + s * lam * (s * f).sum() / len(x)
    assert float(scaled) == pytest.approx(s**2 * float(loss), rel=1e-5)


def test_train_dictionary_takes_the_scaled_l1_by_default():
    h = np.random.default_rng(4).normal(size=(200, 8)) * 0.5
    trained = representations.train_dictionary(h, expansion=2, steps=5, seed=0)
    assert trained.config.l1_coef == pytest.approx(representations.dictionary_l1(h))
    with pytest.raises(ValueError, match="`l1_coef` must be"):
        representations.train_dictionary(h, l1_coef=-1.0, steps=5)
