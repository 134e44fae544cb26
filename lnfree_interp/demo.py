"""``lnfree-interp demo``: the paper's headline on the embedded tiny-shakespeare models, offline.

1. exactness: the LN-free model through every backend against the float64 reference;
2. DLA of a real prompt, top components (LN-free and its LN twin);
3. DLA vs the true direct effect on held-out text: ~0% LN-free, clearly > 0 with LayerNorm
   (the paper: 0% vs 49% on GPT-2 small);
4. attribution patching vs activation patching on IOI-style prompt pairs.
5. induction heads of the LN-free model: induction / previous-token scores per head, the best
   induction head's attention on a repeated sequence, and the earlier heads it composes with.

Figures go to the output folder: one PNG per figure and ``figures.html``, all of them interactive in
one self-contained page (one copy of plotly.js inside; opens offline).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

LNFREE, LN = "tiny-shakespeare-lnfree", "tiny-shakespeare-vanilla"
PROMPT = "ROMEO:\nI will not"


def _step(i: int, n: int, what: str) -> float:
    print(f"\n[{i}/{n}] {what}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      ({time.perf_counter() - t0:.1f} s)", flush=True)


def heldout_sample() -> str:
    """The held-out tiny-shakespeare text shipped with the embedded models."""
    from .registry import EMBEDDED_DIR

    return (EMBEDDED_DIR / "heldout.txt").read_text()


def _backends() -> list[str]:
    from .backends.tl import has_hooked_transformer

    names = ["hf", "hooked", "bridge", "nnsight", "unified"]
    return names if has_hooked_transformer() else [n for n in names if n != "hooked"]


def verify_all(src: Any, dtype: Any, expect_lnfree: bool = True, quiet: bool = False) -> list:
    """Load ``src`` through every available backend and verify each (see [`verify`][lnfree_interp.verify])."""
    from . import load_hf, load_hooked, load_nnsight, load_unified, verify

    loaders = {"hf": lambda **kw: load_hf(src, **kw), "nnsight": lambda **kw: load_nnsight(src, **kw),
               "hooked": lambda **kw: load_hooked(src, backend="hooked", **kw),
               "bridge": lambda **kw: load_hooked(src, backend="bridge", **kw),
               "unified": lambda **kw: load_unified(src, **kw)}
    results = []
    for name in _backends():
        result = verify(loaders[name](dtype=dtype, expect_lnfree=expect_lnfree), src)
        results.append(result)
        if not quiet:
            print(f"  {result}")
    return results


def _top2(model, prompt: str) -> tuple[str, str]:
    """The model's two most likely next tokens after ``prompt`` (decoded strings)."""
    from .backends import get_backend
    from .inputs import prepare

    backend = get_backend(model)
    tokens, mask = prepare(backend, prompt)
    with torch.no_grad():
        logits = backend.forward(tokens, mask)[0, -1]
    top = logits.topk(2).indices.tolist()
    return model.tokenizer.decode([top[0]]), model.tokenizer.decode([top[1]])


