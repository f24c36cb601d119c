"""Sparse autoencoders with an optional neuron-monosemanticity term computed from neuron embeddings.

The SAE reads activations `x` `[batch, d_in]`:

    f = relu(W_e (x - b_d) + b_e)        # [batch, n_latents]
    x̂ = W_d f + b_d                      # [batch, d_in], columns of W_d kept at unit norm

Loss = MSE(x, x̂) + l1_coef · mean_batch Σ_k f_k + mono_coef · (1 - mono), where `mono` is computed from
the SAE neuron embeddings `e_k(x) = (x - b_d) ⊙ W_e[k]` — the neuron-embedding idea one level up:
`e_k(x).sum() + b_e[k]` is latent k's pre-activation on x (tested).

Monosemanticity of latent k on a batch with weights w_ik ≥ 0 is the weighted mean pairwise cosine
similarity of its embeddings, computed without forming the `[batch, n_latents, d_in]` tensor:

    u_ik = e_k(x_i) / |e_k(x_i)|,   S_k = Σ_i w_ik u_ik
    mono_k = (|S_k|² - Σ_i w_ik²) / ((Σ_i w_ik)² - Σ_i w_ik²)        # Σ_{i≠j} w_i w_j cos_ij / Σ_{i≠j} w_i w_j

`MONO_FORMS` are the batch forms of the term that were measured (numbers: notebook 04, offline MNIST,
standard SAE at l1_coef 0.05: 19.5% dead latents, mono 0.44, L0 12.6):

- `"active"`: w = f, so only inputs where a latent is active count; a dead latent gets no gradient.
  Raised mono but also the dead fraction (λm 0.1 / 1: 27% / 68% dead).
- `"soft"`: w = softplus(pre-activation): every input counts a little, so inactive latents feel the term.
  Still a normalised mean, unchanged when all of a latent's weights scale together. More dead (82% at λm 1).
- `"topk"`: the `mono_topk` inputs of the batch with the highest pre-activation, equal weights, whether or
  not the latent fires on them (mirrors "a neuron's top examples" for language models). More dead (60% at λm 1).
- `"active_mass"`: w = f, pair sum divided by the number of pairs batch·(batch-1) instead of by
  Σ w_i w_j. Little effect at λm 1 (19.9% dead), mostly dead at λm 10 (90%).
- `"soft_mass"` (default): softplus weights with the pair sum divided by the number of pairs. The term
  grows with the activation mass a latent puts on inputs whose embeddings agree, so it pushes
  pre-activations *up* on inputs that agree with the rest — also for latents that are inactive on the
  batch. The only form that cut dead latents (λm 1 / 3: 5.5% / 0.4%) and made codes denser (L0 13 / 36),
  the paper's direction.

A normalised form rewards a latent for firing on fewer, more alike inputs, and the surest way to have
no disagreeing pair is to fire on nothing; a mass form rewards firing on many alike inputs.

`mono` in the loss is the mean of `mono_k` over latents where it is defined (for normalised forms: latents
with weight on at least two inputs). The term switches on after `mono_start` steps.

Training runs on one thread (`single_thread`): at these sizes torch's threads cost more than they save.
`train_saes_on` trains several SAEs at once, one process per core, with results identical to one by one.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from nbutils import _env
from nbutils._validation import check_choice, check_float_range, check_int_range, fail

__all__ = [
    "MONO_FORMS",
    "SAEConfig",
    "SAE",
    "mono_weights",
    "batch_monosemanticity",
    "encoder_participation",
    "train_sae_on",
    "train_saes_on",
    "single_thread",
    "one_thread",
]

MONO_FORMS = ("active", "soft", "topk", "active_mass", "soft_mass")
MonoForm = Literal["active", "soft", "topk", "active_mass", "soft_mass"]
MASS_FORMS = ("active_mass", "soft_mass")  # divided by the number of pairs, not by Σ w_i w_j
_EPS = 1e-8


@dataclass(frozen=True)
class SAEConfig:
    """Settings of one SAE training run.

    Attributes:
        n_latents: dictionary size (8× a 64-d input = 512).
        l1_coef: λ1, weight of the L1 penalty (mean over the batch of Σ_k f_k).
        mono_coef: λm, weight of `1 - mono`; 0 gives the standard SAE.
        mono_form: batch form of the monosemanticity term, one of `MONO_FORMS` (module docstring).
        mono_topk: inputs per latent for `mono_form="topk"`.
        mono_start: training steps before the monosemanticity term switches on.
        steps: optimiser steps.
        batch_size: inputs per step (sampled with replacement from the training activations).
        lr: Adam learning rate.
        seed: seeds initialisation and batch sampling.
    """

    n_latents: int = 512
    l1_coef: float = 0.05
    mono_coef: float = 0.0
    mono_form: MonoForm = "soft_mass"
    mono_topk: int = 16
    mono_start: int = 200
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int_range("n_latents", self.n_latents, 1, 1 << 20)
        check_float_range("l1_coef", self.l1_coef, 0.0, float("inf"), high_open=True)
        check_float_range("mono_coef", self.mono_coef, 0.0, float("inf"), high_open=True)
        check_choice("mono_form", self.mono_form, MONO_FORMS)
        check_int_range("mono_topk", self.mono_topk, 2, 1 << 20)
        check_int_range("mono_start", self.mono_start, 0, 1 << 30)
        check_int_range("steps", self.steps, 1, 1 << 30)
        check_int_range("batch_size", self.batch_size, 2, 1 << 20)
        check_float_range("lr", self.lr, 0.0, 1.0, low_open=True)
        check_int_range("seed", self.seed, 0, 2**32 - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class SAE(nn.Module):
    """A ReLU sparse autoencoder with unit-norm decoder columns.

    Attributes:
        W_e: encoder `[n_latents, d_in]` (row k reads latent k).
        b_e: encoder bias `[n_latents]`.
        W_d: decoder `[d_in, n_latents]` (column k writes latent k; unit norm).
        b_d: decoder bias `[d_in]`, subtracted before encoding.
        source: fingerprint of the model whose activations it was trained on ("" if none).
        config: the `SAEConfig` it was trained with (None for a hand-built SAE).
        history: per-step training losses (dict of lists), empty for a hand-built SAE.
        train_seconds: wall-clock training time (0 for a hand-built SAE).
    """

    def __init__(self, d_in: int, n_latents: int, *, seed: int = 0) -> None:
        super().__init__()
        check_int_range("d_in", d_in, 1, 1 << 20)
        check_int_range("n_latents", n_latents, 1, 1 << 20)
        gen = torch.Generator().manual_seed(seed)
        W_d = torch.randn(d_in, n_latents, generator=gen)  # [d_in, n_latents]
        W_d = W_d / W_d.norm(dim=0, keepdim=True)
        self.W_e = nn.Parameter(W_d.T.clone())  # [n_latents, d_in]
        self.b_e = nn.Parameter(torch.zeros(n_latents))
        self.W_d = nn.Parameter(W_d)
        self.b_d = nn.Parameter(torch.zeros(d_in))
        self.source = ""
        self.config: SAEConfig | None = None
        self.history: dict[str, list[float]] = {}
        self.train_seconds = 0.0

    @property
    def d_in(self) -> int:
        return self.W_e.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_e.shape[0]

    def pre(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_latents"]:
        """Latent pre-activations `W_e (x - b_d) + b_e`."""
        return torch.addmm(self.b_e, x - self.b_d, self.W_e.T)

    def encode(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_latents"]:
        """Latent activations `f = relu(pre(x))`."""
        return F.relu(self.pre(x))

    def decode(self, f: Float[Tensor, "batch n_latents"]) -> Float[Tensor, "batch d_in"]:
        """Reconstruction `W_d f + b_d`."""
        return torch.addmm(self.b_d, f, self.W_d.T)

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_in"]:
        return self.decode(self.encode(x))

    def embeddings(self, x: Float[Tensor, "batch d_in"], latent: int) -> Float[Tensor, "batch d_in"]:
        """SAE neuron embeddings `(x - b_d) ⊙ W_e[latent]`; their sum plus `b_e[latent]` is the pre-activation."""
        latent = check_int_range("latent", latent, 0, self.n_latents - 1, what=f"for this SAE ({self.n_latents} latents)")
        return (x - self.b_d) * self.W_e[latent]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder columns to unit norm."""
        self.W_d.div_(self.W_d.norm(dim=0, keepdim=True).clamp_min(_EPS))


