"""Attention sinks and first-token residual norms against the attention weights and hidden states
that an unfolded HF model (eager attention, ``output_attentions=True``) returns itself."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

import lnfree_interp as L
from lnfree_interp.analyses import attention_sinks, residual_norms, token_windows
from lnfree_interp.checkpoints import EMBEDDED_DIR
from tests.conftest import LOADERS, load

TEXT = (EMBEDDED_DIR / "heldout.txt").read_text()[:4000]


def _hf_reference(name: str, tokens: torch.Tensor):
    """Attention weights and residual streams from the checkpoint on disk, read by transformers alone."""
    hf = GPT2LMHeadModel.from_pretrained(EMBEDDED_DIR / name, attn_implementation="eager",
                                         dtype=torch.float64).eval()
    final = []
    handle = hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: final.append(a[0]))
    with torch.no_grad():
        out = hf(tokens, output_attentions=True, output_hidden_states=True)
    handle.remove()
    return out.attentions, list(out.hidden_states[: hf.config.n_layer]) + final


@pytest.mark.parametrize("name", ["tiny-shakespeare", "tiny-shakespeare-lnfree"])
def test_sinks_against_hf_attention_weights(name):
    model = L.load_hf(name, dtype=torch.float64, expect_lnfree=name.endswith("lnfree"))
    tokens = token_windows(model, TEXT, seq_len=48, max_tokens=192)
    attentions, _ = _hf_reference(name, tokens)
    for threshold in (0.3, 0.1):
        report = attention_sinks(model, TEXT, threshold=threshold, seq_len=48, max_tokens=192, batch_size=3,
                                 progress=False)
        for layer, att in enumerate(attentions):  # [b, head, q, k]
            col = att[..., 0]
            mean_first = col[..., 1:].mean((0, 2))  # per head, queries 1..T-1
            torch.testing.assert_close(report.first_attention[layer], mean_first, rtol=0, atol=1e-9)
            rate = (col > threshold).double().mean()  # Gu et al. / authors: all (head, query) pairs
            assert float(report.sink_rate[layer]) == pytest.approx(float(rate), abs=1e-12)
            assert float(report.sink_heads[layer]) == pytest.approx(float((mean_first > threshold).double().mean()))
        assert report.threshold == threshold and report.n_windows == 4 and report.seq_len == 48
    assert report.overall_sink_rate == pytest.approx(float(report.sink_rate.mean()))
    assert list(report.to_dataframe().columns) == ["layer", "sink_rate", "sink_heads", "max_first_attention"]


@pytest.mark.parametrize("name", ["tiny-shakespeare-vanilla", "tiny-shakespeare-lnfree"])
def test_residual_norms_against_hf_hidden_states(name):
    model = L.load_hf(name, dtype=torch.float64, expect_lnfree=name.endswith("lnfree"))
    tokens = token_windows(model, TEXT, seq_len=40, max_tokens=160)
    _, hidden = _hf_reference(name, tokens)
    frame = residual_norms(model, TEXT, seq_len=40, max_tokens=160, batch_size=3, progress=False)
    assert len(frame) == len(hidden) == 5
    # the reference runs the schaeff encoding as stored: each "LN" divides by sqrt(var + 1e12), not exactly 1e6,
    # a relative difference of var / 2e12 per LN (~2e-9 at this model's residual norms, ~1e3): hence rel 2e-8
    for row, h in zip(frame.itertuples(), hidden):
        norms = h.norm(dim=-1)
        assert row.first == pytest.approx(float(norms[:, 0].mean()), rel=2e-8)
        assert row.rest == pytest.approx(float(norms[:, 1:].mean()), rel=2e-8)
        assert row.ratio == pytest.approx(row.first / row.rest)


def test_every_backend_agrees():
    ref = attention_sinks(L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64), TEXT, seq_len=32,
                          max_tokens=64, progress=False)
    for kind in LOADERS:
        model = load(kind, "tiny-shakespeare-lnfree", dtype=torch.float64)
        got = attention_sinks(model, TEXT, seq_len=32, max_tokens=64, progress=False)
        torch.testing.assert_close(got.first_attention, ref.first_attention, rtol=0, atol=1e-10, msg=kind)
        norms = residual_norms(model, TEXT, seq_len=32, max_tokens=64, progress=False)
        assert norms["first"].notna().all(), kind


def test_bad_input():
    model = L.load_hf("tiny-shakespeare-lnfree")
    for bad in (0, 1, 1.2, -0.3, "x"):
        with pytest.raises(L.LNFreeError, match="threshold"):
            attention_sinks(model, TEXT, threshold=bad, progress=False)
    with pytest.raises(L.LNFreeError, match="shorter than one window"):
        attention_sinks(model, "ROMEO:", progress=False)
    with pytest.raises(L.LNFreeError, match="seq_len"):
        residual_norms(model, TEXT, seq_len=1, progress=False)


def test_first_token_analysis_is_both_in_one_pass():
    from lnfree_interp.analyses import first_token_analysis

    model = L.load_hf("tiny-shakespeare-vanilla", expect_lnfree=False)
    sinks, norms = first_token_analysis(model, TEXT, threshold=0.2, seq_len=32, max_tokens=96, progress=False)
    alone = attention_sinks(model, TEXT, threshold=0.2, seq_len=32, max_tokens=96, progress=False)
    assert torch.equal(sinks.first_attention, alone.first_attention) and torch.equal(sinks.sink_rate, alone.sink_rate)
    import pandas as pd

    # float32: the pattern hooks may switch HF to eager attention, which rounds differently
    pd.testing.assert_frame_equal(norms, residual_norms(model, TEXT, seq_len=32, max_tokens=96, progress=False),
                                  rtol=1e-5)
