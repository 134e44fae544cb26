"""The IOI prompt-pair helper (lnfree_interp.ioi)."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import LNFreeError


def test_pairs_are_well_formed(tokenizer):
    p = L.ioi_prompts(tokenizer, n=6, seed=3)
    assert len(p) == 6 and p.templates[:2] == ["BABA", "ABBA"]
    for clean, corr, io, s, io_id, s_id in zip(p.clean, p.corrupted, p.answers, p.wrongs, p.answer_ids, p.wrong_ids):
        a, b = tokenizer(clean)["input_ids"], tokenizer(corr)["input_ids"]
        assert len(a) == len(b)  # same token length ...
        assert sum(x != y for x, y in zip(a, b)) == 1  # ... differing only in the subject's second mention
        assert clean.count(io) == 1 and clean.count(s) == 2 and corr.count(s) == 1
        assert tokenizer(io)["input_ids"] == [io_id] and tokenizer(s)["input_ids"] == [s_id]


def test_works_end_to_end_with_patching(models, tokenizer):
    model = L.load_hooked(models["schaeff"], tokenizer=tokenizer, dtype=torch.float64)
    p = L.ioi_prompts(model, n=4)
    atp = L.attribution_patching(model, p.clean, p.corrupted, L.logit_diff(p.answers, p.wrongs))
    assert atp.values.shape[0] == 8 and torch.isfinite(atp.values).all()


def test_clear_error_without_single_token_names(tokenizer):
    with pytest.raises(LNFreeError, match="single tokens"):
        L.ioi_prompts(tokenizer, names=["Bartholomew", "Xanthippe", "Mary"])


def test_bad_arguments(tokenizer):
    with pytest.raises(LNFreeError, match="placeholder"):
        L.ioi_prompts(tokenizer, templates=("When{A} and{B} met,{C} said to",))
    with pytest.raises(LNFreeError, match="single tokens"):
        L.ioi_prompts(tokenizer, names=["Mary"] * 3)  # the answer would equal the wrong answer
    with pytest.raises(LNFreeError, match="empty"):
        L.ioi_prompts(tokenizer, names=[])
    with pytest.raises(LNFreeError, match="at least one"):
        L.ioi_prompts(tokenizer, n=0)
    with pytest.raises(LNFreeError, match="merges"):  # "{S}n" merges the name with the next letter
        L.ioi_prompts(tokenizer, n=8, templates=("When{A} and{B} went,{S}n gave it to",))