def mono_weights(
    pre: Float[Tensor, "batch n_latents"], form: MonoForm, *, topk: int = 16
) -> Float[Tensor, "batch n_latents"]:
    """The per-input weights w_ik of the monosemanticity term for each form (module docstring)."""
    check_choice("form", form, MONO_FORMS)
    if form in ("active", "active_mass"):
        return F.relu(pre)
    if form in ("soft", "soft_mass"):
        return F.softplus(pre)
    k = min(topk, pre.shape[0])
    idx = pre.topk(k, dim=0).indices  # [k, n_latents]
    return torch.zeros_like(pre).scatter_(0, idx, 1.0)


def batch_monosemanticity(
    sae: SAE,
    x: Float[Tensor, "batch d_in"],
    weights: Float[Tensor, "batch n_latents"],
    *,
    normalize: bool = True,
) -> Float[Tensor, "n_latents"]:
    """Weighted mean pairwise cosine similarity of each latent's embeddings over the batch.

    Args:
        sae: the autoencoder (its `W_e`, `b_d` define the embeddings).
        x: inputs `[batch, d_in]`.
        weights: w_ik ≥ 0 `[batch, n_latents]` (`mono_weights`).
        normalize: divide the weighted pair sum by Σ_{i≠j} w_i w_j (a weighted mean, in [-1, 1]; NaN for a
            latent with weight on fewer than two inputs) rather than by the number of pairs batch·(batch-1).

    Returns:
        `[n_latents]`: monosemanticity of each latent.
    """
    c = x - sae.b_d  # [batch, d_in]
    sq_norms = (c * c) @ (sae.W_e * sae.W_e).T  # [batch, n_latents] = |e_k(x_i)|²
    a = weights * torch.rsqrt(sq_norms + _EPS * _EPS)  # w_ik / |e_k(x_i)| (0 for a zero embedding with w = 0)
    S = sae.W_e * (a.T @ c)  # [n_latents, d_in] = Σ_i w_ik u_ik
    # |S|² counts every pair twice and each input once with w_ik² |u_ik|² (|u_ik| = 1, or 0 for a zero embedding)
    pair_sum = (S * S).sum(-1) - (a * a * sq_norms).sum(0)  # Σ_{i≠j} w_i w_j cos_ij
    if not normalize:
        n = x.shape[0]
        return pair_sum / (n * (n - 1))
    total = weights.sum(0)
    denom = total * total - (weights * weights).sum(0)  # Σ_{i≠j} w_i w_j
    defined = denom > 1e-6 * (total * total).clamp_min(_EPS)
    return torch.where(defined, pair_sum / denom.clamp_min(_EPS), torch.full_like(denom, float("nan")))


