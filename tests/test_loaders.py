"""Loaders (lnfree_interp.loaders) against the independent float64 reference of conftest.

Tolerances (issue #2): float64 max |logit error| <= 1e-12; float32 <= 1e-5 relative to max |logit|.
"""

import copy

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError
from lnfree_interp.backends import get_backend

from .conftest import LOADERS, TL_BACKENDS, assert_unchanged, load, logits_of, reference, state_snapshot

TOKENS = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))


def _ref_logits(model):
    with torch.no_grad():
        return reference(model)(TOKENS).logits


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("encoding", ["schaeff", "apollo"])
@pytest.mark.parametrize("center", [False, True])
def test_exact_against_reference(loader, encoding, center, models, ckpt_dirs):
    ref = _ref_logits(models[encoding])
    assert ref.abs().max() > 1  # O(1) logits: the tolerances mean something
    for src in (models[encoding], ckpt_dirs[encoding]):
        m64 = load(loader, src, dtype=torch.float64, center_writing_weights=center)
        err64 = (logits_of(m64, TOKENS).double() - ref).abs().max().item()
        assert err64 <= 1e-12, (loader, encoding, err64)
        m32 = load(loader, src, center_writing_weights=center)
        err32 = (logits_of(m32, TOKENS).double() - ref).abs().max().item()
        assert err32 <= 1e-5 * ref.abs().max().item(), (loader, encoding, err32)


@pytest.mark.parametrize("loader", LOADERS)
def test_layernorm_baseline_needs_opt_in_and_stays_exact(loader, models, ckpt_dirs):
    with pytest.raises(LNFreeError, match="expect_lnfree=False"):
        load(loader, ckpt_dirs["layernorm"])
    model = load(loader, ckpt_dirs["layernorm"], dtype=torch.float64, expect_lnfree=False)
    backend = get_backend(model)
    assert not backend.lnfree  # LN kept (LNPre), never turned into identities
    err = (logits_of(model, TOKENS) - _ref_logits(models["layernorm"])).abs().max().item()
    assert err <= 1e-12


@pytest.mark.parametrize("kind", TL_BACKENDS)
def test_tl_models_look_like_tl_models(kind, models):
    free = L.load_hooked(models["schaeff"], backend=kind)
    assert free.cfg.normalization_type is None
    wte = models["schaeff"].transformer.wte.weight
    assert torch.equal(free.W_E.detach(), wte.detach())
    names = set(free.hook_dict)
    for name in ("blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out", "hook_embed",
                 "hook_pos_embed", "blocks.1.mlp.hook_post"):
        assert name in names
    _, cache = free.run_with_cache(TOKENS[:1])
    stack, labels = cache.decompose_resid(return_labels=True)
    assert torch.equal(cache.apply_ln_to_stack(stack), stack)  # LN-free: a no-op
    assert cache["blocks.0.attn.hook_z"].shape == (1, 20, 4, 16)
    base = L.load_hooked(models["layernorm"], backend=kind, expect_lnfree=False)
    assert base.cfg.normalization_type == "LNPre"
    assert "ln_final.hook_scale" in base.hook_dict and "blocks.0.ln1.hook_scale" in base.hook_dict


def test_default_backend_and_hooked_on_tl4(models):
    from lnfree_interp.backends.tl import has_hooked_transformer

    model = L.load_hooked(models["schaeff"])
    assert type(model).__name__ == ("HookedTransformer" if has_hooked_transformer() else "TransformerBridge")
    if not has_hooked_transformer():
        with pytest.raises(LNFreeError, match="removed in TransformerLens 4.0"):
            L.load_hooked(models["schaeff"], backend="hooked")
    with pytest.raises(LNFreeError, match="backend="):
        L.load_hooked(models["schaeff"], backend="nope")


@pytest.mark.parametrize("loader", LOADERS)
def test_user_model_and_tokenizer_untouched(loader, models, tokenizer):
    model = models["schaeff"]
    snap = state_snapshot(model)
    tok_before = (tokenizer.padding_side, tokenizer.pad_token, dict(tokenizer.init_kwargs))
    was_training = model.training
    load(loader, model, tokenizer=tokenizer)
    load(loader, model, tokenizer=tokenizer, dtype=torch.float64, center_writing_weights=True)
    assert_unchanged(model, snap)
    assert model.training == was_training
    assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm)
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm)
    assert (tokenizer.padding_side, tokenizer.pad_token, dict(tokenizer.init_kwargs)) == tok_before


