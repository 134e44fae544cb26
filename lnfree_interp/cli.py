"""The ``lnfree-interp`` command line.

    lnfree-interp demo                       # the paper's headline on the embedded models, offline
    lnfree-interp info SRC                   # encoding, sizes, registry entry
    lnfree-interp verify SRC --dtype float64 # max logit error of every backend vs the exact reference
    lnfree-interp dla SRC --prompt "..." --answer " x" [--wrong " y"] [--by head] [--out DIR]
    lnfree-interp patch SRC --clean "..." --corrupted "..." --answer " x" --wrong " y" [--out DIR]
    lnfree-interp eval SRC [--text FILE]
    lnfree-interp compare [SRC ...] [--out DIR]   # the paper's findings side by side: HTML, Markdown, PNGs
    lnfree-interp circuit [SRC] [--vs SRC] [--out DIR]  # induction circuit: EAP edges vs edge patching

SRC is a Hub id or alias (``lnfree-interp list``), a local checkpoint directory, or an embedded
model (``tiny-shakespeare-lnfree``). Exit codes: 0 success, 1 failure (an error, or a verification
above tolerance), 2 usage error. Errors print as one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .errors import LNFreeError

EMBEDDED = ("tiny-shakespeare", "tiny-shakespeare-vanilla", "tiny-shakespeare-lnfree")


def _load(args: argparse.Namespace, kind: str = "hooked", **kwargs: Any):
    from . import load_hf, load_hooked
    from .builders.hf import as_dtype

    opts = {"dtype": as_dtype(getattr(args, "dtype", "float32")),
            "expect_lnfree": not getattr(args, "baseline", False)}
    opts.update(kwargs)
    return load_hf(args.src, **opts) if kind == "hf" else load_hooked(args.src, **opts)


def _text(text: str | None) -> str | None:
    r"""Read ``\n`` and ``\t`` typed in a shell argument as a newline and a tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def _token(text: str | None) -> Any:
    """``id:262`` is token id 262; anything else a (single-token) string such as ``" be"``."""
    text = _text(text)
    if text is not None and text.startswith("id:"):
        try:
            return int(text[3:])
        except ValueError:
            raise LNFreeError(f"{text!r}: write a token id as id:N, e.g. id:262.") from None
    return text


def _out_dir(out: str | None) -> Path | None:
    """The output folder, checked before any computation."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise LNFreeError(f"--out {out} is an existing file; pass a directory (it is created if missing).")
    return path


def _table(df, floatfmt: str = "{:+.4f}") -> str:
    return df.to_string(index=False, float_format=lambda v: floatfmt.format(v))


# --- commands -------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import list_checkpoints

    df = list_checkpoints()
    print(df.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import inspect_checkpoint

    print(inspect_checkpoint(args.src))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .builders.hf import as_dtype
    from .checkpoints import inspect_checkpoint
    from .demo import verify_all

    info = inspect_checkpoint(args.src)
    print(f"{info.source}: {info.encoding} ({'LN-free' if info.lnfree else 'with LayerNorm'}); "
          "reference: unfolded checkpoint in float64, "
          + ("hacked LNs written out" if info.lnfree else "its real LayerNorms kept"))
    results = verify_all(args.src, as_dtype(args.dtype), expect_lnfree=not args.baseline)
    failed = [r for r in results if not r.passed]
    print("all backends within tolerance" if not failed else f"{len(failed)} backend(s) above tolerance")
    return 1 if failed else 0


def _write(result: Any, out: Path | None, stem: str, title: str, html: bool) -> None:
    """``result``'s figure as ``out/stem.png`` (and a self-contained ``out/stem.html`` with --html)."""
    if out is not None:
        for path in result.save(out / stem, title=title, units="logits", html=html):
            print(f"  wrote {path}")


def _prompts_title(prompts: list[str], width: int = 60) -> str:
    """``'first prompt'`` (and ``N more, mean``) for a figure title."""
    from .figures import shorten

    more = f" and {len(prompts) - 1} more (mean)" if len(prompts) > 1 else ""
    return shorten(prompts[0], width) + more


