"""The backends seam (lnfree_interp.backends): detection, hook names, weights layout."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError
from lnfree_interp.backends import get_backend

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
