"""A hand-written training loop with AdaLFL's adaptive loss: torchvision's ResNet-18 on CIFAR-10 with AdamW.

    python examples/train_with_adaptive_loss.py --data-root ../shared/data --steps 2000

The loss network is meta-learned online at every step (`AdaptiveLoss.step`); everything else is the user's
own: the model (torchvision's), the optimizer, the batches and the loop. Scalars are read only every
--log-every steps. The images come from the project's CIFAR-10 reader (the official python pickles, with
the usual random crop and flip), as plain tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision

from adalfl import AdaptiveLoss
from engine.rng import step_generator
from tasks.supervised import batch_indices, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=20, help="test batches to evaluate at the end")
    parser.add_argument("--save", help="file to save the learned loss's state_dict in")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    task = load_task("cifar10", Path(args.data_root), val_fraction=0.1, seed=0, augment=True).to(device)

    model = torchvision.models.resnet18(num_classes=10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-2)
    adaptive_loss = AdaptiveLoss(num_outputs=10).to(device)

    for step in range(1, args.steps + 1):
        indices = batch_indices(task.size("train"), args.batch_size, seed=0, step=step)
        batch = task.batch("train", indices, step_generator(0, step), device=device)
        stats = adaptive_loss.step(model, optimizer, batch)
        if step % args.log_every == 0 or step == args.steps:
            if not bool(stats.finite):
                raise SystemExit(f"non-finite loss or meta-gradient by step {step}: lower the learning rates")
            meta = "" if stats.meta_loss is None else f", meta loss {float(stats.meta_loss):.4f}"  # at loss updates
            print(f"step {step}: cross-entropy {float(stats.task_loss):.4f}, "
                  f"learned loss {float(stats.train_loss):.4f}{meta}")

    model.eval()
    errors = total = 0
    with torch.no_grad():
        for start in range(0, min(task.size("test"), 256 * args.eval_batches), 256):
            x, y = task.batch("test", torch.arange(start, min(start + 256, task.size("test"))), device=device)
            errors += (model(x).argmax(1) != y).sum().item()
            total += y.numel()
    print(f"test error on {total} images: {errors / total:.4f}")
    if args.save:
        torch.save(adaptive_loss.state_dict(), args.save)


if __name__ == "__main__":
    main()