def test_loading_twice_gives_identical_weights(models):
    a = L.load_hf(models["schaeff"], dtype=torch.float64)
    b = L.load_hf(models["schaeff"], dtype=torch.float64)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("loader", LOADERS)
def test_save_load_round_trip(loader, models, tmp_path):
    folded = L.load_hf(models["schaeff"], dtype=torch.float64, center_writing_weights=True)
    folded.save_pretrained(tmp_path / "saved")
    again = load(loader, tmp_path / "saved", dtype=torch.float64)
    assert L.inspect_checkpoint(tmp_path / "saved").encoding == "folded"
    assert (logits_of(again, TOKENS) - logits_of(folded, TOKENS)).abs().max() <= 1e-13
    err = (logits_of(again, TOKENS) - _ref_logits(models["schaeff"])).abs().max().item()
    assert err <= 1e-12
    # the in-memory folded model is also a valid source, and loads to the same weights
    again_hf = L.load_hf(folded, dtype=torch.float64)
    for k, v in folded.state_dict().items():
        assert torch.equal(again_hf.state_dict()[k], v), k



def test_ln_baseline_round_trip_verifies(models, tmp_path):
    # a folded LN baseline keeps ln_f's bias in lm_head.bias: verify's reference must keep it too
    base = L.load_hf(models["layernorm"], dtype=torch.float64, expect_lnfree=False)
    assert base.lm_head.bias.abs().max() > 0.1
    base.save_pretrained(tmp_path / "saved")
    again = L.load_hf(tmp_path / "saved", dtype=torch.float64, expect_lnfree=False)
    assert (logits_of(again, TOKENS) - logits_of(base, TOKENS)).abs().max() <= 1e-12
    check = L.verify(again)
    assert check.passed and check.max_abs_error <= 1e-10

def test_dtypes(models):
    bf = L.load_hf(models["schaeff"], dtype=torch.bfloat16)
    assert bf.lm_head.weight.dtype == torch.bfloat16
    ref = _ref_logits(models["schaeff"])
    err = (logits_of(bf, TOKENS).double() - ref).abs().max()
    assert err <= 5e-2 * ref.abs().max()
    assert L.load_hf(models["schaeff"], dtype="float64").lm_head.weight.dtype == torch.float64
    with pytest.raises(LNFreeError, match="Unsupported dtype"):
        L.load_hf(models["schaeff"], dtype=torch.int8)


@pytest.mark.parametrize("loader", LOADERS)
def test_verify_passes_and_reports(loader, models, ckpt_dirs):
    for src in (models["apollo"], ckpt_dirs["apollo"]):
        result = L.verify(load(loader, src, dtype=torch.float64))
        assert result.passed and result.max_abs_error <= 1e-12
    result = L.verify(load(loader, ckpt_dirs["schaeff"]))
    assert result.passed and result.dtype == torch.float32 and "ok" in str(result)


def test_verify_catches_a_wrong_model(models, ckpt_dirs):
    wrong = L.load_hf(models["apollo"], dtype=torch.float64)
    assert not L.verify(wrong, ckpt_dirs["schaeff"]).passed


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_token_inputs(loader, models):
    from lnfree_interp.inputs import prepare

    backend = get_backend(load(loader, models["schaeff"]))
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        prepare(backend, torch.tensor([[1, 2, backend.d_vocab]]))
    with pytest.raises(LNFreeError, match="exceeds the model's context"):
        prepare(backend, torch.zeros(1, backend.n_ctx + 1, dtype=torch.long))
    with pytest.raises(LNFreeError, match="Empty inputs"):
        prepare(backend, [])


