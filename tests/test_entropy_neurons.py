"""Entropy neurons: null-space scores against a numpy SVD, the exact zero direct effect of a write
into the unembedding's null space (LN-free, float64), and mean ablation against full forward passes
with the neuron ablated by a hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lnfree_interp as L
from lnfree_interp.analyses import entropy_neuron_scores, neuron_ablation, null_space, token_windows
from lnfree_interp.backends import get_backend
from lnfree_interp.checkpoints import EMBEDDED_DIR
from tests.conftest import LOADERS, load

TEXT = (EMBEDDED_DIR / "heldout.txt").read_text()[:4000]


@pytest.fixture(scope="module")
def free():
    return L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64)


@pytest.fixture(scope="module")
def base():
    return L.load_hf("tiny-shakespeare-vanilla", dtype=torch.float64, expect_lnfree=False)


def _logits_with_write(model, tokens, vector):
    """Logits after adding ``vector`` to the final residual stream at every position (full forward)."""
    backend = get_backend(model)
    name = f"blocks.{backend.n_layers - 1}.hook_resid_post"
    with torch.no_grad(), backend.hooks({name: lambda act: act + vector}):
        return backend.forward(tokens, None).double()


def test_null_space_write_has_exactly_zero_direct_effect_lnfree(free, base):
    tokens = token_windows(free, TEXT, seq_len=32, max_tokens=64)
    with torch.no_grad():
        clean = get_backend(free).forward(tokens, None).double()
    exact = null_space(free, exact=True)
    assert exact.shape[1] == 1  # the all-ones direction the folded centring removes
    v = exact[:, 0] * 1e3  # a write far larger than the residual stream (norm ~20)
    assert float((_logits_with_write(free, tokens, v) - clean).abs().max()) <= 1e-10
    # the effective null space: the direct effect is exactly the projection through W_U (linear) ...
    W_U = get_backend(free).weights().W_U.detach().double()
    for u in null_space(free, 2).T:
        moved = _logits_with_write(free, tokens, 50 * u) - clean
        assert float((moved - 50 * (u @ W_U)).abs().max()) <= 1e-10
    # ... and with LayerNorm it is not: the write changes the final LN scale (a temperature)
    with torch.no_grad():
        base_clean = get_backend(base).forward(tokens, None).double()
    u = null_space(base, 1)[:, 0]
    moved = _logits_with_write(base, tokens, 50 * u) - base_clean
    W_Ub = get_backend(base).weights().W_U.detach().double()
    assert float((moved - 50 * (u @ W_Ub)).abs().max()) > 1e-2


def test_scores_against_numpy_svd(free, base):
    for model in (free, base):
        backend = get_backend(model)
        W_U = backend.weights().W_U.detach().double().numpy()
        if not backend.lnfree:
            W_U = W_U - W_U.mean(0, keepdims=True)
        U, S, _ = np.linalg.svd(W_U, full_matrices=False)  # descending
        k = 3
        null = U[:, -1 - k : -1]  # the k smallest above the exactly-null all-ones direction
        assert S[-1] < 1e-10 * S[0] and abs(abs(U[:, -1].sum()) - np.sqrt(W_U.shape[0])) < 1e-8
        W_out = backend.weights().W_out[-1].detach().double().numpy()
        ones = np.ones(W_out.shape[1]) / np.sqrt(W_out.shape[1])
        seen = W_out - np.outer(W_out @ ones, ones)
        frac = ((W_out @ null) ** 2).sum(1) / (seen**2).sum(1)
        scores = entropy_neuron_scores(model, k_null=k).sort_values("index")
        np.testing.assert_allclose(scores["null_fraction"], frac, rtol=1e-9)
        np.testing.assert_allclose(scores["w_out_norm"], np.linalg.norm(W_out, axis=1), rtol=1e-12)
        cos = (W_out / np.linalg.norm(W_out, axis=1, keepdims=True)) @ (
            backend.weights().W_U.detach().double().numpy() / np.linalg.norm(
                backend.weights().W_U.detach().double().numpy(), axis=0, keepdims=True))
        np.testing.assert_allclose(scores["logit_var"], cos.var(1, ddof=1), rtol=1e-9)  # authors' t.var
    top = entropy_neuron_scores(free)
    assert list(top["null_norm"]) == sorted(top["null_norm"], reverse=True)
    assert top["neuron"][0].startswith(f"L{get_backend(free).n_layers - 1}N")


@pytest.mark.parametrize("which", ["free", "base"])
def test_ablation_matches_forward_with_hooked_neuron(which, free, base):
    model = free if which == "free" else base
    backend = get_backend(model)
    last = backend.n_layers - 1
    neurons = [3, 17, 400]
    result = neuron_ablation(model, TEXT, neurons, seq_len=32, max_tokens=96, return_per_token=True, progress=False)
    tokens = token_windows(model, TEXT, seq_len=32, max_tokens=96)
    name = f"blocks.{last}.mlp.hook_post"
    acts = []
    with torch.no_grad(), backend.hooks({name: lambda a: acts.append(a[:, :-1].double().clone())}):
        clean = torch.log_softmax(backend.forward(tokens, None).double()[:, :-1], -1)
    mean = torch.cat(acts).flatten(0, 1).mean(0)  # over the scored tokens
    H0 = -(clean.exp() * clean).sum(-1).flatten()
    CE0 = -clean.gather(-1, tokens[:, 1:, None])[..., 0].flatten()
    for j, n in enumerate(neurons):
        def ablate(a, n=n):
            a = a.clone()
            a[..., n] = mean[n].to(a.dtype)
            return a
        with torch.no_grad(), backend.hooks({name: ablate}):
            lp = torch.log_softmax(backend.forward(tokens, None).double()[:, :-1], -1)
        dH = -(lp.exp() * lp).sum(-1).flatten() - H0
        dCE = -lp.gather(-1, tokens[:, 1:, None])[..., 0].flatten() - CE0
        # the last position of each window is not scored, but it was ablated with the same mean: fine,
        # nothing reads it
        torch.testing.assert_close(result.per_token["dH"][j], dH, rtol=0, atol=1e-10)
        torch.testing.assert_close(result.per_token["dCE"][j], dCE, rtol=0, atol=1e-10)
        assert result.table["median_abs_dH"][j] == pytest.approx(float(dH.abs().median()), abs=1e-12)
    assert result.clean_entropy == pytest.approx(float(H0.mean()), abs=1e-10)
    assert result.n_tokens == H0.numel()


def test_every_backend_agrees(free):
    ref = neuron_ablation(free, TEXT, [5, 6], seq_len=32, max_tokens=64, progress=False).table
    ref_scores = entropy_neuron_scores(free, k_null=2)
    for kind in LOADERS:
        model = load(kind, "tiny-shakespeare-lnfree", dtype=torch.float64)
        got = neuron_ablation(model, TEXT, [5, 6], seq_len=32, max_tokens=64, progress=False).table
        np.testing.assert_allclose(got["median_abs_dH"], ref["median_abs_dH"], rtol=1e-8, atol=1e-12, err_msg=kind)
        np.testing.assert_allclose(entropy_neuron_scores(model, k_null=2)["null_norm"], ref_scores["null_norm"],
                                   rtol=1e-9, err_msg=kind)


def test_bad_input(free):
    d_mlp = get_backend(free).d_mlp
    for bad in ([d_mlp], [-1], [True], [1.0], []):
        with pytest.raises(L.LNFreeError, match="(?i)neuron|empty"):
            neuron_ablation(free, TEXT, bad, seq_len=32, progress=False)
    with pytest.raises(L.LNFreeError, match="top"):
        neuron_ablation(free, TEXT, top=0, seq_len=32, progress=False)
    with pytest.raises(L.LNFreeError, match="shorter than one window"):
        neuron_ablation(free, "KING:", [1], seq_len=32, progress=False)
    for k in (0, get_backend(free).d_model, 2.5):
        with pytest.raises(L.LNFreeError, match="k_null"):
            entropy_neuron_scores(free, k_null=k)
