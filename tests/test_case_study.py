"""The induction case study: prompt construction, metric by hand, exactness into logits, CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lnfree_interp as L
from lnfree_interp.case_study import (
    RepeatLogitDiff,
    case_study_markdown,
    case_study_table,
    induction_case_study,
    induction_pairs,
    plot_faithfulness,
)
from lnfree_interp.errors import LNFreeError
from lnfree_interp.nodes import n_edges

LNFREE, VANILLA = "tiny-shakespeare-lnfree", "tiny-shakespeare-vanilla"


@pytest.fixture(scope="module")
def free64():
    return L.load_hooked(LNFREE, dtype=torch.float64)


@pytest.fixture(scope="module")
def studies(free64):
    base = L.load_hooked(VANILLA, dtype=torch.float64, expect_lnfree=False)
    kw = dict(n_prompts=2, seq_len=5, sizes=(5, 50))
    return [induction_case_study(free64, name="lnfree", **kw), induction_case_study(base, name="vanilla", **kw)]


def test_pairs_repeat_and_break_the_repeat(free64):
    clean, corrupted, metric = induction_pairs(free64, n_prompts=3, seq_len=6, seed=1)
    assert clean.shape == corrupted.shape == (3, 13)
    bos = free64.tokenizer.bos_token_id
    assert (clean[:, 0] == bos).all() and (corrupted[:, 0] == bos).all()
    s = clean[:, 1:7]
    assert torch.equal(clean[:, 7:], s) and torch.equal(corrupted[:, 7:], s)  # the second copy is unchanged
    for b in range(3):
        first = set(corrupted[b, 1:7].tolist())
        assert len(set(s[b].tolist())) == 6 and len(first) == 6 and not first & set(s[b].tolist())
    # the metric by hand: logit of the true next token minus the corrupted next, mean over the repeat
    logits = torch.randn(3, 13, free64.cfg.d_vocab, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for i in range(5):  # repeat position 7 + i holds s[i]; its next token is s[i + 1]
            expected[b] += logits[b, 7 + i, s[b, i + 1]] - logits[b, 7 + i, corrupted[b, 2 + i]]
    assert torch.allclose(metric(logits), expected / 5, atol=1e-12)
    assert RepeatLogitDiff.linear
    assert induction_pairs(free64, n_prompts=3, seq_len=6, seed=1)[0].equal(clean)  # seeded


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_prompts=0), "n_prompts"), (dict(seq_len=1), "seq_len"), (dict(seq_len=200), "n_ctx"),
    (dict(seed=-1), "seed"), (dict(n_prompts=True), "n_prompts"),
])
def test_bad_sizes(free64, kwargs, message):
    with pytest.raises(LNFreeError, match=message):
        induction_pairs(free64, **kwargs)


@pytest.mark.parametrize("patch_top", [-3, 2.5, True])
def test_bad_patch_top_is_named_before_any_work(free64, patch_top):
    with pytest.raises(LNFreeError, match=f"patch_top={patch_top!r} must be an integer >= 0"):
        induction_case_study(free64, n_prompts=2, seq_len=4, patch_top=patch_top)


def test_metric_refuses_another_batch(free64):
    _, _, metric = induction_pairs(free64, n_prompts=2, seq_len=4)
    with pytest.raises(LNFreeError, match="2 prompts"):
        metric(torch.zeros(3, 9, free64.cfg.d_vocab))


def test_metric_streams_with_batch_size(free64):
    """Found by a new user: the case study's metric is cut per batch, so batch_size= gives the one-batch numbers."""
    clean, corrupted, metric = induction_pairs(free64, n_prompts=4, seq_len=4)
    whole = L.edge_attribution(free64, clean, corrupted, metric)
    streamed = L.edge_attribution(free64, clean, corrupted, metric, batch_size=3, progress=False)
    assert (streamed.values - whole.values).abs().max() <= 1e-12 * whole.values.abs().max()
    with pytest.raises(LNFreeError, match="built for 4 prompts, got 5"):
        metric.take(0, 2, 5)


