"""A short data-parallel training run for multi-GPU checks: run it with torchrun.

    gpusched submit --gpus 2 -- torchrun --standalone --nproc_per_node 2 examples/train_ddp.py

Each rank prints the GPUs it sees (``GPUSCHED_SEES``); rank 0 prints one ``GPUSCHED_EPOCH``
line per epoch, so gpusched records the epoch time of the 2-GPU set. Every step all-reduces
gradients through NCCL, so a wrong or shared GPU set fails loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    uuids = [f"GPU-{torch.cuda.get_device_properties(i).uuid}"
             for i in range(torch.cuda.device_count())]
    print("GPUSCHED_SEES", json.dumps({"rank": rank, "world": world, "local_rank": local,
                                       "device_count": torch.cuda.device_count(),
                                       "uuids": uuids}), flush=True)
    model = DistributedDataParallel(nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10)).cuda(), device_ids=[local])
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * world)
    for epoch in range(1, args.epochs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = torch.zeros((), device="cuda")
        for _ in range(args.steps // world):
            x = torch.randn(args.batch_size, 3, 64, 64, device="cuda")
            y = torch.randint(0, 10, (args.batch_size,), device="cuda")
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dist.all_reduce(loss)
        torch.cuda.synchronize()
        if rank == 0:
            print("GPUSCHED_EPOCH", json.dumps({
                "epoch": epoch, "max_epoch": args.epochs, "seconds": time.perf_counter() - t0,
                "loss": float(loss) / world, "lr": 0.01 * world}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
