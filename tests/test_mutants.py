"""Tests that kill the surviving mutants of issue 15, through the public API only.

Every expected value here is computed by hand from the unfolded float64 reference of conftest
(hacked LayerNorms written out as ``(x - mean) * w / 1e6 + b``, or the real ``nn.LayerNorm`` for
baselines), hooked with plain torch: no lnfree_interp code is used for the expectation.

Tolerances: 1e-10 absolute in float64 (the sums involved are O(10) logits, so this is ~1e-11 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lnfree_interp as L
from lnfree_interp import LNFreeError, logit_diff

from .conftest import LOADERS, load, reference

ANSWER, WRONG = [5, 17, 40], 9
TOL = 1e-10
NODES = ["head", "attn_out", "mlp_out", "neuron", "resid_pre"]


def _tokens(vocab, seed=1, shape=(3, 14)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _pair(vocab):
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, vocab, (3, 12), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(0, vocab, (3,), generator=gen)
    corrupted[:, 9] = torch.randint(0, vocab, (3,), generator=gen)
    return clean, corrupted


class Ref:
    """The float64 reference of an unfolded checkpoint, with every activation captured by hand."""

    def __init__(self, model):
        self.model = model
        self.ref = reference(model)
        cfg = model.config
        self.n_layers, self.n_heads, self.d_head = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    def run(self, tokens):
        ref, store, hooks = self.ref, {}, []

        def pre(name):
            return lambda m, a: store.__setitem__(name, a[0].detach())

        def post(name):
            return lambda m, a, out: store.__setitem__(name, (out[0] if isinstance(out, tuple) else out).detach())

        hooks.append(ref.transformer.ln_f.register_forward_pre_hook(pre("final")))
        hooks.append(ref.transformer.wte.register_forward_hook(post("embed")))
        hooks.append(ref.transformer.wpe.register_forward_hook(post("pos_embed")))
        for layer, block in enumerate(ref.transformer.h):
            hooks.append(block.ln_1.register_forward_pre_hook(pre(f"resid_pre{layer}")))
            hooks.append(block.attn.c_proj.register_forward_pre_hook(pre(f"z{layer}")))
            hooks.append(block.attn.c_proj.register_forward_hook(post(f"attn_out{layer}")))
            hooks.append(block.mlp.c_proj.register_forward_pre_hook(pre(f"post{layer}")))
            hooks.append(block.mlp.register_forward_hook(post(f"mlp_out{layer}")))
        try:
            with torch.no_grad():
                store["logits"] = ref(tokens).logits
        finally:
            for h in hooks:
                h.remove()
        return store

    def writes(self, store, layer, kind):
        """The residual-stream writes ``[B, P, k, d]`` of the nodes of one layer (resid_pre: the stream)."""
        blocks = self.ref.transformer.h
        if kind == "head":
            z = store[f"z{layer}"].unflatten(-1, (self.n_heads, self.d_head))  # [B, P, H, dh]
            W = blocks[layer].attn.c_proj.weight.unflatten(0, (self.n_heads, self.d_head))  # [H, dh, d]
            return torch.einsum("bphk,hkd->bphd", z, W)
        if kind == "neuron":
            return store[f"post{layer}"][..., None] * blocks[layer].mlp.c_proj.weight  # [B, P, N, d]
        return store[f"{kind}{layer}"][..., None, :]  # [B, P, 1, d]

    def unembed(self, r, answer, wrong):
        """Metric of final residuals ``r [..., B, d]`` through ln_f (recomputed) and the unembedding."""
        rows = torch.arange(r.shape[-2])
        lg = self.ref.lm_head(self.ref.transformer.ln_f(r))
        return lg[..., rows, answer] - lg[..., rows, wrong]


def _ids(x, batch):
    return torch.as_tensor(x).expand(batch)


# --------------------------------------------------------------------------------------------
# patching.py: the direct part of AtP for every node kind and layer (mutant: W_out[0] for all)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", NODES)
def test_atp_direct_part_equals_hand_written_direct_effect(nodes, models):
    """Direct part of AtP per node, layer and position == the change of the metric when the node's
    write (its corrupted minus clean value) is added to the final residual stream only, recomputed
    through the reference's ln_f and unembedding. Exact for an LN-free model and a linear metric."""
    src = models["schaeff"]
    clean, corrupted = _pair(src.config.vocab_size)
    B, P = clean.shape
    ref = Ref(src)
    s_clean, s_corr = ref.run(clean), ref.run(corrupted)
    answer, wrong = _ids(ANSWER, B), _ids(WRONG, B)
    model = L.load_hooked(src, dtype=torch.float64)
    atp = L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), nodes=nodes)
    r = s_clean["final"][:, -1]  # [B, d]
    base = ref.unembed(r, answer, wrong)
    row = 0
    for layer in range(ref.n_layers):
        delta = ref.writes(s_corr, layer, nodes) - ref.writes(s_clean, layer, nodes)  # [B, P, k, d]
        k = delta.shape[2]
        expected = torch.zeros(k, P, B, dtype=torch.float64)
        # only the last position's final residual reaches the metric
        expected[:, -1] = (ref.unembed(r + delta[:, -1].transpose(0, 1), answer, wrong) - base)  # [k, B]
        got = atp.direct[row : row + k]
        assert (got - expected).abs().max() <= TOL, (nodes, layer)
        row += k
    assert row == atp.direct.shape[0]
    assert atp.direct.abs().max() > 1e-3  # the check has something to compare


