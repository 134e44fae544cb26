"""DLA, direct effect and their comparison (lnfree_interp.dla) against an independent float64
computation: the hand-written reference model of conftest, hooked with plain torch.

Tolerances (issue #3): sum of components + bias == metric and DLA == true direct effect to
<= 1e-10 in float64 and <= 1e-5 relative in float32.
"""

import math

import numpy as np
import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError

from .conftest import LOADERS, load, reference

ANSWER, WRONG = [5, 17, 40], 9


def _tokens(vocab):
    return torch.randint(0, vocab, (3, 14), generator=torch.Generator().manual_seed(1))


def _reference_direct_effects(model, tokens, answer, wrong, ln: bool):
    """Per head: metric(r) - metric(r - head_out) at the last position, from the unfolded float64
    reference (hacked LNs written by hand, or the real LayerNorm for baselines, recomputed)."""
    ref = reference(model)
    cfg = model.config
    H, dh = cfg.n_head, cfg.n_embd // cfg.n_head
    store = {}
    hooks = [ref.transformer.ln_f.register_forward_pre_hook(lambda m, a: store.__setitem__("r", a[0]))]
    for layer, block in enumerate(ref.transformer.h):
        hooks.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: store.__setitem__(f"z{layer}", a[0])))
    with torch.no_grad():
        logits = ref(tokens).logits
    for h in hooks:
        h.remove()
    rows = torch.arange(tokens.shape[0])
    answer, wrong = torch.as_tensor(answer).expand(tokens.shape[0]), torch.as_tensor(wrong).expand(tokens.shape[0])

    def metric(r):  # r: [B, d] final residual at the last position
        lg = ref.lm_head(ref.transformer.ln_f(r))
        return lg[rows, answer] - lg[rows, wrong]

    r = store["r"][:, -1]
    clean = metric(r)
    assert torch.allclose(clean, logits[rows, -1, answer] - logits[rows, -1, wrong], atol=1e-12)
    out = {}
    for layer, block in enumerate(ref.transformer.h):
        z = store[f"z{layer}"][:, -1]  # [B, d]
        W = block.attn.c_proj.weight  # [d (H*dh), d]
        for h in range(H):
            head_out = z[:, h * dh:(h + 1) * dh] @ W[h * dh:(h + 1) * dh]
            out[f"L{layer}H{h}"] = clean - metric(r - head_out)
    return clean, out


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("encoding", ["schaeff", "apollo"])
def test_dla_is_exact_direct_effect_float64(loader, encoding, models):
    model = load(loader, models[encoding], dtype=torch.float64)
    tokens = _tokens(models[encoding].config.vocab_size)
    clean, ref_de = _reference_direct_effects(models[encoding], tokens, ANSWER, WRONG, ln=False)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG)
    assert dla.exact
    assert (dla.metric - clean).abs().max() <= 1e-10
    assert (dla.total() - dla.metric).abs().max() <= 1e-10
    for label, value in ref_de.items():
        assert (dla[label] - value).abs().max() <= 1e-10, label
    dla.assert_exact()


@pytest.mark.parametrize("loader", LOADERS)
def test_dla_float32_within_relative_tolerance(loader, models):
    model = load(loader, models["schaeff"])
    tokens = _tokens(models["schaeff"].config.vocab_size)
    clean, ref_de = _reference_direct_effects(models["schaeff"], tokens, ANSWER, WRONG, ln=False)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG)
    scale = clean.abs().max()
    assert (dla.total().double() - clean).abs().max() <= 1e-5 * scale
    for label, value in ref_de.items():
        assert (dla[label].double() - value).abs().max() <= 1e-5 * scale, label



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_assert_exact_in_half_precision(dtype, models):
    model = L.load_hf(models["schaeff"], dtype=dtype)
    dla = L.direct_logit_attribution(model, _tokens(models["schaeff"].config.vocab_size), ANSWER, WRONG)
    assert dla.values.dtype == dtype
    dla.assert_exact()  # within the dtype's tolerance of the summands' scale
    scale = float(dla.values.abs().sum(0).max())
    dla.metric = dla.metric + 0.2 * scale  # well beyond it
    with pytest.raises(LNFreeError, match="summands"):
        dla.assert_exact()

@pytest.mark.parametrize("by", ["head", "layer", "neuron"])
def test_every_granularity_sums_to_the_metric(by, models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by=by)
    assert {"embed", "pos_embed"} <= set(dla.labels)
    assert (dla.total() - dla.metric).abs().max() <= 1e-10
    de = L.direct_effect(model, tokens, ANSWER, WRONG, components=by)
    assert de.labels == dla.labels and (de.values - dla.values).abs().max() <= 1e-10


