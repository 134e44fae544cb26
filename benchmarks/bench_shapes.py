"""Benchmark: what each tool costs as the model grows, GPT-2 small -> medium -> XL shapes.

What it measures
----------------
For each shape (``--shapes``, default ``small medium xl``: 12 x 768, 24 x 1024 and 48 x 1600 layers x
d_model, vocab 50257) a random LN-free checkpoint is written by the library's exporter (sharded
safetensors above 2 GB, as the Hub stores XL; ``bench_load.save_checkpoints``), then, in one process, one
run each after a warm-up on 1 short prompt, CPU, float32:

* load: ``load_hf`` of the directory against plain ``GPT2LMHeadModel.from_pretrained`` followed by one
  read of every weight (transformers maps the file lazily; the read is what its first forward pays), and
  against ``read_copy`` (every tensor read into memory the process owns, no fold: the floor of any loader
  that must own its weights to fold them; see ``bench_load.py`` for peak memory);
* on ``--batch`` prompts x ``--seq`` random tokens (logit difference of two fixed tokens at the last
  position), against one plain no-grad forward of the same batch: ``direct_logit_attribution`` (by head),
  ``attribution_patching`` (by head, 3 tokens of each corrupted prompt changed) and ``edge_attribution``
  (EAP over every edge of the graph).

The ratios ("x forward") are what carries across machines: they say how many forwards each tool costs at
that size. Peak memory per loader is ``bench_load.py``'s job; this script prints the process's peak RSS
after each shape for orientation only.

Usage::

    python benchmarks/bench_shapes.py                       # small, medium, xl (~15 min, 13 GB free disk)
    python benchmarks/bench_shapes.py --shapes small medium # without XL (~3 min)
    python benchmarks/bench_shapes.py --shapes tiny         # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import bench_load  # noqa: E402

SHAPE_NAMES = bench_load.SHAPE_NAMES


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPE_NAMES), default=["small", "medium", "xl"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def measure(shape: str, args: argparse.Namespace, root: str) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    import lnfree_interp as L

    t0 = time.perf_counter()
    dirs, nbytes = bench_load.save_checkpoints(root, shape, with_layernorm=False)
    d = dirs["lnfree"]
    print(f"[{shape}] checkpoint written in {time.perf_counter() - t0:.0f} s ({nbytes / 1e9:.2f} GB)", flush=True)
    out: dict = {"shape": shape, "gb": nbytes / 1e9}

    read_all = bench_load.loader("read_copy")

    def plain():
        model = GPT2LMHeadModel.from_pretrained(d)
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        return model

    out["plain_load"] = C.clock(plain)
    out["read_copy"] = C.clock(lambda: read_all(d))
    box: list = []
    out["load_hf"] = C.clock(lambda: L.load_hf(d), keep=box)
    model = box.pop()
    print(f"[{shape}] loads: from_pretrained+read {out['plain_load']:.1f} s, read_copy {out['read_copy']:.1f} s, "
          f"load_hf {out['load_hf']:.1f} s", flush=True)

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    corrupted = clean.clone()
    for b in range(args.batch):
        pos = torch.randperm(args.seq - 1, generator=gen)[:3]
        corrupted[b, pos] = (clean[b, pos] + torch.randint(1, vocab, (3,), generator=gen)) % vocab
    answer, wrong = 11, 13
    metric = L.logit_diff(answer, wrong)

    def forward(x=clean):
        with torch.no_grad():
            return model(x).logits

    calls = {
        "forward": forward,
        "dla": lambda: L.direct_logit_attribution(model, clean, answer, wrong),
        "atp": lambda: L.attribution_patching(model, clean, corrupted, metric),
        "eap": lambda: L.edge_attribution(model, clean, corrupted, metric, progress=False),
    }
    short = clean[:1, :8]
    forward(short)  # warm-up: first-call allocations and kernel selection
    L.edge_attribution(model, short, corrupted[:1, :8], metric, progress=False)
    for name, fn in calls.items():
        out[name] = C.clock(fn)
        print(f"[{shape}] {name}: {out[name]:.2f} s", flush=True)
    out["n_edges"] = L.n_edges(model.config.n_layer, model.config.n_head)
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    calls.clear()  # the model goes with this frame; its checkpoint now
    shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> None:
    args = parse()
    C.setup(args.threads)
    C.banner("bench_shapes: cost against model size", [
        C.versions(),
        C.load_note() + " at start",
        f"random LN-free GPT-2 checkpoints, float32, CPU; {args.batch} prompts x {args.seq} tokens; one run each "
        "after a warm-up",
    ])
    rows = []
    with tempfile.TemporaryDirectory(prefix="lnfree_shapes_") as root:
        for name in args.shapes:
            r = measure(SHAPE_NAMES[name], args, root)
            gc.collect()  # the shape's model, before the next one loads
            f = r["forward"]
            rows.append([name, f"{r['gb']:.2f}", f"{r['load_hf']:.1f}", C.fmt_x(r["load_hf"] / r["plain_load"]),
                         C.fmt_x(r["load_hf"] / r["read_copy"]), f"{f:.2f}", C.fmt_x(r["dla"] / f),
                         C.fmt_x(r["atp"] / f), f"{r['n_edges']:,}", C.fmt_x(r["eap"] / f),
                         f"{r['peak_gb']:.1f}"])
    print(C.table(["shape", "checkpoint GB", "load_hf s", "/ from_pretrained+read", "/ read_copy", "forward s",
                   "DLA / fwd", "AtP / fwd", "edges", "EAP / fwd", "peak RSS so far GiB"], rows,
                  title=f"=== SUMMARY (bench_shapes, {args.batch} x {args.seq} tokens) ==="))
    print(C.load_note() + " at end")


if __name__ == "__main__":
    main()