def test_neuron_atp_of_the_last_layer_equals_activation_patching(models):
    """Last-layer neurons reach the metric only directly: AtP == activation patching, and it is all
    direct (indirect == 0); earlier layers' neurons have an indirect part."""
    src = models["schaeff"]
    clean, corrupted = _pair(src.config.vocab_size)
    model = L.load_hooked(src, dtype=torch.float64)
    metric = logit_diff(ANSWER, WRONG)
    atp = L.attribution_patching(model, clean, corrupted, metric, nodes="neuron")
    act = L.activation_patching(model, clean, corrupted, metric, nodes="neuron", per_position=True,
                                positions=[-1], batch_size=4096, progress=False)
    last = [i for i, lab in enumerate(atp.labels) if lab.startswith(f"L{src.config.n_layer - 1}N")]
    first = [i for i, lab in enumerate(atp.labels) if lab.startswith("L0N")]
    assert len(last) == src.config.n_inner or len(last) == 4 * src.config.n_embd
    assert (atp.values[last, -1] - act.values[last, 0]).abs().max() <= TOL
    assert atp.indirect[last].abs().max() <= 1e-12
    assert act.values[last, 0].abs().max() > 1e-3
    assert atp.indirect[first].abs().max() > 1e-6


def test_atp_is_zero_at_padding_even_for_a_metric_that_reads_it(models):
    """Pins ``* valid``: a metric that reads every position (padding included) has non-zero
    gradients at padded positions, yet nothing is attributed to them."""
    src = models["schaeff"]
    clean, corrupted = _pair(src.config.vocab_size)
    mask = torch.ones_like(clean)
    mask[1, 8:] = 0  # right padding
    mask[2, :3] = 0  # left padding

    def everywhere(logits):  # reads padded positions too
        return logits[..., 5].sum(-1)

    model = L.load_hooked(src, dtype=torch.float64)
    for nodes in ("head", "neuron", "resid_pre"):
        atp = L.attribution_patching(model, clean, corrupted, everywhere, nodes=nodes, attention_mask=mask,
                                     corrupted_attention_mask=mask)
        pad = ~mask.bool().T  # [P, B]
        assert torch.count_nonzero(atp.values[:, pad]) == 0 and torch.count_nonzero(atp.direct[:, pad]) == 0
        assert atp.values[:, ~pad].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# backends: LN baselines with a non-default eps (mutant: eps hard-coded to 1e-5)
# --------------------------------------------------------------------------------------------


def _with_eps(model, eps):
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    model.config.layer_norm_epsilon = eps
    return model


@pytest.fixture(scope="module", params=[1e-3, 0.5])
def eps_model(request, base_model):
    return request.param, _with_eps(base_model, request.param)


@pytest.mark.parametrize("loader", LOADERS)
def test_ln_baseline_with_non_default_eps(loader, eps_model):
    """The frozen-scale DLA of an LN baseline sums to the metric and matches the hand formula
    ``(C v . g*u) / sqrt(var(r) + eps)``; the direct effect matches recomputing the real LN."""
    eps, src = eps_model
    tokens = _tokens(src.config.vocab_size)
    B = tokens.shape[0]
    ref = Ref(src)
    store = ref.run(tokens)
    answer, wrong = _ids(ANSWER, B), _ids(WRONG, B)
    model = load(loader, src, dtype=torch.float64, expect_lnfree=False)
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="layer")
    de = L.direct_effect(model, tokens, ANSWER, WRONG, components="layer")
    r = store["final"][:, -1]
    cr = r - r.mean(-1, keepdim=True)
    scale = (cr.pow(2).mean(-1) + eps).sqrt()  # [B]
    ln_f, W = ref.ref.transformer.ln_f, ref.ref.lm_head.weight
    u = (W[answer] - W[wrong]) * ln_f.weight  # [B, d]
    base = ref.unembed(r, answer, wrong)
    assert (dla.metric - base).abs().max() <= TOL
    assert (dla.total() - dla.metric).abs().max() <= TOL
    for label in dla.labels:
        if label in ("embed", "pos_embed"):
            v = store[label][:, -1]
        else:
            layer, kind = label.split("_", 1)
            v = store[f"{kind}{layer}"][:, -1]
        cv = v - v.mean(-1, keepdim=True)
        assert (dla[label] - (cv * u).sum(-1) / scale).abs().max() <= TOL, (label, eps)
        assert (de[label] - (base - ref.unembed(r - v, answer, wrong))).abs().max() <= TOL, (label, eps)


