"""Shared helpers for the benchmark scripts: environment, checkpoints, timing, peak memory, tables.

Peak memory
-----------
torch's CPU allocations are invisible to ``tracemalloc``, so memory is measured on the process's
resident set size (RSS). Two independent methods run together on every measured call:

* **kernel high-water mark** (primary): ``/proc/self/clear_refs`` is written ``5``, which resets the
  kernel's peak-RSS counter (``VmHWM``) to the current RSS (Linux >= 4.0); after the call
  ``VmHWM - RSS before`` is the exact peak extra resident memory, with no sampling gaps.
* **sampling thread** (cross-check, and the fallback where ``clear_refs`` is not writable): a
  daemon thread reads ``/proc/self/statm`` (resident pages x page size) every ~0.5 ms and keeps the
  maximum.

Both need freed memory to leave the process: glibc's *dynamic* mmap threshold otherwise grows to
32 MB after the first large free, and later activation-sized buffers come from the heap, stay
resident after ``free`` and are silently reused by the next call (which then looks cheaper than it
is). :func:`setup` therefore re-executes the script once with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` fixed at 128 KiB (every tensor of >= 128 KiB is its own mmap, returned
to the OS when freed). :func:`calibrate_memory` checks the instrument on a known allocation.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lnfree_interp.backends.tl import tl_major  # noqa: F401  (the benchmarks call C.tl_major())

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024

#: GPT-2 small shape (the issue's benchmark model) and a tiny one for --quick smoke runs
SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1000, n_positions=128),
}


def setup(threads: int | None = None) -> None:
    """Offline, deterministic, and with a malloc that returns freed memory (re-execs once)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = "1"  # TransformerLens patching progress bars
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and not os.environ.get("LNFREE_BENCH_NO_REEXEC"):
        env = {**os.environ, **MALLOC_ENV, "LNFREE_BENCH_NO_REEXEC": "1"}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # e.g. TL's "Tried to compute head results when they were already cached"
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = [f"python {sys.version.split()[0]}"]
    for pkg in ("torch", "transformers", "transformer-lens", "nnsight", "lnfree-interp"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} -")
    out.append(f"torch threads {torch.get_num_threads()}")
    out.append(f"cpus {os.cpu_count()}")
    mal = "fixed 128KiB mmap threshold" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "glibc default"
    out.append(f"malloc {mal}")
    return ", ".join(out)


def load_note() -> str:
    """The machine's load average: benchmarks on a shared machine are only as quiet as it is."""
    one, five, fifteen = os.getloadavg()
    return f"load average (1/5/15 min) {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cpus"

# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def random_gpt2(shape: str = "gpt2-small", seed: int = 0):
    """A seeded random ``GPT2LMHeadModel`` with normal LayerNorms (gains/biases made non-trivial)."""
    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=gen))
                module.bias.copy_(torch.empty_like(module.bias).normal_(0, 0.05, generator=gen))
    return model


def hack_lnfree(model, seed: int = 1):
    """The LN-free ("schaeff") encoding, written by the library's own exporter: every LN becomes a
    removed FakeLayerNorm with std ``s ~ U[0.5, 3]``, then ``to_schaeff_encoding`` (eps 1e12, weight
    ``gamma * 1e6 / s``). Returns a copy."""
    import copy

    import torch

    from lnfree_interp.removal import FakeLayerNorm, install_fake_layernorms, to_schaeff_encoding

    model = install_fake_layernorms(copy.deepcopy(model))
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FakeLayerNorm):
            module.running_std.fill_(float(torch.empty(()).uniform_(0.5, 3.0, generator=gen)))
            module.remove()
    return to_schaeff_encoding(model)


def lnfree_gpt2(shape: str = "gpt2-small", seed: int = 0):
    """The benchmark checkpoint: a random LN-free GPT-2 of ``shape`` (in memory)."""
    return hack_lnfree(random_gpt2(shape, seed), seed + 1)


