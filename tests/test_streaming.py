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
