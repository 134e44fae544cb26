"""Dataset-sized inputs (lnfree_interp.streaming): batches give the single-batch numbers (float64, 1e-10)."""

import pytest
import torch
from torch.utils.data import DataLoader

import lnfree_interp as L
from lnfree_interp import LNFreeError, logit_diff


def _data(vocab, n=7, seq=8):
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, vocab, (n, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, vocab, (n,), generator=gen)
    answer = torch.randint(0, vocab, (n,), generator=gen).tolist()
    return clean, corrupted, answer


def test_dla_de_atp_and_edges_stream_to_the_single_batch_numbers(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    for fn, args, kw in (
        (L.direct_logit_attribution, (clean, answer, 9), {}),
        (L.direct_logit_attribution, (clean, answer, 9), {"by": "neuron"}),
        (L.direct_effect, (clean, answer, 9), {"ablation": corrupted}),
        (L.attribution_patching, (clean, corrupted, logit_diff(answer, 9)), {"per_position": True}),
        (L.edge_attribution, (clean, corrupted, logit_diff(answer, 9)), {}),
    ):
        one = fn(model, *args, **kw)
        many = fn(model, *args, batch_size=3, progress=False, **kw)
        assert many.values.shape == one.values.shape and many.labels == one.labels
        assert (many.values - one.values).abs().max() <= 1e-10, fn.__name__
        assert (many.metric - one.metric).abs().max() <= 1e-10
    act_one = L.activation_patching(model, clean, corrupted, logit_diff(answer, 9), nodes="mlp_out", progress=False)
    act_many = L.activation_patching(model, clean, corrupted, logit_diff(answer, 9), nodes="mlp_out", batch_size=2,
                                     progress=False)
    assert (act_one.values - act_many.values).abs().max() <= 1e-10
    cmp = L.compare_dla_direct_effect(model, clean, answer, 9, batch_size=2, progress=False)
    assert cmp.nmae <= 1e-8


def test_dataloaders_and_string_lists(models, tokenizer):
    model = L.load_hf(models["schaeff"], dtype=torch.float64, tokenizer=tokenizer)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    one = L.attribution_patching(model, clean, corrupted, logit_diff(5, 9), per_position=False)
    pairs = DataLoader(list(zip(clean, corrupted)), batch_size=3)
    many = L.attribution_patching(model, pairs, None, logit_diff(5, 9), per_position=False, progress=False)
    assert (many.values - one.values).abs().max() <= 1e-10
    # a clean and a corrupted DataLoader, zipped batch by batch
    clean_dl, corrupted_dl = DataLoader(list(clean), batch_size=3), DataLoader(list(corrupted), batch_size=3)
    two = L.attribution_patching(model, clean_dl, corrupted_dl, logit_diff(5, 9), per_position=False, progress=False)
    assert (two.values - one.values).abs().max() <= 1e-10
    with pytest.raises(LNFreeError, match="batch size"):
        L.attribution_patching(model, DataLoader(list(clean), batch_size=3), DataLoader(list(corrupted), batch_size=2),
                               logit_diff(5, 9), progress=False)
    loader = DataLoader([{"input_ids": c, "answer": a} for c, a in zip(clean, answer)], batch_size=4)
    dla = L.direct_logit_attribution(model, loader, None, 9, progress=False)
    assert (dla.values - L.direct_logit_attribution(model, clean, answer, 9).values).abs().max() <= 1e-10
    with pytest.raises(LNFreeError, match="carry .'answer'. and the call gives answer=7"):  # was silently dropped
        L.direct_logit_attribution(model, loader, 7, 9, progress=False)
    texts = ["When Mary and John went to the store", "ROMEO: I will go.", "The king is dead", "JULIET: I am"]
    ref = L.direct_logit_attribution(model, texts, 5, 9)  # one padded batch
    got = L.direct_logit_attribution(model, texts, 5, 9, batch_size=3, progress=False)
    assert (got.values - ref.values).abs().max() <= 1e-10


def test_bad_streams(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(LNFreeError, match="batch_size"):
            L.direct_logit_attribution(model, clean, 5, 9, batch_size=bad)
    with pytest.raises(LNFreeError, match="DataLoader"):
        L.direct_logit_attribution(model, DataLoader([{"ids": 1}, {"ids": 2}], batch_size=1), 5, 9, progress=False)
    with pytest.raises(LNFreeError, match="integers"):
        L.direct_logit_attribution(model, DataLoader([1.5, 2.5], batch_size=1), 5, 9, progress=False)
    with pytest.raises(LNFreeError, match="pairs"):
        L.attribution_patching(model, DataLoader(list(clean), batch_size=2), corrupted, logit_diff(5, 9),
                               progress=False)
    with pytest.raises(LNFreeError, match="top_k"):
        L.direct_logit_attribution(model, clean, 5, 9, by="neuron", top_k=3, batch_size=2)
    with pytest.raises(LNFreeError, match="mean"):
        L.direct_effect(model, clean, 5, 9, ablation="mean", batch_size=2)
    with pytest.raises(LNFreeError, match="corrupted"):
        L.attribution_patching(model, clean, corrupted[:5], logit_diff(5, 9), batch_size=2, progress=False)
    ids = torch.tensor(answer)

    def closure(logits):  # per-prompt ids for all 7 prompts: each batch of 2 sees only its own logits
        return logits[torch.arange(len(ids)), -1, ids] - logits[:, -1, 9]
    for fn in (L.attribution_patching, L.edge_attribution):
        with pytest.raises(LNFreeError, match="per-prompt tensors") as err:
            fn(model, clean, corrupted, closure, batch_size=2, progress=False)
        assert isinstance(err.value.__cause__, IndexError)  # the user's own error stays attached
    assert L.attribution_patching(model, clean, corrupted, closure).values.shape[-1] == 7  # one batch: fine


def test_streams_found_wrong_by_a_new_user():
    """Each of these returned a wrong number without an error (fresh-user trial, 2026-12-02)."""
    from torch.utils.data import TensorDataset

    model = L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64)
    clean = ["ROMEO:\nI will not", "JULIET:\nI am the", "KING:\nGo now", "QUEEN:\nAnd so"]
    corr = ["QUEEN:\nShe can not", "HAMLET:\nhe is a good", "LEAR:\nThou art", "ROMEO:\nI am"]  # other widths
    # 1. streamed corrupted strings keep their padding mask (pos=-1 was read at a padding column)
    one = L.direct_effect(model, clean, " be", " go", ablation=corr)
    for kw in ({"batch_size": 2}, {"batch_size": 4}):
        many = L.direct_effect(model, clean, " be", " go", ablation=corr, progress=False, **kw)
        assert (many.values - one.values).abs().max() <= 1e-10, kw
    # 2. a (tokens, mask) TensorDataset is not a (clean, corrupted) pair
    toks, mask = L.inputs.prepare(L.backends.get_backend(model), clean)
    loader = DataLoader(TensorDataset(toks, mask), batch_size=2)
    for fn in (L.direct_logit_attribution, L.direct_effect):
        with pytest.raises(LNFreeError, match="pair"):
            fn(model, loader, " be", " go", progress=False)
    # 3. per-prompt values of another length than the prompts, and per-prompt values with a DataLoader
    with pytest.raises(LNFreeError, match="per-prompt"):
        L.direct_logit_attribution(model, clean, [" be", " go"], batch_size=2, progress=False)
    with pytest.raises(LNFreeError, match="per-prompt"):
        L.direct_logit_attribution(model, clean, " be", pos=[-1, -2], batch_size=2, progress=False)
    with pytest.raises(LNFreeError, match="per-prompt"):
        L.attribution_patching(model, toks, toks.flip(0), logit_diff([1, 2, 3], [4, 5, 6]), batch_size=2,
                               progress=False)
    with pytest.raises(LNFreeError, match="DataLoader"):
        L.direct_logit_attribution(model, DataLoader(clean, batch_size=2), [" be", " go", " a", " b"], progress=False)
    # 4. answer keys in a DataLoader's batches are not silently ignored by a fixed-metric function
    keyed = DataLoader([{"clean": c, "corrupted": k, "answer": 5, "wrong": 9} for c, k in zip(toks, toks.flip(0))],
                       batch_size=2)
    with pytest.raises(LNFreeError, match="does not read"):
        L.attribution_patching(model, keyed, None, logit_diff(5, 9), progress=False)
    # 5. a shuffled DataLoader gives DLA and the direct effect other prompts: refused, not a 34 % NMAE
    with pytest.raises(LNFreeError, match="different prompts"):
        L.compare_dla_direct_effect(model, DataLoader(clean, batch_size=3, shuffle=True,
                                                      generator=torch.Generator().manual_seed(1)), " be", " go",
                                    progress=False)
    assert L.compare_dla_direct_effect(model, DataLoader(clean, batch_size=3), " be", " go", progress=False).nmae < 1e-8
    # 6. list input_ids collated per position, 7. argument checks
    lists = DataLoader([{"input_ids": t.tolist()} for t in toks], batch_size=2)
    with pytest.raises(LNFreeError, match="with_format"):
        L.direct_logit_attribution(model, lists, " be", progress=False)
    for bad in ({"layers": "12"}, {"layers": [1.7]}, {"layers": True}, {"layers": 1.5}, {"top_k": 2.7},
                {"top_k": "3"}):
        with pytest.raises(LNFreeError):
            L.direct_logit_attribution(model, clean, " be", by="neuron", **bad)
    with pytest.raises(LNFreeError, match="n_boot"):
        L.compare_dla_direct_effect(model, clean, " be", " go", n_boot=0)
    # 8. a datasets Column without batch_size (it streamed, but one batch was refused)
    datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")
    column = datasets.Dataset.from_dict({"text": clean})["text"]
    got = L.direct_logit_attribution(model, column, " be", " go")
    assert (got.values - L.direct_logit_attribution(model, clean, " be", " go").values).abs().max() == 0


def test_summaries_equal_the_mean_and_std_of_the_per_prompt_values(models):
    """per_prompt=False keeps the mean, std and count over prompts (Running), equal to those of the per-prompt
    call (float64, 1e-10) for every entry point, streamed (uneven last batch) or in one batch."""
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    ld = logit_diff(answer, 9)
    for fn, args, kw in (
        (L.direct_logit_attribution, (clean, answer, 9), {}),
        (L.direct_logit_attribution, (clean, answer, 9), {"by": "neuron", "top_k": 3}),  # one batch: top_k allowed
        (L.direct_effect, (clean, answer, 9), {"ablation": corrupted}),
        (L.direct_effect, (clean, answer, 9), {"ablation": "mean"}),  # one batch: the mean over all prompts
        (L.attribution_patching, (clean, corrupted, ld), {"per_position": True}),
        (L.activation_patching, (clean, corrupted, ld), {"nodes": "mlp_out"}),
        (L.edge_attribution, (clean, corrupted, ld), {}),
        (L.edge_attribution, (clean, corrupted, ld), {"per_position": True, "method": "eap-ig", "steps": 2}),
        (L.edge_patching, (clean, corrupted, ld), {"edges": ["L0H1->logits", "embed->L1H0.q"]}),
    ):
        one = fn(model, *args, progress=False, **kw)
        values = one.values.double()
        score = values.sum(1) if values.ndim > 2 else values
        streams = [{}] if "top_k" in kw or kw.get("ablation") == "mean" else [{}, {"batch_size": 3}]
        for extra in streams:
            s = fn(model, *args, progress=False, per_prompt=False, **kw, **extra)
            name = f"{fn.__name__} {kw} {extra}"
            assert type(s) is type(one) and not s.per_prompt and one.per_prompt, name
            assert s.n_prompts == one.n_prompts == 7 and s.values.shape == (*one.values.shape[:-1], 1), name
            assert (s.values[..., 0] - one.values.mean(-1)).abs().max() <= 1e-10, name
            assert (s.metric - one.metric.mean()).abs().max() <= 1e-10, name
            assert (s.extra["std"] - score.std(-1)).abs().max() <= 1e-10, name
            assert s.mean().shape == one.mean().shape and torch.allclose(s.mean(), one.mean(), rtol=0, atol=1e-10)
            for key in ("metric_clean", "metric_corrupted"):
                if key in one.extra:
                    assert (s.extra[key] - one.extra[key].mean()).abs().max() <= 1e-10, name
            if getattr(one, "direct", None) is not None:
                assert (s.direct[..., 0] - one.direct.mean(-1)).abs().max() <= 1e-10, name
            if getattr(one, "bias", None) is not None:
                assert (s.bias - one.bias.mean()).abs().max() <= 1e-10, name
                s.assert_exact()  # components of the means sum to the mean metric
                scale = max(float((values.abs().flatten(0, -2).sum(0) + one.bias.double().abs()).max()),
                            float(one.metric.abs().max()))
                assert abs(s.extra["scale"] - scale) <= 1e-10, name


def test_summaries_read_like_results_and_refuse_what_needs_prompts(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    one = L.direct_logit_attribution(model, clean, answer, 9)
    s = L.direct_logit_attribution(model, clean, answer, 9, batch_size=2, per_prompt=False, progress=False)
    table, ref = s.top(4), one.top(4)
    assert list(table["component"]) == list(ref["component"])
    assert max(abs(a - b) for a, b in zip(table["std"], ref["std"])) <= 1e-10  # the std of 7 prompts, not of 1
    frame = s.to_dataframe()
    assert set(frame["prompt"]) == {"mean of 7"} and len(frame) == len(s.labels) + 1  # + the unembed_bias row
    from lnfree_interp.figures import default_title

    assert "mean over 7 prompts" in repr(s) and "mean over 7 prompts" in default_title(s)
    assert torch.allclose(s.head_matrix(), one.head_matrix(), rtol=0, atol=1e-10, equal_nan=True)
    ld = logit_diff(answer, 9)
    atp = L.attribution_patching(model, clean, corrupted, ld, per_position=False)
    act = L.activation_patching(model, clean, corrupted, ld, progress=False)
    atp_s = L.attribution_patching(model, clean, corrupted, ld, per_position=False, per_prompt=False)
    with pytest.raises(LNFreeError, match="atp_result holds only a mean over prompts"):
        L.compare_attribution(atp_s, act)
    with pytest.raises(LNFreeError, match="act_result holds only a mean"):
        L.compare_attribution(atp, L.activation_patching(model, clean, corrupted, ld, per_prompt=False, progress=False))
    eap = L.edge_attribution(model, clean, corrupted, ld, batch_size=4, per_prompt=False, progress=False)
    eap_one = L.edge_attribution(model, clean, corrupted, ld)
    assert eap.top_edges(10) == eap_one.top_edges(10) and "the mean over 7 prompts" in repr(eap)
    with pytest.raises(LNFreeError, match="holds only a mean"):
        L.compare_attribution(eap, L.edge_patching(model, clean, corrupted, ld, edges=eap.edges[:3], progress=False))
    single = L.direct_logit_attribution(model, clean[:1], answer[0], 9, per_prompt=False)
    assert single.n_prompts == 1 and torch.isnan(single.extra["std"]).all() and "std" not in single.top(3)


def test_summary_memory_does_not_grow_with_prompts(models):
    """What a summary holds (and what streaming keeps between batches) is one prompt's worth, whatever N."""
    from lnfree_interp.streaming import Running

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size, n=24)
    sizes = set()
    for n in (6, 24):
        s = L.edge_attribution(model, clean[:n], corrupted[:n], logit_diff(answer[:n], 9), batch_size=3,
                               per_prompt=False, progress=False)
        sizes.add(sum(v.numel() for v in [s.values, s.metric, *(x for x in s.extra.values() if torch.is_tensor(x))]))
    assert len(sizes) == 1
    running = Running()
    for start in range(0, 24, 5):  # batches of 5, 5, 5, 5, 4
        running.add(L.direct_logit_attribution(model, clean[start:start + 5], answer[start:start + 5], 9))
        assert running.means[("", "values")].shape == (14,) and running.first.values.shape[-1] == 5  # 2 layers
    assert running.n == 24


def test_summary_exactness_is_the_per_prompt_check(models):
    """assert_exact on a DLA summary checks what it would on the per-prompt values (recorded while
    streaming): errors that cancel across prompts, or a mean far smaller than its summands, change nothing."""
    import dataclasses

    from lnfree_interp.results import AttributionResult
    from lnfree_interp.streaming import summarise

    values = torch.tensor([[1000.0, -1000.0], [-999.0, 999.0]], dtype=torch.float32)  # [component, prompt]
    metric = values.sum(0) + torch.tensor([4e-3, 4e-3])  # float32 rounding of a 2e3 scale: 2e-6 relative
    r = AttributionResult(values, ["L0H0", "L0H1"], metric, "dla", n_layers=1, n_heads=2, exact=True)
    r.assert_exact()
    s = summarise(r)
    assert s.extra["scale"] == 1999.0 and abs(s.extra["max_sum_error"] - 4e-3) <= 1e-6
    assert float(s.values.abs().sum()) <= 1e-3
    s.assert_exact()  # 4e-3 against a mean of ~0 would fail: the prompts' scale is 1999
    with pytest.raises(LNFreeError, match="already a summary"):  # a mean is not one prompt's values
        summarise(s)
    # errors of +-1.8 on two prompts cancel in the mean: the summary must still fail, as the prompts do
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, _, answer = _data(models["schaeff"].config.vocab_size, n=12)
    dla = L.direct_logit_attribution(model, clean, answer, 9)
    shifted = dla.values.clone()
    shifted[0, 0] += 1.82
    shifted[0, 1] -= 1.82
    bad = dataclasses.replace(dla, values=shifted)
    for result in (bad, summarise(bad)):
        with pytest.raises(LNFreeError, match="sum to the metric only within 1.82"):
            result.assert_exact()
    # float32: an error within tolerance of the largest prompt's scale but not of the mean scale passes, as per prompt
    dla32 = L.direct_logit_attribution(L.load_hf(models["schaeff"], dtype=torch.float32), clean, answer, 9)
    scale = dla32.values.abs().sum(0) + dla32.bias.abs()
    assert float(scale.max()) > 1.2 * float(scale.mean())  # the case needs prompts of unequal scale
    nudged = dla32.values.clone()
    nudged[0] += 0.8e-5 * float(scale.max())
    ok = dataclasses.replace(dla32, values=nudged)
    ok.assert_exact()
    summarise(ok).assert_exact()
    summary = L.direct_logit_attribution(model, clean, answer, 9, batch_size=5, per_prompt=False, progress=False)
    total = dla.values.sum(0) + dla.bias
    assert abs(summary.extra["max_sum_error"] - float((total - dla.metric).abs().max())) <= 1e-15
    ref = max(float((dla.values.abs().sum(0) + dla.bias.abs()).max()), float(dla.metric.abs().max()))
    assert summary.extra["scale"] == pytest.approx(ref, abs=1e-12)


def test_summaries_of_varying_widths_are_refused(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    vocab = models["schaeff"].config.vocab_size
    a, b = torch.randint(0, vocab, (2, 6)), torch.randint(0, vocab, (2, 9))
    pairs = DataLoader([(a, a.flip(1)), (b, b.flip(1))], batch_size=None)
    with pytest.raises(LNFreeError, match="padded to one width"):
        L.attribution_patching(model, pairs, None, logit_diff(5, 9), per_prompt=False, progress=False)
    summed = L.attribution_patching(model, pairs, None, logit_diff(5, 9), per_position=False, per_prompt=False,
                                    progress=False)
    joined = L.attribution_patching(model, pairs, None, logit_diff(5, 9), per_position=False, progress=False)
    assert summed.n_prompts == 4 and (summed.values[:, 0] - joined.values.mean(-1)).abs().max() <= 1e-10


def test_per_prompt_arguments_of_every_kind_are_cut_or_shared(models):
    """answer / wrong / pos as a list, tuple, tensor or numpy array of one per prompt are cut with the prompts;
    a number, a string, a 0-d tensor or a sequence of one is shared by every prompt (streamed = one batch)."""
    import numpy as np

    from lnfree_interp.streaming import per_prompt_count, take

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, _, answer = _data(models["schaeff"].config.vocab_size)
    ref = L.direct_logit_attribution(model, clean, answer, 9)
    for per in (answer, tuple(answer), torch.tensor(answer), np.array(answer)):
        got = L.direct_logit_attribution(model, clean, per, 9, batch_size=3, progress=False)
        assert (got.values - ref.values).abs().max() <= 1e-10, type(per)
    shared = L.direct_logit_attribution(model, clean, 5, 9)
    for one in ([5], (5,), torch.tensor(5), torch.tensor([5]), np.array([5])):
        got = L.direct_logit_attribution(model, clean, one, 9, batch_size=3, progress=False)
        assert (got.values - shared.values).abs().max() <= 1e-10, one
    positions = [-1, -2, -3, -1, -2, -3, -1]
    by_pos = L.direct_logit_attribution(model, clean, 5, 9, pos=positions)
    got = L.direct_logit_attribution(model, clean, 5, 9, pos=np.array(positions), batch_size=3, progress=False)
    assert (got.values - by_pos.values).abs().max() <= 1e-10
    assert [per_prompt_count(x) for x in ("abc", b"ab", None, 3, [1], [1, 2], torch.zeros(()), torch.zeros(4),
                                          np.zeros(3), np.float64(2.0))] == [None, None, None, None, None, 2, None, 4,
                                                                             3, None]
    assert take([1, 2, 3], 1, 3, 3) == [2, 3] and take((1, 2, 3), 0, 1, 3) == [1]
    assert take(torch.arange(4), 1, 3, 4).tolist() == [1, 2] and take(np.arange(4), 2, 4, 4).tolist() == [2, 3]
    assert take("abc", 0, 1, 3) == "abc" and take([7], 0, 1, 3) == [7] and take(None, 0, 1, 3) is None
    with pytest.raises(LNFreeError, match="2 per-prompt values .* for 3 prompts"):
        take(torch.arange(2), 0, 1, 3)


def test_loader_batches_of_every_kind(models, tokenizer):
    model = L.load_hf(models["schaeff"], dtype=torch.float64, tokenizer=tokenizer)
    texts = ["the cat sat", "a dog ran off", "one more", "and the last one"]
    ref = L.direct_logit_attribution(model, texts, 5, 9)
    for loader in (DataLoader(texts, batch_size=3), DataLoader([{"text": t} for t in texts], batch_size=3)):
        got = L.direct_logit_attribution(model, loader, 5, 9, progress=False)
        assert (got.values - ref.values).abs().max() <= 1e-10
    with pytest.raises(LNFreeError, match="Cannot read inputs of type set"):  # unordered: refused, not listed
        L.direct_logit_attribution(model, set(texts), 5, 9, batch_size=2, progress=False)
    # a DataLoader's pos key is read when the call leaves pos at its default; a clash is refused
    clean, _, answer = _data(models["schaeff"].config.vocab_size, n=4)
    pos = [-1, -2, -3, -4]
    keyed = DataLoader([{"input_ids": c, "pos": p} for c, p in zip(clean, pos)], batch_size=2)
    got = L.direct_logit_attribution(model, keyed, 5, 9, progress=False)
    assert (got.values - L.direct_logit_attribution(model, clean, 5, 9, pos=pos).values).abs().max() <= 1e-10
    with pytest.raises(LNFreeError, match="carry .'pos'. and the call gives pos=-2"):
        L.direct_logit_attribution(model, keyed, 5, 9, pos=-2, progress=False)
    # two loaders of different lengths part at a batch
    with pytest.raises(LNFreeError, match="part at batch 2"):
        L.attribution_patching(model, DataLoader(list(clean), batch_size=1), DataLoader(list(clean[:2]), batch_size=1),
                               logit_diff(5, 9), progress=False)


def test_joined_and_summarised_extras_and_components():
    """The per-prompt extras (metric_clean, metric_corrupted) are joined / averaged like the values; results
    with other components are refused (both a bug upstream, never a silent mix)."""
    from lnfree_interp.results import AttributionResult
    from lnfree_interp.streaming import Running, concat

    def result(values, labels=("L0H0", "L0H1")):
        values = torch.tensor(values, dtype=torch.float64)
        return AttributionResult(values, list(labels), values.sum(0), "atp", n_layers=1, n_heads=2,
                                 extra={"metric_clean": values[0] * 2, "metric_corrupted": values[1] * 3,
                                        "backend": "hf"})

    a, b = result([[1.0, 2.0], [3.0, 4.0]]), result([[5.0], [6.0]])
    joined = concat([a, b])
    assert joined.extra["metric_clean"].tolist() == [2.0, 4.0, 10.0] and joined.extra["backend"] == "hf"
    assert joined.extra["metric_corrupted"].tolist() == [9.0, 12.0, 18.0] and joined.metric.tolist() == [4, 6, 11]
    s = Running().add(a).add(b).result()
    assert s.extra["metric_clean"].tolist() == [16 / 3] and s.extra["metric_corrupted"].tolist() == [13.0]
    assert s.values[:, 0].tolist() == [8 / 3, 13 / 3] and s.metric.tolist() == [7.0] and s.n_prompts == 3
    assert torch.allclose(s.extra["std"], joined.values.std(1), rtol=0, atol=1e-12)
    other = result([[5.0], [6.0]], labels=("L0H0", "L0H2"))
    with pytest.raises(LNFreeError, match="different components"):
        concat([a, other])
    with pytest.raises(LNFreeError, match="different shapes"):
        Running().add(a).add(other)


def test_found_by_a_fresh_user_on_summaries(models, tokenizer):
    """Fresh-user trial of per_prompt=False (2026-12-03): each of these was wrong or unclear."""
    import numpy as np
    import pandas as pd

    model = L.load_hf(models["schaeff"], dtype=torch.float64, tokenizer=tokenizer)
    clean, corrupted, answer = _data(models["schaeff"].config.vocab_size)
    ld = logit_diff(answer, 9)
    # 1. per_prompt is a bool: "no", 0 or None picked a result's shape by truthiness
    for bad in ("no", "False", 0, None):
        for call in (lambda: L.direct_logit_attribution(model, clean, 5, 9, per_prompt=bad),
                     lambda: L.direct_effect(model, clean, 5, 9, per_prompt=bad),
                     lambda: L.attribution_patching(model, clean, corrupted, ld, per_prompt=bad),
                     lambda: L.activation_patching(model, clean, corrupted, ld, per_prompt=bad),
                     lambda: L.edge_attribution(model, clean, corrupted, ld, per_prompt=bad),
                     lambda: L.edge_patching(model, clean, corrupted, ld, edges=["L0H0->logits"], per_prompt=bad)):
            with pytest.raises(LNFreeError, match=f"per_prompt={bad!r} must be True"):
                call()
    # 2. answers as numpy string arrays, pandas Series (of strings or ids) and lists of 0-d tensors
    shakespeare = L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64)
    texts = ["ROMEO:\nI will not", "KING:\nWhat", "JULIET:\nI am the"]
    words = [" be", " go", " or"]
    ref = L.direct_logit_attribution(shakespeare, texts, words, " the")
    for per in (np.array(words), pd.Series(words)):
        for kw in ({}, {"batch_size": 2, "progress": False}):
            got = L.direct_logit_attribution(shakespeare, texts, per, " the", **kw)
            assert (got.values - ref.values).abs().max() <= 1e-12, (type(per), kw)
    ref_ids = L.direct_logit_attribution(model, clean, answer, 9)
    for per in (pd.Series(answer), [torch.tensor(a) for a in answer]):
        got = L.direct_logit_attribution(model, clean, per, 9)
        assert (got.values - ref_ids.values).abs().max() <= 1e-12, type(per)
    pos = [3, 4, 5, 6, 7, -2, -1]  # pos as a Series (second trial), also with its own index and cut in batches
    by_pos = L.direct_logit_attribution(model, clean, answer, 9, pos=pos)
    for series in (pd.Series(pos), pd.Series(pos, index=range(10, 17))):
        for kw in ({}, {"batch_size": 3, "progress": False}):
            got = L.direct_logit_attribution(model, clean, answer, 9, pos=series, **kw)
            assert (got.values - by_pos.values).abs().max() <= 1e-12, kw
        atp = L.attribution_patching(model, clean, corrupted, logit_diff(answer, 9, pos=series), batch_size=3,
                                     progress=False)
        ref = L.attribution_patching(model, clean, corrupted, logit_diff(answer, 9, pos=pos))
        assert (atp.values - ref.values).abs().max() <= 1e-12
    with pytest.raises(LNFreeError, match="one token id per prompt"):
        L.direct_logit_attribution(model, clean, np.array([[1, 2]] * 7), 9)
    with pytest.raises(LNFreeError, match=r"one token per prompt: got an array of shape \(1, 3\)"):
        L.direct_logit_attribution(shakespeare, texts, np.array([words]), " the")
    shared = L.direct_logit_attribution(shakespeare, texts, " be", " the")
    got = L.direct_logit_attribution(shakespeare, texts, np.array(" be"), " the", batch_size=2, progress=False)
    assert (got.values - shared.values).abs().max() <= 1e-12
    # 3. assert_exact on attribution patching named LayerNorm on an LN-free model
    with pytest.raises(LNFreeError, match="first-order .* not exact on any model"):
        L.attribution_patching(model, clean, corrupted, ld).assert_exact()
    # 4. edge tables show the std over prompts (per prompt and in a summary, the same)
    eap = L.edge_attribution(model, clean, corrupted, ld)
    summary = L.edge_attribution(model, clean, corrupted, ld, per_prompt=False)
    a, b = eap.to_dataframe(), summary.to_dataframe()
    assert list(a.columns) == list(b.columns) and "std" in a.columns
    assert np.abs(a["std"].to_numpy() - b["std"].to_numpy()).max() <= 1e-10
    assert np.abs(a["std"].to_numpy() - eap.values.std(-1).numpy()).max() <= 1e-12
    assert "std" in summary.top(3).columns
    one = L.edge_attribution(model, clean[:1], corrupted[:1], logit_diff(answer[0], 9), per_prompt=False)
    assert "std" not in one.to_dataframe().columns and "the mean over 1 prompt)" in repr(one).splitlines()[0] + ")"
    # 5. the refusal's grammar with two summaries
    atp_s = L.attribution_patching(model, clean, corrupted, ld, per_prompt=False)
    act_s = L.activation_patching(model, clean, corrupted, ld, per_prompt=False, progress=False)
    with pytest.raises(LNFreeError, match="atp_result and act_result hold only a mean"):
        L.compare_attribution(atp_s, act_s)