def test_tokenizer_found_beside_checkpoint_and_token_ids_without(ckpt_dirs, models):
    assert L.load_hf(ckpt_dirs["schaeff"]).tokenizer is not None
    model = L.load_hooked(models["schaeff"])  # in memory, no tokenizer: token ids work
    assert model.tokenizer is None
    assert logits_of(model, TOKENS).shape == (3, 20, models["schaeff"].config.vocab_size)
    ids_only = L.load_nnsight(models["schaeff"], dtype=torch.float64)  # nnsight without a tokenizer
    with ids_only.trace() as tracer:
        with tracer.invoke(TOKENS[:1, :7]):
            a = ids_only.lm_head.output.save()
        with tracer.invoke(TOKENS[1:]):
            b = ids_only.lm_head.output.save()
    ref = _ref_logits(models["schaeff"])
    assert (a[:, :7] - reference(models["schaeff"])(TOKENS[:1, :7]).logits).abs().max() <= 1e-12
    assert (b - ref[1:]).abs().max() <= 1e-12
    with pytest.raises(LNFreeError, match="no tokenizer"):
        with ids_only.trace("some text"):
            pass


def test_nnsight_batches_invokes_and_takes_gradients(ckpt_dirs, models):
    model = L.load_nnsight(ckpt_dirs["schaeff"], dtype=torch.float64)
    ref = reference(models["schaeff"])
    texts = ["When Mary and John went to the store", "The king"]
    with model.trace() as tracer:
        with tracer.invoke(texts[0]):
            a = model.lm_head.output.save()
        with tracer.invoke(texts[1]):
            b = model.lm_head.output.save()
    for text, got in zip(texts, (a, b)):
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            expected = ref(ids).logits
        assert (got[:, -ids.shape[1]:] - expected).abs().max() <= 1e-12
    ids = torch.tensor([model.tokenizer(texts[0])["input_ids"]])
    with model.trace(ids):
        z = model.transformer.h[0].attn.c_proj.input
        logits = model.lm_head.output
        metric = logits[0, -1, 5] - logits[0, -1, 7]
        with metric.backward():
            grad = z.grad.save()
    hf = L.load_hf(ckpt_dirs["schaeff"], dtype=torch.float64)
    store = {}
    hook = hf.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, a: store.setdefault("z", a[0]))
    out = hf(ids).logits
    hook.remove()
    expected = torch.autograd.grad(out[0, -1, 5] - out[0, -1, 7], store["z"])[0]
    assert (grad - expected).abs().max() <= 1e-12


@pytest.mark.parametrize("kind", TL_BACKENDS)
def test_unified_uses_tl_names_and_batches_invokes(kind, ckpt_dirs, models):
    model = L.load_unified(ckpt_dirs["schaeff"], backend=kind, dtype=torch.float64)
    tl = L.load_hooked(ckpt_dirs["schaeff"], backend=kind, dtype=torch.float64)
    texts = ["When Mary and John went", "The king is dead"]
    with model.trace() as tracer:
        with tracer.invoke(texts[0]):
            za = model.blocks[0].hook_resid_pre.output.save()
            la = model.output.save()
        with tracer.invoke(texts[1]):
            lb = model.output.save()
    for text, got in zip(texts, (la, lb)):
        ids = tl.to_tokens(text)  # prepend_bos=False at load: the same tokens as every other backend
        assert ids[0, 0] != tl.tokenizer.bos_token_id
        expected = tl(ids)
        assert (got[:, : ids.shape[1]] - expected).abs().max() <= 1e-12
    _, cache = tl.run_with_cache(tl.to_tokens(texts[0]))
    n = cache["blocks.0.hook_resid_pre"].shape[1]
    assert (za[:, :n] - cache["blocks.0.hook_resid_pre"]).abs().max() <= 1e-12
    with model.trace(tl.to_tokens(texts[0])):
        z = model.blocks[1].attn.hook_z.output.save()
    # HookedTransformer hook points carry [b, p, head, d_head]; bridge hook points the raw HF [b, p, d_model]
    assert tuple(z.shape[2:]) == ((4, 16) if kind == "hooked" else (64,))


def test_returned_objects_are_independent(models):
    a = L.load_hf(models["schaeff"])
    with torch.no_grad():
        a.transformer.wte.weight.add_(1.0)  # editing the loaded model ...
    b = L.load_hf(models["schaeff"])  # ... changes neither the source nor the next load
    assert not torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert torch.equal(b.transformer.wte.weight, models["schaeff"].transformer.wte.weight)


