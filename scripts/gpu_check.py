"""GPU check (issue 13): exactness of every loader on CUDA, and a short load / forward benchmark.

Runs in well under 5 minutes on one GPU:

1. every backend (HF, nnsight, TransformerLens HookedTransformer / TransformerBridge) loads the
   embedded LN-free model on ``cuda`` in float64 and float32 and :func:`lnfree_interp.verify` passes
   (float64 relative error <= 1e-12, float32 <= 1e-5). TF32 is switched off first: with TF32 on,
   float32 matmuls round to 10 mantissa bits and float32 exactness is lost (the float64 reference is
   unaffected);
2. DLA on CUDA: components + bias equal the model's logit difference (``assert_exact``);
3. a random GPT-2-small-shaped LN-free checkpoint is written, loaded with ``load_hf(device="cuda")``
   beside ``GPT2LMHeadModel.from_pretrained(...).to("cuda")``, and a 8 x 256-token forward timed.

Usage::

    python scripts/gpu_check.py            # exits 1 if a check fails, 2 if there is no GPU
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (run this on a machine with a GPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 exactness needs full float32 matmuls
    torch.backends.cudnn.allow_tf32 = False

    import lnfree_interp as L
    from lnfree_interp.backends.tl import has_hooked_transformer

    t_start = time.perf_counter()
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; TF32 off")
    failed = []
    loaders = {"hf": L.load_hf, "nnsight": L.load_nnsight, "bridge": lambda s, **k: L.load_hooked(s, backend="bridge", **k)}
    if has_hooked_transformer():
        loaders["hooked"] = lambda s, **k: L.load_hooked(s, backend="hooked", **k)
    for name, load in loaders.items():
        for dtype in (torch.float64, torch.float32):
            model = load("tiny-shakespeare-lnfree", dtype=dtype, device="cuda")
            check = L.verify(model)
            print(f"  verify {check}")
            if not check.passed:
                failed.append(f"verify {name} {dtype}")

    model = L.load_hooked("tiny-shakespeare-lnfree", dtype=torch.float64, device="cuda")
    dla = L.direct_logit_attribution(model, "ROMEO:\nI will not", answer=" be", wrong=" go")
    try:
        dla.assert_exact()
        print("  DLA on cuda: components + bias == logit difference (float64)")
    except Exception as err:  # noqa: BLE001 - report every failure
        failed.append(f"DLA: {err}")

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import _common as C
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory(prefix="lnfree_gpu_check_") as root:
        d = os.path.join(root, "small")
        C.lnfree_gpt2("gpt2-small").save_pretrained(d)
        timings = {}
        for label, fn in (("from_pretrained().to(cuda)", lambda: GPT2LMHeadModel.from_pretrained(d).to("cuda")),
                          ("load_hf(device=cuda)", lambda: L.load_hf(d, device="cuda"))):
            fn()  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            m = fn()
            torch.cuda.synchronize()
            timings[label] = time.perf_counter() - t
            tokens = torch.randint(0, 50257, (8, 256), device="cuda")
            with torch.no_grad():
                m(tokens)
                torch.cuda.synchronize()
                t = time.perf_counter()
                m(tokens)
                torch.cuda.synchronize()
            print(f"  {label:28s} load {timings[label]:.2f}s, forward 8x256 {time.perf_counter() - t:.4f}s")
        ratio = timings["load_hf(device=cuda)"] / timings["from_pretrained().to(cuda)"]
        print(f"  load_hf / from_pretrained().to(cuda): {ratio:.2f}x")
    print(f"done in {time.perf_counter() - t_start:.0f}s: " + ("all checks passed" if not failed else f"FAILED: {failed}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