# --------------------------------------------------------------------------------------------
# inputs.py: boundary positions (mutant: real_idx > lengths)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["hf", "bridge"])
def test_position_boundaries(loader, models):
    src = models["schaeff"]
    model = load(loader, src, dtype=torch.float64)
    tokens = _tokens(src.config.vocab_size, shape=(1, 9))
    n = tokens.shape[1]
    with pytest.raises(LNFreeError, match="outside the prompt"):
        L.direct_logit_attribution(model, tokens, 5, 9, pos=n)
    with pytest.raises(LNFreeError, match="outside the prompt"):
        L.direct_logit_attribution(model, tokens, 5, 9, pos=-n - 1)
    first = L.direct_logit_attribution(model, tokens, 5, 9, pos=-n)
    assert torch.equal(first.values, L.direct_logit_attribution(model, tokens, 5, 9, pos=0).values)
    alone = L.direct_logit_attribution(model, tokens[:, :1], 5, 9)  # position 0 is a one-token prompt
    assert (first.values - alone.values).abs().max() <= TOL
    last = L.direct_logit_attribution(model, tokens, 5, 9, pos=n - 1)
    assert torch.equal(last.values, L.direct_logit_attribution(model, tokens, 5, 9, pos=-1).values)
    # padded batch: a prompt's length, not the padded width, is the bound
    padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long)], 1).expand(2, -1).clone()
    mask = torch.ones_like(padded)
    mask[1, n:] = 0
    with pytest.raises(LNFreeError, match="outside the prompt"):
        L.direct_logit_attribution(model, padded, 5, 9, pos=n, attention_mask=mask)
    with pytest.raises(LNFreeError, match="outside the prompt"):
        L.direct_logit_attribution(model, padded, 5, 9, pos=[n - 1, n], attention_mask=mask)  # per prompt
    both = L.direct_logit_attribution(model, padded, 5, 9, pos=[n + 4, n - 1], attention_mask=mask)
    assert (both.values[:, 1] - last.values[:, 0]).abs().max() <= TOL
    # the metric resolves positions with the same rule
    with pytest.raises(LNFreeError, match="outside the prompt"):
        logit_diff(5, 9, pos=n)(torch.zeros(1, n, 20))
    assert float(logit_diff(5, 9, pos=-n)(torch.arange(n * 20.0).view(1, n, 20))) == -4.0


