"""Benchmark: edge attribution (EAP, EAP-IG) and circuit evaluation against one forward and TransformerLens 4.3.

What it measures
----------------
On a random LN-free checkpoint of GPT-2-small shape (12 layers x 12 heads, d_model 768, vocab 50257;
built by the library's exporter, ``_common.lnfree_gpt2``), CPU, float32, 8 prompt pairs x 64 random
tokens (each corrupted prompt = its clean prompt with 3 random positions given other random tokens),
metric ``logit[answer] - logit[wrong]`` at the last position (one answer / wrong pair shared by all
prompts, so that TransformerLens's per-pair ``metric_fn`` can use it too), on the TL model of
``load_hooked`` (TransformerBridge on TL 4.x, HookedTransformer on TL 3.x; ``--backend``):

1. in one alternating run (``--repeats`` rounds after a warm-up, medians), each against one plain
   no-grad forward of the clean batch:
   * ``edge_attribution(method="eap")`` over all 32,491 edges (goal <= 4 x forward);
   * ``edge_attribution(method="eap-ig", steps=5)`` (goal <= 12 x forward);
   * ``evaluate_circuit`` of the top-200 EAP edges, corrupted ablation (goal <= 3 x forward);
   and the extra peak memory of each call (kernel RSS high-water mark minus RSS before the call,
   see ``_common.py``) against the forward's; and EAP's floor, the passes it cannot skip (one
   corrupted forward capturing the writers, one clean forward + backward to the embeddings, unembedding
   at the metric's position only) without the contraction.
2. TransformerLens 4.3 ``tools.analysis.attribution_patching.attribution_patch(model, clean, corrupt,
   metric_fn, EdgeAttributionConfig(granularity="edge"))`` (TransformerBridge only; it loops over pairs
   and over (edge, position) in Python, 19-90 s a pair at GPT-2-small shape on 2 cores, by load): run once on the
   first ``--tl-pairs`` pairs (default 1), its time scaled linearly to all pairs (it is a loop over
   pairs), against ours on all pairs. Its edge scores, summed over positions and mapped with
   ``lnfree_interp.edge_results.edge_from_tl``, are correlated with our EAP on the same pairs after the
   sign convention (TL: denoising ``(a_clean - a_corrupt) . grad at corrupt``; ours: noising
   ``(a_corrupt - a_clean) . grad at clean``; so ours is compared with -TL; the two agree to first
   order, exactly where the gradient is constant: edges into ``logits`` on an LN-free model). Printed
   beside the ratio: the best ratio EAP's floor would allow against the same TL time.

Usage::

    python benchmarks/bench_edges.py                 # GPT-2-small shape (~5 min on 2 CPU cores)
    python benchmarks/bench_edges.py --shape tiny    # tiny model, smoke test (seconds)
    python benchmarks/bench_edges.py --tl-pairs 0    # skip TransformerLens
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

GOAL_EAP, GOAL_IG, GOAL_EVAL, GOAL_VS_TL = 4.0, 12.0, 3.0, 50.0


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(C.SHAPES), default="gpt2-small")
    p.add_argument("--backend", choices=["hooked", "bridge"], default=None,
                   help="TL model kind (default: hooked on TL 3.x, bridge on TL 4.x; TL's edge attribution "
                        "needs the bridge)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; tiny 3)")
    p.add_argument("--tl-pairs", type=int, default=1,
                   help="pairs given to TL's attribution_patch (slow: 19-90 s a pair at GPT-2-small shape); "
                        "its time is scaled to all pairs; 0 skips it (default 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per prompt (default 64; tiny 16)")
    p.add_argument("--n-changed", type=int, default=3, help="tokens changed per corrupted prompt")
    p.add_argument("--circuit", type=int, default=200, help="edges in the evaluated circuit (top by |EAP|)")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    C.setup(args.threads)
    import torch

    import lnfree_interp as L
    from lnfree_interp.edge_results import edge_from_tl
    from lnfree_interp.loaders import _tl_backend

    shape = args.shape
    seq = args.seq or (16 if shape == "tiny" else 64)
    batch, repeats = args.batch, args.repeats or 3
    kind = _tl_backend(args.backend)
    tl_pairs = min(args.tl_pairs, batch)
    if tl_pairs and (kind != "bridge" or C.tl_major() < 4):
        print(f"note: TL's edge attribution needs a TransformerBridge (TL >= 4.3); this run has {kind} on TL "
              f"{C.tl_major()}.x, so the TransformerLens section is skipped")
        tl_pairs = 0
    C.banner("bench_edges: edge attribution and circuit evaluation", [
        C.versions(),
        C.load_note() + " at start",
        f"checkpoint: random LN-free GPT-2 ({shape}: {C.SHAPES[shape]}), float32, CPU, TL model: {kind}",
        f"inputs: {batch} prompt pairs x {seq} tokens, {args.n_changed} tokens changed per corrupted prompt, "
        f"logit diff at the last position; {repeats} timed rounds + 1 warm-up, medians; TransformerLens "
        f"attribution_patch: {tl_pairs} pair(s), once",
    ])

    ckpt = C.lnfree_gpt2(shape)
    model = L.load_hooked(ckpt, backend=kind)
    del ckpt
    vocab, n_layers, n_heads = model.cfg.d_vocab, model.cfg.n_layers, model.cfg.n_heads
    n_edges = L.n_edges(n_layers, n_heads)

    gen = torch.Generator().manual_seed(1234)
    clean = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupted = clean.clone()
    for b in range(batch):
        pos = torch.randperm(seq - 1, generator=gen)[: args.n_changed]  # never the metric's position
        corrupted[b, pos] = (clean[b, pos] + torch.randint(1, vocab, (len(pos),), generator=gen)) % vocab
    answer, wrong = [int(x) for x in torch.randperm(vocab, generator=gen)[:2]]
    metric = L.logit_diff(answer, wrong)
    eap0 = L.edge_attribution(model, clean, corrupted, metric)
    circuit = eap0.top_edges(args.circuit)

    def forward():
        with torch.no_grad():
            return model(clean)

    def eap():
        return L.edge_attribution(model, clean, corrupted, metric, method="eap")

    def eap_ig():
        return L.edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=args.steps)

    def evaluate():
        return L.evaluate_circuit(model, circuit, clean, corrupted, metric)

    # EAP's floor: the passes it cannot skip, one corrupted forward (capturing the writers) and one clean
    # forward + backward to the embeddings (every activation gradient EAP needs lies on that path), with the
    # unembedding at the metric's position only, as edge_attribution runs them; no contraction
    from lnfree_interp.backends import get_backend
    from lnfree_interp.graph import writer_hooks
    from lnfree_interp.metrics import bind_metric, readout

    backend = get_backend(model)
    ones = torch.ones_like(clean)
    read = readout(bind_metric(metric, backend, ones))

    def floor():
        with torch.no_grad():
            backend.run(corrupted, ones, capture=writer_hooks(n_layers), **read)
        return backend.run(clean, ones, grad_of=["hook_embed"], **read)

    # ---------------------------------------------------------------- 1. ours vs a forward
    t0 = time.perf_counter()
    runs = C.run_alternating({"forward": forward, "floor": floor, "eap": eap, "eap_ig": eap_ig, "evaluate": evaluate},
                             repeats,
                             sampler_rounds=0, keep={"evaluate"})
    print(f"\nmeasured in {time.perf_counter() - t0:.0f}s", flush=True)
    fwd = runs["forward"]
    rows = []
    goals = {"eap": GOAL_EAP, "eap_ig": GOAL_IG, "evaluate": GOAL_EVAL}
    for name, key in (("plain forward (clean, no grad)", "forward"),
                      ("EAP's floor: corrupted fwd + clean fwd/bwd", "floor"),
                      (f"edge_attribution eap, {n_edges} edges", "eap"),
                      (f"edge_attribution eap-ig, {args.steps} steps", "eap_ig"),
                      (f"evaluate_circuit, top {len(circuit)} edges", "evaluate")):
        r = runs[key]
        x = C.ratio(r.time, fwd.time)
        goal = goals.get(key)
        rows.append([name, f"{r.time:.3f}", f"{min(r.times):.3f}-{max(r.times):.3f}", C.fmt_x(x),
                     f"{r.mem / C.MB:.0f}", C.fmt_x(C.ratio(r.mem, fwd.mem)),
                     "" if goal is None else f"<= {goal:g}x: {C.verdict(x, goal)}"])
    print(C.table(["method", "median s", "range s", "/ forward", "extra peak MB", "peak / forward's", "goal"], rows,
                  title=f"--- {n_edges} edges, {batch} pairs x {seq} tokens (median of {repeats}) ---"))
    ev = runs["evaluate"].result[0]
    print(f"evaluate_circuit: faithfulness {ev['faithfulness']:.4f} with {ev['n_edges']} of {n_edges} edges "
          f"(metric clean {float(ev['metric_clean'].mean()):+.4f}, "
          f"corrupted {float(ev['metric_corrupted'].mean()):+.4f})")

    # ---------------------------------------------------------------- 2. TransformerLens
    summary = []
    if tl_pairs:
        from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

        def tl_metric(logits):  # TL's metric_fn: one pair's logits -> a scalar
            return (logits[:, -1, answer] - logits[:, -1, wrong]).sum()

        print(f"\nTransformerLens attribution_patch(granularity='edge') on {tl_pairs} pair(s) ...", flush=True)
        box: list = []
        with torch.enable_grad():
            t_tl = C.clock(lambda: attribution_patch(model, clean[:tl_pairs], corrupted[:tl_pairs], tl_metric,
                                                     EdgeAttributionConfig(granularity="edge")), keep=box)
        tl_res = box[0]
        t_tl_all = t_tl * batch / tl_pairs
        ours = L.edge_attribution(model, clean[:tl_pairs], corrupted[:tl_pairs], metric)
        tl_sum: dict = {}
        for pair, score in tl_res.edge_scores.items():
            e = edge_from_tl(pair)
            tl_sum[e] = tl_sum.get(e, 0.0) + float(score)
        a = ours.mean().double()
        b = torch.tensor([-tl_sum.get(e, 0.0) for e in ours.edges], dtype=torch.float64)
        missing = sum(e not in tl_sum for e in ours.edges)
        pear = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        logit_idx = [i for i, e in enumerate(ours.edges) if e.reader.kind == "logits"]
        logit_err = float((a[logit_idx] - b[logit_idx]).abs().max())
        speed = C.ratio(t_tl_all, runs["eap"].time)
        print(C.table(["method", "measured s", "pairs", "s for all pairs", "/ forward", "note"], [
            ["TL attribution_patch (edge)", f"{t_tl:.1f}", tl_pairs, f"{t_tl_all:.1f}",
             C.fmt_x(C.ratio(t_tl_all, fwd.time)),
             f"{len(tl_res.edge_scores)} (edge, position) scores" + (" (scaled linearly)" if tl_pairs < batch else "")],
            ["ours edge_attribution eap", f"{runs['eap'].time:.2f}", batch, f"{runs['eap'].time:.2f}",
             C.fmt_x(C.ratio(runs["eap"].time, fwd.time)), "all pairs, one batched call"]],
            title="--- TransformerLens 4.3 edge attribution vs ours ---"))
        print(f"ours vs TL: {C.fmt_x(speed)} faster (goal >= {GOAL_VS_TL:g}x: "
              f"{C.verdict(speed, GOAL_VS_TL, smaller_is_better=False)}); {GOAL_VS_TL:g}x needs ours <= "
              f"{t_tl_all / GOAL_VS_TL:.2f} s; EAP's floor (two forwards and a backward, no contraction) is "
              f"{runs['floor'].time:.2f} s, so at most {C.fmt_x(C.ratio(t_tl_all, runs['floor'].time))} is possible "
              "against this TL time")
        print(f"scores on the same {tl_pairs} pair(s), TL summed over positions: Pearson(ours, -TL) {pear:.6f} over "
              f"{len(a)} edges ({missing} of ours absent from TL's graph); edges into logits: max |ours + TL| "
              f"{logit_err:.2e} (max |score| {float(a[logit_idx].abs().max()):.2e})", flush=True)
        summary += [["TL attribution_patch (edge) time / ours EAP", C.fmt_x(speed), f">= {GOAL_VS_TL:g}x",
                     C.verdict(speed, GOAL_VS_TL, smaller_is_better=False)],
                    ["Pearson(ours EAP, -TL), position sums", f"{pear:.6f}", "~1", ""]]

    print()
    x = {k: C.ratio(runs[k].time, fwd.time) for k in goals}
    print(C.table(["measure", "value", "goal", "verdict"], [
        ["EAP (all edges) / forward", C.fmt_x(x["eap"]), f"<= {GOAL_EAP:g}x", C.verdict(x["eap"], GOAL_EAP)],
        [f"EAP-IG ({args.steps} steps) / forward", C.fmt_x(x["eap_ig"]), f"<= {GOAL_IG:g}x",
         C.verdict(x["eap_ig"], GOAL_IG)],
        ["evaluate_circuit / forward", C.fmt_x(x["evaluate"]), f"<= {GOAL_EVAL:g}x",
         C.verdict(x["evaluate"], GOAL_EVAL)],
        ["extra peak MB: forward / EAP / EAP-IG / evaluate",
         " / ".join(f"{runs[k].mem / C.MB:.0f}" for k in ("forward", "eap", "eap_ig", "evaluate")), "", ""],
        *summary,
    ], title="=== SUMMARY (bench_edges) ==="))
    print(C.load_note() + " at end")


if __name__ == "__main__":
    main()
