"""The fold (lnfree_interp.fold): maths against a hand-written LayerNorm, purity, idempotence."""

import pytest
import torch

from lnfree_interp import LNFreeError
from lnfree_interp.fold import classify_layernorms, detect_encoding, fold_state_dict, ln_names

from .conftest import hack_schaeff


def _eps(model):
    return {n: float(model.get_submodule(n).eps) for n in ln_names(model.config.n_layer)}


def _fold(model, **kw):
    sd = model.state_dict()
    lns = classify_layernorms(sd, model.config.n_layer, _eps(model))
    return fold_state_dict(sd, model.config.n_layer, lns, **kw), lns


def test_folded_reader_equals_hand_written_layernorm(models):
    """x @ W' + c' == ((x - mean) * w/1e6 + b) @ W + c for c_attn of a schaeff checkpoint."""
    model = models["schaeff"]
    folded, _ = _fold(model, dtype=torch.float64)
    ln, attn = model.transformer.h[0].ln_1, model.transformer.h[0].attn.c_attn
    x = torch.randn(5, 64, dtype=torch.float64) * 3 + 2  # non-centred inputs
    hand = ((x - x.mean(-1, keepdim=True)) * ln.weight.double() / 1e6 + ln.bias.double()) @ attn.weight.double() \
        + attn.bias.double()
    got = x @ folded["transformer.h.0.attn.c_attn.weight"] + folded["transformer.h.0.attn.c_attn.bias"]
    assert (got - hand).abs().max() <= 1e-12 * hand.abs().max()


def test_identity_without_fold_is_wrong(models):
    """Replacing the hacked LNs by identities without folding changes the logits by O(1); the
    library's fold (load_hf) reproduces the hand-written reference instead."""
    import copy

    import lnfree_interp as L

    from .conftest import reference

    model = models["schaeff"]
    naive = copy.deepcopy(model).double()
    for block in naive.transformer.h:
        block.ln_1, block.ln_2 = torch.nn.Identity(), torch.nn.Identity()
    naive.transformer.ln_f = torch.nn.Identity()
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hand = reference(model)(tokens).logits
        unfolded = naive(tokens).logits
        folded = L.load_hf(model, dtype=torch.float64)(tokens).logits
    assert (unfolded - hand).abs().max() > 0.1 * hand.abs().max()
    assert (folded - hand).abs().max() <= 1e-12 * hand.abs().max()


def test_unembedding_folded_untied_and_wte_unchanged(models):
    model = models["schaeff"]
    wte = model.transformer.wte.weight.detach().clone()
    folded, _ = _fold(model, dtype=torch.float64)
    assert torch.equal(folded["transformer.wte.weight"], wte.double())
    assert torch.equal(model.transformer.wte.weight, wte)
    assert folded["lm_head.weight"].data_ptr() != folded["transformer.wte.weight"].data_ptr()
    ln_f = model.transformer.ln_f
    r = torch.randn(3, 64, dtype=torch.float64)
    hand = ((r - r.mean(-1, keepdim=True)) * ln_f.weight.double() / 1e6 + ln_f.bias.double()) @ wte.double().T
    got = r @ folded["lm_head.weight"].T + folded["lm_head.bias"]
    assert (got - hand).abs().max() <= 1e-12 * hand.abs().max()


