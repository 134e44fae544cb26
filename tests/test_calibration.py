"""Calibration (ECE with a bootstrap interval, entropy) and output divergences (JSD, KL) against
hand-written references: a per-sample binning loop, per-row bootstrap, and the HF model's own logits."""

from __future__ import annotations

import math

import pytest
import torch

import lnfree_interp as L
from lnfree_interp.analyses import calibration, expected_calibration_error, output_divergence, token_windows
from lnfree_interp.checkpoints import EMBEDDED_DIR

TEXT = (EMBEDDED_DIR / "heldout.txt").read_text()[:6000]


@pytest.fixture(scope="module")
def free():
    return L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64)


@pytest.fixture(scope="module")
def base():
    return L.load_hf("tiny-shakespeare", dtype=torch.float64, expect_lnfree=False)


def hand_ece(conf: list[float], correct: list[int], n_bins: int) -> float:
    """ECE by a loop over samples: bin i holds i/n <= c < (i+1)/n, the last bin also c == 1."""
    count, csum, asum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for c, a in zip(conf, correct):
        b = min(int(next(i for i in range(n_bins + 1) if (i + 1) / n_bins > c or i == n_bins - 1)), n_bins - 1)
        count[b] += 1
        csum[b] += c
        asum[b] += a
    n = len(conf)
    return sum(count[b] / n * abs(csum[b] / count[b] - asum[b] / count[b]) for b in range(n_bins) if count[b])


def test_ece_matches_hand_binning_including_bin_edges():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=gen, dtype=torch.float64)
    conf[:11] = torch.arange(11, dtype=torch.float64) / 10  # exactly on every edge, 0 and 1 included
    correct = torch.rand(500, generator=gen, dtype=torch.float64) < conf
    for n_bins in (1, 7, 10, 15):
        ece, _, bins = expected_calibration_error(conf, correct, n_bins=n_bins, n_boot=0)
        assert ece == pytest.approx(hand_ece(conf.tolist(), correct.int().tolist(), n_bins), abs=1e-12)
        assert int(bins["count"].sum()) == 500
    # perfectly calibrated in every bin -> 0; always-wrong confident predictions -> mean confidence
    assert expected_calibration_error(torch.full((4,), 0.5), torch.tensor([1, 0, 1, 0]), n_boot=0)[0] == 0.0
    c = torch.tensor([0.9, 0.8, 0.95])
    assert expected_calibration_error(c, torch.zeros(3, dtype=torch.bool), n_boot=0)[0] == pytest.approx(
        float(c.double().mean()))


def test_bootstrap_interval_matches_per_row_resampling():
    gen = torch.Generator().manual_seed(1)
    conf = torch.rand(200, generator=gen, dtype=torch.float64)
    correct = (torch.rand(200, generator=gen, dtype=torch.float64) < conf ** 2).int()
    ece, (lo, hi), _ = expected_calibration_error(conf, correct, n_boot=300, seed=5)
    draws = torch.randint(0, 200, (300, 200), generator=torch.Generator().manual_seed(5))
    ref = torch.tensor([hand_ece(conf[d].tolist(), correct[d].tolist(), 10) for d in draws], dtype=torch.float64)
    q = torch.quantile(ref, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert (lo, hi) == pytest.approx(q, abs=1e-12)
    assert lo <= ece <= hi
    assert all(math.isnan(x) for x in expected_calibration_error(conf, correct, n_boot=0)[1])


def test_calibration_against_the_hf_model_logits(base):
    report = calibration(base, TEXT, seq_len=64, n_boot=50, return_per_token=True, progress=False)
    windows = token_windows(base, TEXT, seq_len=64)
    with torch.no_grad():
        logp = torch.log_softmax(base(windows).logits[:, :-1].double(), -1)  # the HF model, no backend
    top, arg = logp.max(-1)
    conf, correct = top.exp().flatten(), (arg == windows[:, 1:]).flatten()
    entropy = -(logp.exp() * logp).sum(-1).flatten()
    assert report.n_tokens == conf.numel() == windows.shape[0] * 63
    torch.testing.assert_close(report.per_token["confidence"], conf, rtol=0, atol=1e-12)
    assert torch.equal(report.per_token["correct"], correct)
    assert report.mean_entropy == pytest.approx(float(entropy.mean()), abs=1e-10)
    assert report.ece == pytest.approx(hand_ece(conf.tolist(), correct.int().tolist(), 10), abs=1e-12)
    assert report.accuracy == pytest.approx(float(correct.double().mean()))
    assert report.ci[0] <= report.ece <= report.ci[1] and report.n_bins == 10
    assert "ECE" in str(report)


def test_divergence_against_hand_formula(base, free):
    rep = output_divergence(base, free, TEXT, seq_len=64, max_tokens=256, return_per_token=True, progress=False)
    windows = token_windows(base, TEXT, seq_len=64, max_tokens=256)
    with torch.no_grad():
        p = torch.softmax(base(windows).logits[:, :-1].double(), -1).flatten(0, 1)
        q = torch.softmax(free(windows).logits[:, :-1].double(), -1).flatten(0, 1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(rep.per_token["jsd"], (kl(p, m) + kl(q, m)) / 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.per_token["kl_ab"], kl(p, q), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rep.per_token["kl_ba"], kl(q, p), rtol=1e-9, atol=1e-12)
    assert 0 < rep.jsd <= math.log(2) and rep.kl_ab > 0 and rep.kl_ba > 0
    same = output_divergence(free, free, TEXT, seq_len=64, max_tokens=128, progress=False)
    assert abs(same.jsd) < 1e-14 and abs(same.kl_ab) < 1e-14 and same.top1_agreement == 1.0


def test_bad_input(free, base, tokenizer):
    with pytest.raises(L.LNFreeError, match="shorter than one window"):
        calibration(free, "ROMEO: hi", seq_len=64, progress=False)
    for level in (0, 1, 1.5, -0.1):
        with pytest.raises(L.LNFreeError, match="between 0 and 1"):
            expected_calibration_error(torch.tensor([0.5]), torch.tensor([1]), level=level)
    with pytest.raises(L.LNFreeError, match="n_bins"):
        expected_calibration_error(torch.tensor([0.5]), torch.tensor([1]), n_bins=0)
    with pytest.raises(L.LNFreeError, match="probabilities"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(L.LNFreeError, match="seq_len"):
        calibration(free, TEXT, seq_len=4096, progress=False)
    from tests.conftest import random_gpt2

    other = L.load_hf(random_gpt2(len(tokenizer)), expect_lnfree=False, tokenizer=tokenizer)
    with pytest.raises(L.LNFreeError, match="different vocabularies"):
        output_divergence(free, other, TEXT, progress=False)
    import copy

    relabelled = copy.copy(base)  # same weights and vocabulary size, another tokenizer
    relabelled.tokenizer = tokenizer
    with pytest.raises(L.LNFreeError, match="tokenizers map tokens to different ids"):
        output_divergence(free, relabelled, TEXT, progress=False)