def test_float16_folds_first(models):
    half = L.load_hf(copy.deepcopy(models["schaeff"]), dtype=torch.float16)
    assert half.lm_head.weight.dtype == torch.float16 and torch.isfinite(half.lm_head.weight).all()
    with pytest.raises(LNFreeError, match="float16, where the LN-free hack"):  # a source cast to fp16 first
        L.load_hf(copy.deepcopy(models["schaeff"]).half())


@pytest.mark.parametrize(("loader", "prepend_bos"), [(k, False) for k in LOADERS]
                         + [(k, True) for k in LOADERS if k not in ("hf", "nnsight")])  # a TL option
def test_own_tokenizer_batch_matches_strings(loader, prepend_bos, ckpt_dirs):
    # TL's tokenizer copy adds a BOS by default; a batch from model.tokenizer must give the same
    # tokens (and numbers) as passing the strings, with or without prepend_bos.
    kwargs = {"prepend_bos": True} if prepend_bos else {}
    model = load(loader, ckpt_dirs["schaeff"], dtype=torch.float64, **kwargs)
    text = "When Mary and John went"
    plain = L.load_hf(ckpt_dirs["schaeff"]).tokenizer(text)["input_ids"]
    tok = L.inputs.get_tokenizer(model)
    expected = ([tok.bos_token_id] if prepend_bos else []) + plain
    assert tok(text)["input_ids"] == expected
    batch = tok([text], return_tensors="pt")
    a = L.direct_logit_attribution(model, batch, " the", " a")
    b = L.direct_logit_attribution(model, text, " the", " a")
    assert torch.equal(a.values, b.values) and torch.equal(a.metric, b.metric)


# ------------------------------------------------------------------------------------------------
# issue 11 item 1: an identity LayerNorm's output is not the residual stream
# ------------------------------------------------------------------------------------------------


def _zero_ln_output(kind, model, tokens, layer, ln, in_place, first_call_only=False):
    """Logits with the output of block ``layer``'s LayerNorm ``ln`` (1 or 2) set to zero, either
    in place (the aliasing idiom) or by returning a new tensor (the reference: no alias possible).
    ``first_call_only``: edit only the module's first call (nnsight's ``.output``)."""
    with torch.no_grad():
        if kind == "bridge":
            def edit(t, hook):
                if in_place:
                    t[:] = 0
                    return None
                return torch.zeros_like(t)
            return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.ln{ln}.hook_out", edit)])
        if kind in ("nnsight", "unified"):
            if in_place:
                inner = model._module
                if kind == "nnsight":
                    site = lambda m: getattr(m.transformer.h[layer], f"ln_{ln}")  # noqa: E731
                else:
                    site = lambda m: getattr(m.blocks[layer], f"ln{ln}")  # noqa: E731
                with model.trace(tokens):
                    site(model).output[:] = 0
                    out = model.output.save()
                out = getattr(out, "logits", out)
                return out
            inner = model._module
            kind = "hf" if kind == "nnsight" else ("bridge" if not hasattr(inner, "W_E") or
                                                     type(inner).__name__ == "TransformerBridge" else "hooked")
            if kind == "bridge":
                return _zero_ln_output("bridge", inner, tokens, layer, ln, False)
            model = inner
        module = (getattr(model.transformer.h[layer], f"ln_{ln}") if kind == "hf"
                  else getattr(model.blocks[layer], f"ln{ln}"))

        calls = []

        def hook(m, args, out):
            calls.append(1)
            if first_call_only and len(calls) > 1:
                return None
            if in_place:
                out.zero_()
                return None
            return torch.zeros_like(out)
        handle = module.register_forward_hook(hook)
        try:
            out = model(tokens)
        finally:
            handle.remove()
        return getattr(out, "logits", out)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("ln", [1, 2])