def test_fold_never_writes_to_its_input_and_does_not_alias(models):
    model = models["apollo"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, _ = _fold(model, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ptrs = {v.data_ptr() for v in model.state_dict().values()}
    assert not any(v.data_ptr() in ptrs for v in folded.values())


def test_fold_is_idempotent(models):
    """Folding the folded weights again changes nothing (the card's re-run-a-cell bug class): the
    folded state dict, given hacked identity LNs (weight 1e6, bias 0, eps 1e12), is folded for real
    (centring and affine) and comes back the same, because its readers are already centred."""
    model = models["schaeff"]
    once, _ = _fold(model, dtype=torch.float64)
    hacked = dict(once)
    for name in ln_names(model.config.n_layer):
        hacked[f"{name}.weight"] = torch.full((model.config.n_embd,), 1e6, dtype=torch.float64)
        hacked[f"{name}.bias"] = torch.zeros(model.config.n_embd, dtype=torch.float64)
    lns = classify_layernorms(hacked, model.config.n_layer, {n: 1e12 for n in ln_names(model.config.n_layer)})
    assert all(ln.hacked for ln in lns)
    twice = fold_state_dict(hacked, model.config.n_layer, lns, dtype=torch.float64, tied_unembed=False)
    assert set(once) == set(twice)
    for k in once:
        assert (once[k] - twice[k]).abs().max() <= 1e-12 * once[k].abs().max().clamp_min(1), k
    cast = fold_state_dict(once, model.config.n_layer, None, dtype=torch.float64, tied_unembed=False)
    assert all(torch.equal(once[k], cast[k]) for k in once)  # no LNs: a plain cast


def test_center_writing_weights_centres_writers_only(models):
    model = models["schaeff"]
    folded, _ = _fold(model, dtype=torch.float64, center_writing_weights=True)
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.attn.c_proj.weight",
                "transformer.h.0.mlp.c_proj.bias"):
        assert folded[key].mean(-1).abs().max() < 1e-12
    # readers are centred over d_model (their input dimension), whatever the option
    assert folded["transformer.h.0.mlp.c_fc.weight"].mean(0).abs().max() < 1e-12


def test_classification_and_encodings(models):
    for name, expected in (("schaeff", "schaeff"), ("apollo", "apollo"), ("layernorm", "layernorm")):
        model = models[name]
        lns = classify_layernorms(model.state_dict(), model.config.n_layer, _eps(model))
        assert detect_encoding(lns, model.state_dict()) == expected
        assert all(ln.hacked == (expected != "layernorm") for ln in lns)


def test_half_hacked_names_the_layernorms(models):
    model = hack_schaeff(models["layernorm"])
    with torch.no_grad():  # undo the weight scaling of one LN, keep its eps 1e12
        model.transformer.h[1].ln_2.weight.div_(1e6)
    sd = model.state_dict()
    lns = classify_layernorms(sd, 2, _eps(model))
    with pytest.raises(LNFreeError, match=r"transformer\.h\.1\.ln_2"):
        detect_encoding(lns, sd)


def test_eps_without_weight_scaling_is_half_hacked(models):
    model = models["layernorm"]
    sd = model.state_dict()
    lns = classify_layernorms(sd, 2, {n: 1e12 for n in ln_names(2)})
    with pytest.raises(LNFreeError, match="Half-hacked"):
        detect_encoding(lns, sd)


def test_weights_scaled_without_eps_is_half_hacked(models):
    model = models["schaeff"]
    sd = model.state_dict()
    lns = classify_layernorms(sd, 2, {n: 1e-5 for n in ln_names(2)})
    with pytest.raises(LNFreeError, match="eps"):
        detect_encoding(lns, sd)


def test_float16_overflow_is_refused(models):
    model = models["schaeff"]
    sd = dict(model.state_dict())
    sd["transformer.h.0.attn.c_proj.weight"] = sd["transformer.h.0.attn.c_proj.weight"] * 1e6
    lns = classify_layernorms(sd, 2, _eps(model))
    with pytest.raises(LNFreeError, match="overflows in torch.float16"):
        fold_state_dict(sd, 2, lns, dtype=torch.float16)
    # the hacked LN weights overflow float16 themselves, but they are folded away in float64 first
    assert torch.isinf(model.transformer.ln_f.weight.half()).any()
    ok = fold_state_dict(model.state_dict(), 2, lns, dtype=torch.float16)
    assert all(torch.isfinite(v).all() for v in ok.values())


def test_chunked_fold_equals_unchunked_and_the_hand_formula(models):
    """Issue 13: the streaming fold works a block of columns at a time. Blocks of 7 columns (the
    vocabulary of 330 and every reader split into many blocks, with a ragged last block) give the
    float64 result of a single block, and both equal the formula written out in one piece."""
    import warnings

    model = models["schaeff"]
    with warnings.catch_warnings():  # e.g. torch resizing a mis-shaped out= buffer: the blocks must fit exactly
        warnings.simplefilter("error")
        small, lns = _fold(model, dtype=torch.float64, chunk=7)
    whole, _ = _fold(model, dtype=torch.float64, chunk=10**9)
    default, _ = _fold(model, dtype=torch.float64)
    assert set(small) == set(whole) == set(default)
    for k in whole:
        scale = whole[k].abs().max().clamp(min=1)
        assert (small[k] - whole[k]).abs().max() <= 1e-15 * scale, k
        assert (default[k] - whole[k]).abs().max() <= 1e-15 * scale, k
    # the unembedding by hand: C diag(g) wte^T and b @ wte^T, in one piece
    ln_f = model.transformer.ln_f
    g = ln_f.weight.double() / ln_f.eps ** 0.5
    wte_t = model.transformer.wte.weight.double().T
    W_U = g[:, None] * wte_t
    W_U = W_U - W_U.mean(0, keepdim=True)
    assert (small["lm_head.weight"].T - W_U).abs().max() <= 1e-14 * W_U.abs().max()
    assert (small["lm_head.bias"] - ln_f.bias.double() @ wte_t).abs().max() <= 1e-13


def test_query_scale_is_folded_into_w_q_only(models):
    """q_scale multiplies the query columns of c_attn (weight and bias) and nothing else."""
    model = models["schaeff"]
    plain, _ = _fold(model, dtype=torch.float64)
    scaled, _ = _fold(model, dtype=torch.float64, q_scale=[2.0, 0.25])
    d = model.config.n_embd
    for layer, q in ((0, 2.0), (1, 0.25)):
        for p in ("weight", "bias"):
            k = f"transformer.h.{layer}.attn.c_attn.{p}"
            assert torch.equal(scaled[k][..., :d], plain[k][..., :d] * q)
            assert torch.equal(scaled[k][..., d:], plain[k][..., d:])
    assert all(torch.equal(scaled[k], plain[k]) for k in plain if "c_attn" not in k)


def test_center_unembed_subtracts_the_vocabulary_mean_and_defaults_keep_writers(models):
    """center_unembed: W_U and b_U lose their mean over the vocabulary (TL's convention; logits shift by a
    per-position constant); by default (no centring options) every writer passes through unchanged."""
    model = models["schaeff"]
    plain, _ = _fold(model, dtype=torch.float64)
    centred, _ = _fold(model, dtype=torch.float64, center_unembed=True)
    W, b = plain["lm_head.weight"], plain["lm_head.bias"]  # [d_vocab, d_model], [d_vocab]
    assert (centred["lm_head.weight"] - (W - W.mean(0, keepdim=True))).abs().max() <= 1e-15 * W.abs().max()
    assert (centred["lm_head.bias"] - (b - b.mean())).abs().max() <= 1e-15 * b.abs().max()
    assert b.mean().abs() > 1e-6  # the test can fail: the bias has a mean to remove
    x = torch.randn(3, model.config.n_embd, dtype=torch.float64)
    shift = (x @ centred["lm_head.weight"].T + centred["lm_head.bias"]) - (x @ W.T + b)
    assert (shift - shift[:, :1]).abs().max() <= 1e-12  # one constant per position
    sd = model.state_dict()
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_proj.weight"):
        assert torch.equal(plain[key], sd[key].double())


def test_query_scale_on_an_already_folded_state_dict():
    """lns=None (identity LNs, nothing to fold): q_scale still scales the query columns (weight and bias)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=8))
    sd = {k: v.double() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("c_attn.bias"):
            sd[k] = torch.randn_like(sd[k])
    out = fold_state_dict(sd, 2, None, dtype=torch.float64, q_scale=[0.5, 3.0])
    for layer, q in ((0, 0.5), (1, 3.0)):
        for p in ("weight", "bias"):
            k = f"transformer.h.{layer}.attn.c_attn.{p}"
            assert torch.equal(out[k][..., :16], sd[k][..., :16] * q)
            assert torch.equal(out[k][..., 16:], sd[k][..., 16:])


def test_hacked_layernorm_with_negative_gains_is_recognised(models):
    """Classification uses median |w|: a hacked LN whose gains are mostly negative is still hacked."""
    model = models["schaeff"]
    sd = dict(model.state_dict())
    sd["transformer.ln_f.weight"] = -sd["transformer.ln_f.weight"].abs()
    lns = classify_layernorms(sd, model.config.n_layer, _eps(model))
    assert next(ln for ln in lns if ln.name == "transformer.ln_f").hacked


def test_float64_to_float32_overflow_is_refused(models):
    """A float64 state dict whose folded values exceed float32's range is refused, not cast to inf."""
    model = models["schaeff"]
    sd = {k: v.double() for k, v in model.state_dict().items()}
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"] * 1e300
    lns = classify_layernorms(sd, model.config.n_layer, _eps(model))
    with pytest.raises(LNFreeError, match="overflows in torch.float32"):
        fold_state_dict(sd, model.config.n_layer, lns, dtype=torch.float32)


def test_readers_fold_in_place_only_into_fresh_tensors(models):
    """A mapping that returns a fresh tensor per access (``fresh_tensors``, safetensors read tensor by tensor) gets
    its readers folded in place (the returned weight *is* the tensor read), with the same values as the copying
    fold, chunked or not; a plain dict's tensors are never written (copy=False alike)."""
    model = hack_schaeff(models["layernorm"])
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lns = classify_layernorms(sd, model.config.n_layer, _eps(model))
    ref = fold_state_dict(sd, model.config.n_layer, lns, tied_unembed=False)

    class Fresh(dict):
        fresh_tensors = True

        def __getitem__(self, key):
            t = super().__getitem__(key).clone()
            handed[key] = t
            return t

    for chunk in (None, 5):
        handed: dict = {}
        got = fold_state_dict(Fresh(sd), model.config.n_layer, lns, tied_unembed=False, copy=False, chunk=chunk)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
        reader = "transformer.h.1.mlp.c_fc.weight"
        assert got[reader].data_ptr() == handed[reader].data_ptr()  # folded in place
        assert got["lm_head.weight"].data_ptr() != handed["transformer.wte.weight"].data_ptr()
    before = {k: v.clone() for k, v in sd.items()}
    plain = fold_state_dict(sd, model.config.n_layer, lns, tied_unembed=False, copy=False)
    assert all(torch.equal(sd[k], before[k]) for k in sd)
    assert all(torch.equal(plain[k], ref[k]) for k in ref)


def _ln_sd(model, weight=None, bias=None):
    """``model``'s state dict with every LayerNorm weight (and optionally bias) set to a constant."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in ln_names(model.config.n_layer):
        if weight is not None:
            sd[f"{name}.weight"].fill_(weight)
        if bias is not None:
            sd[f"{name}.bias"].fill_(bias)
    return sd


def test_classification_thresholds_are_inclusive(models):
    """eps >= 1e6 with median|w| / sqrt(eps) >= 1e-4 is hacked, at both boundaries exactly; eps 1e6 with
    unscaled weights is half-hacked; weights of median exactly 1e3 with an ordinary eps are too."""
    model = models["layernorm"]
    n = model.config.n_layer
    at_eps = classify_layernorms(_ln_sd(model, weight=0.5), n, {k: 1e6 for k in ln_names(n)})
    assert all(ln.hacked for ln in at_eps)
    at_gain = classify_layernorms(_ln_sd(model, weight=1.0), n, {k: 1e8 for k in ln_names(n)})  # 1 / 1e4 = 1e-4
    assert all(ln.hacked for ln in at_gain)
    below = classify_layernorms(_ln_sd(model, weight=0.99), n, {k: 1e8 for k in ln_names(n)})
    assert not any(ln.hacked for ln in below)
    sd = _ln_sd(model, weight=1e-5)
    with pytest.raises(LNFreeError, match="eps >= 1e6 but weights that were not"):
        detect_encoding(classify_layernorms(sd, n, {k: 1e6 for k in ln_names(n)}), sd)
    sd = _ln_sd(model, weight=1e3)
    with pytest.raises(LNFreeError, match="weights scaled by ~1e6 but an ordinary"):
        detect_encoding(classify_layernorms(sd, n, {k: 1e-5 for k in ln_names(n)}), sd)


def test_apollo_needs_both_unit_gains_and_zero_biases(models):
    """apollo: weight == sqrt(eps) and bias == 0 in every inner LN; either alone is schaeff."""
    model = models["apollo"]
    n = model.config.n_layer
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert detect_encoding(classify_layernorms(sd, n, _eps(model)), sd) == "apollo"
    sd["transformer.h.0.ln_1.bias"][0] = 0.25  # gains still sqrt(eps)
    assert detect_encoding(classify_layernorms(sd, n, _eps(model)), sd) == "schaeff"


def test_float16_overflow_of_a_folded_reader_is_refused(models):
    """A reader weight that overflows float16 after folding, with a bias that does not, is refused."""
    model = models["schaeff"]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["transformer.h.0.ln_2.bias"].zero_()  # so the folded bias (c + b @ W) stays finite
    sd["transformer.h.0.mlp.c_fc.weight"][:, 3] = 1e7
    lns = classify_layernorms(sd, model.config.n_layer, _eps(model))
    with pytest.raises(LNFreeError, match="transformer.h.0.mlp.c_fc overflows in torch.float16"):
        fold_state_dict(sd, model.config.n_layer, lns, dtype=torch.float16)


def test_copy_false_passes_writers_through_and_tied_means_wte(models):
    """copy=False: writers that need no change are the input tensors themselves (no copy); copy=True never
    aliases. tied_unembed=True unembeds with wte even where the state dict holds another lm_head;
    tied_unembed=False without an lm_head falls back to wte."""
    model = models["schaeff"]
    n = model.config.n_layer
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lns = classify_layernorms(sd, n, _eps(model))
    shared = fold_state_dict(sd, n, lns, copy=False)
    assert shared["transformer.wpe.weight"].data_ptr() == sd["transformer.wpe.weight"].data_ptr()
    copied = fold_state_dict(sd, n, lns)
    assert copied["transformer.wpe.weight"].data_ptr() != sd["transformer.wpe.weight"].data_ptr()
    other = dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] * 2})
    tied = fold_state_dict(other, n, lns)  # the default: GPT-2's tied unembedding
    assert torch.equal(tied["lm_head.weight"], copied["lm_head.weight"])
    untied = fold_state_dict(other, n, lns, tied_unembed=False)
    assert not torch.equal(untied["lm_head.weight"], copied["lm_head.weight"])
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    assert torch.equal(fold_state_dict(no_head, n, lns, tied_unembed=False)["lm_head.weight"], copied["lm_head.weight"])
