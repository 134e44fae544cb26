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
    from lnfree_interp.checkpoints import lookup

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


def test_config_with_unsupported_attention_option(ckpt_dirs, tmp_path):
    d = tmp_path / "odd"
    shutil.copytree(ckpt_dirs["schaeff"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LNFreeError, match="scale_attn_by_inverse_layer_idx"):
        L.load_hf(d)


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
