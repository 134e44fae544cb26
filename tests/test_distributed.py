"""examples/distributed_dla.py under torchrun with two CPU processes (gloo) gives the one-process numbers."""

import os
import subprocess
import sys
from pathlib import Path

import torch

import lnfree_interp as L

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_give_the_single_process_numbers(tmp_path):
    out = tmp_path / "dist.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "examples" / "distributed_dla.py"), "--prompts", "12", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, 12 prompts" in proc.stdout
    got = torch.load(out, weights_only=True)
    model = L.load_hf("tiny-shakespeare-lnfree", dtype="float64")
    gen = torch.Generator().manual_seed(0)  # the example's dataset
    tokens = torch.randint(0, model.config.vocab_size, (12, 16), generator=gen)
    answer = torch.randint(0, model.config.vocab_size, (12,), generator=gen)
    ref = L.direct_logit_attribution(model, tokens, answer)
    assert got["labels"] == ref.labels
    assert (got["values"] - ref.values).abs().max() <= 1e-10
    assert (got["metric"] - ref.metric).abs().max() <= 1e-10
