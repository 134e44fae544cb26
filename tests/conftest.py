"""Shared fixtures: small GPT-2 checkpoints in every encoding, built here (no Hub), and an
independent float64 reference written out by hand (it uses no lnfree_interp code)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

from lnfree_interp.backends.tl import has_hooked_transformer

TL_BACKENDS = ["hooked", "bridge"] if has_hooked_transformer() else ["bridge"]
LOADERS = ["hf", "nnsight", "unified", *TL_BACKENDS]
NO_HOOKED = "HookedTransformer was removed in TransformerLens 4.0; this case runs in the TL 3.9 lane (.venv3 / CI)"
CORPUS = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "When Tom and James went to the park, James gave a ring to Tom. "
    "Then Kate and Paul had a long argument, and afterwards Paul said to Kate. "
    "ROMEO: I will go. JULIET: I am here. The king is dead; long live the king. "
) * 4


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE tokenizer (trained here) in which the IOI names are single tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS], vocab_size=330, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def random_gpt2(vocab: int, seed: int = 0, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
                n_positions: int = 64, std: float = 0.15):
    """A GPT-2 with LayerNorm and random, non-trivial weights (LN gains and biases far from 1/0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_positions,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model


def hack_schaeff(model, seed: int = 1):
    """schaeff encoding: every LN gets eps 1e12 and weight gamma * 1e6 / s (s random per LN)."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                s = float(torch.empty(()).uniform_(0.5, 3.0, generator=gen))
                module.weight.mul_(1e6 / s)
                module.eps = 1e12
    model.config.layer_norm_epsilon = 1e12
    return model


def hack_apollo(model):
    """apollo encoding: ln_1/ln_2 affine folded into c_attn/c_fc, their weight exactly 1e6 and bias 0;
    ln_f weight gamma * 1e6, bias beta; eps 1e12."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.transformer.h:
            for ln, reader in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
                reader.bias.add_(ln.bias @ reader.weight)
                reader.weight.mul_(ln.weight[:, None])
                ln.weight.fill_(1e6)
                ln.bias.zero_()
                ln.eps = 1e12
        model.transformer.ln_f.weight.mul_(1e6)
        model.transformer.ln_f.eps = 1e12
    model.config.layer_norm_epsilon = 1e12
    return model


class HandCenterAffine(nn.Module):
    """(x - mean) * w / 1e6 + b, the issue's reference for a hacked LN."""

    def __init__(self, ln):
        super().__init__()
        self.w = ln.weight.detach().double().clone() / 1e6
        self.b = ln.bias.detach().double().clone()

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * self.w + self.b


def reference(model):
    """float64 copy of an (unfolded) checkpoint with hacked LNs written out by hand."""
    ref = copy.deepcopy(model).double().eval()
    if ref.config.layer_norm_epsilon >= 1e6:
        for block in ref.transformer.h:
            block.ln_1, block.ln_2 = HandCenterAffine(block.ln_1), HandCenterAffine(block.ln_2)
        ref.transformer.ln_f = HandCenterAffine(ref.transformer.ln_f)
    return ref


@pytest.fixture(scope="session")
def base_model(tokenizer):
    return random_gpt2(len(tokenizer))


@pytest.fixture(scope="session")
def models(base_model):
    """In-memory checkpoints by encoding (never to be modified by tests)."""
    return {"schaeff": hack_schaeff(base_model), "apollo": hack_apollo(base_model), "layernorm": base_model}


@pytest.fixture(scope="session")
def ckpt_dirs(models, tokenizer, tmp_path_factory):
    """The same checkpoints saved as HF directories (safetensors + tokenizer)."""
    out = {}
    for name, model in models.items():
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[name] = d
    return out


def load(kind: str, src, **kwargs):
    """Load ``src`` with the loader/backend ``kind`` (one of LOADERS)."""
    import lnfree_interp as L

    if kind == "hf":
        return L.load_hf(src, **kwargs)
    if kind == "nnsight":
        return L.load_nnsight(src, **kwargs)
    if kind == "unified":
        return L.load_unified(src, **kwargs)
    return L.load_hooked(src, backend=kind, **kwargs)


def logits_of(model, tokens, attention_mask=None):
    """Logits of any loaded model through the library's backend seam."""
    from lnfree_interp.backends import get_backend

    with torch.no_grad():
        return get_backend(model).forward(tokens, attention_mask)


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snapshot):
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} was modified"


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    """On TransformerLens 4.x, a test parametrized over LOADERS / TL_BACKENDS gets its "hooked" case
    as a visible skip with the reason (instead of silently having one case fewer)."""
    if has_hooked_transformer():
        return
    markers = metafunc.definition.own_markers
    for i, mark in enumerate(markers):
        if mark.name == "parametrize" and len(mark.args) >= 2 and (
                mark.args[1] is LOADERS or mark.args[1] is TL_BACKENDS):
            values = [*mark.args[1], pytest.param("hooked", marks=pytest.mark.skip(reason=NO_HOOKED))]
            markers[i] = pytest.mark.parametrize(mark.args[0], values, *mark.args[2:], **mark.kwargs).mark
