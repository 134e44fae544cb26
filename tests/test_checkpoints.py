"""Sources, registry and inspect_checkpoint (lnfree_interp.checkpoints)."""

import json
import shutil

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError


@pytest.mark.parametrize("encoding", ["schaeff", "apollo", "layernorm"])
def test_inspect_detects_encoding_dir_and_memory(encoding, models, ckpt_dirs):
    for src in (models[encoding], ckpt_dirs[encoding], str(ckpt_dirs[encoding])):
        info = L.inspect_checkpoint(src)
        assert info.encoding == encoding
        assert info.lnfree == (encoding != "layernorm")
        assert (info.n_layers, info.n_heads, info.d_model, info.n_ctx) == (2, 4, 64, 64)
        assert info.d_vocab == models[encoding].config.vocab_size
        assert set(info.ln_weight_scale) == {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1",
                                             "transformer.h.1.ln_2", "transformer.ln_f"}
        if encoding == "apollo":
            assert info.ln_weight_scale["transformer.h.0.ln_1"] == 1e6
        assert encoding in str(info)


def test_folded_checkpoint_is_recognised(ckpt_dirs, tmp_path):
    L.load_hf(ckpt_dirs["schaeff"]).save_pretrained(tmp_path / "folded")
    info = L.inspect_checkpoint(tmp_path / "folded")
    assert info.encoding == "folded" and info.lnfree


def test_registry_lists_the_family():
    df = L.list_checkpoints()
    names = set(df["name"])
    for size, steps in (("small", 300), ("medium", 500), ("large", 600), ("xl", 800)):
        assert f"schaeff/gpt2-{size}_LNFree{steps}" in names
        assert f"schaeff/gpt2-{size}_vanilla{steps}" in names
    assert {"openai-community/gpt2", "openai-community/gpt2-xl", "apollo-research/gpt2_noLN",
            "tiny-shakespeare-lnfree"} <= names
    small = df.set_index("name").loc["schaeff/gpt2-small_LNFree300"]
    assert small["loss_owt"] == pytest.approx(3.0797) and small["ft_steps"] == 300 and small["kind"] == "lnfree"


def test_aliases_resolve():
    from lnfree_interp.registry import lookup

    assert lookup("gpt2-small-lnfree").name == "schaeff/gpt2-small_LNFree300"
    assert lookup("SCHAEFF/GPT2-SMALL_LNFREE300").name == "schaeff/gpt2-small_LNFree300"
    assert lookup("gpt2").name == "openai-community/gpt2"
    assert lookup("no-such-model") is None


def _offline_cache(monkeypatch, path):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(path))