def test_editing_an_identity_layernorm_output_leaves_the_residual_stream_alone(loader, ln, models):
    """Issue 11 item 1: zeroing ``ln_1``'s output in place must zero the attention input only (as with a
    real LayerNorm), not the skip connection. Reference: the same edit made by returning a new tensor,
    and the hand computation of "LN output 0" on the float64 reference (HF with hacked LNs written out)."""
    model = load(loader, models["schaeff"], dtype=torch.float64)
    tokens = TOKENS[:2]
    # HookedTransformer calls ln1 three times (query, key, value inputs); nnsight's ``.output`` is the
    # first call, so through load_unified the in-place edit reaches the query input only
    q_only = loader == "unified" and ln == 1 and hasattr(model._module, "W_E") and \
        type(model._module).__name__ == "HookedTransformer"
    in_place = _zero_ln_output(loader, model, tokens, 0, ln, True)
    returned = _zero_ln_output(loader, model, tokens, 0, ln, False, first_call_only=q_only)
    # hand computation: the unfolded float64 reference whose LayerNorm reads a zero residual stream (the
    # folded model's LN output is the residual stream as the LN's readers see it, its centring and affine
    # map being folded into them), while the skip connection keeps the real residual stream
    ref = reference(models["schaeff"])
    block = ref.transformer.h[0]

    class ReadsZero(torch.nn.Module):
        def __init__(self, ln):
            super().__init__()
            self.ln = ln

        def forward(self, x):
            return self.ln(torch.zeros_like(x))

    setattr(block, f"ln_{ln}", ReadsZero(getattr(block, f"ln_{ln}")))
    with torch.no_grad():
        hand = ref(tokens).logits
    unedited = logits_of(model, tokens)
    assert (returned - unedited).abs().max() > (1e-3 if q_only else 0.1)  # the edit does something
    assert (in_place.double() - returned.double()).abs().max() <= 1e-12, loader
    if not q_only:
        assert (in_place.double() - hand).abs().max() <= 1e-10, loader


