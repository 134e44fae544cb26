"""Benchmark: attribution patching (AtP) and activation patching, against the cost floor and TransformerLens.

What it measures
----------------
On a random LN-free checkpoint of GPT-2-small shape, CPU, float32, 8 prompt pairs x 64 random tokens
(each corrupted prompt = its clean prompt with 3 random positions given other random tokens),
metric ``logit[answer] - logit[wrong]`` at the last position (one answer / wrong token pair shared by
all prompts, so that TransformerLens's per-pair ``metric_fn`` can use it too), on the TL model of
``load_hooked`` (HookedTransformer by default on TL 3.x, TransformerBridge on TL 4.x; ``--backend``):

1. AtP, all heads x all positions: ``attribution_patching(model, clean, corrupted, metric,
   nodes="head", per_position=True)`` against
   * one plain no-grad forward over the clean batch (goal: AtP <= 3.5 x forward);
   * the floor: one no-grad forward (corrupted) + one forward + backward of the metric with
     respect to an activation (``hook_embed`` made a leaf, ``torch.autograd.grad``), ~3 forwards;
   * TransformerLens's ``transformer_lens.tools.analysis.attribution_patch`` on the same pairs
     (it loops over pairs: per pair one clean forward + one corrupted forward and backward, then a
     Python loop over embed / head / MLP nodes at every position); goal: ours >= 1.8 x faster.
   All of these alternate, ``--repeats`` rounds after a warm-up; medians. TL's estimate is the
   denoising one (gradient at the corrupted run, ``a_clean - a_corrupt``), ours the noising one, so
   the values differ at second order; the script prints their correlation (ours vs -TL) as a check.
2. Activation patching of every head over all positions at once (``per_position=False``; 144 heads
   x 8 prompts): ours, batched (``activation_patching(..., batch_size=64)``: the clean batch
   replicated 8 x per forward, 18 forwards) against one forward per head (TL's
   ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``, 144 forwards, timed
   including its ``run_with_cache`` of the corrupted run). TL patches clean activations into the
   corrupted run; to compute the same quantity it is given the roles swapped (corrupted cache into
   the clean tokens) and a batch-mean metric, so ``TL - mean(metric_clean) == mean_b(ours)``; the
   max difference is printed. ``--ap-repeats`` rounds (long calls, default 2).
3. AtP vs activation patching on these inputs: ``compare_attribution`` of AtP with
   ``per_position=False`` (the quantity all-position activation patching measures) against the
   activation-patching result (Pearson, Spearman, NMAE, sign agreement).

Extra peak memory (kernel RSS high-water mark minus RSS before the call, see ``_common.py``) is
recorded for every timed call and shown for information.

Usage::

    python benchmarks/bench_atp.py            # full (~10 min on 2 CPU cores)
    python benchmarks/bench_atp.py --quick    # tiny model, smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

GOAL_ATP_FWD, GOAL_VS_TL = 3.5, 1.8


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, 2 repeats (smoke test)")
    p.add_argument("--backend", choices=["hooked", "bridge"], default=None,
                   help="TL model kind (default: hooked on TL 3.x, bridge on TL 4.x)")
    p.add_argument("--repeats", type=int, default=None, help="AtP rounds (default 5; quick 2)")
    p.add_argument("--tl-repeats", type=int, default=1,
                   help="rounds for TL's attribution_patch (slow: minutes per call; default 1)")
    p.add_argument("--ap-repeats", type=int, default=1,
                   help="activation-patching rounds (each call is ~144 forwards; default 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="tokens per prompt (default 64; quick 16)")
    p.add_argument("--n-changed", type=int, default=3, help="tokens changed per corrupted prompt")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    C.setup(args.threads)
    import torch
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos
    from transformer_lens.tools.analysis import attribution_patch

    import lnfree_interp as L
    from lnfree_interp.loaders import _tl_backend

    shape = "tiny" if args.quick else "gpt2-small"
    seq = args.seq or (16 if args.quick else 64)
    batch = args.batch
    repeats = args.repeats or (2 if args.quick else 5)
    ap_repeats = args.ap_repeats
    kind = _tl_backend(args.backend)
    C.banner("bench_atp: attribution patching and activation patching", [
        C.versions(),
        C.load_note() + " at start",
        f"checkpoint: random LN-free GPT-2 ({shape}: {C.SHAPES[shape]}), float32, CPU, TL model: {kind}",
        f"inputs: {batch} prompt pairs x {seq} tokens, {args.n_changed} tokens changed per corrupted prompt, "
        f"logit diff at the last position; AtP {repeats} rounds + 1 warm-up (TL's attribution_patch: "
        f"{min(args.tl_repeats, repeats)} round(s), no warm-up), activation patching {ap_repeats} round(s); medians",
    ])

    ckpt = C.lnfree_gpt2(shape)
    model = L.load_hooked(ckpt, backend=kind)
    del ckpt
    vocab, L_, H = model.cfg.d_vocab, model.cfg.n_layers, model.cfg.n_heads

    gen = torch.Generator().manual_seed(1234)
    clean = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupted = clean.clone()
    for b in range(batch):
        pos = torch.randperm(seq - 1, generator=gen)[: args.n_changed]  # never the metric's position
        corrupted[b, pos] = (clean[b, pos] + torch.randint(1, vocab, (len(pos),), generator=gen)) % vocab
    answer, wrong = [int(x) for x in torch.randperm(vocab, generator=gen)[:2]]
    metric = L.logit_diff(answer, wrong)

    def tl_metric_sum(logits):  # TL's metric_fn: one scalar (sum over the rows it is given)
        return (logits[:, -1, answer] - logits[:, -1, wrong]).sum()

    def tl_metric_mean(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    # ---------------------------------------------------------------- functions under test
    def forward():
        with torch.no_grad():
            return model(clean)

    def floor():
        """One no-grad forward + one forward+backward of the metric w.r.t. an activation."""
        with torch.no_grad():
            model(corrupted)
        box = {}

        def leaf(act, hook):
            act = act.detach().requires_grad_(True)
            box["act"] = act
            return act

        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", leaf)]):
            logits = model(clean)
            (g,) = torch.autograd.grad(metric(logits).sum(), [box["act"]])
        return g

    def ours_atp():
        return L.attribution_patching(model, clean, corrupted, metric, nodes="head", per_position=True)

    def tl_atp():
        with torch.enable_grad():
            return attribution_patch(model, clean, corrupted, tl_metric_sum)

    def ours_ap():
        return L.activation_patching(model, clean, corrupted, metric, nodes="head", per_position=False,
                                     batch_size=64, progress=False)

    def tl_ap():
        with torch.no_grad():
            _, cache = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))
            return get_act_patch_attn_head_out_all_pos(model, clean, cache, tl_metric_mean)

    # ---------------------------------------------------------------- 1. AtP
    t0 = time.perf_counter()
    runs = C.run_alternating({"forward": forward, "floor": floor, "ours_atp": ours_atp, "tl_atp": tl_atp},
                             repeats, sampler_rounds=0, limit={"tl_atp": args.tl_repeats}, keep={"ours_atp", "tl_atp"})
    print(f"\nAtP section measured in {time.perf_counter() - t0:.0f}s", flush=True)
    fwd = runs["forward"]
    rows = []
    for name, key, note in (("plain forward (clean, no grad)", "forward", ""),
                            ("floor: fwd + fwd&bwd to an activation", "floor", "~3x by construction"),
                            ("ours: attribution_patching", "ours_atp", f"goal <= {GOAL_ATP_FWD}x forward"),
                            ("TL tools.analysis.attribution_patch", "tl_atp", "loops over pairs")):
        r = runs[key]
        rows.append([name, f"{r.time:.3f}", f"{min(r.times):.3f}-{max(r.times):.3f}",
                     C.fmt_x(C.ratio(r.time, fwd.time)), C.fmt_x(C.ratio(r.time, runs["floor"].time)),
                     f"{r.mem / C.MB:.0f}", note])
    print(C.table(["method", "median s", "range s", "/ forward", "/ floor", "peak MB", "note"], rows,
                  title=f"--- attribution patching, {L_ * H} heads x {seq} positions x {batch} pairs "
                        f"(median of {repeats}; TL: {len(runs['tl_atp'].times)}) ---"))
    atp_fwd = C.ratio(runs["ours_atp"].time, fwd.time)
    atp_floor = C.ratio(runs["ours_atp"].time, runs["floor"].time)
    floor_fwd = C.ratio(runs["floor"].time, fwd.time)
    speedup_tl = C.ratio(runs["tl_atp"].time, runs["ours_atp"].time)
    print(f"ours vs TL attribution_patch: {C.fmt_x(speedup_tl)} faster (goal >= {GOAL_VS_TL}x: "
          f"{C.verdict(speedup_tl, GOAL_VS_TL, smaller_is_better=False)}); "
          f"ours / forward {C.fmt_x(atp_fwd)} (goal <= {GOAL_ATP_FWD}x: {C.verdict(atp_fwd, GOAL_ATP_FWD)}); "
          f"ours / floor {C.fmt_x(atp_floor)}")

    atp, tl_res = runs["ours_atp"].result[0], runs["tl_atp"].result[0]
    ours_mean = atp.values.mean(-1)  # [head, pos]
    tl_vals = torch.zeros_like(ours_mean)
    for node, score in tl_res.node_scores.items():
        if node.kind == "attn_head_out":
            tl_vals[node.layer * H + node.head, node.position] = score
    pear = float(torch.corrcoef(torch.stack([ours_mean.flatten().double(), -tl_vals.flatten().double()]))[0, 1])
    print(f"check: AtP ours (noising, batch mean) vs -TL (denoising): Pearson {pear:.4f} over "
          f"{ours_mean.numel()} head x position values; TL scored {len(tl_res.node_scores)} nodes "
          f"(embed + heads + MLPs at every position)", flush=True)

    # ---------------------------------------------------------------- 2. activation patching
    t0 = time.perf_counter()
    ap_runs = C.run_alternating({"ours_ap": ours_ap, "tl_ap": tl_ap}, ap_repeats, warmup=0, sampler_rounds=0,
                                keep={"ours_ap", "tl_ap"})
    print(f"\nactivation-patching section measured in {time.perf_counter() - t0:.0f}s", flush=True)
    ap = ap_runs["ours_ap"].result[0]
    tl_grid = ap_runs["tl_ap"].result[0]  # [layer, head]
    m_clean = ap.extra["metric_clean"]
    ap_diff = float((tl_grid.flatten() - m_clean.mean() - ap.values.mean(-1)).abs().max())
    ap_scale = float(ap.values.mean(-1).abs().max())
    n_fwd_ours = -(-L_ * H // max(1, 64 // batch)) + 2
    rows = []
    rows_per_fwd = max(1, 64 // batch) * batch
    for name, key, note in (
            ("ours: activation_patching (batched)", "ours_ap", f"{n_fwd_ours} forwards of {rows_per_fwd} rows"),
            ("TL get_act_patch_attn_head_out_all_pos", "tl_ap", f"{L_ * H + 1} forwards of {batch} rows")):
        r = ap_runs[key]
        rows.append([name, f"{r.time:.2f}", f"{min(r.times):.2f}-{max(r.times):.2f}",
                     C.fmt_x(C.ratio(r.time, fwd.time)), f"{r.mem / C.MB:.0f}", note])
    print(C.table(["method", "median s", "range s", "/ forward", "peak MB", "note"], rows,
                  title=f"--- activation patching, {L_ * H} heads, all positions at once, {batch} prompts "
                        f"(median of {ap_repeats}) ---"))
    speedup_ap = C.ratio(ap_runs["tl_ap"].time, ap_runs["ours_ap"].time)
    print(f"ours batched vs one forward per head: {C.fmt_x(speedup_ap)} faster; results agree: "
          f"max|TL - mean(metric_clean) - mean_b(ours)| = {ap_diff:.2e} (max |effect| {ap_scale:.2e})", flush=True)

    # ---------------------------------------------------------------- 3. AtP vs activation patching
    atp_all = L.attribution_patching(model, clean, corrupted, metric, nodes="head", per_position=False)
    cmp = L.compare_attribution(atp_all, ap, n_boot=200)
    s = cmp.stats
    print()
    print(C.table(["pearson", "spearman", "NMAE %", "NMAE 95% CI", "sign agreement", "normalised MAE", "max |err|"],
                  [[f"{s['pearson']:.4f}", f"{s['spearman']:.4f}", f"{cmp.nmae:.2f}",
                    f"{cmp.ci[0]:.2f}-{cmp.ci[1]:.2f}", f"{s['sign_agreement']:.3f}", f"{s['normalised_mae']:.3g}",
                    f"{s['max_abs_error']:.3g}"]],
                  title=f"--- AtP (per_position=False) vs activation patching: {L_ * H} heads x {batch} prompts ---"))
    print("(random weights: the model is close to linear on these inputs, so AtP tracks activation patching "
          "closely; this checks the pipeline, it is not a claim about trained models)")
    print(f"AtP split: sum|direct| {float(atp_all.direct.abs().sum()):.3g}, sum|indirect| "
          f"{float(atp_all.indirect.abs().sum()):.3g} (the direct part is exact on an LN-free model with logit diff)")

    print()
    print(C.table(["measure", "value", "goal", "verdict"], [
        ["AtP time / plain forward", C.fmt_x(atp_fwd), f"<= {GOAL_ATP_FWD}x", C.verdict(atp_fwd, GOAL_ATP_FWD)],
        ["floor (fwd + fwd&bwd) / plain forward", C.fmt_x(floor_fwd), "~3x", ""],
        ["AtP time / floor", C.fmt_x(atp_floor), "", ""],
        ["TL attribution_patch time / ours", C.fmt_x(speedup_tl), f">= {GOAL_VS_TL}x",
         C.verdict(speedup_tl, GOAL_VS_TL, smaller_is_better=False)],
        ["TL act. patching (1 fwd/head) time / ours batched", C.fmt_x(speedup_ap), "", ""],
        ["act. patching: max |TL - ours|", f"{ap_diff:.2e}", f"<< {ap_scale:.1e}", ""],
        ["AtP vs act. patching Pearson / Spearman", f"{s['pearson']:.4f} / {s['spearman']:.4f}", "", ""],
    ], title="=== SUMMARY (bench_atp) ==="))
    print(C.load_note() + " at end")


if __name__ == "__main__":
    main()
