#!/usr/bin/env python
"""Mutation testing of lnfree_interp's maths: small wrong changes to the code must make a test fail.

A self-contained AST harness (no extra dependency; not run in CI). For each chosen module it makes
one mutant per (site, operator) -- ``+``<->``-``, ``*``<->``/``, ``<``<->``<=``, ``==``<->``!=``,
``and``<->``or``, ``not x``->``x``, ``-x``->``x``, numbers ``n``->``n+1`` (floats ``x``->``2x``),
``True``<->``False``, ``.sum``<->``.mean``, ``.max``<->``.min``, ``x.abs()``->``x``, slice ``a:b``->
``a:b-1``, ``+=``<->``-=`` -- and runs the tests that execute that line (found by one traced baseline
run; module- and class-level lines run at import, so every test covers them) in a forked child of a
process that has already imported torch / transformers /
TransformerLens / nnsight, so a mutant costs only its tests. Code inside ``raise`` statements,
f-strings and docstrings, and lines marked ``# pragma: no mutate``, are not mutated.

The source tree is copied to a temporary folder per worker: the repository is never written to.

    python scripts/mutation_test.py                                  # the core modules, ~850 mutants
    python scripts/mutation_test.py inputs.py --tests tests/test_mutants.py tests/test_metrics.py
    python scripts/mutation_test.py dla.py --jobs 2 --limit 50      # a random sample of 50 mutants

Prints the score per module (killed / all; a mutant on a line no selected test executes counts as
surviving, "not covered") and every survivor as ``file:line [operator] original -> mutant``.
Exit status 0 when every module reaches ``--goal`` percent (default 90), else 1.

Cost: one pytest run per covered mutant, of only the tests that execute its line (fastest first,
stopping at the first failure). Measured on inputs.py with 11 focused tests: 122 mutants in 52 min
with 2 jobs on 2 cores shared with a training run (load ~7); on a quiet machine expect a few seconds
per mutant. For a quick look use ``--limit`` (a seeded random sample per module).
"""

from __future__ import annotations

import argparse
import ast
import os
import pickle
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "lnfree_interp"
CORE = ["fold.py", "dla.py", "direct_path.py", "patching.py", "inputs.py", "backends/__init__.py", "backends/hf.py",
        "backends/tl.py", "builders/tl.py", "metrics.py", "graph.py", "faithfulness.py", "circuits.py"]
#: module -> the test files that exercise it (only the tests covering a mutated line are run)
TESTS = {
    "fold.py": ["tests/test_fold.py", "tests/test_loaders.py", "tests/test_checkpoints.py", "tests/test_removal.py"],
    "inputs.py": ["tests/test_mutants.py", "tests/test_dla.py", "tests/test_metrics.py", "tests/test_patching.py",
                  "tests/test_streaming.py", "tests/test_loaders.py"],
    "dla.py": ["tests/test_dla.py", "tests/test_mutants.py", "tests/test_streaming.py", "tests/test_headlines.py"],
    "direct_path.py": ["tests/test_dla.py", "tests/test_mutants.py", "tests/test_streaming.py"],
    "patching.py": ["tests/test_patching.py", "tests/test_mutants.py", "tests/test_stats.py", "tests/test_streaming.py",
                    "tests/test_circuits.py"],
    "metrics.py": ["tests/test_metrics.py", "tests/test_circuits.py", "tests/test_backends.py"],
    "graph.py": ["tests/test_circuits.py", "tests/test_backends.py"],
    "faithfulness.py": ["tests/test_circuits.py"],
    "circuits.py": ["tests/test_circuits.py", "tests/test_streaming.py"],
    "streaming.py": ["tests/test_streaming.py", "tests/test_mutants.py", "tests/test_patching.py",
                     "tests/test_circuits.py", "tests/test_dla.py"],
    "backends/__init__.py": ["tests/test_backends.py", "tests/test_mutants.py", "tests/test_dla.py",
                             "tests/test_patching.py", "tests/test_circuits.py", "tests/test_lens.py"],
    "backends/hf.py": ["tests/test_backends.py", "tests/test_mutants.py", "tests/test_dla.py", "tests/test_loaders.py",
                       "tests/test_patching.py", "tests/test_circuits.py"],
    "backends/tl.py": ["tests/test_backends.py", "tests/test_mutants.py", "tests/test_dla.py", "tests/test_loaders.py",
                       "tests/test_patching.py", "tests/test_circuits.py"],
}
DEFAULT_TESTS = ["tests/test_backends.py", "tests/test_mutants.py", "tests/test_dla.py", "tests/test_loaders.py",
                 "tests/test_patching.py", "tests/test_fold.py"]