def test_hub_id_offline_and_not_cached_says_how_to_fix(monkeypatch, tmp_path):
    _offline_cache(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(LNFreeError, match="local directory") as err:
        L.inspect_checkpoint("schaeff/gpt2-small_LNFree300")
    assert "HF_HUB_OFFLINE=1" in str(err.value)


def test_hub_id_through_the_cache(monkeypatch, tmp_path, ckpt_dirs):
    """A cached Hub snapshot loads offline (the real code path, with a hand-made cache entry)."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-lnfree"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(ckpt_dirs["schaeff"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    _offline_cache(monkeypatch, cache)
    assert L.inspect_checkpoint("someone/tiny-lnfree").encoding == "schaeff"


def test_unknown_name_and_bad_paths(tmp_path):
    with pytest.raises(LNFreeError, match="not a directory, a known checkpoint"):
        L.inspect_checkpoint("definitely not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LNFreeError, match="No config.json"):
        L.inspect_checkpoint(tmp_path / "empty")


def test_missing_and_corrupt_weights(ckpt_dirs, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpt_dirs["schaeff"], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LNFreeError, match="corrupt"):
        L.load_hf(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(LNFreeError, match="No weight file"):
        L.load_hf(d)


def test_non_gpt2_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(LNFreeError, match="GPT-2"):
        L.load_hf(model)
    model.save_pretrained(tmp_path / "llama")
    with pytest.raises(LNFreeError, match="'llama'"):
        L.inspect_checkpoint(tmp_path / "llama")


def test_legacy_bin_weights_load_with_weights_only(ckpt_dirs, models, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(ckpt_dirs["schaeff"] / "config.json", d)
    torch.save(models["schaeff"].state_dict(), d / "pytorch_model.bin")
    assert L.inspect_checkpoint(d).encoding == "schaeff"
    assert L.verify(L.load_hf(d, dtype=torch.float64)).passed


def test_config_with_unsupported_attention_option(ckpt_dirs, models, tmp_path):
    """scale_attn_by_inverse_layer_idx (once refused) now loads exactly: the 1/(layer+1) score scale is
    folded into W_Q, b_Q. Reference: transformers' own float64 computation with the option on."""
    from .conftest import reference

    d = tmp_path / "odd"
    shutil.copytree(ckpt_dirs["schaeff"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    from transformers import GPT2LMHeadModel

    native = GPT2LMHeadModel.from_pretrained(d).eval()
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(native)(tokens).logits
        plain = reference(models["schaeff"])(tokens).logits
        got = L.load_hf(d, dtype=torch.float64)(tokens).logits
    assert (plain - ref).abs().max() > 1e-3  # the option changes the logits
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert L.verify(L.load_hf(d, dtype=torch.float64)).relative_error <= 1e-12


# ------------------------------------------------------------------------------------------------
# issue 13: streaming load from sharded / single safetensors and .bin; bad input
# ------------------------------------------------------------------------------------------------


def _sharded(models, tokenizer, tmp_path, name="sharded"):
    d = tmp_path / name
    models["schaeff"].save_pretrained(d, max_shard_size="40KB")
    tokenizer.save_pretrained(d)
    return d


def _open_files():
    import os

    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def test_sharded_safetensors_load_exactly(models, tokenizer, tmp_path):
    from .conftest import reference

    d = _sharded(models, tokenizer, tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(models["schaeff"])(tokens).logits
        for loader in (L.load_hf, L.load_hooked):
            got = loader(d, dtype=torch.float64)
            out = got(tokens)
            assert (getattr(out, "logits", out) - ref).abs().max() <= 1e-12
    assert not any(str(s) in _open_files() for s in shards)  # every shard closed after the load


def test_sharded_bad_input_is_refused_with_nothing_left_open(models, tokenizer, tmp_path):
    d = _sharded(models, tokenizer, tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    before = _open_files()

    # an index naming a missing file
    bad = tmp_path / "missing"
    shutil.copytree(d, bad)
    (bad / shards[1].name).unlink()
    with pytest.raises(LNFreeError, match="missing weight shards"):
        L.load_hf(bad)

    # a truncated shard: refused when its header is read, before any tensor is
    for cut in (10, 7):
        trunc = tmp_path / f"truncated{cut}"
        shutil.copytree(d, trunc)
        data = (trunc / shards[-1].name).read_bytes()
        (trunc / shards[-1].name).write_bytes(data[: len(data) - 100] if cut == 10 else data[:cut])
        with pytest.raises(LNFreeError, match="corrupt or incomplete"):
            L.load_hooked(trunc)

    # an index that disagrees with its shards (a tensor listed in the wrong file)
    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    key = next(k for k, f in index["weight_map"].items() if f == shards[0].name)
    index2 = {**index, "weight_map": {**index["weight_map"], key: shards[-1].name}}
    (wrong / "model.safetensors.index.json").write_text(json.dumps(index2))
    with pytest.raises(LNFreeError, match="index"):
        L.load_nnsight(wrong)

    # an unreadable index
    (wrong / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(LNFreeError, match="not a valid checkpoint index"):
        L.load_hf(wrong)
    assert _open_files() <= before  # no file handle left behind by the failed loads


def test_single_file_and_bin_load_the_same_model(models, tokenizer, ckpt_dirs, tmp_path):
    d = _sharded(models, tokenizer, tmp_path)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(ckpt_dirs["schaeff"] / "config.json", binary)
    torch.save(models["schaeff"].state_dict(), binary / "pytorch_model.bin")
    ref = L.load_hf(ckpt_dirs["schaeff"], dtype=torch.float64).state_dict()
    for other in (d, binary):
        sd = L.load_hf(other, dtype=torch.float64).state_dict()
        assert set(sd) == set(ref)
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # float32 from safetensors folds the readers in place into the tensors read (fresh per access); from a .bin
    # (one memory-mapped dict) or an in-memory model it copies: the same model either way
    from lnfree_interp.checkpoints import resolve

    assert resolve(d).state_dict.fresh_tensors and resolve(ckpt_dirs["schaeff"]).state_dict.fresh_tensors
    assert not resolve(binary).state_dict.fresh_tensors
    ref32 = L.load_hf(models["schaeff"], dtype=torch.float32).state_dict()
    for other in (ckpt_dirs["schaeff"], d, binary):
        sd = L.load_hf(other, dtype=torch.float32).state_dict()
        assert all(torch.equal(sd[k], ref32[k]) for k in ref32), other


def test_safetensors_reader_matches_safetensors_library(ckpt_dirs):
    """The checkpoint reader (plain file reads, no memory map) returns what safetensors.safe_open does."""
    from safetensors import safe_open

    from lnfree_interp.checkpoints import _SafetensorsFile

    path = ckpt_dirs["schaeff"] / "model.safetensors"
    ours = _SafetensorsFile(path)
    with safe_open(str(path), framework="pt") as lib:
        assert sorted(ours.keys()) == sorted(lib.keys())
        for k in lib.keys():
            a, b = ours.get_tensor(k), lib.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    ours.close()


def test_sources_that_are_not_checkpoints(models):
    for bad in (None, 3.5, {"model": 1}):
        with pytest.raises(LNFreeError, match="Cannot load from a"):
            L.load_hf(bad)
    with pytest.raises(LNFreeError, match="Got a TransformerBridge|Got a HookedTransformer"):
        L.load_hf(L.load_hooked(models["schaeff"]))
    # an nnsight model from load_nnsight is read through the HF model it wraps
    nn_model = L.load_nnsight(models["schaeff"], dtype=torch.float64)
    again = L.load_hf(nn_model, dtype=torch.float64)
    assert L.inspect_checkpoint(nn_model).encoding == "folded"
    for k, v in nn_model._module.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unusable_device():
    with pytest.raises(LNFreeError, match="cuda.is_available"):
        L.load_hf("tiny-shakespeare-lnfree", device="cuda")
    with pytest.raises(LNFreeError, match="not a torch device"):
        L.load_hooked("tiny-shakespeare-lnfree", device="gpu0")
