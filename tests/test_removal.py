"""The LN-removal procedure and the schaeff export (lnfree_interp.removal)."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError
from lnfree_interp.removal import FakeLayerNorm, RemovalSchedule, remove_layernorm, save_lnfree

from .conftest import random_gpt2

SCHEDULE = RemovalSchedule(start=1, gap_ln2=1, gap_ln1=1, gap_lnf=1, tail=2)


def _stream(vocab, n=400):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))


def test_schedule_order_follows_the_paper():
    events = RemovalSchedule(start=10, gap_ln2=2, gap_ln1=3, gap_lnf=5, tail=7).events(2)
    assert [name for _, name in events] == ["transformer.h.0.ln_2", "transformer.h.1.ln_2", "transformer.h.0.ln_1",
                                            "transformer.h.1.ln_1", "transformer.ln_f"]
    assert [step for step, _ in events] == [10, 12, 14, 17, 22]
    assert RemovalSchedule(start=10, gap_ln2=2, gap_ln1=3, gap_lnf=5, tail=7).total_steps(2) == 29


def test_fake_layernorm_before_and_after_removal():
    ln = torch.nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    fake = FakeLayerNorm(ln).train()
    x = torch.randn(4, 3, 8) * 2 + 1
    assert torch.allclose(fake(x), ln(x), atol=1e-6)
    s = float(fake.running_std)
    assert s == pytest.approx(float((x.var(-1, unbiased=False) + ln.eps).sqrt().mean()), rel=1e-5)
    fake.remove()
    y = torch.randn(2, 8) * 5
    expected = (y - y.mean(-1, keepdim=True)) / s * ln.weight + ln.bias
    assert torch.allclose(fake(y), expected, atol=1e-5)
    fake(torch.randn(2, 8) * 100)  # frozen: training forwards no longer move the std
    assert float(fake.running_std) == s
    with pytest.raises(LNFreeError, match="before any training"):
        FakeLayerNorm(ln).remove()


def test_toy_run_exports_a_checkpoint_matching_the_fakeln_forward(tmp_path):
    base = random_gpt2(120, seed=3, n_layer=2, std=0.05)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lnfree, losses = remove_layernorm(base, _stream(120), schedule=SCHEDULE, batch_size=4, seq_len=16, progress=False)
    assert len(losses) == SCHEDULE.total_steps(2) and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # input model untouched
    assert all(isinstance(lnfree.get_submodule(n), FakeLayerNorm) and bool(lnfree.get_submodule(n).removed)
               for n in ("transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"))
    directory = save_lnfree(lnfree, tmp_path / "toy")
    assert L.inspect_checkpoint(directory).encoding == "schaeff"

    tokens = _stream(120, 48).view(3, 16)
    with torch.no_grad():
        trained = lnfree.double()(tokens).logits  # the FakeLN forward it was trained with
    loaded = L.load_hf(directory, dtype=torch.float64)
    with torch.no_grad():
        got = loaded(tokens).logits
    # float32 storage of gamma * 1e6 / s costs ~1e-7 relative; nothing else differs
    assert (got - trained).abs().max() <= 1e-5 * trained.abs().max()

    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel.from_pretrained(directory).double().eval()  # the hack, as plain HF runs it
    with torch.no_grad():
        hacked = plain(tokens).logits
    assert (hacked - trained).abs().max() <= 1e-4 * trained.abs().max()


def test_reproducible_with_a_seed():
    base = random_gpt2(120, seed=3, n_layer=2, std=0.05)
    a, la = remove_layernorm(base, _stream(120), schedule=SCHEDULE, batch_size=4, seq_len=16, progress=False, seed=5)
    b, lb = remove_layernorm(base, _stream(120), schedule=SCHEDULE, batch_size=4, seq_len=16, progress=False, seed=5)
    assert la == lb
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_export_refuses_unfinished_removal(tmp_path):
    base = random_gpt2(120, seed=3, n_layer=2, std=0.05)
    with pytest.raises(LNFreeError, match="not removed"):
        save_lnfree(base, tmp_path / "x")


def test_refuses_what_it_could_not_finish():
    base = random_gpt2(120, seed=3, n_layer=2, std=0.05)
    folded = L.load_hf(base, expect_lnfree=False)  # a folded LN baseline: lm_head has a bias
    with pytest.raises(LNFreeError, match="folded by lnfree_interp"):
        remove_layernorm(folded, torch.arange(500) % 120, schedule=RemovalSchedule(start=1, tail=1))
    with pytest.raises(LNFreeError, match="gaps >= 1"):
        RemovalSchedule(gap_ln1=0)  # two LNs on one step: one would be skipped silently


def test_train_lm_counts_only_unmasked_labels(monkeypatch):
    """A batch may be ``(input_ids, labels)``: the recorded loss is the HF cross-entropy over the labels that are
    not -100 (a hand-written log-softmax at the kept positions), so masked positions never train."""
    import lnfree_interp.removal as removal

    model = random_gpt2(50).float()
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(x, -100)
    labels[0, 5:9] = x[0, 5:9]
    monkeypatch.setattr(removal, "batches", lambda *a, **k: iter([(x, labels)] * 3))
    model.eval()
    with torch.no_grad():
        logp = model(input_ids=x).logits.double().log_softmax(-1)
    expected = -logp[0, 4:8].gather(-1, x[0, 5:9, None]).mean()
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    losses = removal.train_lm(model, _stream(model.config.vocab_size), steps=1, seq_len=12, progress=False)
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert losses[0] != pytest.approx(float(-logp[0, :-1].gather(-1, x[0, 1:, None]).mean()), rel=1e-3)