def param_bytes(model) -> int:
    """Bytes of the model's distinct parameter storages (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def clock(fn: Callable[[], Any], collect: bool = True, keep: list | None = None) -> float:
    """Seconds of one call of ``fn`` (after ``gc.collect()``); its result is dropped, or appended
    to ``keep``."""
    if collect:
        gc.collect()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    if keep is not None:
        keep[:] = [out]
    del out
    return dt


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (bytes)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def rss_split() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes: mmapped checkpoint pages count as file-backed."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out.get("RssAnon", 0), out.get("RssFile", 0)


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    hwm: float | None  #: kernel high-water mark minus RSS before (bytes), None if unavailable
    sampled: float  #: sampler's max RSS minus RSS before (bytes)
    samples: int
    before: int = 0  #: RSS just before the block (bytes)

    @property
    def best(self) -> float:
        return self.hwm if self.hwm is not None else self.sampled


class _Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak, self.n = interval, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            r = rss()
            self.n += 1
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)


@contextmanager
def peak_rss(interval: float = 0.0005) -> Iterator[list[Peak]]:
    """``with peak_rss() as out: call()`` -> ``out[0]`` is a :class:`Peak` (extra bytes over the RSS
    just before the block)."""
    out: list[Peak] = []
    gc.collect()
    sampler = _Sampler(interval)
    can_reset = _reset_hwm()
    before = rss()
    hwm_before = _hwm() if can_reset else 0
    sampler.peak = before
    sampler.start()
    try:
        yield out
    finally:
        sampler.stop.set()
        sampler.join()
        peak_sampled = max(sampler.peak, rss())
        hwm = _hwm() - hwm_before if can_reset else None
        out.append(Peak(hwm, peak_sampled - before, sampler.n, before))


def measure_peak(fn: Callable[[], Any]) -> Peak:
    with peak_rss() as out:
        res = fn()
        del res
    return out[0]


@dataclass
class Runs:
    """Measurements of one function: times (s) and extra peak RSS (bytes) of each timed call."""

    times: list[float]
    mems: list[float]  #: kernel high-water mark per call (sampler where clear_refs is unavailable)
    sampled: list[float]  #: sampler-round measurements (the cross-check)
    result: list  #: [the last timed call's return value] when asked to keep it

    @property
    def time(self) -> float:
        return med(self.times)

    @property
    def mem(self) -> float:
        return med(self.mems)

    @property
    def sampled_mem(self) -> float:
        return med(self.sampled)


def run_alternating(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, sampler_rounds: int = 1,
                    limit: dict[str, int] | None = None, keep: set[str] = frozenset()) -> dict[str, Runs]:
    """Call the functions in turn: ``warmup`` unmeasured rounds, ``repeats`` timed rounds (each call
    also records its kernel high-water-mark peak, which costs nothing), then ``sampler_rounds``
    rounds under the RSS sampling thread (memory only: the thread competes for the CPU).

    ``limit``: function -> at most this many timed rounds (and no warm-up or sampler round when
    it is below ``repeats``), for slow references. ``keep``: functions whose last timed result is
    kept in ``Runs.result``.
    """
    limit = limit or {}
    n = {k: min(repeats, limit.get(k, repeats)) for k in fns}
    for _ in range(warmup):
        for k, fn in fns.items():
            if n[k] == repeats:
                clock(fn)
    hwm_ok = _reset_hwm()
    out = {k: Runs([], [], [], []) for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            if i >= n[k]:
                continue
            box = out[k].result if k in keep else None
            if hwm_ok:
                gc.collect()
                _reset_hwm()
                before = _hwm()  # = RSS now, read through the same kernel counter as the peak
                out[k].times.append(clock(fn, collect=False, keep=box))
                out[k].mems.append(_hwm() - before)
            else:
                with peak_rss() as peak:
                    out[k].times.append(clock(fn, keep=box))
                out[k].mems.append(peak[0].sampled)
    for _ in range(sampler_rounds):
        for k, fn in fns.items():
            if n[k] < repeats:
                continue
            p = measure_peak(fn)
            out[k].sampled.append(p.sampled)
            if p.hwm is not None:
                out[k].mems.append(p.hwm)
    return out


def calibrate_memory(nbytes: int = 256 * MB) -> str:
    """Check the instrument: allocate and fill a tensor of ``nbytes`` inside a measured block."""
    import torch

    def alloc():
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        time.sleep(0.01)  # give the sampler a chance to see it
        return x

    p = measure_peak(alloc)
    hwm = "n/a" if p.hwm is None else f"{p.hwm / MB:.1f} MB"
    return (f"memory instrument check: a {nbytes / MB:.0f} MB tensor measures {hwm} (kernel VmHWM), "
            f"{p.sampled / MB:.1f} MB (sampler, {p.samples} samples)")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = [] if title is None else [title]
    for i, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append(line)
    return "\n".join(out)


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def ratio(a: float, b: float) -> float:
    """a / b, or nan when b is not positive (e.g. a tiny forward whose extra RSS is below the
    kernel counters' resolution)."""
    return a / b if b > 0 else float("nan")


def fmt_mb(x: float) -> str:
    return "-" if x != x else f"{x / MB:.1f}"


def fmt_x(x: float) -> str:
    """A ratio, with 3 decimals below 10 so that a verdict at a goal like 1.15 is visible."""
    if x != x:
        return "n/a"
    return f"{x:.3f}x" if abs(x) < 10 else f"{x:.1f}x"


def verdict(value: float, goal: float, smaller_is_better: bool = True) -> str:
    if value != value:
        return "n/a"
    ok = value <= goal if smaller_is_better else value >= goal
    return "MET" if ok else "MISSED"


def banner(title: str, lines: list[str]) -> None:
    print("=" * 100)
    print(title)
    for line in lines:
        print("  " + line)
    print("=" * 100, flush=True)