PRELOAD = ["numpy", "torch", "pandas", "scipy", "matplotlib.pyplot", "plotly.graph_objects", "transformers",
           "tokenizers", "transformer_lens", "nnsight", "jaxtyping", "einops", "accelerate", "tqdm.auto", "pytest",
           "safetensors.torch", "huggingface_hub"]

SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
            ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_METHOD = {"sum": "mean", "mean": "sum", "max": "min", "min": "max", "amax": "amin", "amin": "amax",
               "argmax": "argmin", "argmin": "argmax"}


@dataclass
class Mutant:
    module: str
    index: int
    line: int
    op: str
    original: str
    mutated: str
    status: str = "pending"  # killed | survived | not covered | timeout
    tests: list[str] = field(default_factory=list)


class Mutator(ast.NodeTransformer):
    """Enumerates mutation sites in a fixed order; with ``target`` set, applies only that one."""

    def __init__(self, skip_lines: set[int], target: int | None = None):
        self.skip_lines, self.target = skip_lines, target
        self.sites: list[tuple[int, str, str, str]] = []  # (line, op, original, mutated)
        self._frozen = 0
        self._line: int | None = None  # a function's defaults count as its first statement's line

    def _site(self, node: ast.AST, op: str, make) -> ast.AST:
        line = self._line or getattr(node, "lineno", 0)
        if self._frozen or getattr(node, "lineno", 0) in self.skip_lines:
            return node
        index = len(self.sites)
        new = make()
        self.sites.append((line, op, ast.unparse(node), ast.unparse(new)))
        return new if index == self.target else node

    def _frozen_visit(self, node: ast.AST) -> ast.AST:
        self._frozen += 1
        try:
            return self.generic_visit(node)
        finally:
            self._frozen -= 1

    # never mutated: error paths' messages, f-strings, docstrings, annotations
    def visit_Raise(self, node):
        return self._frozen_visit(node)

    def visit_JoinedStr(self, node):
        return self._frozen_visit(node)

    def visit_arg(self, node):
        return node

    def visit_AnnAssign(self, node):
        node.target = self.visit(node.target)
        node.value = self.visit(node.value) if node.value is not None else None
        return node

    def visit_FunctionDef(self, node):
        node.returns = node.returns  # not visited
        node.body = [self.visit(n) for n in node.body]
        # defaults are evaluated at import, which the trace does not attribute to tests: a mutated default
        # is covered by the tests that run the function's body
        first = next((n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))),
                     None)
        self._line = getattr(first, "lineno", None)
        try:
            node.args = self.visit(node.args)
        finally:
            self._line = None
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node  # docstring
        return self.generic_visit(node)

    def visit_BinOp(self, node):
        self.generic_visit(node)
        swap = SWAP_BIN.get(type(node.op))
        if swap is None:
            return node
        return self._site(node, f"{type(node.op).__name__}->{swap.__name__}",
                          lambda: ast.BinOp(node.left, swap(), node.right))

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        swap = SWAP_BIN.get(type(node.op))
        if swap is None:
            return node
        return self._site(node, f"{type(node.op).__name__}=->{swap.__name__}=",
                          lambda: ast.AugAssign(node.target, swap(), node.value))

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = SWAP_CMP.get(type(op))
            if swap is None:
                continue

            def make(i=i, swap=swap):
                ops = list(node.ops)
                ops[i] = swap()
                return ast.Compare(node.left, ops, node.comparators)

            result = self._site(node, f"{type(op).__name__}->{swap.__name__}", make)
            if result is not node:
                return result
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        swap = ast.Or if isinstance(node.op, ast.And) else ast.And
        return self._site(node, f"{type(node.op).__name__}->{swap.__name__}", lambda: ast.BoolOp(swap(), node.values))

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.Not, ast.USub)):
            return self._site(node, f"drop {type(node.op).__name__}", lambda: node.operand)
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            return self._site(node, "bool", lambda: ast.Constant(not v))
        if isinstance(v, int):
            return self._site(node, "n->n+1", lambda: ast.Constant(v + 1))
        if isinstance(v, float):
            return self._site(node, "x->2x", lambda: ast.Constant(2 * v if v else 1.0))
        return node

    def visit_Slice(self, node):
        self.generic_visit(node)
        if node.upper is None:
            return node
        return self._site(node, "slice upper-1", lambda: ast.Slice(node.lower, ast.BinOp(node.upper, ast.Sub(),
                                                                                         ast.Constant(1)), node.step))

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "abs" and not node.args:
            return self._site(node, "drop .abs()", lambda: f.value)
        if isinstance(f, ast.Attribute) and f.attr in SWAP_METHOD:
            return self._site(node, f".{f.attr}->.{SWAP_METHOD[f.attr]}",
                              lambda: ast.Call(ast.Attribute(f.value, SWAP_METHOD[f.attr], ast.Load()), node.args,
                                               node.keywords))
        return node


