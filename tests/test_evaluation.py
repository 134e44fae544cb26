"""Held-out loss statistics (lnfree_interp.evaluation)."""

import copy
import logging

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError

from .conftest import LOADERS, load, reference


def test_matches_manual_cross_entropy(models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    stream = torch.randint(0, models["schaeff"].config.vocab_size, (100,), generator=torch.Generator().manual_seed(0))
    report = L.evaluate_loss(model, stream, seq_len=16, batch_size=2, return_per_token=True, progress=False)
    windows = stream[:96].view(6, 16)
    with torch.no_grad():
        logits = reference(models["schaeff"])(windows).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert report.n_tokens == 6 * 15
    assert report.mean == pytest.approx(ce.mean().item(), abs=1e-10)
    assert report.median == pytest.approx(ce.median().item(), abs=1e-10)
    assert report.range_95[0] <= report.median <= report.range_95[1]
    assert report.range_999[0] <= report.range_95[0] and report.range_95[1] <= report.range_999[1]
    assert torch.allclose(report.per_token, ce, atol=1e-10)
    assert "mean" in str(report) and report.as_dict()["n_tokens"] == 90


def test_same_on_every_backend_and_baselines(models, tokenizer):
    text = "When Mary and John went to the store, John gave a drink to Mary. The king is dead. " * 4
    means = [L.evaluate_loss(load(k, models["schaeff"], dtype=torch.float64, tokenizer=tokenizer), text,
                             progress=False).mean for k in LOADERS]
    assert max(means) - min(means) <= 1e-10
    base = L.load_hf(models["layernorm"], expect_lnfree=False, tokenizer=tokenizer)
    assert L.evaluate_loss(base, text, progress=False).n_tokens > 0


def test_bad_input(models):
    model = L.load_hf(models["schaeff"])
    with pytest.raises(LNFreeError, match="no tokenizer"):
        L.evaluate_loss(model, "text")
    with pytest.raises(LNFreeError, match="seq_len"):
        L.evaluate_loss(model, torch.arange(10), seq_len=65)
    with pytest.raises(LNFreeError, match="at least"):
        L.evaluate_loss(model, torch.arange(5), seq_len=16)
    with pytest.raises(LNFreeError, match="seq_len=0"):
        L.evaluate_loss(model, torch.arange(100), seq_len=0)  # not a silent fallback to n_ctx
    with pytest.raises(LNFreeError, match="batch_size"):
        L.evaluate_loss(model, torch.arange(100), seq_len=16, batch_size=0)
    with pytest.raises(LNFreeError, match="integers"):
        L.evaluate_loss(model, torch.rand(100) * 50, seq_len=16)  # not truncated to ids


def test_text_input_errors_and_no_tokenizer_noise(tokenizer, models):
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = 64  # as GPT-2's 1024: a long text exceeds it, and we cut windows ourselves
    model = L.load_hf(models["schaeff"], tokenizer=tok)
    with pytest.raises(LNFreeError, match="join"):
        L.evaluate_loss(model, ["a b c"] * 50)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)  # other libraries may have silenced transformers earlier in the session
    try:
        report = L.evaluate_loss(model, "When Mary and John went to the store. " * 50, seq_len=64, progress=False)
        quiet = list(seen)
        tok("When Mary and John went to the store. " * 50)  # the same call outside: it does warn
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert report.n_tokens > 200
    assert quiet == [] and len(seen) == 1 and "Token indices sequence length" in seen[0]