_THREAD_DEPTH = [0]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch and the BLAS libraries numpy uses on one thread inside the block (restored after).

    The matrices here are small: threads cost more than they save, and far more on a busy machine
    (a 64 × 784 similarity matrix took 40× longer with two OpenBLAS threads under load). Nested use is free.
    """
    if _THREAD_DEPTH[0]:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _THREAD_DEPTH[0] += 1
    try:
        with threadpool_limits(1):
            yield
    finally:
        _THREAD_DEPTH[0] -= 1
        torch.set_num_threads(before)


def one_thread(fn):
    """Decorator: run `fn` inside `single_thread()`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper


def encoder_participation(sae: SAE) -> Float[Tensor, "n_latents"]:
    """How many input dimensions each latent reads: participation ratio (Σ_d W_e[k,d]²)² / Σ_d W_e[k,d]⁴.

    1 for a row on one axis, d_in for a row spread evenly. An embedding `(x - b_d) ⊙ W_e[k]` that lives on
    a few axes has high cosine similarity between any two inputs, whatever they show.
    """
    p = sae.W_e.detach() ** 2  # [n_latents, d_in]
    return p.sum(1) ** 2 / (p * p).sum(1).clamp_min(_EPS)


def _check_activations(name: str, x: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    if x.ndim != 2:
        fail(name, "be 2-D [n, d_in]", f"shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        fail(name, "have at least 2 rows", x.shape[0])
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).sum())
        fail(name, "be finite", f"{bad} rows with NaN or inf", "Drop or fix those rows first.")
    return x


def train_sae_on(
    x: Float[Tensor, "n d_in"], config: SAEConfig = SAEConfig(), *, progress: bool = True
) -> SAE:
    """Train an SAE on activations `x` with Adam (decoder columns renormalised after every step).

    Args:
        x: training activations `[n, d_in]`, finite.
        config: settings (`SAEConfig`); `mono_coef > 0` adds the monosemanticity term.
        progress: show a tqdm bar.

    Returns:
        The trained `SAE` (eval mode) with `config`, `history` (per-step `mse`, `l1`, `mono`, `l0`) and
        `train_seconds`.
    """
    x = _check_activations("x", x)
    gen = torch.Generator().manual_seed(config.seed)
    sae = SAE(x.shape[1], config.n_latents, seed=config.seed)
    with torch.no_grad():
        sae.b_d.copy_(x.mean(0))
    sae.config = config
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    history: dict[str, list[float]] = {"mse": [], "l1": [], "mono": [], "l0": []}
    start = time.perf_counter()
    with single_thread():
        _train_loop(sae, x, config, opt, gen, history, progress)
    sae.train_seconds = time.perf_counter() - start
    sae.history = history
    return sae.eval()


