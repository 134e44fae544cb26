"""induction_score: against attention and losses recomputed by hand (HF eager attention, float64, the
hacked LayerNorms written out by hand), on every backend; bad input; and the embedded trio's headline
induction and loss figures recomputed from the shipped files."""

import json

import pytest
import torch

import lnfree_interp as L
from lnfree_interp.checkpoints import EMBEDDED_DIR

from .conftest import LOADERS, assert_unchanged, load, reference, state_snapshot

SEQ, N_SEQ, SEED = 12, 5, 3  # the conftest checkpoints have n_positions 64


def hand_figures(ref, tokens, seq_len, bos=1, ablate=()):
    """Induction / previous-token scores and first-copy / repeat NLL, by explicit loops over
    positions, from HF's own eager attention probabilities (``output_attentions``)."""
    handles = []
    for layer, head in ablate:  # zero the head's slice of z (the input of c_proj)
        d_head = ref.config.n_embd // ref.config.n_head

        def pre(m, args, head=head, d_head=d_head):
            z = args[0].clone()
            z[..., head * d_head:(head + 1) * d_head] = 0
            return (z,)
        handles.append(ref.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            out = ref(tokens, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    att = [a.double() for a in out.attentions]  # per layer [batch, head, q, k]
    logp = out.logits.double().log_softmax(-1)
    n_layer, n_head = len(att), att[0].shape[1]
    ind = torch.zeros(n_layer, n_head, dtype=torch.float64)
    prev = torch.zeros_like(ind)
    first, rep = [], []
    for i in range(tokens.shape[0]):
        for j in range(seq_len):
            q = bos + seq_len + j  # j-th token of the repeat; its first occurrence is at bos + j
            for layer in range(n_layer):
                ind[layer] += att[layer][i, :, q, bos + j + 1]
        for q in range(bos + 1, tokens.shape[1]):
            for layer in range(n_layer):
                prev[layer] += att[layer][i, :, q, q - 1]
        for j in range(1, seq_len):
            first.append(-float(logp[i, bos + j - 1, tokens[i, bos + j]]))
            rep.append(-float(logp[i, bos + seq_len + j - 1, tokens[i, bos + seq_len + j]]))
    n = tokens.shape[0]
    return (ind / (n * seq_len), prev / (n * (tokens.shape[1] - bos - 1)), sum(first) / len(first),
            sum(rep) / len(rep))


def eager_reference(model):
    ref = reference(model)
    ref.config._attn_implementation = "eager"
    for module in ref.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    return ref


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
def test_matches_hand_computation_on_every_backend(loader, encoding, models, ckpt_dirs):
    model = load(loader, ckpt_dirs[encoding], dtype=torch.float64, expect_lnfree=encoding != "layernorm")
    res = L.induction_score(model, n_seq=N_SEQ, seq_len=SEQ, seed=SEED, batch_size=2, ablate=["L0H1"])
    ind, prev, first, rep = hand_figures(eager_reference(models[encoding]), res.tokens, SEQ, ablate=[(0, 1)])
    assert torch.allclose(res.induction, ind, rtol=0, atol=1e-10)
    assert torch.allclose(res.prev_token, prev, rtol=0, atol=1e-10)
    assert res.first_nll == pytest.approx(first, abs=1e-9)
    assert res.repeat_nll == pytest.approx(rep, abs=1e-9)
    assert res.nll_drop == pytest.approx(first - rep, abs=1e-9)
    assert res.ablated == ("L0H1",)
    # without ablation the figures differ (the ablation really happened)
    plain = L.induction_score(model, n_seq=N_SEQ, seq_len=SEQ, seed=SEED)
    ind0, prev0, first0, rep0 = hand_figures(eager_reference(models[encoding]), plain.tokens, SEQ)
    assert torch.allclose(plain.induction, ind0, rtol=0, atol=1e-10)
    assert plain.repeat_nll == pytest.approx(rep0, abs=1e-9)
    assert not torch.allclose(plain.induction[1], res.induction[1], atol=1e-6)


def test_tokens_are_distinct_repeated_and_seeded(ckpt_dirs, tokenizer):
    model = L.load_hf(ckpt_dirs["schaeff"])
    res = L.induction_score(model, n_seq=4, seq_len=SEQ, seed=SEED)
    t = res.tokens
    assert t.shape == (4, 1 + 2 * SEQ)
    assert (t[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(t[:, 1:1 + SEQ], t[:, 1 + SEQ:])
    for row in t[:, 1:1 + SEQ]:
        assert len(set(row.tolist())) == SEQ
        assert not set(row.tolist()) & set(tokenizer.all_special_ids)
    assert torch.equal(L.induction_score(model, n_seq=4, seq_len=SEQ, seed=SEED).tokens, t)
    assert not torch.equal(L.induction_score(model, n_seq=4, seq_len=SEQ, seed=SEED + 1).tokens, t)
    text = "When Mary and John went to the store, John gave a drink to Mary. The king is dead."
    from_text = L.induction_score(model, n_seq=2, seq_len=8, seed=0, text=text, prepend_bos=False)
    allowed = set(tokenizer(text)["input_ids"])
    assert from_text.source == "text" and from_text.tokens.shape == (2, 16)
    assert set(from_text.tokens.flatten().tolist()) <= allowed


def test_result_views_and_model_untouched(ckpt_dirs):
    model = L.load_hf(ckpt_dirs["schaeff"])
    model.train()
    snap = state_snapshot(model)
    res = L.induction_score(model, n_seq=3, seq_len=SEQ)
    assert_unchanged(model, snap)
    assert model.training  # eval mode only while measuring
    df = res.to_dataframe()
    assert list(df.columns) == ["component", "layer", "head", "induction", "prev_token"]
    assert len(df) == res.n_layers * res.n_heads
    best = df.loc[df["induction"].idxmax()]
    assert res.best_induction == (best["component"], pytest.approx(best["induction"]))
    assert "drop" in repr(res) and res.best_prev_token[0] in repr(res)
    fig = res.plot()
    ax = fig.axes[0]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # layer 0 at the top
    assert ax.get_ylabel() == "layer" and "nats" in fig._suptitle.get_text()
    assert any("attention probability" in a.get_ylabel() for a in fig.axes)
    pat = res.plot_pattern("L1H0")
    assert "L1H0" in pat.axes[0].get_title() and pat.axes[0].get_xlabel() == "key position"


@pytest.mark.parametrize("kwargs, match", [
    ({"n_seq": 0}, "n_seq"),
    ({"seq_len": 1}, "seq_len"),
    ({"seq_len": True}, "seq_len"),
    ({"seq_len": 2.5}, "seq_len"),
    ({"seq_len": 40}, "n_ctx"),  # 1 + 80 > 64
    ({"seed": -1}, "seed"),
    ({"batch_size": 0}, "batch_size"),
    ({"text": ""}, "non-empty"),
    ({"text": "the the the", "seq_len": 5}, "distinct"),
    ({"ablate": ["X1"]}, "L\\{layer\\}H\\{head\\}"),
    ({"ablate": ["L7H0"]}, "layer < 2"),
])
def test_bad_input_raises(ckpt_dirs, kwargs, match):
    model = L.load_hf(ckpt_dirs["schaeff"])
    with pytest.raises(L.LNFreeError, match=match):
        L.induction_score(model, **{"n_seq": 2, "seq_len": SEQ, **kwargs})


def test_bad_model_and_head_label_raise(ckpt_dirs):
    with pytest.raises(L.LNFreeError, match="Unsupported model"):
        L.induction_score(torch.nn.Linear(2, 2))
    res = L.induction_score(L.load_hf(ckpt_dirs["schaeff"]), n_seq=1, seq_len=SEQ)
    with pytest.raises(L.LNFreeError, match="head="):
        res.plot_pattern("L0H9")


TRIO = ("tiny-shakespeare", "tiny-shakespeare-vanilla", "tiny-shakespeare-lnfree")


def test_trio_headline_figures_recomputed_from_shipped_files():
    """Issue 9's bar, recomputed from the shipped files: held-out CE (vanilla <= 4.0291 + 0.05, the
    previous trio's + 0.05), LN-free gap <= +0.10 nats, repeat NLL >= 3 nats below the first copy and
    an induction head with score >= 0.5 in every model; the model cards report these very numbers."""
    text = (EMBEDDED_DIR / "heldout.txt").read_text()  # the held-out 10% the cards report on
    rows = {}
    for name in TRIO:
        model = L.load_hf(name, expect_lnfree=name.endswith("lnfree"))
        ce = L.evaluate_loss(model, text, progress=False).mean
        rows[name] = (ce, L.induction_score(model))
    vanilla = rows["tiny-shakespeare-vanilla"][0]
    print("\nmodel | held-out CE | gap vs vanilla | repeat-NLL drop | best induction head | best prev-token head")
    for name, (ce, r) in rows.items():
        print(f"{name} | {ce:.4f} | {ce - vanilla:+.4f} | {r.nll_drop:.2f} | {r.best_induction[0]} "
              f"{r.best_induction[1]:.3f} | {r.best_prev_token[0]} {r.best_prev_token[1]:.3f}")
    assert vanilla <= 4.0291 + 0.05
    assert rows["tiny-shakespeare-lnfree"][0] - vanilla <= 0.10
    for name, (_ce, r) in rows.items():
        assert r.nll_drop >= 3.0, name
        assert r.best_induction[1] >= 0.5, name
        card = json.loads((EMBEDDED_DIR / name / "lnfree_meta.json").read_text()).get("induction")
        assert card is not None, f"{name}: its card does not report induction (rebuild with the new script)"
        assert card["best_induction_head"] == r.best_induction[0], name
        assert card["nll_drop"] == pytest.approx(r.nll_drop, abs=1e-4), name
        assert card["best_induction_score"] == pytest.approx(r.best_induction[1], abs=1e-4), name