# --------------------------------------------------------------------------------------------
# dla.py: top-k neurons by mean |value| (mutant: signed mean)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["dla", "direct_effect"])
def test_top_k_keeps_the_largest_by_absolute_value(fn, models):
    src = models["schaeff"]
    model = L.load_hooked(src, dtype=torch.float64)
    tokens = _tokens(src.config.vocab_size)
    run = (lambda **kw: L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", **kw)) \
        if fn == "dla" else (lambda **kw: L.direct_effect(model, tokens, ANSWER, WRONG, components="neuron", **kw))
    full = run()
    neurons = [i for i, lab in enumerate(full.labels) if "N" in lab and lab.startswith("L")]
    score = full.values[neurons].abs().mean(-1)
    k = 10
    order = sorted(range(len(neurons)), key=lambda i: -float(score[i]))
    expected = {full.labels[neurons[i]] for i in order[:k]}
    assert float(score[order[k - 1]]) > float(score[order[k]])  # no tie at the cut
    signed = full.values[neurons].mean(-1)
    assert any(float(signed[i]) < 0 for i in order[:k])  # large negative neurons are among the top
    top = run(top_k=k)
    kept = {lab for lab in top.labels if lab.startswith("L") and "N" in lab}
    assert kept == expected
    for lab in kept:
        assert torch.equal(top[lab], full[lab])
    for layer in range(src.config.n_layer):  # the rest row is the sum of the dropped neurons
        dropped = [neurons[i] for i in order[k:] if full.labels[neurons[i]].startswith(f"L{layer}N")]
        assert (top[f"{layer}_mlp_rest"] - full.values[dropped].sum(0)).abs().max() <= TOL
    assert (top.values.sum(0) - full.values.sum(0)).abs().max() <= TOL


# --------------------------------------------------------------------------------------------
# dla.py: DLA and direct effect by layer / neuron, and mean ablation, against hand computation
# --------------------------------------------------------------------------------------------


def _hand_components(ref, store, by):
    """label -> write to the final residual at every position ``[B, P, d]``, by hand."""
    out = {"embed": store["embed"], "pos_embed": store["pos_embed"].expand_as(store["embed"])}
    for layer, block in enumerate(ref.ref.transformer.h):
        out[f"{layer}_attn_out"] = store[f"attn_out{layer}"]
        if by == "neuron":
            W = block.mlp.c_proj.weight
            post = store[f"post{layer}"]
            for n in range(W.shape[0]):
                out[f"L{layer}N{n}"] = post[..., n, None] * W[n]
            out[f"{layer}_mlp_bias"] = block.mlp.c_proj.bias.expand_as(store["embed"])
        else:
            out[f"{layer}_mlp_out"] = store[f"mlp_out{layer}"]
    return out


@pytest.mark.parametrize("ablation", ["zero", "mean", "corrupted"])
@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
@pytest.mark.parametrize("by", ["layer", "neuron"])
def test_dla_and_direct_effect_by_layer_and_neuron_against_hand_computation(by, encoding, ablation, models):
    """Every component's direct effect is ``metric(r) - metric(r - (v - v_ablated))`` with the final
    LayerNorm recomputed (LN baselines) and the ablated value zero, the mean over every token, or the
    corrupted prompt's value; DLA equals it on LN-free models and is ``(C v) . (g * u) / s(r)`` with
    the scale frozen on baselines."""
    src = models[encoding]
    tokens = _tokens(src.config.vocab_size)
    corrupted = _tokens(src.config.vocab_size, seed=7)
    B = tokens.shape[0]
    ref = Ref(src)
    store = ref.run(tokens)
    answer, wrong = _ids(ANSWER, B), _ids(WRONG, B)
    r = store["final"][:, -1]
    base = ref.unembed(r, answer, wrong)
    hand = _hand_components(ref, store, by)
    assert (sum(v[:, -1] for v in hand.values()) - r).abs().max() <= 1e-9  # they make up the final residual
    if ablation == "zero":
        ablated = {lab: 0.0 for lab in hand}
    elif ablation == "mean":
        ablated = {lab: v.mean((0, 1)) for lab, v in hand.items()}
    else:
        hand_c = _hand_components(ref, ref.run(corrupted), by)
        ablated = {lab: v[:, -1] for lab, v in hand_c.items()}
    model = L.load_hf(src, dtype=torch.float64, expect_lnfree=encoding != "layernorm")
    dla = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by=by)
    de = L.direct_effect(model, tokens, ANSWER, WRONG, components=by,
                         ablation=corrupted if ablation == "corrupted" else ablation)
    assert set(dla.labels) == set(hand) and de.labels == dla.labels
    expected = torch.stack([base - ref.unembed(r - (hand[lab][:, -1] - ablated[lab]), answer, wrong)
                            for lab in de.labels])
    assert (de.values - expected).abs().max() <= TOL
    if ablation != "zero":  # the ablated value matters for some component
        zero = torch.stack([base - ref.unembed(r - hand[lab][:, -1], answer, wrong) for lab in de.labels])
        assert (expected - zero).abs().max() > 1e-3
    if encoding == "schaeff":
        zero = torch.stack([base - ref.unembed(r - hand[lab][:, -1], answer, wrong) for lab in dla.labels])
        assert (dla.values - zero).abs().max() <= TOL
    else:
        ln_f, W = ref.ref.transformer.ln_f, ref.ref.lm_head.weight
        u = (W[answer] - W[wrong]) * ln_f.weight  # [B, d]: the direction before centring
        cr = r - r.mean(-1, keepdim=True)
        scale = (cr.pow(2).mean(-1) + ln_f.eps).sqrt()
        frozen = torch.stack([((hand[lab][:, -1] - hand[lab][:, -1].mean(-1, keepdim=True)) * u).sum(-1) / scale
                              for lab in dla.labels])
        assert (dla.values - frozen).abs().max() <= TOL


def test_ln_baseline_attribution_ignores_a_constant_added_to_the_unembedding(models):
    """The final LayerNorm centres its output, so adding ``k_v`` to every entry of the unembedding's
    column ``v`` changes no logit difference and no attribution: DLA and the direct effect must
    project on the centred direction (mutant: the direction used uncentred)."""
    src = models["layernorm"]
    tokens = _tokens(src.config.vocab_size)
    model = L.load_hf(src, dtype=torch.float64, expect_lnfree=False)
    shifted = L.load_hf(src, dtype=torch.float64, expect_lnfree=False)
    with torch.no_grad():  # lm_head.weight is [vocab, d]: the same constant along d for each token
        shifted.lm_head.weight += torch.linspace(-3, 3, shifted.lm_head.weight.shape[0], dtype=torch.float64)[:, None]
    for by in ("head", "neuron"):
        for fn in (lambda m: L.direct_logit_attribution(m, tokens, ANSWER, WRONG, by=by),
                   lambda m: L.direct_effect(m, tokens, ANSWER, WRONG, components=by)):
            a, b = fn(model), fn(shifted)
            assert (a.metric - b.metric).abs().max() <= TOL  # the same model
            assert (a.values - b.values).abs().max() <= TOL, by


