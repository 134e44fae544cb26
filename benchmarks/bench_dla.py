"""Benchmark: direct logit attribution (DLA) cost relative to one plain forward pass.

What it measures
----------------
On a random LN-free checkpoint of GPT-2-small shape (12 layers, 12 heads, d_model 768, vocab 50257;
LayerNorms eps 1e12 and weight x 1e6/s, as the LN-free checkpoints), CPU, float32, batches of
8 x 128 and 8 x 512 random tokens, metric ``logit[answer] - logit[wrong]`` at the last position
(one random answer / wrong token per prompt), every head + attention bias + MLP + embeddings
(``by="head"``), for three ways of getting the attribution:

* ``ours/<backend>``: ``lnfree_interp.direct_logit_attribution`` on the TransformerLens model of
  ``load_hooked`` (HookedTransformer by default on TL 3.x, TransformerBridge on TL 4.x; ``--backend``);
  its plain forward is ``model(tokens)``.
* ``ours/nnsight``: the same function on the ``load_nnsight`` model; its plain forward is the
  wrapped HF module ``model._module(input_ids=tokens)``.
* ``TL recipe``: TransformerLens's own recipe on the same TL model: ``run_with_cache``, heads from
  ``cache.stack_head_results(layer=-1, pos_slice=-1)``, embeddings + MLPs from
  ``cache.decompose_resid(layer=-1, pos_slice=-1, mode="mlp")``, then ``cache.logit_attrs(...)``.
  Its plain forward is the TL model's. On TL 3.x the per-head results are cached by the forward
  (``model.set_use_attn_result(True)`` around ``run_with_cache``, TL's switch for them): TL 3.9's
  ``ActivationCache.compute_head_results`` multiplies ``z[..., None] * W_O`` into a
  ``[batch, pos, head, d_head, d_model]`` tensor (2.4 GB per layer at 8 x 128, 9.7 GB at 8 x 512, which
  runs out of memory on a 24 GB machine); TL 4.x contracts per head. ``--tl-recipe`` overrides.

Every call runs under ``torch.no_grad()`` (the library's DLA does so itself; TL users set
``torch.set_grad_enabled(False)``). Per shape, after one warm-up round, all five functions (TL
forward, ours/TL, TL recipe, HF forward, ours/nnsight) are called in turn ``--repeats`` times
(alternating, so load changes on a shared machine hit all alike); the table shows medians.

* time: wall clock of one call; the ratio is to the plain forward of the same model.
* extra peak memory: peak process RSS during the call minus RSS just before it (after
  ``gc.collect()``), from the kernel's high-water mark (reset through ``/proc/self/clear_refs``) on
  every timed call, cross-checked by a 0.5 ms RSS sampling thread in one extra round
  (see ``benchmarks/_common.py``, which also re-execs with a malloc that returns freed memory).

Goals (issue): DLA time <= 1.15 x forward, DLA extra peak memory <= 1.2 x forward's.
Agreement: max |ours - TL recipe| over the heads (and over every shared component), ours/TL vs
ours/nnsight, and ``values.sum(0) + bias == metric``.

Usage::

    python benchmarks/bench_dla.py            # full (several minutes per shape on 2 CPU cores)
    python benchmarks/bench_dla.py --quick    # tiny model and shapes, 2 repeats: smoke test
    python benchmarks/bench_dla.py --backend bridge --repeats 5 --seqs 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

GOAL_TIME, GOAL_MEM = 1.15, 1.2


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and shapes, 2 repeats (smoke test)")
    p.add_argument("--backend", choices=["hooked", "bridge"], default=None,
                   help="TL model kind (default: hooked on TL 3.x, bridge on TL 4.x)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 3; quick 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 128 512)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-sampler", action="store_true", help="skip the RSS-sampler cross-check round")
    p.add_argument("--force-recipe", action="store_true",
                   help="run the TL recipe even when its estimated memory exceeds 70%% of MemAvailable")
    p.add_argument("--tl-recipe", choices=["auto", "cache", "attn_result"], default="auto",
                   help="how the TL recipe gets per-head results: 'cache' = stack_head_results computes them "
                        "from the cached hook_z (TL 4.x), 'attn_result' = set_use_attn_result(True) during "
                        "run_with_cache; auto = attn_result on TL 3.x, whose compute_head_results broadcasts "
                        "z * W_O to [batch, pos, head, d_head, d_model] (9.7 GB per layer at 8 x 512)")
    return p.parse_args()


def tl_recipe(model, tokens, answer, wrong, attn_result: bool = False):
    """TransformerLens's DLA: full activation cache, stacked components, logit_attrs.

    ``attn_result``: cache per-head results in the forward (``set_use_attn_result(True)``, TL's own
    switch for them) instead of letting ``stack_head_results`` compute them from ``hook_z``.
    """
    import torch

    if attn_result:
        model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        if attn_result:
            model.set_use_attn_result(False)
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    rest, rest_labels = cache.decompose_resid(layer=-1, pos_slice=-1, mode="mlp", return_labels=True)
    stack = torch.cat([heads, rest], 0)
    values = cache.logit_attrs(stack, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)
    return values, head_labels + rest_labels


def recipe_bytes(cfg, batch: int, seq: int, broadcast: bool) -> int:
    """Rough peak of the TL recipe: its activation cache (per layer ~9 d_model-sized activations, the
    MLP's two 4 x d_model ones, per-head results [head, d_model], attention scores and pattern
    [head, pos]) plus, on TL 3.x, one layer's [batch, pos, head, d_head, d_model] broadcast product."""
    d, H = cfg.d_model, cfg.n_heads
    per_token = cfg.n_layers * (9 * d + 2 * cfg.d_mlp + H * d + 2 * H * seq)
    extra = batch * seq * H * cfg.d_head * d if broadcast else 0
    return 4 * (batch * seq * per_token + extra)