def _train_loop(sae, x, config, opt, gen, history, progress) -> None:
    normalize = config.mono_form not in MASS_FORMS
    batch_size = config.batch_size
    for step in tqdm(range(config.steps), desc="SAE", disable=not progress):
        batch = x[torch.randint(0, x.shape[0], (batch_size,), generator=gen)]  # [batch, d_in]
        pre = sae.pre(batch)  # [batch, n_latents]
        f = F.relu(pre)
        mse = F.mse_loss(sae.decode(f), batch)
        l1 = f.sum() / batch_size  # mean over the batch of Σ_k f_k
        loss = mse + config.l1_coef * l1
        mono_value = float("nan")
        if config.mono_coef > 0 and step >= config.mono_start:
            w = mono_weights(pre, config.mono_form, topk=config.mono_topk)
            mono_k = batch_monosemanticity(sae, batch, w, normalize=normalize)
            mono = mono_k[~torch.isnan(mono_k)].mean() if (~torch.isnan(mono_k)).any() else pre.sum() * 0
            loss = loss + config.mono_coef * (1 - mono)
            mono_value = float(mono.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        history["mse"].append(float(mse.detach()))
        history["l1"].append(float(l1.detach()))
        history["mono"].append(mono_value)
        history["l0"].append(int(f.bool().sum()) / batch_size)  # f ≥ 0: active = nonzero



def _train_state(index: int, x: np.ndarray, config: SAEConfig) -> tuple[int, dict[str, np.ndarray], dict[str, list[float]], float]:
    """Worker of `train_saes_on`: train one SAE quietly; return its index, weights, history and seconds (plain data)."""
    sae = train_sae_on(torch.from_numpy(x), config, progress=False)
    return index, {k: v.detach().numpy() for k, v in sae.state_dict().items()}, sae.history, sae.train_seconds


def _from_state(config: SAEConfig, state: dict[str, np.ndarray], history: dict[str, list[float]], seconds: float) -> SAE:
    d_in = state["W_e"].shape[1]
    sae = SAE(d_in, config.n_latents, seed=config.seed)
    sae.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    sae.config, sae.history, sae.train_seconds = config, history, seconds
    return sae.eval()


def train_saes_on(
    x: Float[Tensor, "n d_in"] | Sequence[Float[Tensor, "n d_in"]],
    configs: Sequence[SAEConfig],
    *,
    workers: int | None = None,
    progress: bool = True,
) -> list[SAE]:
    """Train one SAE per config, `workers` at a time in separate processes.

    Every run is seeded and single-threaded, so each SAE is the one `train_sae_on(x, config)` gives (tested);
    separate processes put every core to work without the per-operation cost of threads on small matrices.
    Runs with the monosemanticity term (about twice the cost per step) start first.

    Args:
        x: training activations `[n, d_in]`, finite: the same for every config, or a list with one per config
            (e.g. one per layer).
        configs: one `SAEConfig` per SAE.
        workers: processes; `None` = one per available core, at most one per config; 1 = in this process.
        progress: show a tqdm bar over finished SAEs.

    Returns:
        The trained SAEs in the order of `configs` (as `train_sae_on` returns them).
    """
    configs = list(configs)
    if isinstance(x, (list, tuple)):
        if len(x) != len(configs):
            fail("x", "hold one activation matrix per config", f"{len(x)} matrices for {len(configs)} configs")
        xs = [_check_activations(f"x[{i}]", xi) for i, xi in enumerate(x)]
    else:
        xs = [_check_activations("x", x)] * len(configs)
    for i, config in enumerate(configs):
        if not isinstance(config, SAEConfig):
            raise TypeError(f"`configs` must hold nbutils.sae.SAEConfig objects; got {type(config).__name__} at position {i}.")
    if not configs:
        return []
    workers = min(_env.available_cores() if workers is None else check_int_range("workers", workers, 1, 1 << 10), len(configs))
    bar = tqdm(total=len(configs), desc="SAEs", disable=not progress)
    if workers == 1:
        saes = []
        for xi, config in zip(xs, configs):
            saes.append(train_sae_on(xi, config, progress=False))
            bar.update()
        bar.close()
        return saes
    from joblib import Parallel, delayed  # joblib's loky processes: no `if __name__ == "__main__"` needed in scripts

    cost = [c.steps * (2 if c.mono_coef > 0 else 1) for c in configs]
    order = sorted(range(len(configs)), key=lambda i: -cost[i])  # longest first: the last to finish are short
    x_np = [xi.detach().numpy() for xi in xs]
    saes: list[SAE | None] = [None] * len(configs)
    parallel = Parallel(n_jobs=workers, batch_size=1, max_nbytes=None, return_as="generator_unordered")
    try:
        for i, *result in parallel(delayed(_train_state)(i, x_np[i], configs[i]) for i in order):
            saes[i] = _from_state(configs[i], *result)
            bar.update()
    finally:
        bar.close()
    return saes