def test_labels_follow_transformerlens_conventions(models):
    model = L.load_hf(models["schaeff"])
    tokens = _tokens(models["schaeff"].config.vocab_size)
    heads = L.direct_logit_attribution(model, tokens, ANSWER).labels
    assert heads[:2] == ["embed", "pos_embed"] and "L1H3" in heads and "0_attn_bias" in heads and "1_mlp_out" in heads
    layers = L.direct_logit_attribution(model, tokens, ANSWER, by="layer").labels
    assert layers == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    neurons = L.direct_logit_attribution(model, tokens, ANSWER, by="neuron", layers=[1], top_k=7)
    assert "0_mlp_out" in neurons.labels and "1_mlp_bias" in neurons.labels and "1_mlp_rest" in neurons.labels
    assert sum(lab.startswith("L1N") for lab in neurons.labels) == 7
    assert (neurons.total() - neurons.metric).abs().max() <= 1e-5 * neurons.metric.abs().max()


def test_backends_agree(models, tokenizer):
    texts = ["When Mary and John went to the store, John gave a drink to", "The king is dead; long live the"]
    results = [L.direct_logit_attribution(load(k, models["schaeff"], dtype=torch.float64, tokenizer=tokenizer),
                                          texts, " Mary", " John") for k in LOADERS]
    for r in results[1:]:
        assert r.labels == results[0].labels
        assert (r.values - results[0].values).abs().max() <= 1e-12


