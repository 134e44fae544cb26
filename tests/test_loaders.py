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
