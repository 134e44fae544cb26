"""The backends seam (lnfree_interp.backends): detection, hook names, weights layout."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError
from lnfree_interp.backends import get_backend
from lnfree_interp.backends.tl import has_hooked_transformer

from .conftest import LOADERS, load


@pytest.mark.parametrize("loader", LOADERS)
def test_every_backend_exposes_the_same_weights_and_hooks(loader, models):
    ref = get_backend(L.load_hf(models["schaeff"], dtype=torch.float64))
    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    assert backend.name == loader
    w, w_ref = backend.weights(), ref.weights()
    for field in ("W_O", "b_O", "W_out", "b_out"):
        assert len(getattr(w, field)) == 2
        for mine, ref_t in zip(getattr(w, field), getattr(w_ref, field)):
            assert torch.equal(mine.detach(), ref_t.detach()), field
    assert w.W_O[1].shape == (4, 16, 64) and w.W_out[0].shape == (256, 64)
    assert torch.equal(w.W_U.detach(), w_ref.W_U.detach()) and torch.equal(w.b_U.detach(), w_ref.b_U.detach())
    tokens = torch.randint(0, backend.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = {}
    names = ["hook_embed", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"]
    with torch.no_grad(), backend.hooks({n: (lambda a, n=n: seen.setdefault(n, a.clone())) for n in names}):
        backend.forward(tokens, None)
    assert seen["blocks.1.attn.hook_z"].shape == (2, 9, 4, 16)
    assert seen["blocks.0.mlp.hook_post"].shape == (2, 9, 256)
    # the final residual through W_U reproduces the logits (LN-free: the unembedding is all there is)
    logits = backend.forward(tokens, None).detach()
    assert (seen["blocks.1.hook_resid_post"] @ w.W_U + w.b_U - logits).abs().max() <= 1e-12
    with pytest.raises(LNFreeError, match="Unknown hook name"):
        with backend.hooks({"blocks.9.hook_nothing": lambda a: a}):
            pass


def test_unsupported_models_get_a_clear_error(models):
    with pytest.raises(LNFreeError, match="not loaded through lnfree_interp"):
        get_backend(models["schaeff"])  # a raw, hacked HF model: its LayerNorms are not folded
    with pytest.raises(LNFreeError, match="Unsupported model type"):
        get_backend(torch.nn.Linear(2, 2))
    compiled = torch.nn.Module()
    compiled._orig_mod = L.load_hf(models["schaeff"])  # what torch.compile returns: an OptimizedModule wrapper
    with pytest.raises(LNFreeError, match="_orig_mod"):
        get_backend(compiled)
    model = L.load_hooked(models["schaeff"])
    model.cfg.normalization_type = "LN"
    with pytest.raises(LNFreeError, match="normalization_type='LN'"):
        get_backend(model)


def test_frameworks_are_imported_lazily():
    import subprocess
    import sys

    code = ("import sys, lnfree_interp; "
            "print(any(m.startswith(('transformer_lens', 'nnsight')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("loader", LOADERS)
def test_reader_hooks_weights_and_norms_match_hf(loader, models):
    """hook_q/k/v/pattern and the q/k/v/MLP-in weight views agree with a hand computation on the HF model."""
    for encoding in ("schaeff", "layernorm"):
        lnfree = encoding != "layernorm"
        backend = get_backend(load(loader, models[encoding], dtype=torch.float64, expect_lnfree=lnfree))
        norms = backend.norms()
        assert norms.lnfree == lnfree and backend.lnfree == lnfree
        assert all(s.kind == ("identity" if lnfree else "layernorm") for s in (*norms.ln1, *norms.ln2, norms.ln_final))
        w = backend.weights()
        tokens = torch.randint(0, backend.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
        names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k",
                 "blocks.1.attn.hook_v", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_pre", "blocks.1.hook_mlp_in"]
        acts = backend.run(tokens, None, capture=names).acts
        x = norms.ln1[1](acts["blocks.1.hook_resid_pre"])
        for kind, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
            hand = torch.einsum("bpd,hdk->bphk", x, W[1]) + b[1]
            assert (hand - acts[f"blocks.1.attn.hook_{kind}"]).abs().max() <= 1e-10, kind
        q, k = acts["blocks.1.attn.hook_q"], acts["blocks.1.attn.hook_k"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        assert (scores.softmax(-1) - acts["blocks.1.attn.hook_pattern"]).abs().max() <= 1e-10
        mlp_in = norms.ln2[1](acts["blocks.1.hook_resid_mid"])
        assert (mlp_in - acts["blocks.1.hook_mlp_in"]).abs().max() <= 1e-12
        pre = mlp_in @ w.W_in[1] + w.b_in[1]
        assert (pre - acts["blocks.1.mlp.hook_pre"]).abs().max() <= 1e-10


@pytest.mark.parametrize("loader", LOADERS)
def test_replacing_the_mlp_input_leaves_the_skip_connection(loader, models):
    """hook_mlp_in changes only the MLP's input: hook_mlp_out moves, hook_resid_mid (the skip path) does not, and
    the new hook_pre is the replacement through W_in (every backend, float64)."""
    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    w = backend.weights()
    tokens = torch.randint(0, backend.d_vocab, (2, 7), generator=torch.Generator().manual_seed(2))
    names = ["blocks.0.hook_resid_mid", "blocks.0.mlp.hook_pre", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    base = backend.run(tokens, None, capture=names).acts
    new = torch.randn(2, 7, backend.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = backend.run(tokens, None, hooks={"blocks.0.hook_mlp_in": lambda x: new}, capture=names).acts
    assert torch.equal(got["blocks.0.hook_resid_mid"], base["blocks.0.hook_resid_mid"])
    assert (got["blocks.0.mlp.hook_pre"] - (new @ w.W_in[0] + w.b_in[0])).abs().max() <= 1e-10
    assert (got["blocks.0.hook_mlp_out"] - base["blocks.0.hook_mlp_out"]).abs().max() > 1e-3
    resid = got["blocks.0.hook_resid_mid"] + got["blocks.0.hook_mlp_out"]
    assert (resid - got["blocks.0.hook_resid_post"]).abs().max() <= 1e-12


@pytest.mark.parametrize("loader", LOADERS)
def test_run_unembeds_only_the_given_positions(loader, models):
    """Backend.run(positions=...) returns the logits at one position per row ([rows, 1, vocab]), equal to
    those of the full run, with gradients equal too; few rows (padded internally) and many alike."""
    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    for rows in (3, 40):
        gen = torch.Generator().manual_seed(rows)
        tokens = torch.randint(0, backend.d_vocab, (rows, 6), generator=gen)
        pos = torch.randint(0, 6, (rows,), generator=gen)
        full = backend.run(tokens, None, capture=["blocks.1.hook_resid_post"], grad_of=["blocks.1.hook_resid_pre"],
                           metric=lambda lg: lg[torch.arange(rows), pos, 3] - lg[torch.arange(rows), pos, 5])
        part = backend.run(tokens, None, capture=["blocks.1.hook_resid_post"], grad_of=["blocks.1.hook_resid_pre"],
                           metric=lambda lg: lg[:, 0, 3] - lg[:, 0, 5], positions=pos)
        assert part.logits.shape == (rows, 1, backend.d_vocab)
        assert (part.logits[:, 0] - full.logits[torch.arange(rows), pos]).abs().max() <= 1e-12
        assert torch.equal(part.acts["blocks.1.hook_resid_post"], full.acts["blocks.1.hook_resid_post"])
        g, g_full = part.grads["blocks.1.hook_resid_pre"], full.grads["blocks.1.hook_resid_pre"]
        assert (g - g_full).abs().max() <= 1e-12 and g_full.abs().max() > 0


@pytest.mark.parametrize("loader", LOADERS)
def test_patching_q_through_the_seam_changes_the_output(loader, models):
    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    tokens = torch.randint(0, backend.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    base = backend.run(tokens, None).logits
    patched = backend.run(tokens, None, hooks={"blocks.1.attn.hook_q": lambda q: q * 0}).logits
    assert (patched - base).abs().max() > 1e-3
    again = backend.run(tokens, None).logits  # hooks gone
    assert torch.equal(again, base)


def test_config_that_disagrees_with_the_modules_is_refused(models):
    """A TL model whose cfg says LayerNorm while its LN modules compute the identity (or the reverse) is refused:
    DLA must not apply a final-LN scale the model does not apply."""
    model = L.load_hooked(models["schaeff"])
    model.cfg.normalization_type = "LNPre"
    with pytest.raises(LNFreeError, match="disagree"):
        L.direct_logit_attribution(model, torch.tensor([[1, 2, 3]]), 3)


def test_bridge_identity_layernorm_hooks_take_effect(models):
    """On an LN-free TransformerBridge, editing ln hook_scale / hook_normalized changes the output as on a model
    with a LayerNorm (TL's bridge fires them for an identity LN but ignored edits)."""
    model = L.load_hooked(models["schaeff"], dtype=torch.float64, backend="bridge")
    backend = get_backend(model)
    tokens = torch.randint(0, backend.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    w = backend.weights()
    resid = backend.run(tokens, None, capture=["blocks.1.hook_resid_post"]).acts["blocks.1.hook_resid_post"]
    edits = (("ln_final.hook_scale", lambda a, hook: a * 2), ("ln_final.hook_normalized", lambda a, hook: a / 2))
    for name, fn in edits:
        with model.hooks(fwd_hooks=[(name, fn)]):
            logits = model(tokens).detach()
        assert (logits - ((resid / 2) @ w.W_U + w.b_U)).abs().max() <= 1e-10, name
    with model.hooks(fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda a, hook: a * 0)]):
        zeroed = model(tokens).detach()
    assert (zeroed - model(tokens).detach()).abs().max() > 1e-3


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("site", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"])
def test_replacing_the_residual_stream_reaches_the_skip_connection(loader, site, models):
    """A hook that returns a new residual-stream tensor changes the residual itself (the LayerNorm's input and the
    skip connection), on every backend alike: checked against a hand computation on the final residual."""
    for encoding in ("schaeff", "layernorm"):
        lnfree = encoding != "layernorm"
        backend = get_backend(load(loader, models[encoding], dtype=torch.float64, expect_lnfree=lnfree))
        tokens = torch.randint(0, backend.d_vocab, (2, 7), generator=torch.Generator().manual_seed(2))
        zeroed = backend.run(tokens, None, hooks={site: lambda a: torch.zeros_like(a)},
                             capture=["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"])
        acts = zeroed.acts
        final = acts["blocks.1.hook_resid_post"]
        if site == "blocks.1.hook_resid_pre":  # nothing but layer 1's writes remain
            expected = acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"]
        elif site == "blocks.0.hook_resid_post":
            expected = acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"]
        else:
            expected = None
        if expected is not None:
            assert (final - expected).abs().max() <= 1e-10, (site, encoding)
        ref = get_backend(load("bridge", models[encoding], dtype=torch.float64, expect_lnfree=lnfree))
        logits = ref.run(tokens, None, hooks={site: lambda a: torch.zeros_like(a)}).logits
        assert (zeroed.logits - logits).abs().max() <= 1e-10, (site, encoding)


def test_only_folded_layernorms_and_identities_are_read(models):
    """A LayerNorm with any unfolded gain or bias, or a module of another kind (parameter-free or not),
    is refused: the backend never guesses what a normalisation site computes."""
    import copy

    from torch import nn

    base = L.load_hf(models["layernorm"], dtype=torch.float64, expect_lnfree=False)
    assert not get_backend(base).lnfree
    for attr, value in (("weight", 2.0), ("bias", 0.5)):
        bad = copy.deepcopy(base)
        with torch.no_grad():
            getattr(bad.transformer.h[1].ln_2, attr).fill_(value)
        with pytest.raises(LNFreeError, match=r"h\[1\]\.ln_2 is a LayerNorm with an unfolded affine map"):
            get_backend(bad).norms()

    class ParameterFreeNorm(nn.Module):
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    free = L.load_hf(models["schaeff"], dtype=torch.float64)
    assert get_backend(free).lnfree
    for module in (nn.Tanh(), ParameterFreeNorm(), nn.Linear(64, 64)):
        bad = copy.deepcopy(free)
        bad.transformer.ln_f = module
        name = type(module).__name__
        with pytest.raises(LNFreeError, match=f"ln_f is a {name}( with its own forward)?, not a folded"):
            get_backend(bad).norms()


@pytest.mark.parametrize("loader", LOADERS)
def test_residual_hooks_name_the_right_layer_on_a_deeper_model(loader):
    """On a 3-layer model (with 2 layers, layer + 1 and layer - 1 name the same block): every layer's
    hook_resid_post is the next layer's hook_resid_pre, and equals resid_pre + attn_out + mlp_out."""
    from .conftest import hack_schaeff, random_gpt2

    src = hack_schaeff(random_gpt2(300, n_layer=3))
    backend = get_backend(load(loader, src, dtype=torch.float64))
    tokens = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    names = [f"blocks.{layer}.{h}" for layer in range(3)
             for h in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
    acts = backend.run(tokens, None, capture=names).acts
    for layer in range(3):
        a = lambda h, layer=layer: acts[f"blocks.{layer}.{h}"]  # noqa: E731
        expected = a("hook_resid_pre") + a("hook_attn_out") + a("hook_mlp_out")
        assert (a("hook_resid_post") - expected).abs().max() <= 1e-10, layer
        if layer < 2:
            assert torch.equal(a("hook_resid_post"), acts[f"blocks.{layer + 1}.hook_resid_pre"]), layer
    w = backend.weights()
    assert (acts["blocks.2.hook_resid_post"] @ w.W_U + w.b_U - backend.forward(tokens, None)).abs().max() <= 1e-10


@pytest.mark.parametrize("loader", LOADERS)
def test_two_hooks_on_one_site_chain_and_capture_hooks_change_nothing(loader, models):
    """``blocks.0.hook_resid_post`` and ``blocks.1.hook_resid_pre`` are one tensor: a replacement by the first
    is what the second sees; hooks that return None (capture) leave the logits bit for bit."""
    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    tokens = torch.randint(0, backend.d_vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    plain = backend.forward(tokens, None).detach()
    seen = {}
    hooks = {n: (lambda a, n=n: seen.__setitem__(n, a.clone())) for n in
             ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.0.attn.hook_z",
              "blocks.1.attn.hook_q", "hook_embed")}
    assert torch.equal(backend.run(tokens, None, hooks=hooks).logits, plain)
    assert torch.equal(seen["blocks.0.hook_resid_post"], seen["blocks.1.hook_resid_pre"])
    doubled = backend.run(tokens, None, hooks={"blocks.0.hook_resid_post": lambda a: 2 * a,
                                               "blocks.1.hook_resid_pre": lambda a: seen.__setitem__("x", a.clone())})
    assert torch.equal(seen["x"], 2 * seen["blocks.1.hook_resid_pre"])
    assert (doubled.logits - plain).abs().max() > 1e-3
    # the seam's own hooks() (no run() around them): hooks may return None on residual sites too
    with torch.no_grad(), backend.hooks({"blocks.0.hook_resid_post": lambda a: 2 * a,
                                         "blocks.1.hook_resid_pre": lambda a: None}):
        assert torch.equal(backend.forward(tokens, None), doubled.logits)
    with torch.no_grad(), backend.hooks({"blocks.1.hook_resid_pre": lambda a: None,
                                         "blocks.1.hook_resid_mid": lambda a: None}):
        assert torch.equal(backend.forward(tokens, None), plain)


@pytest.mark.parametrize("loader", ["hf", "nnsight"])
def test_attention_pattern_hooks_on_transformers_models(loader, models):
    """hook_pattern needs the eager attention: it is switched on for the run and the model's own setting
    (sdpa by default) comes back after it; runs without pattern hooks keep sdpa; the pattern is read-only."""
    model = load(loader, models["schaeff"], dtype=torch.float64)
    backend = get_backend(model)
    config = backend.hf.config
    assert config._attn_implementation == "sdpa"
    tokens = torch.randint(0, backend.d_vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    during = []
    watch = {"blocks.0.hook_mlp_out": lambda a: during.append(config._attn_implementation)}
    run = backend.run(tokens, None, hooks=watch, capture=["blocks.1.attn.hook_pattern"])
    assert during == ["eager"] and config._attn_implementation == "sdpa"
    pattern = run.acts["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (2, 4, 6, 6) and (pattern.sum(-1) - 1).abs().max() <= 1e-12
    during.clear()
    backend.run(tokens, None, hooks=watch)
    assert during == ["sdpa"]
    with pytest.raises(LNFreeError, match="read-only"):
        backend.run(tokens, None, hooks={"blocks.1.attn.hook_pattern": lambda p: p * 0.5})
    assert config._attn_implementation == "sdpa"  # restored after the error too


@pytest.mark.skipif(not has_hooked_transformer(),
                    reason="HookedTransformer was removed in TransformerLens 4.0; this case runs in the TL 3.9 lane")
def test_transformerlens_layernorm_modules_are_read_not_trusted():
    """A HookedTransformer with normalization_type='LN': refused for the config (its LayerNorm would be
    applied with weights the backend does not see), and, once a gain or bias differs from 1 / 0, for the
    unfolded module itself."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=20, act_fn="gelu",
                                  normalization_type="LN")
    model = HookedTransformer(cfg)
    with pytest.raises(LNFreeError, match="normalization_type='LN' but its normalisation modules compute layernorm"):
        get_backend(model)
    rms = HookedTransformer(HookedTransformerConfig(**{**cfg.to_dict(), "normalization_type": "RMS"}))
    # an RMSNorm has a `w` too, but is no LayerNorm
    with pytest.raises(LNFreeError, match="is a RMSNorm( with its own forward)?, not a folded LayerNorm"):
        get_backend(rms)
    for attr in ("w", "b"):
        bad = HookedTransformer(cfg)
        with torch.no_grad():
            getattr(bad.blocks[0].ln2, attr).fill_(2.0)
        with pytest.raises(LNFreeError, match=r"blocks\.0\.ln2 is a TransformerLens LayerNorm with an unfolded"):
            get_backend(bad)


def test_found_by_a_fresh_user_norm_sites():
    """A subclass of nn.LayerNorm / nn.Identity with a forward of its own is refused (it was read as an identity
    and DLA claimed exact=True with components summing to 5.8 against a metric of 16.9); a module put in place
    of a TransformerBridge's ln_final gets the same clear error (it was an AttributeError)."""
    from torch import nn

    class Doubling(nn.Identity):
        def forward(self, x):
            return 2 * x

    class Shifted(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = L.load_hf("tiny-shakespeare-lnfree")
    tokens = torch.tensor([[5, 6, 7, 8]])
    for module in (Doubling(), Shifted(model.config.n_embd, elementwise_affine=False)):
        model.transformer.ln_f = module
        with pytest.raises(LNFreeError, match=f"ln_f is a {type(module).__name__} with its own forward"):
            L.direct_logit_attribution(model, tokens, 7)
    bridge = L.load_hooked("tiny-shakespeare-lnfree", backend="bridge")
    bridge.ln_final = nn.Tanh()
    with pytest.raises(LNFreeError, match="ln_f is a Tanh, not a folded LayerNorm"):
        L.direct_logit_attribution(bridge, tokens, 7)
