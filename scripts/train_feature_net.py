"""Train the FID feature classifier of one dataset on its train split, from a fixed seed.

Writes ``trainer/metrics/weights/<dataset>_classifier.pt`` (a float32 state dict) and its
``.sha256`` (sha256sum format), then prints the held-out (test split) accuracy and the time taken.

    python scripts/train_feature_net.py --dataset digits
    python scripts/train_feature_net.py --dataset fashion_mnist

Bit-for-bit equal weights need the same torch build and thread count; accuracy is stable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import DataConfig  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.metrics.classifier import (  # noqa: E402
    WEIGHTS_DIR,
    ClassifierNet,
    build_classifier,
    sha256_file,
    weights_path,
)

# Per-dataset recipe: epochs, batch size, peak lr of Adam's one-cycle schedule, random shift (pixels).
RECIPES: dict[str, dict[str, float]] = {
    "digits": {"epochs": 40, "batch": 64, "lr": 2e-3, "shift": 1},
    "fashion_mnist": {"epochs": 2, "batch": 128, "lr": 2e-3, "shift": 0},
}


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `shift` pixels, filling with the background value -1."""
    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(net: ClassifierNet, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Fraction of `images` classified as `labels` (eval mode)."""
    net.eval()
    preds = torch.cat([net(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    hits = int((preds == labels).sum())
    return hits / len(images)


def train(dataset: str, seed: int = 0) -> tuple[ClassifierNet, float]:
    """Train the classifier of `dataset` on its train split; return it and the wall seconds."""
    recipe = RECIPES[dataset]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_dataset(DataConfig(name=dataset), "train")
    x, y = data.images, data.labels
    net = build_classifier(dataset)
    batch, epochs = int(recipe["batch"]), int(recipe["epochs"])
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(net(random_shift(x[idx], int(recipe["shift"]), gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % max(1, epochs // 4) == 0:
            print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f}", flush=True)
    net.eval()
    return net, time.perf_counter() - t0


def save(net: ClassifierNet, path: Path) -> str:
    """Write the state dict atomically and its .sha256 beside it; return the digest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    digest = sha256_file(path)
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(RECIPES), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args()
    net, seconds = train(args.dataset, args.seed)
    test = load_dataset(DataConfig(name=args.dataset), "test")
    acc = accuracy(net, test.images, test.labels)
    path = weights_path(args.dataset, args.out_dir)
    digest = save(net, path)
    size_kb = path.stat().st_size / 1024
    print(f"{args.dataset}: test accuracy {acc:.4f} ({len(test)} images), trained in {seconds:.1f} s")
    print(f"wrote {path} ({size_kb:.0f} KiB, sha256 {digest})")


if __name__ == "__main__":
    main()
