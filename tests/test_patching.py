"""Attribution patching, activation patching and their comparison (lnfree_interp.patching)."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError, logit_diff, logprob

from .conftest import LOADERS, TL_BACKENDS, load

ANSWER, WRONG = [5, 17, 40], 9


def _pair(vocab):
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, vocab, (3, 12), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(0, vocab, (3,), generator=gen)
    return clean, corrupted


@pytest.mark.parametrize("loader", LOADERS)
def test_direct_path_node_is_exact_on_lnfree_and_not_with_layernorm(loader, models):
    """The last layer's MLP output at the answer position reaches the logits only directly: AtP ==
    activation patching to 1e-10 in float64 LN-free; with LayerNorm the LN makes them differ."""
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    errors = {}
    for encoding in ("schaeff", "layernorm"):
        model = load(loader, models[encoding], dtype=torch.float64, expect_lnfree=encoding != "layernorm")
        metric = logit_diff(ANSWER, WRONG)
        atp = L.attribution_patching(model, clean, corrupted, metric, nodes="mlp_out")
        act = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", per_position=True,
                                    positions=[11], progress=False)
        i = atp.labels.index("1_mlp_out")
        assert act.labels == atp.labels
        assert act.values[i, 0].abs().max() > 1e-3  # the patch matters
        errors[encoding] = (atp.values[i, -1] - act.values[i, 0]).abs().max().item()
        # ... and it is all direct
        assert (atp.indirect[i, -1]).abs().max() <= 1e-12
    assert errors["schaeff"] <= 1e-10
    assert errors["layernorm"] > 1e-6



def test_positions_restrict_the_patch_without_per_position(models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    per_pos = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", per_position=True,
                                    progress=False)
    everywhere = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", progress=False)
    at_last = L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out", positions=[-1],
                                    progress=False)
    assert at_last.values.shape == everywhere.values.shape and at_last.extra["patched_positions"] == [11]
    assert torch.allclose(at_last.values, per_pos.values[:, -1], rtol=0, atol=1e-12)
    assert (at_last.values - everywhere.values).abs().max() > 1e-6  # the other positions matter

def test_direct_part_equals_path_patched_direct_effect(models):
    """AtP's direct part, summed over positions, is the direct effect of patching each head's output
    into the final residual stream (exact on LN-free models with a linear metric). Sign conventions:
    AtP = metric(patched) - metric(clean); DE = metric(clean) - metric(ablated)."""
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    atp = L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), per_position=False)
    de = L.direct_effect(model, clean, ANSWER, WRONG, ablation=corrupted)
    for i, label in enumerate(atp.labels):
        assert (atp.direct[i] + de[label]).abs().max() <= 1e-10, label
    assert atp.extra["direct_exact"] and "exact" in atp.note


@pytest.mark.parametrize("nodes", ["head", "attn_out", "mlp_out", "neuron", "resid_pre"])
def test_values_split_and_shapes(nodes, models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    atp = L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), nodes=nodes)
    width = {"head": 4, "neuron": 256}.get(nodes, 1)
    assert atp.values.shape == (2 * width, 12, 3)
    assert (atp.direct + atp.indirect - atp.values).abs().max() <= 1e-15
    summed = L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), nodes=nodes, per_position=False)
    assert summed.values.shape == (2 * width, 3)
    assert (summed.values - atp.values.sum(1)).abs().max() <= 1e-12


def test_batched_pairs_equal_one_pair_at_a_time(models):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    batched = L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG))
    for b in range(3):
        one = L.attribution_patching(model, clean[b:b + 1], corrupted[b:b + 1], logit_diff(ANSWER[b], WRONG))
        assert (one.values[..., 0] - batched.values[..., b]).abs().max() <= 1e-12


@pytest.mark.parametrize("kind", TL_BACKENDS)
def test_activation_patching_matches_one_forward_per_node(kind, models):
    """Batched activation patching == TL's own run_with_hooks, one forward per head (all positions)."""
    model = L.load_hooked(models["schaeff"], backend=kind, dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    act = L.activation_patching(model, clean, corrupted, metric, nodes="head", batch_size=6, progress=False)
    _, corr_cache = model.run_with_cache(corrupted)
    base = metric(model(clean))
    for layer in range(2):
        for head in range(4):
            def patch(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = corr_cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
                return z
            patched = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
            expected = metric(patched) - base
            assert (act[f"L{layer}H{head}"] - expected).abs().max() <= 1e-12


def test_identical_inputs_give_exact_zero_even_in_train_mode(models):
    for encoding in ("schaeff", "layernorm"):
        model = L.load_hooked(models[encoding], expect_lnfree=encoding == "schaeff")
        model.train()
        clean, _ = _pair(models[encoding].config.vocab_size)
        for nodes in ("head", "neuron"):
            atp = L.attribution_patching(model, clean, clean.clone(), logit_diff(ANSWER, WRONG), nodes=nodes)
            assert torch.count_nonzero(atp.values) == 0
        act = L.activation_patching(model, clean, clean.clone(), logit_diff(ANSWER, WRONG), progress=False)
        assert torch.count_nonzero(act.values) == 0
        assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("loader", LOADERS)
def test_no_parameter_gradients_and_no_hooks_left(loader, models):
    from lnfree_interp.backends import get_backend

    model = load(loader, models["schaeff"])
    module = get_backend(model).module

    def hooks():  # TransformerBridge keeps internal hooks of its own: compare before/after
        return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in module.modules()]

    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    with torch.no_grad():
        get_backend(model).forward(clean, None)  # the bridge installs its own lazy hooks on first use
    before = hooks()
    L.attribution_patching(model, clean, corrupted, logprob(ANSWER))
    L.activation_patching(model, clean, corrupted, logprob(ANSWER), progress=False)
    assert all(p.grad is None for p in module.parameters())
    assert hooks() == before


def test_hooks_removed_when_the_metric_raises(models):
    model = L.load_hooked(models["schaeff"])
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        L.attribution_patching(model, clean, corrupted, broken)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert not model.training


def test_compare_attribution(models, tmp_path):
    model = L.load_hooked(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    atp = L.attribution_patching(model, clean, corrupted, metric, per_position=False)
    act = L.activation_patching(model, clean, corrupted, metric, progress=False)
    cmp = L.compare_attribution(atp, act)
    assert 0.9 < cmp.stats["pearson"] <= 1 + 1e-12 and 0 <= cmp.stats["sign_agreement"] <= 1
    assert cmp.nmae == pytest.approx(100 * (atp.values - act.values).abs().mean().item()
                                     / act.values.abs().mean().item())
    restore = act.extra["metric_corrupted"] - act.extra["metric_clean"]
    assert cmp.stats["normalised_mae"] == pytest.approx(((atp.values - act.values) / restore).abs().mean().item())
    assert list(cmp.per_component["layer"]) == [0, 1]
    png, html = cmp.save(tmp_path / "scatter", html=True)
    assert png.stat().st_size > 1000 and html.exists()
    with pytest.raises(LNFreeError, match="different nodes"):
        L.compare_attribution(atp, L.activation_patching(model, clean, corrupted, metric, nodes="mlp_out",
                                                          progress=False))
    with pytest.raises(LNFreeError, match="first"):
        L.compare_attribution(act, atp)  # swapped
    with pytest.raises(LNFreeError, match="positions"):  # AtP summed over all positions, AP patched 2
        L.compare_attribution(atp, L.activation_patching(model, clean, corrupted, metric, positions=[-2, -1],
                                                          progress=False))
    base = L.load_hooked(models["layernorm"], dtype=torch.float64, expect_lnfree=False)
    with pytest.raises(LNFreeError, match="different models, inputs or metrics"):
        L.compare_attribution(atp, L.activation_patching(base, clean, corrupted, metric, progress=False))


def test_bad_input(models, tokenizer):
    model = L.load_hooked(models["schaeff"], tokenizer=tokenizer)
    short, long_ = "When Mary", "When Mary and John went to the store"
    for fn in (L.attribution_patching, L.activation_patching):  # equal padded shape, unequal lengths
        with pytest.raises(LNFreeError, match="token length"):
            fn(model, [long_, short], [short, long_], logit_diff(" Mary", " John"))
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    with pytest.raises(LNFreeError, match="different shapes"):
        L.attribution_patching(model, clean, corrupted[:, :10], logit_diff(ANSWER, WRONG))
    with pytest.raises(LNFreeError, match="2 clean prompt.s. but 1 corrupted"):  # counts, not token lengths
        L.attribution_patching(model, [short, short], [short], logit_diff(" Mary", " John"))
    with pytest.raises(LNFreeError, match="one scalar per prompt"):
        L.attribution_patching(model, clean, corrupted, lambda logits: logits[:, -1, :5])
    with pytest.raises(LNFreeError, match="no gradient"):
        L.attribution_patching(model, clean, corrupted, lambda logits: logits[:, -1].argmax(-1).double())
    with pytest.raises(LNFreeError, match="nodes="):
        L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), nodes="heads")
    with pytest.raises(LNFreeError, match="callable"):
        L.attribution_patching(model, clean, corrupted, "logit_diff")
    with torch.inference_mode(), pytest.raises(LNFreeError, match="inference_mode"):
        L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG))
    with torch.no_grad():  # no_grad is overridden for the backward pass
        assert L.attribution_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG)).values.abs().max() > 0
    with pytest.raises(LNFreeError, match="positions"):
        L.activation_patching(model, clean, corrupted, logit_diff(ANSWER, WRONG), per_position=True,
                              positions=[99], progress=False)