def cmd_dla(args: argparse.Namespace) -> int:
    from . import direct_logit_attribution

    out = _out_dir(args.out)
    model = _load(args)
    prompts = [str(_text(p)) for p in args.prompt]
    dla = direct_logit_attribution(model, prompts, _token(args.answer), _token(args.wrong), by=args.by,
                                   top_k=args.top_k)
    what = f"logit[{args.answer!r}]" + (f" - logit[{args.wrong!r}]" if args.wrong else "")
    exactness = "exact: LN-free" if dla.exact else "approximate: " + dla.note
    mean = " (mean over prompts)" if len(prompts) > 1 else ""
    print(f"{what} in logits{mean}: model {dla.metric.mean():+.4f}, components + bias {dla.total().mean():+.4f} "
          f"({exactness})")
    print(_table(dla.top(args.top)))
    title = (f"DLA of {what} on {_prompts_title(prompts)}\n"
             f"{args.src} ({'exact: LN-free' if dla.exact else 'approximate: with LayerNorm'})")
    _write(dla, out, "dla", title, args.html)
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from . import activation_patching, attribution_patching, compare_attribution, logit_diff

    out = _out_dir(args.out)
    model = _load(args)
    if len(args.clean) != len(args.corrupted):
        raise LNFreeError(f"{len(args.clean)} --clean prompts but {len(args.corrupted)} --corrupted.")
    metric = logit_diff(_token(args.answer), _token(args.wrong))
    clean, corrupted = [str(_text(p)) for p in args.clean], [str(_text(p)) for p in args.corrupted]
    atp = attribution_patching(model, clean, corrupted, metric, nodes=args.nodes, per_position=False)
    act = activation_patching(model, clean, corrupted, metric, nodes=args.nodes)
    cmp = compare_attribution(atp, act)
    what = f"logit[{args.answer!r}] - logit[{args.wrong!r}]"
    pairs = f"{len(clean)} prompt pair{'s' if len(clean) > 1 else ''}"
    print(f"metric {what} in logits, mean over {pairs}: clean {atp.extra['metric_clean'].mean():+.4f}, "
          f"corrupted {atp.extra['metric_corrupted'].mean():+.4f}")
    print(f"attribution patching (a, estimate) vs activation patching (b, reference), {args.nodes} nodes:")
    print(cmp)
    assert atp.direct is not None  # attribution_patching always splits direct / indirect
    top = atp.top(args.top).rename(columns={"mean": "atp"})
    top["atp_direct"] = [float(atp.direct[atp.labels.index(c)].mean()) for c in top["component"]]
    top["activation_patching"] = [float(act[c].mean()) for c in top["component"]]
    print(f"largest {len(top)} by |AtP| (logits, mean over {pairs}):")
    print(_table(top[["component", "atp", "atp_direct", "activation_patching"]]))
    title = (f"AtP vs activation patching per {args.nodes}: {args.src}\n{pairs}, e.g. {_prompts_title(clean, 40)}"
             f"\nmetric {what}")
    _write(cmp, out, "atp_vs_activation_patching", title, args.html)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate_loss
    from .demo import heldout_sample

    model = _load(args, kind="hf")
    text = Path(args.text).read_text() if args.text else heldout_sample()
    report = evaluate_loss(model, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
    print(f"{args.src}: {report}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report import EMBEDDED_TRIO, compare_models, update_markdown_block

    out = _out_dir(args.out)
    text = Path(args.text).read_text() if args.text else None
    report = compare_models(args.src or list(EMBEDDED_TRIO), text=text, max_tokens=args.max_tokens or None,
                            seq_len=args.seq_len, threshold=args.threshold, n_bins=args.n_bins, n_boot=args.n_boot,
                            k_null=args.k_null, dtype=args.dtype)
    print(report.to_markdown())
    for path in report.save(out if out is not None else Path("lnfree-report")):
        print(f"  wrote {path}")
    if args.update_readme:
        cmd = "lnfree-interp compare " + " ".join(args.src) + f" --update-readme {args.update_readme}"
        update_markdown_block(args.update_readme, report.to_markdown() + f"\n\nGenerated by `{cmd.replace('  ', ' ')}`.")
        print(f"  updated the table in {args.update_readme}")
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from . import load_hooked
    from .builders.hf import as_dtype
    from .case_study import case_study_markdown, case_study_table, induction_case_study, plot_faithfulness
    from .report import update_markdown_block

    out = _out_dir(args.out)
    vs = args.vs if args.vs is not None else \
        ("tiny-shakespeare-vanilla" if args.src == "tiny-shakespeare-lnfree" else "none")
    sources = [(args.src, not args.baseline)] + ([] if vs.lower() == "none" else [(vs, False)])
    studies = []
    for src, lnfree in sources:
        model = load_hooked(src, dtype=as_dtype(args.dtype), expect_lnfree=lnfree)
        study = induction_case_study(model, name=Path(src).name, n_prompts=args.n_prompts, seq_len=args.seq_len,
                                     seed=args.seed, patch_top=args.patch_top, top_k=args.top)
        studies.append(study)
        print(study.summary())
    s0 = studies[0]
    top = s0.eap.top(args.top)[["edge", "mean"]].rename(columns={"mean": "eap"})
    ig, patched = dict(zip(s0.eap_ig.labels, s0.eap_ig.mean().tolist())), {}
    if s0.patched is not None:
        patched = dict(zip(s0.patched.labels, s0.patched.mean().tolist()))
    top["eap_ig"] = [ig[e] for e in top["edge"]]
    top["edge_patching"] = [patched.get(e, float("nan")) for e in top["edge"]]
    print(f"\ntop {len(top)} edges of {s0.name} by |EAP| (logits, mean over {s0.clean.shape[0]} prompt pairs):")
    print(_table(top))
    if s0.patched is not None:
        print("\nEAP / EAP-IG vs edge patching per reader class (compare_attribution over every edge and prompt, "
              "logits):")
        print(case_study_table(studies).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\nnormalised faithfulness of the top-n circuits (corrupted ablation):")
    for s in studies:
        f = s.faithfulness
        points = zip(f["n_edges"], f["eap"], f["eap_ig"])
        print(f"  {s.name}: " + ", ".join(f"{n}: {e:.3f}/{g:.3f}" for n, e, g in points) + "  (n edges: EAP/EAP-IG)")
    if out is not None:
        for s in studies:
            for path in s.eap.save(out / f"circuit_{s.name}", k=args.graph_edges,
                                   title=f"Top {args.graph_edges} EAP edges (blue +, red -): {s.name}\n"
                                         "repeated random tokens; metric: mean logit diff over the repeat"):
                print(f"  wrote {path}")
            if s.patched is not None:
                fig = s.plot_agreement()
                fig.savefig(out / f"eap_vs_edge_patching_{s.name}.png", dpi=120)
                plt.close(fig)
                print(f"  wrote {out / f'eap_vs_edge_patching_{s.name}.png'}")
        fig = plot_faithfulness(studies)
        fig.savefig(out / "faithfulness.png", dpi=120)
        plt.close(fig)
        print(f"  wrote {out / 'faithfulness.png'}")
    if args.update_docs:
        rel = None if out is None else os.path.relpath(out, Path(args.update_docs).parent)
        cmd = (f"lnfree-interp circuit {args.src} --vs {vs} --n-prompts {args.n_prompts} --seq-len {args.seq_len} "
               f"--dtype {args.dtype}" + (f" --out {args.out}" if args.out else "")
               + f" --update-docs {args.update_docs}")
        update_markdown_block(args.update_docs, case_study_markdown(studies, rel) + f"\nGenerated by `{cmd}`.",
                              marker="lnfree-circuit")
        print(f"  updated the case-study block in {args.update_docs}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out = _out_dir(args.out)
    run_demo(out if out is not None else Path("lnfree-demo"))
    return 0


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .builders.hf import DTYPES

    parser = argparse.ArgumentParser(prog="lnfree-interp", description=(__doc__ or "").replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def src(p: argparse.ArgumentParser, dtype: bool = True) -> None:
        p.add_argument("src", help="Hub id or alias, checkpoint directory, or embedded model name")
        p.add_argument("--baseline", action="store_true",
                       help="allow a checkpoint with real LayerNorm (an LN baseline)")
        if dtype:
            p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                           help="float64 for exactness to ~1e-15; float16/bfloat16 halve memory (default float32)")

    add("list", cmd_list, "list the known checkpoints and their reported losses")
    p = add("info", cmd_info, "encoding, sizes and registry entry of a checkpoint (reads config + LN weights)")
    p.add_argument("src", help="Hub id or alias, checkpoint directory, or embedded model name")
    p = add("verify", cmd_verify, "max logit error of every backend against the exact float64 reference")
    src(p)
    p = add("dla", cmd_dla, "direct logit attribution of one or more prompts")
    src(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt (repeat for a batch); \\n is read as a newline")
    p.add_argument("--answer", required=True, help="answer token: a single-token string (' be') or id:N")
    p.add_argument("--wrong", help="wrong-answer token (string or id:N): attribute the logit difference")
    p.add_argument("--by", default="head", choices=["head", "layer", "neuron"])
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--top-k", type=int, default=None, help="neurons kept with --by neuron")
    p.add_argument("--out", help="directory for dla.png (heatmap: layers x heads and MLPs, in logits)")
    p.add_argument("--html", action="store_true", help="also write dla.html (interactive, self-contained)")
    p = add("patch", cmd_patch, "attribution patching vs activation patching on prompt pairs")
    src(p)
    p.add_argument("--clean", action="append", required=True, help="clean prompt (repeat for a batch)")
    p.add_argument("--corrupted", action="append", required=True, help="corrupted prompt, same token length")
    p.add_argument("--answer", required=True, help="answer token: a single-token string (' be') or id:N")
    p.add_argument("--wrong", required=True, help="wrong-answer token (string or id:N)")
    p.add_argument("--nodes", default="head", choices=["head", "attn_out", "mlp_out", "neuron", "resid_pre"])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", help="directory for the scatter plot atp_vs_activation_patching.png")
    p.add_argument("--html", action="store_true", help="also write the scatter plot as self-contained HTML")
    p = add("eval", cmd_eval, "held-out loss: mean, median and percentile ranges (nats)")
    src(p)
    p.add_argument("--text", help="text file (default: the shipped held-out tiny-shakespeare sample)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p = add("compare", cmd_compare, "the paper's findings for several models side by side: HTML + Markdown + PNGs")
    p.add_argument("src", nargs="*", help="models to compare (default: the embedded trio); the first is the "
                   "reference for the divergences")
    p.add_argument("--out", default="lnfree-report", help="output folder (default ./lnfree-report)")
    p.add_argument("--text", help="text file (default: the shipped held-out tiny-shakespeare sample)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text used (0: all; default 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default min(512, n_ctx))")
    p.add_argument("--threshold", type=float, default=0.3, help="attention-sink threshold (paper: 0.3)")
    p.add_argument("--n-bins", type=int, default=10, help="ECE bins (paper: 10)")
    p.add_argument("--n-boot", type=int, default=1000, help="ECE bootstrap resamples (paper: 10000)")
    p.add_argument("--k-null", type=int, default=None, help="null-space size for entropy neurons")
    p.add_argument("--dtype", default="float64", choices=list(DTYPES), help="default float64")
    p.add_argument("--update-readme", metavar="FILE", help="replace the table between the "
                   "<!-- lnfree-compare:start/end --> markers in FILE (e.g. README.md)")
    p = add("circuit", cmd_circuit, "induction case study: EAP / EAP-IG edges, edge patching, faithfulness")
    p.add_argument("src", nargs="?", default="tiny-shakespeare-lnfree",
                   help="model (default: the embedded tiny-shakespeare-lnfree)")
    p.add_argument("--baseline", action="store_true", help="allow SRC to have real LayerNorm (an LN baseline)")
    p.add_argument("--vs", default=None, help="second model to compare, LN baselines allowed (default: "
                   "tiny-shakespeare-vanilla for the default SRC, else none; 'none' to skip)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--n-prompts", type=int, default=8, help="prompt pairs (default 8)")
    p.add_argument("--seq-len", type=int, default=16, help="random tokens per copy (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-top", type=int, default=None,
                   help="edge-patch only the top N EAP edges (default: every edge; 0: none)")
    p.add_argument("--top", type=int, default=20, help="rows of the top-edge table (default 20)")
    p.add_argument("--graph-edges", type=int, default=40, help="edges drawn in the graph (default 40)")
    p.add_argument("--out", help="directory for circuit_*.png/.html/.csv, eap_vs_edge_patching_*.png, faithfulness.png")
    p.add_argument("--update-docs", metavar="FILE", help="replace the <!-- lnfree-circuit:start/end --> block "
                   "in FILE (e.g. docs/circuits.md) with the tables")
    p = add("demo", cmd_demo, "the paper's headline on the embedded tiny-shakespeare models, offline")
    p.add_argument("--out", default="lnfree-demo", help="output folder for the figures (default ./lnfree-demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except (LNFreeError, FileNotFoundError, IsADirectoryError) as err:
        if args.debug:
            raise
        print(f"lnfree-interp: error: {str(err).replace('pass expect_lnfree=False', 'pass --baseline')}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `lnfree-interp list | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # noqa: BLE001 - one line for users, --debug for the traceback
        if args.debug:
            raise
        print(f"lnfree-interp: unexpected {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