def test_mean_ablation_of_a_varying_component(models):
    """Mean ablation replaces a head's write by its mean over every real token of the inputs
    (padding excluded): DE = metric(r) - metric(r - (v - mean v))."""
    src = models["schaeff"]
    tokens = _tokens(src.config.vocab_size)
    lengths = [14, 9, 11]
    mask = torch.zeros_like(tokens)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ref = Ref(src)
    answer, wrong = torch.tensor(ANSWER), torch.tensor([WRONG] * 3)
    per_prompt = [ref.run(tokens[b : b + 1, :n]) for b, n in enumerate(lengths)]
    model = L.load_hooked(src, dtype=torch.float64)
    de = L.direct_effect(model, tokens, ANSWER, WRONG, ablation="mean", attention_mask=mask)
    checked = 0
    for layer in range(ref.n_layers):
        heads = torch.cat([ref.writes(s, layer, "head")[0] for s in per_prompt])  # [real tokens, H, d]
        mean = heads.mean(0)  # [H, d]
        last = torch.stack([ref.writes(s, layer, "head")[0, -1] for s in per_prompt])  # [B, H, d]
        r = torch.stack([s["final"][0, -1] for s in per_prompt])
        base = ref.unembed(r, answer, wrong)
        for h in range(ref.n_heads):
            expected = base - ref.unembed(r - (last[:, h] - mean[h]), answer, wrong)
            assert (de[f"L{layer}H{h}"] - expected).abs().max() <= TOL, (layer, h)
            zero = base - ref.unembed(r - last[:, h], answer, wrong)
            assert (expected - zero).abs().max() > 1e-3  # the mean is not zero: the ablation matters
            checked += 1
    assert checked == ref.n_layers * ref.n_heads


@pytest.mark.parametrize("loader", ["hf", "bridge"])
def test_input_boundaries(loader, models, tokenizer):
    """The edges of the vocabulary and the context, and string batches padded by the library."""
    src = models["schaeff"]
    model = load(loader, src, dtype=torch.float64, tokenizer=tokenizer)
    V, n_ctx = src.config.vocab_size, src.config.n_positions
    ok = L.direct_logit_attribution(model, torch.tensor([[0, 3, V - 1]]), 0, V - 1)  # ids 0 and V-1 are valid
    assert (ok.total() - ok.metric).abs().max() <= TOL
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        L.direct_logit_attribution(model, torch.tensor([[0, 3, V]]), 0)
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        L.direct_logit_attribution(model, torch.tensor([[0, 3, 4]]), V)
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        L.direct_logit_attribution(model, torch.tensor([[0, 3, 4]]), 0, -1)
    full = torch.randint(0, V, (1, n_ctx), generator=torch.Generator().manual_seed(4))
    assert L.direct_logit_attribution(model, full, 5, 9).values.shape[1] == 1  # exactly n_ctx tokens
    with pytest.raises(LNFreeError, match="n_ctx"):
        L.direct_logit_attribution(model, torch.cat([full, full[:, :1]], 1), 5, 9)
    # strings of different lengths: padded by the library, each prompt attributed at its own last token
    texts = ["When Mary and John went to the store, John gave a drink to", "The king is dead"]
    both = L.direct_logit_attribution(model, texts, " Mary", " John")
    for b, text in enumerate(texts):
        alone = L.direct_logit_attribution(model, text, " Mary", " John")
        assert (both.values[:, b] - alone.values[:, 0]).abs().max() <= TOL
    batch = tokenizer(texts[1], return_tensors="pt")  # a tokenizer batch (mapping) is accepted as is
    from_mapping = L.direct_logit_attribution(model, dict(batch), " Mary", " John")
    assert (from_mapping.values[:, 0] - both.values[:, 1]).abs().max() <= TOL


# --------------------------------------------------------------------------------------------
# dla.py: argument boundaries and compare_dla_direct_effect's tables
# --------------------------------------------------------------------------------------------


def test_dla_argument_boundaries(models):
    src = models["schaeff"]
    model = L.load_hf(src, dtype=torch.float64)
    tokens = _tokens(src.config.vocab_size)
    one = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", top_k=1)  # the smallest k
    assert sum(lab[0] == "L" and "N" in lab for lab in one.labels) == 1
    for bad in (0, -2, True, 2.0, "3"):
        with pytest.raises(LNFreeError, match="top_k="):
            L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", top_k=bad)
    for bad in ("1", [True], [1.0], (0, "1")):
        with pytest.raises(LNFreeError, match="layers="):
            L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", layers=bad)
    assert L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", layers=(1,)).labels[2] == "0_attn_out"
    n_neurons = src.config.n_layer * 4 * src.config.n_embd
    every = L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron", top_k=n_neurons)
    assert every.labels == L.direct_logit_attribution(model, tokens, ANSWER, WRONG, by="neuron").labels  # no rest rows
    for bad in (0, -1, True, 2.5):
        with pytest.raises(LNFreeError, match="n_boot="):
            L.compare_dla_direct_effect(model, tokens, ANSWER, WRONG, n_boot=bad)
    assert L.compare_dla_direct_effect(model, tokens, ANSWER, WRONG, n_boot=1).ci is not None