def heldout_prompts(model, n: int = 24, length: int = 48, seed: int = 0):
    """``n`` windows of the shipped held-out text, with the true next token as the answer and the
    model's most likely *other* token as the wrong answer."""
    from .backends import get_backend

    backend = get_backend(model)
    ids = torch.tensor(model.tokenizer(heldout_sample(), add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length - 1, (n,), generator=gen)
    windows = torch.stack([ids[s: s + length] for s in starts.tolist()])
    answers = torch.stack([ids[s + length] for s in starts.tolist()])
    with torch.no_grad():
        logits = backend.forward(windows.to(backend.device), None)[:, -1].clone()
    logits[torch.arange(n), answers] = -float("inf")
    return windows, answers, logits.argmax(-1).cpu()


def induction_step(model, out: Path) -> tuple[list[Path], dict]:
    """Demo step: the induction score of every head, the best induction head's attention on a repeated
    sequence, and which earlier heads it composes with (zero-ablating each one in turn; the heads whose
    removal collapses its score are its previous-token partners). Writes two PNGs; returns
    ``(paths, numbers)``."""
    from . import induction_score

    res = induction_score(model)
    (ind, ind_score), (prev, prev_score) = res.best_induction, res.best_prev_token
    print(f"      {res.n_seq} x {res.seq_len} random tokens, repeated: NLL {res.first_nll:.2f} nats on the first copy, "
          f"{res.repeat_nll:.2f} on the repeat (drop {res.nll_drop:.2f})")
    print(f"      best induction head {ind} (score {ind_score:.2f}); best previous-token head {prev} ({prev_score:.2f})")
    Path(out).mkdir(parents=True, exist_ok=True)
    paths = [Path(out) / "induction_scores.png", Path(out) / f"induction_pattern_{ind}.png"]
    res.plot(f"Induction ({res.n_seq} x {res.seq_len} random tokens, repeated), {LNFREE}\n"
             f"NLL drop on the repeat {res.nll_drop:.2f} nats").savefig(paths[0])
    res.plot_pattern(ind).savefig(paths[1])
    if ind_score < 0.3:
        print(f"      no induction head in this model (best score {ind_score:.2f} < 0.3): nothing composes")
        return paths, {"result": res, "ablation": {}, "partners": []}
    layer, head = (int(x) for x in ind[1:].split("H"))
    earlier = [(l, h) for l in range(layer) for h in range(res.n_heads)]
    knocked = {f"L{l}H{h}": float(induction_score(model, n_seq=16, ablate=[f"L{l}H{h}"]).induction[layer, head])
               for l, h in earlier}
    partners = sorted(knocked, key=knocked.get)[:2]
    prev_of = {f"L{l}H{h}": float(res.prev_token[l, h]) for l, h in earlier}
    print(f"      {ind} composes with: zero-ablating one earlier head at a time, its induction score falls most for "
          + ", ".join(f"{k} (to {knocked[k]:.2f}; previous-token score {prev_of[k]:.2f})" for k in partners))
    return paths, {"result": res, "ablation": knocked, "partners": partners}


def circuit_step(free, base, out: Path) -> tuple[list[Path], dict]:
    """Demo step: the induction circuit edge by edge (`induction_case_study`) on the
    LN-free and vanilla models: EAP vs edge patching per reader class, faithfulness of the top-n
    circuits, and whether a previous-token head -> induction head ``.k`` edge is among the top edges.
    Writes two PNGs; returns ``(paths, numbers)``."""
    import matplotlib.pyplot as plt

    from .case_study import case_study_table, induction_case_study, plot_faithfulness

    studies = [induction_case_study(m, name=name, n_prompts=4, seq_len=8) for name, m in ((LNFREE, free), (LN, base))]
    for s in studies:
        print("      " + s.summary().replace("\n", "\n      "))
    table = case_study_table(studies)
    eap = table[table.method == "eap"]
    print("      EAP vs edge patching, per reader class (Pearson / max |error| in logits):")
    for name in (LNFREE, LN):
        rows = eap[eap.model == name]
        print(f"        {name:26s} " + ", ".join(f"{k} {p:.3f} / {e:.1e}" for k, p, e in
                                                zip(rows.reader_kind, rows.pearson, rows.max_abs_error)))
    paths = [out / "circuit_faithfulness.png", out / f"circuit_{LNFREE}.png"]
    for fig, path in ((plot_faithfulness(studies), paths[0]), (studies[0].plot_graph(30), paths[1])):
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths, {"studies": studies, "table": table}


def run_demo(out: Path) -> dict:
    """Run the demo, print its findings, write figures to ``out``; returns the headline numbers."""
    from . import (
        __version__,
        activation_patching,
        attribution_patching,
        compare_attribution,
        compare_dla_direct_effect,
        direct_logit_attribution,
        ioi_prompts,
        load_hooked,
        logit_diff,
    )
    from .figures import save_html, shorten

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = 7
    t_all = time.perf_counter()
    print(f"lnfree_interp {__version__} demo: LN-free GPT-2 interpretability on the embedded tiny-shakespeare "
          "trio "
          "(4 layers x 4 heads, trained on CPU; see lnfree_interp/models/*/README.md)")

    t = _step(1, n, f"Exactness: {LNFREE} through every backend vs the unfolded float64 reference")
    results = verify_all(LNFREE, torch.float64)
    _done(t)

    t = _step(2, n, f"Direct logit attribution of {PROMPT!r}")
    free = load_hooked(LNFREE)
    base = load_hooked(LN, expect_lnfree=False)
    answer, wrong = _top2(free, PROMPT)
    print(f"      LN-free model's top two next tokens: {answer!r} vs {wrong!r}; metric = logit difference")
    figures, interactive = [], []
    for name, model in ((LNFREE, free), (LN, base)):
        dla = direct_logit_attribution(model, PROMPT, answer, wrong)
        kind = "exact" if dla.exact else "approximate (LayerNorm scale frozen)"
        print(f"      {name}: logit diff {float(dla.metric[0]):+.3f}; components + bias {float(dla.total()[0]):+.3f}; "
              f"DLA {kind}; top components:")
        top = dla.top(5)
        print("        " + ", ".join(f"{c} {v:+.3f}" for c, v in zip(top["component"], top["mean"])))
        title = (f"DLA of logit[{answer!r}] - logit[{wrong!r}] on {shorten(PROMPT)}\n"
                 f"{name} ({'exact: LN-free' if dla.exact else 'approximate: with LayerNorm'})")
        figures += dla.save(out / f"dla_{name}", title=title, units="logits")
        interactive.append(dla.plot(title, units="logits"))
    _done(t)

    t = _step(3, n, "DLA vs the true direct effect (zero-ablation path patching), per head, on held-out text")
    windows, answers, wrongs = heldout_prompts(free)
    nmaes = {}
    for name in (LNFREE, LN):
        model64 = load_hooked(name, dtype=torch.float64, expect_lnfree=name == LNFREE)
        cmp = compare_dla_direct_effect(model64, windows, answers, wrongs)
        nmaes[name] = cmp.nmae
        print(f"      {name:26s} NMAE {cmp.nmae:10.3g} %  (95% CI {cmp.ci[0]:.3g}-{cmp.ci[1]:.3g} %), "
              f"max |DLA - DE| {cmp.stats['max_abs_error']:.2g} logits")
        cmp.title = (f"DLA vs direct effect per head: {name}\n{len(windows)} held-out windows of "
                     f"{windows.shape[1]} tokens; metric logit[true next] - logit[top other]")
        figures += cmp.save(out / f"dla_vs_direct_effect_{name}", units="logits")
        interactive.append(cmp.plot(units="logits"))
    print("      the paper (GPT-2 small): 0% LN-free vs 49% with LayerNorm")
    _done(t)

    t = _step(4, n, "Attribution patching vs activation patching, all heads, IOI-style prompt pairs")
    pairs = ioi_prompts(free, n=8)
    print(f"      e.g. clean {pairs.clean[0]!r} -> {pairs.answers[0]!r}; corrupted {pairs.corrupted[0]!r}")
    patching = {}
    for name, model in ((LNFREE, free), (LN, base)):
        metric = logit_diff(pairs.answers, pairs.wrongs)
        atp = attribution_patching(model, pairs.clean, pairs.corrupted, metric, nodes="head", per_position=False)
        act = activation_patching(model, pairs.clean, pairs.corrupted, metric, nodes="head")
        cmp = compare_attribution(atp, act)
        patching[name] = cmp.stats
        print(f"      {name:26s} Pearson {cmp.stats['pearson']:.3f}, Spearman {cmp.stats['spearman']:.3f}, "
              f"NMAE {cmp.nmae:.3g} %, sign agreement {cmp.stats['sign_agreement']:.2f}")
        cmp.title = (f"AtP vs activation patching per head: {name}\n{len(pairs.clean)} IOI pairs, e.g. "
                     f"{shorten(pairs.clean[0], 40)}\nmetric logit[IO] - logit[S]")
        figures += cmp.save(out / f"atp_vs_activation_patching_{name}", units="logits")
        interactive.append(cmp.plot(units="logits"))
    _done(t)

    t = _step(5, n, f"Induction heads of {LNFREE}: repeated random tokens; which heads compose")
    induction_figures, induction = induction_step(free, out)
    figures += induction_figures
    _done(t)

    t = _step(6, n, "The induction circuit edge by edge: EAP vs edge patching, faithfulness, LN-free vs vanilla")
    circuit_figures, circuit = circuit_step(free, base, out)
    figures += circuit_figures
    _done(t)

    figures.append(save_html(interactive, out / "figures.html", title="lnfree_interp demo figures"))

    t = _step(7, n, "Summary")
    worst = max(r.max_abs_error for r in results)
    print(f"      exactness: max |logit error| over {len(results)} backends in float64: {worst:.2e}")
    print(f"      DLA error vs direct effect: {nmaes[LNFREE]:.2g} % LN-free, {nmaes[LN]:.3g} % with LayerNorm")
    print(f"      figures ({len(figures)} files) in {out.resolve()}:")
    for f in figures:
        print(f"        {f.name}")
    _done(t)
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s")
    return {"verify": results, "nmae": nmaes, "patching": patching, "induction": induction, "circuit": circuit,
            "figures": figures}
