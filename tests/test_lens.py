"""The exact logit lens and the attention-score decomposition (lnfree_interp.lens)."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError

from .conftest import LOADERS, load

ANSWER, WRONG = [5, 17, 40], 9


def _tokens(vocab, seq=9):
    return torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("loader", LOADERS)
def test_logit_lens_is_cumulative_dla(models, loader):
    """LN-free: the readout after layer l == b_U + DLA of embed, pos_embed and every component up to l;
    the last readout == the model's logits (float64, 1e-10)."""
    model = load(loader, models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    lens = L.logit_lens(model, tokens, ANSWER, WRONG)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="layer")
    assert lens.exact and lens.labels == ["embed", "0", "1"]
    upto = {"embed": ["embed", "pos_embed"], "0": ["embed", "pos_embed", "0_attn_out", "0_mlp_out"],
            "1": ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]}
    for i, label in enumerate(lens.labels):
        cumulative = sum(dla[c] for c in upto[label]) + dla.bias
        assert (lens.metric[i] - cumulative).abs().max() <= 1e-10
    assert (lens.metric[-1] - dla.metric).abs().max() <= 1e-10
    ref = L.load_hf(models["schaeff"], dtype=torch.float64)
    with torch.no_grad():
        logits = ref(tokens).logits[:, -1]
    assert (lens.logits[-1] - logits).abs().max() <= 1e-10


def test_logit_lens_with_layernorm_is_labelled(models):
    model = L.load_hf(models["layernorm"], dtype=torch.float64, expect_lnfree=False)
    tokens = _tokens(models["layernorm"].config.vocab_size)
    lens = L.logit_lens(model, tokens, ANSWER, WRONG)
    assert not lens.exact
    with torch.no_grad():
        logits = model(tokens).logits[:, -1]
    assert (lens.logits[-1] - logits).abs().max() <= 1e-10  # the last readout is still the model's output
    assert lens.to_dataframe().shape == (3, 3)


@pytest.mark.parametrize("loader", LOADERS)
def test_attention_scores_sum_to_the_models_score(models, loader):
    model = load(loader, models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    att = L.attention_scores(model, tokens, "L1H2", query_pos=-2)
    total = att.values.sum((0, 1))
    ok = ~torch.isnan(att.scores)
    assert (total[ok] - att.scores[ok]).abs().max() <= 1e-10
    assert att.scores.isnan().sum() == 3 * 1  # the last key is after the query
    # independent: q . k / sqrt(dh) from the HF model's own c_attn output
    ref = L.load_hf(models["schaeff"], dtype=torch.float64)
    out = {}
    h = ref.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: out.__setitem__("qkv", o))
    with torch.no_grad():
        ref(tokens)
    h.remove()
    q, k, _ = out["qkv"].split(64, -1)
    q, k = q[:, -2, 2 * 16:3 * 16], k[:, :, 2 * 16:3 * 16]
    hand = torch.einsum("bk,bpk->bp", q, k) / 4.0
    assert (att.scores[ok] - hand[ok]).abs().max() <= 1e-10
    assert att.query_labels[:2] == ["embed", "L0H0"] and att.key_labels[-1] == "b_K"
    top = att.top(key_pos=0, k=3)
    assert len(top) == 3 and abs(top["score"][0]) == att.at(0).mean(-1).abs().max().item()


def test_attention_scores_refuses_layernorm_and_bad_heads(models):
    tokens = _tokens(models["schaeff"].config.vocab_size)
    with pytest.raises(LNFreeError, match="LN-free"):
        L.attention_scores(L.load_hf(models["layernorm"], expect_lnfree=False), tokens, "L1H0")
    model = L.load_hf(models["schaeff"])
    for bad in ("L5H0", "L0H9", "0_mlp_out", "L1H2.q"):
        with pytest.raises(LNFreeError):
            L.attention_scores(model, tokens, bad)