def test_compare_tables_against_the_two_results(models):
    """compare_dla_direct_effect's per-head table and max error are those of the DLA and
    direct-effect results it is made of (both orientations of the logit difference, so the largest
    error is once positive and once negative); its defaults are 1000 resamples and seed 0."""
    src = models["layernorm"]
    model = L.load_hf(src, dtype=torch.float64, expect_lnfree=False)
    tokens = _tokens(src.config.vocab_size, shape=(8, 10))
    heads = [f"L{l}H{h}" for l in range(src.config.n_layer) for h in range(src.config.n_head)]
    signs = set()
    for answer, wrong in ((5, WRONG), (WRONG, 5)):
        cmp = L.compare_dla_direct_effect(model, tokens, answer, wrong)
        dla = L.direct_logit_attribution(model, tokens, answer, wrong)
        de = L.direct_effect(model, tokens, answer, wrong)
        assert de.exact and not dla.exact  # the direct effect is exact by construction; DLA with LN is not
        assert list(cmp.per_component["component"]) == heads
        assert cmp.per_component["dla_mean"].tolist() == pytest.approx([float(dla[h].mean()) for h in heads],
                                                                       abs=TOL)
        assert cmp.per_component["de_mean"].tolist() == pytest.approx([float(de[h].mean()) for h in heads], abs=TOL)
        diff = torch.stack([dla[h] - de[h] for h in heads])
        err = float(diff.abs().max())
        signs.add(float(diff.flatten()[diff.abs().argmax()]) > 0)
        assert err > 1e-3 and cmp.stats["max_abs_error"] == pytest.approx(err, abs=TOL)
    assert signs == {True, False}
    assert cmp.ci == L.compare_dla_direct_effect(model, tokens, answer, wrong, n_boot=1000, seed=0).ci
    assert cmp.ci != L.compare_dla_direct_effect(model, tokens, answer, wrong, seed=1).ci


def test_compare_refuses_prompts_that_change_between_its_two_passes(models):
    from torch.utils.data import DataLoader

    src = models["schaeff"]
    model = L.load_hf(src, dtype=torch.float64)
    tokens = _tokens(src.config.vocab_size, shape=(8, 6))
    torch.manual_seed(0)
    shuffled = DataLoader(list(tokens), batch_size=4, shuffle=True)
    with pytest.raises(LNFreeError, match="different prompts"):
        L.compare_dla_direct_effect(model, shuffled, 5, 9, progress=False)
    same = DataLoader(list(tokens), batch_size=4)
    assert L.compare_dla_direct_effect(model, same, 5, 9, progress=False).nmae <= 1e-8


# --------------------------------------------------------------------------------------------
# patching.py: what the results claim, DataLoaders in activation patching, compare's guards
# --------------------------------------------------------------------------------------------


def test_atp_claims_an_exact_direct_part_only_for_lnfree_models_and_linear_metrics(models):
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    free = L.load_hf(models["schaeff"], dtype=torch.float64)
    base = L.load_hf(models["layernorm"], dtype=torch.float64, expect_lnfree=False)

    def plain(logits):  # a callable: its linearity is unknown
        return logits[:, -1, 5] - logits[:, -1, 9]

    for model, metric, exact in ((free, logit_diff(5, 9), True), (free, plain, False),
                                 (base, logit_diff(5, 9), False), (base, plain, False)):
        res = L.attribution_patching(model, clean, corrupted, metric)
        assert res.extra["direct_exact"] is exact and not res.exact
        assert ("direct part exact" in res.note) is exact
    act = L.activation_patching(free, clean, corrupted, logit_diff(5, 9), progress=False)
    assert act.exact and act.kind == "activation_patching"


def test_activation_patching_takes_a_dataloader_of_pairs(models):
    from torch.utils.data import DataLoader

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(5, 9)
    one = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", progress=False)
    pairs = DataLoader(list(zip(clean, corrupted)), batch_size=2)
    streamed = L.activation_patching(model, pairs, None, metric, nodes="mlp_out", progress=False)
    assert (streamed.values - one.values).abs().max() <= TOL and streamed.values.shape == one.values.shape
    small = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", batch_size=1, progress=False)
    assert (small.values - one.values).abs().max() <= TOL


def test_compare_attribution_guards(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(5, 9)
    atp = L.attribution_patching(model, clean, corrupted, metric, nodes="mlp_out", per_position=False)
    act = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", progress=False)
    cmp = L.compare_attribution(atp, act)
    assert cmp.ci == L.compare_attribution(atp, act, n_boot=1000, seed=0).ci  # the defaults
    with pytest.raises(LNFreeError, match="attribution_patching result first"):
        L.compare_attribution(atp, atp)
    with pytest.raises(LNFreeError, match="attribution_patching result first"):
        L.compare_attribution(act, act)
    eap = L.edge_attribution(model, clean, corrupted, metric)
    for est, truth in ((eap, act), (atp, eap)):
        with pytest.raises(LNFreeError, match="EAP / EAP-IG result first"):
            L.compare_attribution(est, truth)
    for shift in (1.0, -1.0):  # other inputs: metrics off in either direction
        other = copy.copy(act)
        other.extra = {**act.extra, "metric_clean": act.extra["metric_clean"] + shift}
        with pytest.raises(LNFreeError, match="different metric clean"):
            L.compare_attribution(atp, other)
    atp_p = L.attribution_patching(model, clean, corrupted, metric, nodes="mlp_out", per_position=True)
    act_p = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", per_position=True,
                                  progress=False)
    moved = copy.copy(act_p)
    moved.positions = list(reversed(act_p.positions))
    with pytest.raises(LNFreeError, match="cover positions"):
        L.compare_attribution(atp_p, moved)
    per = L.compare_attribution(atp_p, act_p)
    assert len(per.layers) == atp_p.values.numel()  # one layer label per (node, position, prompt)


