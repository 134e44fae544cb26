"""The shipped tiny-shakespeare trio (lnfree_interp/models), recomputed from the shipped files."""

import json

import pytest
import torch

import lnfree_interp as L
from lnfree_interp.checkpoints import EMBEDDED_DIR

from .conftest import LOADERS, load, logits_of

NAMES = {"tiny-shakespeare": "layernorm", "tiny-shakespeare-vanilla": "layernorm", "tiny-shakespeare-lnfree": "schaeff"}
PROMPTS = ["ROMEO:\nI will not", "KING RICHARD III:\nMy lord, I", "JULIET:\nO Romeo, Romeo! wherefore art"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_files(name):
    folder = EMBEDDED_DIR / name
    assert (folder / "model.safetensors").stat().st_size <= 15 * 10**6  # issue 9: each model <= 15 MB
    for f in ("config.json", "tokenizer.json", "README.md", "lnfree_meta.json"):
        assert (folder / f).exists(), f
    card = (folder / "README.md").read_text()
    assert "| tiny-shakespeare-lnfree |" in card and "seed" in card and "Samples" in card
    assert L.inspect_checkpoint(name).encoding == NAMES[name]
    assert L.list_checkpoints().set_index("name").loc[name, "embedded"]


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_reproduce_plain_hf_and_the_exact_reference(loader):
    from transformers import GPT2LMHeadModel

    folder = EMBEDDED_DIR / "tiny-shakespeare-lnfree"
    plain = GPT2LMHeadModel.from_pretrained(folder).eval()  # the hacked checkpoint as plain HF runs it
    model = load(loader, "tiny-shakespeare-lnfree")
    tokens = torch.randint(0, plain.config.vocab_size, (2, plain.config.n_positions),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain(tokens).logits
    got = logits_of(model, tokens)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert L.verify(load(loader, "tiny-shakespeare-lnfree", dtype=torch.float64)).max_abs_error <= 1e-12


def test_dla_sums_to_the_metric_on_real_prompts():
    model = L.load_hooked("tiny-shakespeare-lnfree", dtype=torch.float64)
    dla = L.direct_logit_attribution(model, PROMPTS, " be", " not")
    assert (dla.total() - dla.metric).abs().max() <= 1e-10
    dla.assert_exact()
    base = L.load_hooked("tiny-shakespeare-vanilla", dtype=torch.float64, expect_lnfree=False)
    cmp_free = L.compare_dla_direct_effect(model, PROMPTS, " be", " not")
    cmp_base = L.compare_dla_direct_effect(base, PROMPTS, " be", " not")
    assert cmp_free.nmae <= 1e-8 and cmp_base.nmae > 1.0


def test_quality_bar_recomputed_from_shipped_files():
    """LN-free held-out CE within +0.10 nats of the vanilla twin, and far below a unigram model."""
    from lnfree_interp.demo import heldout_sample

    text = heldout_sample()
    losses = {}
    for name in NAMES:
        model = L.load_hf(name, expect_lnfree=name.endswith("lnfree"))
        losses[name] = L.evaluate_loss(model, text, progress=False).mean
    meta = json.loads((EMBEDDED_DIR / "tiny-shakespeare-lnfree" / "lnfree_meta.json").read_text())
    assert losses["tiny-shakespeare-lnfree"] - losses["tiny-shakespeare-vanilla"] <= 0.10
    assert losses["tiny-shakespeare-lnfree"] < meta["unigram_loss"] - 1.0
    # the model cards report this very measurement (the held-out split, windows of n_ctx)
    for name in NAMES:
        card = json.loads((EMBEDDED_DIR / name / "lnfree_meta.json").read_text())
        assert abs(losses[name] - card["heldout_loss"]) < 1e-4, name