def test_eap_into_logits_is_exact_lnfree_only(studies):
    table = case_study_table(studies)
    row = table[(table.model == "lnfree") & (table.method == "eap") & (table.reader_kind == "logits")].iloc[0]
    assert row.max_abs_error <= 1e-10 and row.max_abs_effect > 1e-3  # edge patching == EAP, float64
    base = table[(table.model == "vanilla") & (table.method == "eap") & (table.reader_kind == "logits")].iloc[0]
    assert base.max_abs_error > 1e-6  # with LayerNorm the final LN's scale moves: first order only
    assert set(table.reader_kind) == {"logits", "q", "k", "v", "mlp_in"}
    n = n_edges(4, 4)
    assert table[(table.model == "lnfree") & (table.method == "eap")].n_edges.sum() == n


def test_faithfulness_ends_at_one_and_edges_rank_consistently(studies):
    s = studies[0]
    assert list(s.faithfulness.n_edges) == [5, 50, len(s.eap.edges)]
    assert s.faithfulness.eap.iloc[-1] == pytest.approx(1.0, abs=1e-9)  # the full graph is the clean run
    k = s.k_composition
    assert len(k) == sum(4 * l for l in range(4)) * 4 and (k["rank"].diff().dropna() > 0).all()
    top = [e.label for e in s.eap.top_edges(len(s.eap.edges))]
    for _, row in k.head(3).iterrows():
        assert top.index(row["edge"]) + 1 == row["rank"]
        writer, reader = row["edge"].split("->")
        lw, hw = (int(x) for x in writer[1:].split("H"))
        lr, hr = (int(x) for x in reader[1:-2].split("H"))
        assert row["prev_token_score"] == pytest.approx(float(s.induction.prev_token[lw, hw]))
        assert row["induction_score"] == pytest.approx(float(s.induction.induction[lr, hr]))


def test_found_needs_a_prev_token_to_induction_k_edge_in_the_top(studies):
    s = studies[0]
    k = s.k_composition.copy()
    k["prev_token_head"], k["induction_head"] = False, False
    assert not dataclasses.replace(s, k_composition=k).found
    k.loc[0, ["prev_token_head", "induction_head"]] = True
    k.loc[0, "rank"] = s.top_k + 1
    assert not dataclasses.replace(s, k_composition=k).found
    k.loc[0, "rank"] = s.top_k
    assert dataclasses.replace(s, k_composition=k).found
    assert ("yes" if s.found else "no") in s.summary().splitlines()[-1]


def test_markdown_and_figures(studies):
    md = case_study_markdown(studies, figure_dir="assets/circuits")
    assert "| model | method | reader |" in md and "lnfree EAP-IG" in md and "assets/circuits/faithfulness.png" in md
    for fig in (plot_faithfulness(studies), studies[0].plot_agreement(), studies[0].plot_graph(10)):
        assert "logit" in fig.axes[0].get_title()


def test_cli_circuit(tmp_path, capsys):
    from lnfree_interp.cli import main

    docs = tmp_path / "page.md"
    docs.write_text("# t\n<!-- lnfree-circuit:start -->\nold\n<!-- lnfree-circuit:end -->\ntail\n")
    code = main(["circuit", "--vs", "none", "--n-prompts", "2", "--seq-len", "4", "--patch-top", "30",
                 "--out", str(tmp_path / "out"), "--update-docs", str(docs)])
    out = capsys.readouterr().out
    assert code == 0 and "top 20 edges" in out and "reader_kind" in out and "faithfulness" in out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {f"circuit_{LNFREE}.png", f"circuit_{LNFREE}.html", "faithfulness.png"} <= names
    text = docs.read_text()
    assert "old" not in text and text.endswith("tail\n") and "Generated by `lnfree-interp circuit" in text
