"""Benchmark: ``compare_models`` on the embedded trio, relative to one plain evaluation pass.

What it measures
----------------
The default report (``lnfree-interp compare``: the three embedded tiny-shakespeare models in float64,
4,096 tokens of the shipped held-out text, 1,000 bootstrap resamples) against its anchor, one
``evaluate_loss`` pass of one model over the same tokens, both timed in this run (wall clock and
process CPU time, ``time.process_time``). The ratio "report / anchor" says how many plain passes the
report costs, which holds across machines; the goal (issue 12) is a report within 2 minutes on
2 CPU cores, which on a quiet machine the wall-clock column shows directly. On a shared machine read
the CPU column (the report uses up to 2 threads).

Usage::

    python benchmarks/bench_report.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import lnfree_interp as L
    from lnfree_interp.checkpoints import EMBEDDED_DIR
    from lnfree_interp.report import compare_models

    text = (EMBEDDED_DIR / "heldout.txt").read_text()
    model = L.load_hf("tiny-shakespeare-lnfree", dtype=torch.float64)
    anchor = lambda: L.evaluate_loss(model, text, seq_len=128, max_tokens=4096, progress=False)  # noqa: E731
    report = lambda: compare_models(progress=False)  # noqa: E731  (loads the trio itself)
    anchor()  # warm-up (imports, allocator)
    rows = {"anchor: evaluate_loss, 1 model, 4096 tokens": [], "compare_models(), 3 models": []}
    for _ in range(args.repeats):  # alternate, so load changes on a shared machine hit both alike
        rows["anchor: evaluate_loss, 1 model, 4096 tokens"].append(timed(anchor))
        rows["compare_models(), 3 models"].append(timed(report))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} runs")
    print(f"{'':48s} {'wall s':>8s} {'CPU s':>8s}")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    for k, (w, c) in med.items():
        print(f"{k:48s} {w:8.1f} {c:8.1f}")
    (wa, ca), (wr, cr) = med.values()
    print(f"report / anchor: {wr / wa:.1f}x wall, {cr / ca:.1f}x CPU; goal: report wall <= 120 s on 2 cores "
          f"({'met' if wr <= 120 else 'not met'} here)")


if __name__ == "__main__":
    main()