def main() -> None:
    args = parse()
    C.setup(args.threads)
    import torch

    import lnfree_interp as L
    from lnfree_interp.loaders import _tl_backend

    shape = "tiny" if args.quick else "gpt2-small"
    seqs = args.seqs or ([16, 48] if args.quick else [128, 512])
    repeats = args.repeats or (2 if args.quick else 3)
    batch = args.batch if not args.quick else min(args.batch, 4)
    kind = _tl_backend(args.backend)
    attn_result = args.tl_recipe == "attn_result" or (args.tl_recipe == "auto" and C.tl_major() < 4)
    recipe_note = ("TL recipe: per-head results cached by the forward (set_use_attn_result(True)): TL 3.x's "
                   "ActivationCache.compute_head_results broadcasts z * W_O to [batch, pos, head, d_head, d_model] "
                   "(9.7 GB per layer at 8 x 512: out of memory here)" if attn_result else
                   "TL recipe: run_with_cache, stack_head_results computes per-head results from hook_z")
    C.banner("bench_dla: direct logit attribution vs one plain forward", [
        C.versions(),
        C.load_note() + " at start",
        f"checkpoint: random LN-free GPT-2 ({shape}: {C.SHAPES[shape]}), float32, CPU",
        f"inputs: batch {batch} x seq {seqs}, logit diff at the last position, by='head'; "
        f"{repeats} timed rounds + 1 warm-up{'' if args.no_sampler else ' + 1 sampler round'}, medians",
        recipe_note,
        C.calibrate_memory(),
    ])

    t0 = time.perf_counter()
    ckpt = C.lnfree_gpt2(shape)
    tl = L.load_hooked(ckpt, backend=kind)
    nn = L.load_nnsight(ckpt)
    hf = nn._module
    del ckpt
    vocab = tl.cfg.d_vocab
    print(f"loaded {kind} + nnsight models in {time.perf_counter() - t0:.1f}s", flush=True)

    summary = []
    for seq in seqs:
        gen = torch.Generator().manual_seed(seq)
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        answer = torch.randint(0, vocab, (batch,), generator=gen)
        wrong = torch.randint(0, vocab, (batch,), generator=gen)

        def nograd(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        fns = {
            "tl_fwd": nograd(lambda: tl(tokens)),
            "ours_tl": nograd(lambda: L.direct_logit_attribution(tl, tokens, answer, wrong, by="head")),
            "recipe": nograd(lambda: tl_recipe(tl, tokens, answer, wrong, attn_result)),
            "hf_fwd": nograd(lambda: hf(input_ids=tokens)),
            "ours_nn": nograd(lambda: L.direct_logit_attribution(nn, tokens, answer, wrong, by="head")),
        }
        need, avail = recipe_bytes(tl.cfg, batch, seq, broadcast=C.tl_major() < 4), C.mem_available()
        run_recipe = args.force_recipe or need < 0.7 * avail
        if not run_recipe:
            del fns["recipe"]
            print(f"\nTL recipe SKIPPED at seq {seq}: estimated peak {need / 2**30:.1f} GiB > 70% of MemAvailable "
                  f"{avail / 2**30:.1f} GiB" + (" (TL 3.x broadcasts z * W_O per layer; --force-recipe to try)"
                                                if C.tl_major() < 4 else " (--force-recipe to try)"), flush=True)
        t1 = time.perf_counter()
        runs = C.run_alternating(fns, repeats, sampler_rounds=0 if args.no_sampler else 1)
        elapsed = time.perf_counter() - t1

        # agreement (one more call each, outside the measurements)
        with torch.no_grad():
            ours = L.direct_logit_attribution(tl, tokens, answer, wrong, by="head")
            ours_nn = L.direct_logit_attribution(nn, tokens, answer, wrong, by="head")
            if run_recipe:
                ref, ref_labels = tl_recipe(tl, tokens, answer, wrong, attn_result)
        if run_recipe:
            idx = {lab: i for i, lab in enumerate(ours.labels)}
            heads = [i for i, lab in enumerate(ref_labels) if lab.startswith("L")]
            ours_rows = ours.values[[idx[ref_labels[i]] for i in range(len(ref_labels))]]
            head_diff = float((ours_rows[heads] - ref[heads]).abs().max())
            all_diff = float((ours_rows - ref).abs().max())
            agree = (f"max|ours - TL recipe| heads {head_diff:.2e}, all {len(ref_labels)} shared components "
                     f"{all_diff:.2e} (max |value| {float(ref.abs().max()):.2e})")
        else:
            agree = "TL recipe skipped"
        nn_diff = float((ours.values - ours_nn.values).abs().max())
        sum_err = float((ours.total() - ours.metric).abs().max())
        metric_scale = float(ours.metric.abs().max())

        tl_fwd, hf_fwd = runs["tl_fwd"], runs["hf_fwd"]
        rows = []
        for name, key, base in ((f"ours/{kind}", "ours_tl", tl_fwd), ("ours/nnsight", "ours_nn", hf_fwd),
                                (f"TL recipe ({kind}{', attn_result' if attn_result else ''})", "recipe", tl_fwd)):
            if key not in runs:
                rows.append([name, "skipped"] + [""] * 8)
                summary.append((seq, name, float("nan"), float("nan")))
                continue
            r = runs[key]
            t_ratio = C.ratio(r.time, base.time)
            m_ratio = C.ratio(r.mem, base.mem)
            rows.append([name, f"{r.time:.3f}", f"{base.time:.3f}", C.fmt_x(t_ratio),
                         C.verdict(t_ratio, GOAL_TIME), f"{r.mem / C.MB:.1f}", f"{base.mem / C.MB:.1f}",
                         C.fmt_x(m_ratio), C.verdict(m_ratio, GOAL_MEM),
                         f"{C.fmt_mb(r.sampled_mem)}/{C.fmt_mb(base.sampled_mem)}"])
            summary.append((seq, name, t_ratio, m_ratio))
        print()
        print(C.table(
            ["method", "time s", "fwd s", "time/fwd", f"<= {GOAL_TIME}x", "peak MB", "fwd peak MB",
             "peak/fwd", f"<= {GOAL_MEM}x", "sampler MB (call/fwd)"], rows,
            title=f"--- batch {batch} x seq {seq}  (median of {repeats}; measured in {elapsed:.0f}s) ---"))
        print("time spread (min-max, s): " + ", ".join(
            f"{k} {min(v.times):.3f}-{max(v.times):.3f}" for k, v in runs.items()))
        print(f"agreement: {agree}; max|ours/{kind} - ours/nnsight| {nn_diff:.2e}; "
              f"max|sum(values)+bias - metric| {sum_err:.2e} (max |metric| {metric_scale:.2e})", flush=True)

    print()
    print(C.table(["seq", "method", "time / forward", f"goal <= {GOAL_TIME}", "peak / forward's",
                   f"goal <= {GOAL_MEM}"],
                  [[s, n, C.fmt_x(t), C.verdict(t, GOAL_TIME), C.fmt_x(m), C.verdict(m, GOAL_MEM)]
                   for s, n, t, m in summary], title="=== SUMMARY (bench_dla) ==="))
    print(C.load_note() + " at end")


if __name__ == "__main__":
    main()
