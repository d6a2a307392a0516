"""Small CNN classifiers whose penultimate layer is the feature space of the Fréchet distance.

At small scale the FID feature network is a classifier trained on the dataset itself ("Fréchet
classifier distance", docs/algorithms.md §7): its numbers are never comparable with Inception-FID. One network
per dataset, trained on the train split only by ``scripts/train_feature_net.py`` from a fixed seed;
the weights ship in ``trainer/metrics/weights/<dataset>_classifier.pt`` with a ``.sha256`` beside.

The classifier works at its dataset's native resolution (digits 8x8, Fashion-MNIST 32x32). Images at
another resolution (digits trained at 16x16) are resized to it (area / bilinear) before features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.checkpoint import sha256_file
from trainer.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NATIVE_SHAPE: dict[str, tuple[int, int, int]] = {"digits": (1, 8, 8), "fashion_mnist": (1, 32, 32)}
WIDTHS: dict[str, tuple[int, ...]] = {"digits": (32, 64), "fashion_mnist": (32, 64, 128)}  # 8->2, 32->4


class ClassifierNet(nn.Module):
    """[conv3x3-ReLU-maxpool2] per width, then fc128-ReLU (the features) and fc10 (the logits)."""

    def __init__(
        self, in_channels: int = 1, resolution: int = 32, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.num_features = 128  # read by the Fréchet distance (and torchmetrics' FID)
        chans = (in_channels, *widths)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:], strict=True))
        side = resolution >> len(widths)
        self.fc1 = nn.Linear(widths[-1] * side * side, self.num_features)
        self.fc2 = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128] of images [N, C, H, W] in [-1, 1] at native resolution."""
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.fc2(self.features(x))


class ClassifierFeatures(nn.Module):
    """Feature extractor for the Fréchet distance: resize to native resolution, then `features`."""

    def __init__(self, net: ClassifierNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(resize_to(x.clamp(-1.0, 1.0), self.net.resolution))


def resize_to(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize [N, C, H, W] to resolution x resolution: area when shrinking, bilinear when growing."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    if x.shape[-1] > resolution:
        return F.interpolate(x, size=(resolution, resolution), mode="area")
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def weights_path(dataset: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Where the shipped classifier of `dataset` lives."""
    return Path(weights_dir) / f"{dataset}_classifier.pt"


def build_classifier(dataset: str) -> ClassifierNet:
    """An untrained classifier shaped for `dataset` (digits or fashion_mnist)."""
    if dataset not in NATIVE_SHAPE:
        raise ValueError(f"no classifier feature network for dataset {dataset!r}")
    c, h, _ = NATIVE_SHAPE[dataset]
    return ClassifierNet(in_channels=c, resolution=h, widths=WIDTHS[dataset])


def load_classifier(dataset: str, weights_dir: Path = WEIGHTS_DIR) -> tuple[ClassifierNet, str]:
    """The shipped classifier of `dataset` in eval mode, frozen, and its weights' sha256.

    Raises CheckpointError (naming the file) when the weights or their .sha256 are missing, the
    digest does not match, or the state dict does not fit the network.
    """
    path = weights_path(dataset, weights_dir)
    sha_path = path.with_name(path.name + ".sha256")
    regen = f"regenerate with: python scripts/train_feature_net.py --dataset {dataset}"
    for p in (path, sha_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: feature-network file not found; {regen}")
    expected = (sha_path.read_text().split() or [""])[0]  # sha256sum format: "<hex>  <name>"
    digest = sha256_file(path)
    if digest != expected:
        raise CheckpointError(f"{path}: sha256 {digest[:12]}... does not match {sha_path.name}; {regen}")
    net = build_classifier(dataset)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"{path}: not a {dataset} classifier state dict ({type(e).__name__})") from None
    net.eval().requires_grad_(False)
    return net, digest