def test_float16_gradient_overflow_is_reported(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float16)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    with pytest.raises(LNFreeError, match="Non-finite gradients"):
        L.attribution_patching(model, clean, corrupted, lambda logits: (logits[:, -1].float() * 50).exp().sum(-1))


def test_position_boundaries_and_label_mismatch(models):
    """positions=[-seq] is the first position (the same patch as [0]); [seq] is refused. compare_attribution
    refuses results whose node labels differ even when their shapes agree."""
    import dataclasses

    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    model = load("hf", models["schaeff"], dtype=torch.float64)
    metric = logit_diff(ANSWER, WRONG)
    seq = clean.shape[1]
    kw = {"nodes": "mlp_out", "per_position": True, "progress": False}
    first = L.activation_patching(model, clean, corrupted, metric, positions=[-seq], **kw)
    zero = L.activation_patching(model, clean, corrupted, metric, positions=[0], **kw)
    assert first.positions == zero.positions == [0] and torch.equal(first.values, zero.values)
    with pytest.raises(LNFreeError, match="must be non-empty and lie in"):
        L.activation_patching(model, clean, corrupted, metric, positions=[seq], **kw)
    atp = L.attribution_patching(model, clean, corrupted, metric, nodes="mlp_out")
    act = L.activation_patching(model, clean, corrupted, metric, **kw)
    L.compare_attribution(atp, act)  # the pair itself is accepted
    renamed = dataclasses.replace(act, labels=list(reversed(act.labels)))
    assert renamed.values.shape == atp.values.shape and renamed.labels != atp.labels
    with pytest.raises(LNFreeError, match="different nodes or shapes"):
        L.compare_attribution(atp, renamed)