def mutants_of(module: str, source: str) -> list[Mutant]:
    skip = {i + 1 for i, line in enumerate(source.splitlines()) if "pragma: no mutate" in line}
    m = Mutator(skip)
    m.visit(ast.parse(source))
    return [Mutant(module, i, line, op, orig, new) for i, (line, op, orig, new) in enumerate(m.sites)]


def mutated_source(source: str, index: int) -> str:
    skip = {i + 1 for i, line in enumerate(source.splitlines()) if "pragma: no mutate" in line}
    tree = Mutator(skip, target=index).visit(ast.parse(source))
    return ast.unparse(ast.fix_missing_locations(tree))


# --------------------------------------------------------------------------------------------
# running tests in forked children
# --------------------------------------------------------------------------------------------


def make_worker(root: Path, tmp: Path, i: int) -> Path:
    dest = tmp / f"worker{i}"
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "site", "*.egg-info", "build", "dist",
                                    ".pytest_cache", "*.ipynb_checkpoints")
    shutil.copytree(root, dest, ignore=ignore, symlinks=True)
    return dest


def run_child(workdir: Path, pytest_args: list[str], log: Path, trace: tuple[list[str], Path] | None = None) -> int:
    """Fork; the child runs pytest in ``workdir`` and exits with its status. Returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(workdir)
        sys.path.insert(0, str(workdir))
        import torch

        torch.set_num_threads(1)
        plugins = []
        if trace is not None:
            plugins.append(LineTracer(*trace))
        code = int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *pytest_args],
                               plugins=plugins))
        if trace is not None:
            plugins[0].dump()
    except BaseException:  # noqa: BLE001 - report through the exit status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class LineTracer:
    """pytest plugin: which test executes which line of the target files (for test selection)."""

    def __init__(self, files: list[str], out: Path):
        self.files, self.out = set(files), out
        self.current: str | None = None
        self.lines: dict[tuple[str, int], set[str]] = {}
        self.durations: dict[str, float] = {}

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines.setdefault((frame.f_code.co_filename, frame.f_lineno), set()).add(self.current or "<import>")
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename in self.files:
            return self._local
        return None

    def pytest_configure(self, config):
        import threading

        sys.settrace(self._global)
        threading.settrace(self._global)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.current = item.nodeid
        t = time.perf_counter()
        yield
        self.durations[item.nodeid] = time.perf_counter() - t
        self.current = None

    def dump(self):
        sys.settrace(None)
        self.out.write_bytes(pickle.dumps((self.lines, self.durations)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", default=CORE, help=f"files under {PKG}/ (default: {' '.join(CORE)})")
    ap.add_argument("--tests", nargs="+", help="test files / node ids to use for every module (default: per module)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--limit", type=int, help="run a random sample of this many mutants per module")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-factor", type=float, default=4.0, help="x the covering tests' baseline time (min 30 s)")
    ap.add_argument("--goal", type=float, default=90.0, help="percent killed each module must reach")
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    ap.add_argument("--root", type=Path, default=ROOT, help="the source tree to copy (default: this checkout)")
    args = ap.parse_args(argv)
    root = args.root.resolve()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.dont_write_bytecode = True

    sources = {m: (root / PKG / m).read_text() for m in args.modules}
    all_mutants = {m: mutants_of(m, s) for m, s in sources.items()}
    if args.limit:
        rng = random.Random(args.seed)
        all_mutants = {m: sorted(rng.sample(ms, min(args.limit, len(ms))), key=lambda x: x.index)
                       for m, ms in all_mutants.items()}
    if args.list:
        for ms in all_mutants.values():
            for mu in ms:
                print(f"{PKG}/{mu.module}:{mu.line} [{mu.op}] {mu.original} -> {mu.mutated}")
        return 0

    t0 = time.perf_counter()
    from importlib.metadata import entry_points

    for ep in entry_points(group="pytest11"):  # pytest plugins first: nnsight's import patches classes they inspect
        try:
            ep.load()
        except Exception:  # noqa: BLE001 - pytest reports it in the child
            pass
    for name in PRELOAD:  # imported once here; every forked child inherits them
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - optional
            pass
    print(f"preloaded in {time.perf_counter() - t0:.0f} s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="lnfree_mutation_"))
    try:
        return run(args, root, tmp, sources, all_mutants, t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, root: Path, tmp: Path, sources: dict[str, str], all_mutants: dict[str, list[Mutant]], t0: float) -> int:
    workers = [make_worker(root, tmp, i) for i in range(max(1, args.jobs))]
    test_files = {m: args.tests or TESTS.get(m, DEFAULT_TESTS) for m in args.modules}

    # baseline: one traced run per distinct test selection, in worker 0 (unmutated)
    coverage: dict[str, tuple[dict, dict]] = {}
    for m in args.modules:
        key = " ".join(test_files[m])
        if key in coverage:
            coverage[m] = coverage[key]
            continue
        files = [str(w / PKG / mod) for w in workers[:1] for mod in args.modules]
        out = tmp / f"trace{len(coverage)}.pkl"
        t = time.perf_counter()
        pid = run_child(workers[0], test_files[m], tmp / "baseline.log", trace=(files, out))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print((tmp / "baseline.log").read_text()[-3000:])
            print(f"baseline tests fail (exit {code}) on the unmutated code: fix them first.")
            return 2
        lines, durations = pickle.loads(out.read_bytes())
        coverage[key] = coverage[m] = (lines, durations)
        print(f"baseline {key}: {len(durations)} tests, {time.perf_counter() - t:.0f} s (traced)", flush=True)

    queue: list[Mutant] = []
    for m, ms in all_mutants.items():
        lines, durations = coverage[m]
        path = str(workers[0] / PKG / m)
        in_functions = {n for node in ast.walk(ast.parse(sources[m])) if isinstance(node, (ast.FunctionDef,
                        ast.AsyncFunctionDef)) for n in range(node.body[0].lineno, node.end_lineno + 1)}
        for mu in ms:
            tests = lines.get((path, mu.line))
            if not tests and mu.line not in in_functions:  # module / class level: runs at import (conftest
                tests = {"<import>"}  # imports the package before the trace starts), so every test covers it
            if not tests:
                mu.status = "not covered"
                continue
            tests = sorted(durations) if "<import>" in tests else sorted(tests, key=lambda t: durations.get(t, 0))
            mu.tests = tests
            queue.append(mu)
    print(f"{sum(len(v) for v in all_mutants.values())} mutants, {len(queue)} covered; running with {args.jobs} "
          "job(s)", flush=True)

    free = list(range(len(workers)))
    running: dict[int, tuple] = {}
    done_count = 0

    def finish(entry, code):
        nonlocal done_count
        mu, _, w = entry
        (workers[w] / PKG / mu.module).write_text(sources[mu.module])
        mu.status = "timeout" if code == "timeout" else ("survived" if code == 0 else "killed")
        free.append(w)
        done_count += 1
        if done_count % 20 == 0 or done_count == len(queue):
            print(f"  {done_count}/{len(queue)} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def timeout_of(entry):
        mu = entry[0]
        base = sum(coverage[mu.module][1].get(t, 1.0) for t in mu.tests)
        return max(30.0, args.timeout_factor * base + 15)

    for mu in queue:
        while not free:
            wait_all_once(running, timeout_of, finish)
        w = free.pop()
        (workers[w] / PKG / mu.module).write_text(mutated_source(sources[mu.module], mu.index))
        pid = run_child(workers[w], mu.tests, tmp / f"mutant{w}.log")
        running[pid] = (mu, time.monotonic(), w)
    while running:
        wait_all_once(running, timeout_of, finish)

    ok = True
    print(f"\nmutation score (killed / all; timeouts count as killed), {time.perf_counter() - t0:.0f} s:")
    for m, ms in all_mutants.items():
        killed = sum(mu.status in ("killed", "timeout") for mu in ms)
        uncovered = sum(mu.status == "not covered" for mu in ms)
        score = 100.0 * killed / len(ms) if ms else 100.0
        ok &= score >= args.goal
        print(f"  {PKG}/{m:22s} {score:5.1f}%  ({killed}/{len(ms)} killed, {len(ms) - killed - uncovered} survived, "
              f"{uncovered} not covered)")
    print("\nsurvivors:")
    for ms in all_mutants.values():
        for mu in ms:
            if mu.status in ("survived", "not covered"):
                tag = "" if mu.status == "survived" else " (not covered)"
                print(f"  {PKG}/{mu.module}:{mu.line} [{mu.op}]{tag} {mu.original} -> {mu.mutated}")
    return 0 if ok else 1


def wait_all_once(running: dict[int, tuple], timeout_of, on_done) -> None:
    """Reap finished (or timed-out) children once; sleep briefly if none finished."""
    for pid in list(running):
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            on_done(running.pop(pid), os.waitstatus_to_exitcode(status))
            return
        if time.monotonic() - running[pid][1] > timeout_of(running[pid]):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            on_done(running.pop(pid), "timeout")
            return
    time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