def test_padding_left_and_right_attribute_the_last_real_token(models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    short = tokens[1, :9]
    alone = L.direct_logit_attribution(model, short, ANSWER[1], WRONG)
    right = torch.stack([tokens[0], torch.cat([short, torch.zeros(5, dtype=torch.long)])])
    left = torch.stack([tokens[0], torch.cat([torch.zeros(5, dtype=torch.long), short])])
    for toks, mask_row in ((right, [1] * 9 + [0] * 5), (left, [0] * 5 + [1] * 9)):
        mask = torch.stack([torch.ones(14, dtype=torch.long), torch.tensor(mask_row)])
        both = L.direct_logit_attribution(model, toks, [ANSWER[0], ANSWER[1]], WRONG, attention_mask=mask)
        assert (both.values[:, 1] - alone.values[:, 0]).abs().max() <= 1e-10


def test_ln_baseline_dla_is_an_approximation_and_de_matches_reference(models):
    base = L.load_hooked(models["layernorm"], dtype=torch.float64, expect_lnfree=False)
    tokens = _tokens(models["layernorm"].config.vocab_size)
    dla = L.direct_logit_attribution(base, tokens, ANSWER, WRONG)
    assert not dla.exact and "frozen" in dla.note
    assert (dla.total() - dla.metric).abs().max() <= 1e-10  # frozen scale: still sums to the metric
    with pytest.raises(LNFreeError, match="LayerNorm"):
        dla.assert_exact()
    _, ref_de = _reference_direct_effects(models["layernorm"], tokens, ANSWER, WRONG, ln=True)
    de = L.direct_effect(base, tokens, ANSWER, WRONG)
    for label, value in ref_de.items():  # closed-form LN recomputation == recomputing the real LN
        assert (de[label] - value).abs().max() <= 1e-10, label
    assert max((dla[k] - v).abs().max() for k, v in ref_de.items()) > 1e-4


def test_compare_is_zero_lnfree_and_not_with_layernorm(models, tokenizer):
    tokens = _tokens(models["schaeff"].config.vocab_size)
    free = L.compare_dla_direct_effect(L.load_hooked(models["schaeff"], dtype=torch.float64), tokens, ANSWER, WRONG)
    assert free.nmae <= 1e-8 and free.ci[1] <= 1e-8
    base = L.compare_dla_direct_effect(L.load_hooked(models["layernorm"], dtype=torch.float64, expect_lnfree=False),
                                       tokens, ANSWER, WRONG)
    assert base.nmae > 0.5 and base.ci[0] > 0
    assert set(base.per_component["component"]) == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    assert len(base.plot().data) == 2
    one = L.compare_dla_direct_effect(L.load_hooked(models["layernorm"], dtype=torch.float64, expect_lnfree=False),
                                      tokens[:1], ANSWER[0], WRONG)
    assert one.nmae > 0.5 and all(map(math.isnan, one.ci)) and "no CI from one prompt" in repr(one)


def test_mean_and_corrupted_ablation(models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    corrupted = tokens.flip(0)
    de = L.direct_effect(model, tokens, ANSWER, WRONG, ablation=corrupted)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG)
    dla_c = L.direct_logit_attribution(model, corrupted, ANSWER, WRONG)
    # linear direct path: DE with a corrupted ablation is the difference of the two DLAs
    assert (de.values - (dla.values - dla_c.values)).abs().max() <= 1e-10
    mean = L.direct_effect(model, tokens, ANSWER, WRONG, ablation="mean")
    assert mean["0_attn_bias"].abs().max() == 0  # a constant's mean is itself


def test_memory_light_capture_keeps_no_cache(models, monkeypatch):
    """Only [batch, ...] slices at the attributed positions are kept (never a [batch, pos, ...] cache)."""
    from lnfree_interp import direct_path

    seen = []
    original = direct_path.components

    def spy(backend, by, layers, acts, *args, **kwargs):
        seen.extend(v.shape for v in acts.values())
        return original(backend, by, layers, acts, *args, **kwargs)

    monkeypatch.setattr(direct_path, "components", spy)
    model = L.load_hooked(models["schaeff"])
    L.direct_logit_attribution(model, _tokens(models["schaeff"].config.vocab_size), ANSWER, by="neuron")
    assert seen and all(shape[0] == 3 and 14 not in shape for shape in seen)


def test_result_object(models, tmp_path):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    dla = L.direct_logit_attribution(model, _tokens(models["schaeff"].config.vocab_size), ANSWER, WRONG)
    df = dla.to_dataframe()
    assert set(df.columns) >= {"component", "layer", "head", "prompt", "value"}
    assert len(df) == (len(dla.labels) + 1) * 3  # + the unembed_bias rows
    assert abs(df.groupby("prompt")["value"].sum().to_numpy() - dla.metric.numpy()).max() <= 1e-10
    top = dla.top(3)
    assert list(top.columns) == ["component", "mean", "std"] and len(top) == 3
    assert abs(top["mean"].iloc[0]) == dla.mean().abs().max().item()
    fig = dla.plot()
    assert fig.data[0].type == "heatmap" and fig.data[0].z.shape == (2, 6)  # H0-H3, attn bias, MLP
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's backend (a notebook's inline one): save() must not switch it
    try:
        png, html = dla.save(tmp_path / "dla", html=True)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert png.stat().st_size > 1000 and html.stat().st_size > 1000
    assert not (tmp_path / "plotly.min.js").exists()  # the HTML is self-contained: opens offline on its own
    assert "<script src=" not in html.read_text()  # no external script: plotly.js is inside
    with pytest.raises(LNFreeError, match="k="):
        dla.top(0)
    assert "kind='dla'" in repr(dla) and top["component"].iloc[0] in repr(dla)


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_input(loader, models, tokenizer):
    model = load(loader, models["schaeff"], tokenizer=tokenizer)
    text = "When Mary and John went to the store, John gave a drink to"
    with pytest.raises(LNFreeError, match="tokens"):
        L.direct_logit_attribution(model, text, " Mary and John")  # multi-token answer, split named
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        L.direct_logit_attribution(model, text, 10**6)
    with pytest.raises(LNFreeError, match="outside the prompt"):
        L.direct_logit_attribution(model, text, " Mary", pos=100)
    with pytest.raises(LNFreeError, match="for 2 prompts"):
        L.direct_logit_attribution(model, [text, text], [" Mary", " John", " Tom"])
    with pytest.raises(LNFreeError, match="Empty inputs"):
        L.direct_logit_attribution(model, [], " Mary")
    with pytest.raises(LNFreeError, match="by="):
        L.direct_logit_attribution(model, text, " Mary", by="heads")
    with pytest.raises(LNFreeError, match="components='neurons'"):  # direct_effect names its own argument
        L.direct_effect(model, text, " Mary", components="neurons")
    for bad in (None, 5.7, torch.tensor([[5]]), torch.tensor([5.0])):
        with pytest.raises(LNFreeError, match="token id"):
            L.direct_logit_attribution(model, text, bad)
    with pytest.raises(LNFreeError, match="not 'zero' or 'mean'"):
        L.direct_effect(model, text, " Mary", ablation="Zero")  # a typo is not a corrupted prompt
    with pytest.raises(LNFreeError, match="not 'zero' or 'mean'"):
        L.direct_effect(model, text, " Mary", ablation=None)
    for bad_pos in (None, "x", 1.5, [1.5]):
        with pytest.raises(LNFreeError, match="pos="):
            L.direct_logit_attribution(model, text, " Mary", pos=bad_pos)
    ids = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6]])
    for bad_mask, message in (([[1, 1, 1, 2], [1, 1, 1, 1]], "only 0 and 1"), ([[1, 0, 1, 1], [1, 1, 1, 1]], "gaps")):
        with pytest.raises(LNFreeError, match=message):
            L.direct_logit_attribution(model, ids, 5, attention_mask=torch.tensor(bad_mask))
    with pytest.raises(LNFreeError, match="by='neuron'"):
        L.direct_logit_attribution(model, text, " Mary", top_k=3)  # would be silently ignored
    numpy_id = L.direct_logit_attribution(model, text, np.int64(5), np.array([7]))  # numpy ids are ids
    assert torch.equal(numpy_id.values, L.direct_logit_attribution(model, text, 5, 7).values)