# --------------------------------------------------------------------------------------------
# inputs.py: what the errors name, masks at their edges, tokenizers that add special tokens
# --------------------------------------------------------------------------------------------


def test_input_errors_name_the_culprits(models):
    src = models["schaeff"]
    model = L.load_hf(src, dtype=torch.float64)
    V = src.config.vocab_size
    for bad in (5, torch.tensor(5), torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(LNFreeError, match="shape"):
            L.direct_logit_attribution(model, bad, 5)
    ids = torch.tensor([[0, V, V + 1, -1, V + 2, V + 3, V + 4, V - 1]])  # 0 and V-1 valid; 6 bad, 5 named
    with pytest.raises(LNFreeError, match=rf"Token ids \[{V}, {V + 1}, -1, {V + 2}, {V + 3}\] are outside"):
        L.direct_logit_attribution(model, ids, 5)
    tokens = _tokens(V, shape=(5, 6))
    mask = torch.ones_like(tokens)
    mask[1] = torch.tensor([1, 0, 1, 1, 1, 1])  # a gap
    mask[2] = torch.tensor([1, 1, 0, 0, 1, 0])  # a gap
    mask[3] = torch.tensor([0, 0, 0, 1, 1, 1])  # left padding: fine
    mask[4] = torch.tensor([0, 0, 0, 0, 0, 1])  # one real token: fine
    with pytest.raises(LNFreeError, match=r"rows \[1, 2\] have gaps"):
        L.direct_logit_attribution(model, tokens, 5, attention_mask=mask)
    mask[1:3] = 1
    one = L.direct_logit_attribution(model, tokens, 5, attention_mask=mask)
    alone = L.direct_logit_attribution(model, tokens[4:, 5:], 5)
    assert (one.values[:, 4] - alone.values[:, 0]).abs().max() <= TOL
    mask[0] = 0
    with pytest.raises(LNFreeError, match="all zeros"):
        L.direct_logit_attribution(model, tokens, 5, attention_mask=mask)
    with pytest.raises(LNFreeError, match="pos="):
        L.direct_logit_attribution(model, tokens[:2], 5, pos=[[1], [2]])  # one int per prompt, not a column
    clean = _tokens(V, shape=(5, 6))
    cmask, kmask = torch.ones_like(clean), torch.ones_like(clean)
    for i in (1, 2, 3, 4):
        kmask[i, :i] = 0  # corrupted prompt i is i tokens shorter
    with pytest.raises(LNFreeError, match=r"pair\(s\) \[1, 2, 3, 4\] .*\(6, 5\), \(6, 4\), \(6, 3\)\]"):
        L.attribution_patching(model, clean, clean, logit_diff(5, 9), attention_mask=cmask,
                               corrupted_attention_mask=kmask)


def test_a_tokenizer_that_adds_special_tokens_itself(models, tokenizer):
    """Strings are tokenized without the tokenizer's own special tokens (a BOS only where the model's
    config asks for one), and single-token answers stay single tokens."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>",
                                                                                                    bos)])
    text = "When Mary and John went to the store"
    assert tok(text)["input_ids"][0] == bos  # this tokenizer does add a BOS by itself
    plain = tok(text, add_special_tokens=False)["input_ids"]
    model = L.load_hf(models["schaeff"], dtype=torch.float64, tokenizer=tok)
    from_text = L.direct_logit_attribution(model, text, " Mary", " John")
    from_ids = L.direct_logit_attribution(model, torch.tensor([plain]), tok(" Mary", add_special_tokens=False)[
        "input_ids"][0], tok(" John", add_special_tokens=False)["input_ids"][0])
    assert torch.equal(from_text.values, from_ids.values)


# --------------------------------------------------------------------------------------------
# backends: a model whose parameters are frozen still gives gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["hf", "bridge"])
def test_gradient_methods_on_a_frozen_model(loader, models):
    """``model.requires_grad_(False)`` (common before interpretability work) changes nothing: the hooked
    activations become leaves that take gradients, and the user's flags are left as they were."""
    src = models["schaeff"]
    model = load(loader, src, dtype=torch.float64)
    clean, corrupted = _pair(src.config.vocab_size)
    metric = logit_diff(5, 9)
    ref = L.attribution_patching(model, clean, corrupted, metric)
    ref_e = L.edge_attribution(model, clean, corrupted, metric)
    model.requires_grad_(False)
    frozen = L.attribution_patching(model, clean, corrupted, metric)
    assert (frozen.values - ref.values).abs().max() <= TOL
    assert (L.edge_attribution(model, clean, corrupted, metric).values - ref_e.values).abs().max() <= TOL
    assert not any(p.requires_grad for p in model.parameters())


def test_edge_comparison_normalisation_and_layers(models):
    """compare_attribution(EAP, edge patching): the paper's normalisation divides by each prompt's
    full-restoration effect metric(corrupted) - metric(clean); points are coloured by reader layer
    (the logits after the last layer)."""
    src = models["schaeff"]
    model = L.load_hf(src, dtype=torch.float64)
    clean, corrupted = _pair(src.config.vocab_size)
    metric = logit_diff(5, 9)
    eap = L.edge_attribution(model, clean, corrupted, metric)
    edges = eap.top_edges(12)
    truth = L.edge_patching(model, clean, corrupted, metric, edges=edges, progress=False)
    cmp = L.compare_attribution(eap, truth)
    row = {e: i for i, e in enumerate(eap.edges)}
    a = eap.values[[row[e] for e in edges]]
    restore = truth.extra["metric_corrupted"] - truth.extra["metric_clean"]
    assert restore.abs().min() > 1e-3
    hand = ((a - truth.values) / restore).abs().mean()
    assert cmp.stats["normalised_mae"] == pytest.approx(float(hand), abs=1e-12)
    n = src.config.n_layer
    expected = [n if e.reader.kind == "logits" else e.reader.layer for e in edges for _ in range(clean.shape[0])]
    assert cmp.layers == expected and n in expected


def test_ln_baseline_edges_ignore_a_constant_added_to_the_readers(models):
    """A LayerNorm's output is centred, so adding ``k_j`` to every entry of column ``j`` of a reader
    (``c_attn``, ``c_fc``) leaves the model unchanged; EAP's gradients through the LayerNorm (its
    vector-Jacobian product) must not see it either (mutant: the incoming gradient left uncentred)."""
    src = models["layernorm"]
    clean, corrupted = _pair(src.config.vocab_size)
    metric = logit_diff(5, 9)
    model = L.load_hf(src, dtype=torch.float64, expect_lnfree=False)
    shifted = L.load_hf(src, dtype=torch.float64, expect_lnfree=False)
    with torch.no_grad():  # Conv1D weights are [d_model, out]: one constant down each output column
        for block in shifted.transformer.h:
            for conv in (block.attn.c_attn, block.mlp.c_fc):
                conv.weight += torch.linspace(-2, 2, conv.weight.shape[1], dtype=torch.float64)
    a = L.edge_attribution(model, clean, corrupted, metric)
    b = L.edge_attribution(shifted, clean, corrupted, metric)
    assert (a.extra["metric_clean"] - b.extra["metric_clean"]).abs().max() <= TOL  # the same model
    assert (a.values - b.values).abs().max() <= 1e-9


def test_found_by_a_fresh_user_bootstrap_and_mask_values(models):
    """compare_attribution validates n_boot / seed like compare_dla_direct_effect (raw RuntimeError /
    TypeError before; numpy integers accepted by both); a fractional attention mask is refused, not cast
    (0.5 used to become 0 silently)."""
    import numpy as np

    src = models["schaeff"]
    model = L.load_hf(src, dtype=torch.float64)
    clean, corrupted = _pair(src.config.vocab_size)
    metric = logit_diff(5, 9)
    atp = L.attribution_patching(model, clean, corrupted, metric, per_position=False)
    act = L.activation_patching(model, clean, corrupted, metric, progress=False)
    eap = L.edge_attribution(model, clean, corrupted, metric)
    truth = L.edge_patching(model, clean, corrupted, metric, edges=eap.top_edges(5), progress=False)
    for pair in ((atp, act), (eap, truth)):
        for bad in ({"n_boot": 0}, {"n_boot": -1}, {"n_boot": 2.5}, {"n_boot": True}, {"seed": "x"}, {"seed": 1.5}):
            with pytest.raises(LNFreeError, match=f"{next(iter(bad))}="):
                L.compare_attribution(*pair, **bad)
        assert L.compare_attribution(*pair, n_boot=np.int64(10), seed=np.int64(1)).ci is not None
    assert L.compare_dla_direct_effect(model, clean, 5, 9, n_boot=np.int64(10)).ci is not None
    for mask in ([[1.0, 1.0, 1.0, 0.5, 0.5]], [[1.0, 1.0, 1.0, 1.5, 1.0]], [[1.0, 0.5, 1.0, 1.0, 1.0]]):
        with pytest.raises(LNFreeError, match="only 0 and 1"):
            L.direct_logit_attribution(model, clean[:1, :5], 5, attention_mask=torch.tensor(mask))
    ok = L.direct_logit_attribution(model, clean[:1, :5], 5, attention_mask=torch.tensor([[1.0, 1, 1, 0, 0]]))
    alone = L.direct_logit_attribution(model, clean[:1, :3], 5)
    assert (ok.values - alone.values).abs().max() <= TOL
