"""A small real PyTorch training run on synthetic detection-style data, for trying gpusched.

Each image (3x64x64) holds one bright square; the net predicts its class (the square's colour
channel) and its box (x0, y0, x1, y1, scaled to 0..1). After every epoch it prints gpusched's
one-line epoch record, and at start which GPUs it sees, so tests can check GPU isolation (with
the wall clock of that line and of the process's start, so benchmarks can time a job's start):

    GPUSCHED_SEES {"device_count": 1, "uuids": ["GPU-..."], "time": 1764400000.123,
                   "process_started": 1764399998.52}
    GPUSCHED_EPOCH {"epoch": 1, "max_epoch": 5, "seconds": 0.8, "loss": 1.23, "lr": 0.001}
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
from torch import nn

SIZE = 64
CLASSES = 3


def batch(n: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    images = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 0.2
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    side = torch.randint(8, 32, (n,), generator=gen)
    x0 = (torch.rand(n, generator=gen) * (SIZE - side)).long()
    y0 = (torch.rand(n, generator=gen) * (SIZE - side)).long()
    for i in range(n):
        s, x, y = int(side[i]), int(x0[i]), int(y0[i])
        images[i, int(labels[i]), y : y + s, x : x + s] = 1.0
    boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1).float() / SIZE
    return images.to(device), labels.to(device), boxes.to(device)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 16, 32, 64, 64]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cls = nn.Linear(64, CLASSES)
        self.box = nn.Sequential(nn.Linear(64, 4), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.cls(f), self.box(f)


def process_started() -> float | None:
    """This process's start as unix seconds (Linux /proc, 1/CLK_TCK resolution), or None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # since boot (CLOCK_BOOTTIME)
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return round(time.time() - age, 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    uuids = [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    sees = {"device_count": count, "uuids": uuids, "time": round(time.time(), 3),
            "process_started": process_started()}
    print("GPUSCHED_SEES " + json.dumps(sees), flush=True)

    device = torch.device("cuda" if count else "cpu")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * args.steps)
    ce, l1 = nn.CrossEntropyLoss(), nn.SmoothL1Loss()

    for epoch in range(1, args.epochs + 1):
        start, total = time.monotonic(), 0.0
        model.train()
        for _ in range(args.steps):
            images, labels, boxes = batch(args.batch_size, device, gen)
            logits, pred = model(images)
            loss = ce(logits, labels) + 5.0 * l1(pred, boxes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        loss_avg = total / args.steps
        if not math.isfinite(loss_avg):
            raise SystemExit(f"loss diverged at epoch {epoch}")
        record = {
            "epoch": epoch,
            "max_epoch": args.epochs,
            "seconds": round(time.monotonic() - start, 3),
            "loss": round(loss_avg, 5),
            "lr": float(f"{opt.param_groups[0]['lr']:.6g}"),
        }
        print("GPUSCHED_EPOCH " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
