"""Benchmark: peak memory (and time) of loading a checkpoint, relative to its parameter bytes.

What it measures
----------------
A random GPT-2-small-shaped checkpoint (124M parameters, float32) is saved twice to a temporary
directory as safetensors, each with a small byte-level BPE tokenizer trained here (so no loader
needs the Hub):

* ``lnfree/``: the LN-free encoding (LayerNorm eps 1e12, weight x 1e6/s), for lnfree_interp's
  loaders: ``load_hooked`` (default backend: HookedTransformer on TL 3.x, TransformerBridge on
  TL 4.x), ``load_hooked(backend="bridge")``, ``load_hf`` and ``load_nnsight``.
* ``layernorm/``: the same weights with ordinary LayerNorms, for TransformerLens's own processing
  path (its LayerNorm folding needs real LayerNorms), as references:
  - TL 3.x ``HookedTransformer``: ``GPT2LMHeadModel.from_pretrained(dir)``,
    ``transformer_lens.pretrained.weight_conversions.gpt2.convert_gpt2_weights``, ``del`` the HF
    model, ``HookedTransformer(cfg)`` with a hand-written ``HookedTransformerConfig`` (GPT-2's), then
    ``load_and_process_state_dict(sd, fold_ln=True, center_writing_weights=True,
    center_unembed=True)`` - the steps of ``HookedTransformer.from_pretrained``, offline;
  - ``TransformerBridge.boot_transformers(dir)`` (offline from the local directory) followed by
    ``enable_compatibility_mode(fold_ln=True, center_writing_weights=True, center_unembed=True)``
    (TL's weight processing for bridges), on TL 3.9 and 4.x.
  Whatever the installed TransformerLens cannot run is listed as skipped, with the reason.

Every measurement runs in a fresh subprocess: it imports everything, loads a tiny checkpoint of the
same kind through the same code path (so lazy imports and one-time initialisation are not counted),
runs ``gc.collect()``, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reads
the RSS, then loads the GPT-2-small checkpoint. Reported: peak RSS during the load minus the RSS
before it (kernel high-water mark; cross-checked against a 0.5 ms RSS sampling thread and
``resource.getrusage().ru_maxrss``), the RSS still held afterwards (the model itself), and the load
time; medians over ``--repeats`` subprocesses. Ratios are to the checkpoint's parameter bytes
(tied embedding counted once). Goal (issue): ``load_hooked`` peak <= 2.5 x parameter bytes.

Note: our loaders return an untied float32 ``lm_head`` with a bias (the final LayerNorm is folded
into it), so the loaded model itself holds ~1.31 x the checkpoint's parameter bytes; TL's
HookedTransformer also keeps an untied ``W_U``. Memory-mapped safetensors pages the loader touches
count as resident while mapped.

Streaming goal (issue 13)
------------------------
``--shape xl`` (48 layers, d_model 1600, 25 heads, vocab 50257: GPT-2 XL, 1.56 B parameters, 6.2 GB
in float32) writes the LN-free checkpoint as *sharded* safetensors (``model.safetensors.index.json``,
2 GB shards, as large checkpoints are stored) and measures our loaders beside plain
``GPT2LMHeadModel.from_pretrained`` of the same directory (kind ``hf_from_pretrained``).
``read_copy`` (every tensor read into fresh memory by the loaders' safetensors reader, no fold) is the
floor of any loader that owns its weights, printed beside them. Goals:
peak extra RSS <= 1.3 x the checkpoint's parameter bytes, and wall time <= 1.5 x that of
``from_pretrained``. The TL references need their own LayerNorm checkpoint and several copies of
the weights, so they run only at the small shapes. ``--shape xl`` needs ~13 GB free while it
writes the checkpoint and ~8 GB per load; run it on a quiet machine.

Usage::

    python benchmarks/bench_load.py                  # GPT-2 small, all loaders (~5 min)
    python benchmarks/bench_load.py --shape medium   # GPT-2 medium shape
    python benchmarks/bench_load.py --shape xl       # the issue-13 streaming goal (~10 min, 13 GB)
    python benchmarks/bench_load.py --quick          # tiny checkpoint, 1 subprocess each
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

GOAL = 2.5
#: issue 13: peak / checkpoint parameter bytes, and wall time / plain from_pretrained, for the streaming load
STREAM_GOAL, TIME_GOAL = 1.3, 1.5
C.SHAPES.setdefault("medium", dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, n_positions=1024))
C.SHAPES.setdefault("xl", dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_positions=1024))
SHAPE_NAMES = {"tiny": "tiny", "small": "gpt2-small", "medium": "medium", "xl": "xl"}
#: measurement -> (checkpoint kind, description)
KINDS = {
    "hf_from_pretrained": ("lnfree", "plain transformers GPT2LMHeadModel.from_pretrained (same directory)"),
    "hf_from_pretrained_read": ("lnfree", "from_pretrained + read every weight once (what a first forward does)"),
    "read_copy": ("lnfree", "every tensor read into fresh memory, no fold (floor of a loader owning its weights)"),
    "load_hooked": ("lnfree", "lnfree_interp.load_hooked (default backend)"),
    "load_hooked_bridge": ("lnfree", "lnfree_interp.load_hooked(backend='bridge')"),
    "load_hf": ("lnfree", "lnfree_interp.load_hf"),
    "load_nnsight": ("lnfree", "lnfree_interp.load_nnsight"),
    "tl_hooked_ref": ("layernorm", "TL 3.x: from_pretrained(HF) + convert + load_and_process_state_dict"),
    "tl_bridge_ref": ("layernorm", "TL: TransformerBridge.boot_transformers + enable_compatibility_mode"),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, 1 subprocess per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every measured process (default 1: on a shared 2-core machine, "
                        "2 OpenMP threads spin against other processes and small ops slow down 30x)")
    p.add_argument("--shape", choices=list(SHAPE_NAMES), default="small",
                   help="checkpoint shape (xl: the issue-13 streaming goal; sharded safetensors)")
    p.add_argument("--repeats", type=int, default=None, help="subprocesses per measurement (default 3; quick 1)")
    p.add_argument("--only", nargs="+", choices=list(KINDS), default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--warm-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# child: one load
# ------------------------------------------------------------------------------------------------


def skip_reason(kind: str) -> str | None:
    major = C.tl_major()
    if kind == "load_hooked" and major >= 4:
        return None  # default backend is the bridge there: still measured
    if kind == "tl_hooked_ref" and major >= 4:
        return (f"HookedTransformer and transformer_lens.pretrained were removed in TL {major}.x "
                "(nothing to compare with)")
    return None


def loader(kind: str):
    """A function ``directory -> model`` for ``kind``."""
    import lnfree_interp as L

    if kind == "load_hooked":
        return lambda d: L.load_hooked(d)
    if kind in ("hf_from_pretrained", "hf_from_pretrained_read"):
        import torch
        from transformers import GPT2LMHeadModel

        def plain(d):
            model = GPT2LMHeadModel.from_pretrained(d)
            if kind == "hf_from_pretrained_read":  # transformers maps the file lazily: page every weight in
                with torch.no_grad():
                    for p in model.parameters():
                        p.sum()
            return model

        return plain
    if kind == "read_copy":  # what any loader that copies the weights out of the file pays before folding
        from pathlib import Path

        import torch

        from lnfree_interp.checkpoints import _LazyWeights, _weight_files

        def read_copy(d):
            weights = _LazyWeights(*_weight_files(Path(d)))
            try:  # a ParameterList (sharing the tensors) so that the table can count its bytes
                return torch.nn.ParameterList(torch.nn.Parameter(weights[k], requires_grad=False) for k in weights)
            finally:
                weights.close()

        return read_copy
    if kind == "load_hooked_bridge":
        return lambda d: L.load_hooked(d, backend="bridge")
    if kind == "load_hf":
        return lambda d: L.load_hf(d)
    if kind == "load_nnsight":
        return lambda d: L.load_nnsight(d)
    if kind == "tl_hooked_ref":
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
        from transformers import GPT2LMHeadModel

        def tl_hooked(d):
            hf = GPT2LMHeadModel.from_pretrained(d)
            c = hf.config
            cfg = HookedTransformerConfig(
                model_name="gpt2-random", n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
                n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size,
                act_fn=c.activation_function, eps=c.layer_norm_epsilon, normalization_type="LN",
                positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
                default_prepend_bos=True, device="cpu")
            sd = convert_gpt2_weights(hf, cfg)
            del hf
            model = HookedTransformer(cfg, move_to_device=False)
            model.load_and_process_state_dict(sd, fold_ln=True, center_writing_weights=True, center_unembed=True)
            return model

        return tl_hooked
    if kind == "tl_bridge_ref":
        from transformer_lens.model_bridge import TransformerBridge

        def tl_bridge(d):
            bridge = TransformerBridge.boot_transformers(str(d), device="cpu")
            bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=True,
                                             center_unembed=True)
            return bridge

        return tl_bridge
    raise ValueError(kind)


def child(args: argparse.Namespace) -> None:
    import gc
    import resource

    import torch  # noqa: F401  (import cost is not measured)
    import transformers  # noqa: F401

    reason = skip_reason(args.child)
    if reason:
        print("RESULT " + json.dumps({"skipped": reason}), flush=True)
        return
    try:
        load = loader(args.child)
        warm = load(args.warm_dir)  # lazy imports, one-time initialisation
        del warm
    except Exception as err:  # noqa: BLE001 - report, do not crash the table
        print("RESULT " + json.dumps({"skipped": f"cannot run here: {type(err).__name__}: {err}"[:300]}), flush=True)
        return
    gc.collect()
    anon0, file0 = C.rss_split()
    with C.peak_rss() as peak:
        t0 = time.perf_counter()
        model = load(args.dir)
        seconds = time.perf_counter() - t0
        kept = C.rss()
    anon1, file1 = C.rss_split()
    p = peak[0]
    # ru_maxrss reads the same high-water mark (reset by clear_refs where writable)
    ru_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - p.before
    n_params = C.param_bytes(model)
    print("RESULT " + json.dumps({
        "peak": p.best, "sampled": p.sampled, "hwm": p.hwm, "ru_maxrss": ru_max, "rss_after": kept - p.before,
        "anon_after": anon1 - anon0, "file_after": file1 - file0,
        "seconds": seconds, "model_param_bytes": n_params, "type": type(model).__name__,
    }), flush=True)


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------


def train_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    text = ["The quick brown fox jumps over the lazy dog. When Mary and John went to the store, "
            "John gave a drink to Mary."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def save_checkpoints(root: str, shape: str, with_layernorm: bool = True) -> tuple[dict[str, str], int]:
    """``{"lnfree": dir, "layernorm": dir}`` for ``shape`` and the checkpoint's parameter bytes.

    The LN-free checkpoint is written by the library's exporter (``to_schaeff_encoding``) from the
    random model, converted in place (no extra copy: the XL shape needs two copies at most). Large
    shapes are sharded (2 GB shards, ``model.safetensors.index.json``)."""
    import gc

    import torch

    from lnfree_interp.removal import FakeLayerNorm, install_fake_layernorms, to_schaeff_encoding

    tok = train_tokenizer()
    base = C.random_gpt2(shape)
    nbytes = C.param_bytes(base)
    shard = "2GB" if nbytes > 2 * 1024**3 else None
    dirs = {}
    if with_layernorm:
        d = os.path.join(root, f"{shape}-layernorm")
        base.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
        tok.save_pretrained(d)
        dirs["layernorm"] = d
    model = install_fake_layernorms(base)  # in place
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, FakeLayerNorm):
            module.running_std.fill_(float(torch.empty(()).uniform_(0.5, 3.0, generator=gen)))
            module.remove()
    try:  # the exporter builds a fresh GPT2LMHeadModel and copies the weights in: skip its random init
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        lnfree = to_schaeff_encoding(model)
    del model, base
    gc.collect()
    d = os.path.join(root, f"{shape}-lnfree")
    lnfree.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(d)
    dirs["lnfree"] = d
    del lnfree
    gc.collect()
    return dirs, nbytes


THREADS = [1]


def run_child(kind: str, directory: str, warm_dir: str) -> dict:
    env = {**os.environ, "LNFREE_BENCH_NO_REEXEC": "1"}  # already carries the malloc settings
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--dir", directory, "--warm-dir", warm_dir,
           "--threads", str(THREADS[0])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"skipped": f"subprocess failed (rc {proc.returncode}): {tail[0][:200]}"}


def main() -> None:
    args = parse()
    C.setup(threads=args.threads)
    THREADS[0] = args.threads
    if args.child:
        child(args)
        return
    shape = "tiny" if args.quick else SHAPE_NAMES[args.shape]
    big = shape in ("medium", "xl")
    repeats = args.repeats or (1 if args.quick or shape == "xl" else 3)
    kinds = args.only or [k for k in KINDS if not (big and KINDS[k][0] == "layernorm")]
    need_ln = any(KINDS[k][0] == "layernorm" for k in kinds)
    C.banner("bench_load: peak memory of loading a checkpoint / its parameter bytes", [
        C.versions(),
        C.load_note() + " at start",
        f"checkpoint: random GPT-2 ({shape}: {C.SHAPES[shape]}), float32 safetensors + tokenizer, "
        "saved LN-free (ours) and with LayerNorm (TL references)",
        f"{repeats} fresh subprocess(es) per measurement, medians; warm-up load of a tiny checkpoint in each; "
        f"torch threads {args.threads}",
        C.calibrate_memory(),
    ])
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lnfree_bench_load_") as root:
        dirs, nbytes = save_checkpoints(root, shape, with_layernorm=need_ln)
        warm_dirs, _ = save_checkpoints(root, "tiny") if shape != "tiny" else (dirs, 0)
        if os.path.exists(os.path.join(dirs["lnfree"], "model.safetensors.index.json")):
            n_shards = len([f for f in os.listdir(dirs["lnfree"]) if f.endswith(".safetensors")])
            print(f"LN-free checkpoint: sharded safetensors, {n_shards} shards", flush=True)
        print(f"checkpoint parameter bytes: {nbytes / C.MB:.1f} MB; saved in {time.perf_counter() - t_start:.0f}s",
              flush=True)
        results = {}
        for kind in kinds:
            ckpt = KINDS[kind][0]
            runs = [run_child(kind, dirs[ckpt], warm_dirs[ckpt]) for _ in range(repeats)]
            ok = [r for r in runs if "skipped" not in r]
            results[kind] = ok if ok else runs[0]["skipped"]
            status = f"{len(ok)}/{len(runs)} ok" if ok else f"skipped: {runs[0]['skipped']}"
            print(f"  measured {kind}: {status}", flush=True)

    rows, skipped = [], []
    ratios = {}
    for kind in kinds:
        res = results[kind]
        if isinstance(res, str):
            skipped.append(f"{kind}: {res}")
            continue
        peak = C.med([r["peak"] for r in res])
        ratio = peak / nbytes
        ratios[kind] = ratio
        goal = C.verdict(ratio, GOAL) if kind.startswith("load_") else ""
        rows.append([
            KINDS[kind][1], res[0]["type"], f"{peak / C.MB:.0f}", C.fmt_x(ratio), goal,
            f"{C.med([r['sampled'] for r in res]) / C.MB:.0f}", f"{C.med([r['ru_maxrss'] for r in res]) / C.MB:.0f}",
            f"{C.med([r['rss_after'] for r in res]) / C.MB:.0f} = {C.med([r['anon_after'] for r in res]) / C.MB:.0f}"
            f" + {C.med([r['file_after'] for r in res]) / C.MB:.0f}",
            C.fmt_x(C.med([r['model_param_bytes'] for r in res]) / nbytes),
            f"{C.med([r['seconds'] for r in res]):.2f}",
        ])
    print()
    print(C.table(["loader", "returns", "peak MB", "peak/params", f"<= {GOAL}x", "sampler MB",
                   "ru_maxrss-before MB", "held after MB = anon + file", "model params/ckpt", "load s"], rows,
                  title=f"--- load peak extra RSS, checkpoint parameter bytes {nbytes / C.MB:.1f} MB "
                        f"(median of {repeats}) ---"))
    print("peak = kernel high-water mark during the load minus RSS before it; 'held after' = RSS still held\n"
          "when the load returned (the model), split into anonymous and file-backed pages (mmapped safetensors);\n"
          "sampler: the same peak by sampling; ru_maxrss-before: the process peak by getrusage minus RSS before\n"
          "(covers imports and the warm-up load too, so >= peak)")
    for s in skipped:
        print(f"skipped {s}")
    times = {k: C.med([r["seconds"] for r in results[k]]) for k in ratios}
    base_time = times.get("hf_from_pretrained")
    summary = []
    for k, v in ratios.items():
        ours = k.startswith("load_")
        t_ratio = times[k] / base_time if base_time else float("nan")
        summary.append([KINDS[k][1], C.fmt_x(v), f"<= {STREAM_GOAL}x" if ours else "reference",
                        C.verdict(v, STREAM_GOAL) if ours else "", f"{times[k]:.2f}", C.fmt_x(t_ratio),
                        f"<= {TIME_GOAL}x" if ours else "", C.verdict(t_ratio, TIME_GOAL) if ours else ""])
    print()
    print(C.table(["loader", "peak / checkpoint parameter bytes", "goal", "verdict", "load s",
                   "time / from_pretrained", "goal", "verdict"], summary,
                  title=f"=== SUMMARY (bench_load, shape {shape}) ==="))
    print(C.load_note() + " at end")


if __name__ == "__main__":
    main()