def test_hooks_removed_and_mode_restored_after_errors(models):
    model = L.load_hooked(models["schaeff"])
    model.train()

    def boom(*args):
        raise RuntimeError("boom in the middle of the forward pass")

    handle = model.blocks[1].mlp.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            L.direct_logit_attribution(model, _tokens(models["schaeff"].config.vocab_size), 3)
    finally:
        handle.remove()
    assert model.training and all(m.training for m in model.modules())
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    dla = L.direct_logit_attribution(model, _tokens(models["schaeff"].config.vocab_size), 3)
    assert model.training and (dla.total() - dla.metric).abs().max() <= 1e-4


def test_assert_exact_tolerance_scales_with_the_summands_not_the_metric():
    # A near-zero logit difference (the quickstart's ',' vs ' a') made of O(10) float32
    # components: rounding error ~1e-6 is exact to float32, though 1e-5 * |metric| is smaller.
    values = torch.tensor([[12.0], [-7.5], [-4.4772]], dtype=torch.float32)
    metric = torch.tensor([0.0228 + 6e-7])
    bias = torch.tensor([0.0])
    ok = L.AttributionResult(values, ["L0H0", "0_mlp_out", "embed"], metric, "dla", 1, 1, bias=bias, exact=True)
    ok.assert_exact()
    off = L.AttributionResult(values, ["L0H0", "0_mlp_out", "embed"], metric + 0.01, "dla", 1, 1,
                              bias=bias, exact=True)
    with pytest.raises(LNFreeError, match="summands"):
        off.assert_exact()


def test_value_bias_convention_matches_transformerlens_fold(models):
    """value_bias='attn_bias' gives each head (pattern @ x W_V) W_O with b_V folded into the attention bias,
    as TransformerLens's fold_value_biases: checked against a hand computation from the HF model (float64)."""
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    tokens = _tokens(models["schaeff"].config.vocab_size)
    ours = L.direct_logit_attribution(model, tokens, 3, 7)
    tl_style = L.direct_logit_attribution(model, tokens, 3, 7, value_bias="attn_bias")
    assert (ours.total() - tl_style.total()).abs().max() <= 1e-10  # totals agree
    H, d = 4, 64
    dh = d // H
    hidden = {}
    blocks = model.transformer.h
    hs = [blocks[1].ln_1.register_forward_pre_hook(lambda m, a: hidden.__setitem__("x", a[0]))]
    with torch.no_grad():
        model.config._attn_implementation = "eager"  # sdpa returns no attention weights
        out = model(tokens, output_attentions=True)
        model.config._attn_implementation = "sdpa"
    for h in hs:
        h.remove()
    att = out.attentions[1][:, :, -1]  # [B, H, key] at the last position
    W = blocks[1].attn.c_attn.weight[:, 2 * d:]  # W_V, [d, H*dh]
    v = hidden["x"] @ W  # no bias
    W_U = model.lm_head.weight
    u = W_U[3] - W_U[7]
    largest = float(max(abs(x) for x in ours.mean().tolist()))
    for h in range(H):
        z = torch.einsum("bk,bkc->bc", att[:, h], v[..., h * dh:(h + 1) * dh])
        head = z @ blocks[1].attn.c_proj.weight[h * dh:(h + 1) * dh] @ u
        assert (tl_style[f"L1H{h}"] - head).abs().max() <= 1e-10 * max(largest, 1)
    assert (ours["L1H0"] - tl_style["L1H0"]).abs().max() > 1e-8  # the conventions really differ here
    with pytest.raises(LNFreeError, match="value_bias"):
        L.direct_logit_attribution(model, tokens, 3, 7, value_bias="tl")


def test_concurrent_calls_on_one_model_are_serialised(models):
    """Four threads running DLA on one model get the same numbers as one thread (runs hold a per-model lock)."""
    import threading

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    vocab = models["schaeff"].config.vocab_size
    inputs = [torch.randint(0, vocab, (3, 6 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [L.direct_logit_attribution(model, x, 3, 7).values for x in inputs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                got[i] = L.direct_logit_attribution(model, inputs[i], 3, 7).values
                assert torch.equal(got[i], expected[i])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(got[i], expected[i]) for i in range(4))