def test_identity_layernorm_copy_is_cheap(models):
    """The copy an IdentityLayerNorm makes: a plain float64 forward with the copies equals one
    without (same numbers), and the removed LayerNorms are IdentityLayerNorm (an nn.Identity)."""
    from lnfree_interp.builders.hf import IdentityLayerNorm

    hf = L.load_hf(models["schaeff"], dtype=torch.float64)
    assert all(isinstance(b.ln_1, IdentityLayerNorm) and isinstance(b.ln_2, torch.nn.Identity)
               for b in hf.transformer.h)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    y = hf.transformer.h[0].ln_1(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


# ------------------------------------------------------------------------------------------------
# issue 11 item 5: every GPT-2 config field that changes the computation is exact or refused
# ------------------------------------------------------------------------------------------------


def _variant(seed=0, lnfree=True, **config):
    """A 2-layer random GPT-2 with ``config`` fields set (schaeff-hacked unless ``lnfree=False``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .conftest import hack_schaeff

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=32, bos_token_id=0,
                     eos_token_id=0, **config)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    return hack_schaeff(model) if lnfree else model


VTOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))


def _exact_or_refused(loader, model, field, ref_model=None):
    """Load ``model`` in float64 with ``loader``: exact against the independent float64 reference
    (of ``ref_model``, default ``model``) and verify() agreeing, or LNFreeError naming ``field`` and
    the backend. Returns "exact" or "refused"."""
    try:
        m = load(loader, model, dtype=torch.float64)
    except LNFreeError as err:
        backend = {"hf": "hf", "nnsight": "hf", "unified": "", "hooked": "hooked", "bridge": "bridge"}[loader]
        assert field in str(err) and backend in str(err), (loader, str(err))
        return "refused"
    with torch.no_grad():
        ref = reference(ref_model if ref_model is not None else model)(VTOKENS).logits
    err = (logits_of(m, VTOKENS).double() - ref).abs().max().item()
    assert err <= 1e-12 * ref.abs().max().item(), (loader, field, err)
    check = L.verify(m, tokens=VTOKENS)
    assert check.passed and check.relative_error <= 1e-12, (loader, field, str(check))
    return "exact"


def _activations():
    from transformers.activations import ACT2CLS

    return sorted(ACT2CLS)


@pytest.mark.parametrize("loader", LOADERS)
def test_every_activation_function_is_exact_or_refused(loader):
    """Every transformers activation: exact at float64 tolerance, or a clear refusal. Only activations
    with trainable parameters are refused by the transformers-run backends; HookedTransformer refuses
    the ones TransformerLens has no exact equivalent for (e.g. tanh, quick_gelu), never with a raw
    AssertionError."""
    outcome = {}
    for act in _activations():
        outcome[act] = _exact_or_refused(loader, _variant(activation_function=act), "activation_function")
    from transformers.activations import ACT2FN

    parametric = {a for a in outcome if list(ACT2FN[a].parameters())}
    refused = {a for a, o in outcome.items() if o == "refused"}
    standard = {"gelu_new", "gelu", "relu", "silu", "gelu_fast", "gelu_pytorch_tanh"}
    assert not (refused & standard), refused
    if loader in ("hf", "nnsight", "bridge"):
        assert refused == parametric, refused
    else:
        assert parametric <= refused


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("field,value", [
    ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 40),
])
def test_attention_and_mlp_options_are_exact(loader, field, value):
    """Options transformers computes natively are folded (attention scaling into W_Q) or carried
    (n_inner): every backend matches HF's own float64 computation of the hacked checkpoint."""
    model = _variant(**{field: value})
    assert _exact_or_refused(loader, model, field) == "exact"


@pytest.mark.parametrize("loader", LOADERS)
def test_reorder_and_upcast_attn_is_exact_at_float64(loader):
    """reorder_and_upcast_attn computes the same function as standard attention (transformers upcasts
    the scores to float32): the loaded float64 model equals the float64 standard-attention reference
    and verify() passes at the float64 tolerance (it failed with a 3.4e-10 relative error)."""
    model = _variant(reorder_and_upcast_attn=True)
    same = copy.deepcopy(model)
    same.config.reorder_and_upcast_attn = False
    for block in same.transformer.h:
        block.attn.reorder_and_upcast_attn = False
    assert _exact_or_refused(loader, model, "reorder_and_upcast_attn", ref_model=same) == "exact"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementation_is_exact(attn):
    model = _variant()
    model.config._attn_implementation = attn
    for loader in ("hf", *TL_BACKENDS):
        assert _exact_or_refused(loader, model, "attn_implementation") == "exact"


@pytest.mark.parametrize("loader", LOADERS)
def test_add_cross_attention_is_refused_naming_field_and_backend(loader):
    model = _variant(add_cross_attention=True)
    with pytest.raises(LNFreeError, match="add_cross_attention=True"):
        load(loader, model)


@pytest.mark.parametrize("loader", LOADERS)
def test_layer_norm_epsilon_of_a_baseline_is_used(loader):
    """An LN baseline's eps (here 1e-2, far from GPT-2's 1e-5) is the folded LNPre's eps on every backend;
    LayerNorms with different eps are refused (TransformerLens has one cfg.eps)."""
    model = _variant(lnfree=False, layer_norm_epsilon=1e-2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)  # real LNs with small inputs: eps matters
    m64 = load(loader, model, dtype=torch.float64, expect_lnfree=False)
    with torch.no_grad():
        ref = reference(model)(VTOKENS).logits
        wrong_eps = copy.deepcopy(model).double()
        for m in wrong_eps.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-5
        wrong = wrong_eps(VTOKENS).logits
    assert (wrong - ref).abs().max() > 1e-6  # eps is visible in the logits
    assert (logits_of(m64, VTOKENS).double() - ref).abs().max() <= 1e-12
    odd = copy.deepcopy(model)
    odd.transformer.h[0].ln_1.eps = 1e-3
    with pytest.raises(LNFreeError, match="different eps"):
        load(loader, odd, expect_lnfree=False)


# ------------------------------------------------------------------------------------------------
# issue 11 item 8 and verify friction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", LOADERS)
def test_verify_after_the_in_memory_source_is_garbage_collected(loader, ckpt_dirs):
    """verify(load_x(GPT2LMHeadModel.from_pretrained(d))) works once the temporary is gone (it re-reads
    d, after checking its weights are the ones folded); a source with no directory, or one edited
    before loading, says what to pass instead of comparing against the wrong checkpoint."""
    import gc

    from transformers import GPT2LMHeadModel

    model = load(loader, GPT2LMHeadModel.from_pretrained(ckpt_dirs["schaeff"]), dtype=torch.float64)
    gc.collect()
    check = L.verify(model)
    assert check.passed and check.relative_error <= 1e-12

    edited = GPT2LMHeadModel.from_pretrained(ckpt_dirs["schaeff"])
    with torch.no_grad():
        edited.transformer.h[0].attn.c_attn.weight.mul_(1.5)
    model = load(loader, edited, dtype=torch.float64)
    del edited
    gc.collect()
    with pytest.raises(LNFreeError, match="differ from the ones this model was folded from"):
        L.verify(model)

    from .conftest import hack_schaeff, random_gpt2

    model = load(loader, hack_schaeff(random_gpt2(300, seed=3)))
    gc.collect()
    with pytest.raises(LNFreeError, match="verify\\(model, src=hf_model\\)"):
        L.verify(model)


def test_verify_prints_the_relative_error_beside_the_relative_tolerance(models):
    check = L.verify(L.load_hf(models["schaeff"]))
    text = str(check)
    assert f"relative error {check.relative_error:.2e} <= tolerance {check.tolerance:.1e} ok" in text
    assert "logits" in text and check.dtype == torch.float32


def test_low_precision_tolerances_are_the_dtypes_rounding(models):
    """bfloat16 / float16 pass only within ~2 units of their own rounding (2**-7, 2**-10 relative), are
    labelled not exact, and bfloat16 reports the unfolded checkpoint's own bfloat16 error beside ours."""
    assert L.verification.VERIFY_TOLERANCE[torch.bfloat16] <= 2 * 2.0 ** -7 + 1e-9
    assert L.verification.VERIFY_TOLERANCE[torch.float16] <= 2 * 2.0 ** -10 + 1e-9
    bf = L.verify(L.load_hf(models["schaeff"], dtype=torch.bfloat16))
    assert bf.passed and "not exact" in str(bf) and bf.dtype_floor_error is not None
    assert bf.max_abs_error <= 2 * bf.dtype_floor_error  # the fold adds nothing beyond bf16's rounding
    # a wrong bf16 model (a weight perturbed by 5%) fails
    wrong = L.load_hf(models["schaeff"], dtype=torch.bfloat16)
    with torch.no_grad():
        wrong.transformer.h[1].mlp.c_proj.weight.mul_(1.05)
    assert not L.verify(wrong, models["schaeff"]).passed


def test_cli_verify_baseline_does_not_say_hacked(capsys, ckpt_dirs):
    from lnfree_interp.cli import main

    assert main(["verify", str(ckpt_dirs["layernorm"]), "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "hacked" not in out and "real LayerNorms kept" in out


# ------------------------------------------------------------------------------------------------
# shared options: one definition, every loader, LNFreeError (never TypeError) for inapplicable values
# ------------------------------------------------------------------------------------------------


def test_every_loader_takes_the_same_options(models):
    import inspect

    names = {}
    for fn in (L.load_hf, L.load_hooked, L.load_nnsight, L.load_unified):
        params = inspect.signature(fn).parameters
        names[fn.__name__] = [p for p in params if p != "src"]
        assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in names[fn.__name__])
    assert all(sorted(v) == sorted(L.loaders.LOAD_OPTIONS) for v in names.values()), names
    src = models["schaeff"]
    assert isinstance(L.load_hf(src, backend="hf", prepend_bos=False), torch.nn.Module)
    L.load_nnsight(src, backend=None, prepend_bos=False)
    for fn, bad in ((L.load_hf, {"backend": "bridge"}), (L.load_hf, {"prepend_bos": True}),
                    (L.load_nnsight, {"backend": "hooked"}), (L.load_nnsight, {"prepend_bos": True}),
                    (L.load_hooked, {"backend": "hf"}), (L.load_unified, {"backend": "nnsight"}),
                    (L.load_hooked, {"center_unembed": "yes"})):
        with pytest.raises(LNFreeError):
            fn(src, **bad)
