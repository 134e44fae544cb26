"""DLA over a dataset split across processes with torch.distributed (gloo on CPU, nccl on GPUs).

    torchrun --nproc_per_node=2 examples/distributed_dla.py [MODEL] [--prompts 64] [--out result.pt]

Each process loads the model, takes a contiguous share of the prompts (rank r of w takes
``r * n // w : (r + 1) * n // w``), runs ``direct_logit_attribution`` on it, and the per-prompt values
are gathered on every rank (``torch.distributed.all_gather_object``) and concatenated in prompt
order: the same numbers as one process over all prompts (tested). Rank 0 prints the top components
and, with ``--out``, saves the joined values. On GPUs each rank uses ``cuda:{LOCAL_RANK}``; GPT-2 XL
fits on one GPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lnfree_interp as L


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-shakespeare-lnfree")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--out", default=None, help="save {'values', 'labels', 'metric'} here (rank 0)")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun's env:// rendezvous
    rank = dist.get_rank() if world > 1 else 0
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    model = L.load_hf(args.model, dtype=args.dtype, device=device)
    gen = torch.Generator().manual_seed(0)  # every rank builds the same dataset
    tokens = torch.randint(0, model.config.vocab_size, (args.prompts, 16), generator=gen)
    answer = torch.randint(0, model.config.vocab_size, (args.prompts,), generator=gen)
    start, stop = rank * args.prompts // world, (rank + 1) * args.prompts // world
    dla = L.direct_logit_attribution(model, tokens[start:stop], answer[start:stop], batch_size=16, progress=False)
    payload = (start, dla.values.cpu(), dla.metric.cpu())
    parts = [payload]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, payload)
    parts.sort(key=lambda p: p[0])
    values = torch.cat([p[1] for p in parts], -1)
    metric = torch.cat([p[2] for p in parts], -1)
    if rank == 0:
        print(f"{world} processes, {values.shape[-1]} prompts; top components by |mean DLA| (logits):")
        mean = values.mean(-1)
        for i in mean.abs().topk(5).indices.tolist():
            print(f"  {dla.labels[i]:>12s} {mean[i].item():+.4f}")
        if args.out:
            torch.save({"values": values, "labels": dla.labels, "metric": metric}, args.out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
