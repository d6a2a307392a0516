"""Datasets as float tensors in [-1, 1] with int64 labels; local files only, never a download.

Sources (``DataConfig.name``):
- ``digits``: scikit-learn's bundled 8x8 digits (1797, values 0..16), x = v/8 - 1 (docs/algorithms.md §8).
- ``fashion_mnist``: IDX gz files of the Debian package ``dataset-fashion-mnist``, 28x28 padded to
  32x32 with the background value -1, x = v/127.5 - 1 (docs/algorithms.md §8). Train 60k, test 10k.
- ``cifar10``: the standard python pickle batches (``data_batch_1..5``, ``test_batch``).
- ``imagenet64``: downsampled-ImageNet npz files (``train_data_batch_*.npz``, ``val_data.npz``).
- ``folder``: ``root/<class_name>/*.png``, classes indexed by sorted folder name.

Splits: datasets with an official split use it (``test`` = the held-out set). ``digits`` and
``folder`` have none: a fixed permutation (numpy seed 0) puts the last 20 % in ``test``. ``all`` is
train + test. ``DataConfig.resolution`` resizes (bilinear, align_corners=False, then clamp) when it
differs from the native size, e.g. digits at 16x16.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import logging
import os
import pickle
import re
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import DataConfig
from trainer.errors import DataError

log = logging.getLogger(__name__)

Split = Literal["train", "test", "all"]
_REPO = Path(__file__).resolve().parents[1]
_FMNIST_DEFAULTS = (
    Path("/usr/share/datasets/fashion-mnist"),
    _REPO / "data/debian/usr/share/datasets/fashion-mnist",
    Path("data/debian/usr/share/datasets/fashion-mnist"),
)
_FMNIST_HINT = "install with: make install (Debian package dataset-fashion-mnist)"
_CIFAR_HINT = (
    "get the python version from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
    "extract it and set data.root to cifar-10-batches-py"
)
_IMAGENET_HINT = (
    "get Imagenet64_train_npz / Imagenet64_val_npz from https://image-net.org/download-images "
    "(downsampled ImageNet), unpack all npz files into one directory and set data.root to it"
)
_TEST_FRACTION = 0.2


@dataclasses.dataclass
class ImageDataset:
    """Images float32 [N, C, H, W] in [-1, 1] and labels int64 [N] in 0..num_classes-1."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy with images and labels on `device`."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))


def dataset_std(ds: ImageDataset) -> float:
    """Standard deviation of all pixel values (logged beside sigma_data, docs/algorithms.md §1)."""
    return float(ds.images.double().std().item())


def resolve_root(cfg: DataConfig) -> Path | None:
    """The directory dataset `cfg.name` is read from (None for digits, which ships with scikit-learn)."""
    roots = {"fashion_mnist": _fmnist_root, "cifar10": _cifar_root, "imagenet64": _imagenet_root}
    if cfg.name in roots:
        return roots[cfg.name](cfg)
    return cfg.root if cfg.name == "folder" else None


def load_dataset(cfg: DataConfig, split: Split = "train") -> ImageDataset:
    """Load dataset `cfg.name` (split train/test/all) as tensors in [-1, 1] on the CPU."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split: must be train, test or all, got {split!r}")
    loaders = {
        "digits": _load_digits,
        "fashion_mnist": _load_fashion_mnist,
        "cifar10": _load_cifar10,
        "imagenet64": _load_imagenet64,
        "folder": _load_folder,
    }
    images, labels, num_classes = loaders[cfg.name](cfg, split)
    x = _resize(images, cfg.resolution)
    ds = ImageDataset(x.contiguous(), labels.to(torch.int64), num_classes, cfg.name)
    log.info("loaded %s/%s: %d images of %s, %d classes", cfg.name, split, len(ds), ds.shape, num_classes)
    return ds


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Bilinear resize to resolution x resolution when it differs from the native size."""
    if resolution is None or (x.shape[-2] == resolution and x.shape[-1] == resolution):
        return x
    y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return y.clamp(-1.0, 1.0)


def _uint8_to_unit(v: np.ndarray) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]: x = v/127.5 - 1 (docs/algorithms.md §8)."""
    return torch.from_numpy(v.astype(np.float32)).div_(127.5).sub_(1.0)


def _permuted_split(n: int, split: Split) -> np.ndarray:
    """Indices of `split` for a dataset without an official split: seed-0 permutation, last 20 % test."""
    perm = np.random.default_rng(0).permutation(n)
    n_test = int(round(n * _TEST_FRACTION))
    if split == "train":
        return np.sort(perm[: n - n_test])
    if split == "test":
        return np.sort(perm[n - n_test :])
    return np.arange(n)


def _require_dir(root: Path, hint: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found; {hint}")
    return root


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled).


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits.csv.gz, read as `sklearn.datasets.load_digits` reads it, without
    importing scikit-learn (~1 s per process: every Ray worker pays it): 8x8 images 0..16, labels."""
    found = importlib.util.find_spec("sklearn")
    if found is None or not found.submodule_search_locations:
        raise DataError("digits: scikit-learn is not installed (it ships the data); run `make install`")
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: scikit-learn's bundled digits data is missing; reinstall scikit-learn")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _load_digits(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    images, target = _digits_arrays()
    idx = _permuted_split(len(target), split)
    v = torch.from_numpy(images[idx].astype(np.float32))[:, None]  # [N, 1, 8, 8], 0..16
    x = v / 8.0 - 1.0  # docs/algorithms.md §8
    return x, torch.from_numpy(target[idx]), 10


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX gz).


def _fmnist_root(cfg: DataConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    env = os.environ.get("SCT_FMNIST_ROOT")
    if env:
        return Path(env)
    return next((p for p in _FMNIST_DEFAULTS if p.is_dir()), _FMNIST_DEFAULTS[0])


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Decode one IDX gz file (magic 2051 images [N, H, W] / 2049 labels [N]) as uint8; cached."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; {_FMNIST_HINT}")
    st = path.stat()
    return _read_idx_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, expect_magic)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int, expect_magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); {_FMNIST_HINT}") from None
    ndim = {2051: 3, 2049: 1}[expect_magic]
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {_FMNIST_HINT}")
    magic, *dims = struct.unpack(f">{1 + ndim}i", raw[:header])
    if magic != expect_magic:
        raise DataError(f"{path}: wrong IDX magic {magic} (expected {expect_magic}); {_FMNIST_HINT}")
    if any(d <= 0 for d in dims):
        raise DataError(f"{path}: invalid IDX dimensions {dims}; {_FMNIST_HINT}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for dims {dims}; {_FMNIST_HINT}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    arr.flags.writeable = False  # shared by the cache
    return arr


def _pad_to_pow2(x: torch.Tensor, value: float) -> torch.Tensor:
    """Pad H, W symmetrically up to the next power of two (28 -> 32) with `value`."""
    h, w = x.shape[-2:]
    th, tw = 1 << (h - 1).bit_length(), 1 << (w - 1).bit_length()
    top, left = (th - h) // 2, (tw - w) // 2
    return F.pad(x, (left, tw - w - left, top, th - h - top), value=value)


def _load_fashion_mnist(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    root = _fmnist_root(cfg)
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    xs, ys = [], []
    for prefix in parts:
        img_path = root / f"{prefix}-images-idx3-ubyte.gz"
        lab_path = root / f"{prefix}-labels-idx1-ubyte.gz"
        imgs, labs = read_idx(img_path, 2051), read_idx(lab_path, 2049)
        if imgs.shape[0] != labs.shape[0]:
            raise DataError(f"{lab_path}: {labs.shape[0]} labels for {imgs.shape[0]} images; {_FMNIST_HINT}")
        if labs.max(initial=0) > 9:
            raise DataError(f"{lab_path}: label {int(labs.max())} outside 0..9; {_FMNIST_HINT}")
        xs.append(_pad_to_pow2(_uint8_to_unit(imgs)[:, None], value=-1.0))  # background = -1
        ys.append(torch.from_numpy(labs.astype(np.int64)))
    return torch.cat(xs), torch.cat(ys), 10


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches).


def _cifar_root(cfg: DataConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    return Path(os.environ.get("SCT_CIFAR10_ROOT", "data/cifar-10-batches-py"))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file can never run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name} in a data file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: file not found; {_CIFAR_HINT}")
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()  # the standard CIFAR-10 format is a pickle
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR-10 pickle batch ({type(e).__name__}); {_CIFAR_HINT}") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 pickle batch (no dict); {_CIFAR_HINT}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'; {_CIFAR_HINT}")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        got = f"{data.dtype} {data.shape}, {len(labels)} labels"
        raise DataError(f"{path}: expected uint8 data [N, 3072] and N labels, got {got}; {_CIFAR_HINT}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9; {_CIFAR_HINT}")
    return data, labels


def _load_cifar10(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    root = _require_dir(_cifar_root(cfg), _CIFAR_HINT)
    train = [f"data_batch_{i}" for i in range(1, 6)]
    names = {"train": train, "test": ["test_batch"], "all": [*train, "test_batch"]}[split]
    batches = [_read_cifar_batch(root / n) for n in names]
    data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return _uint8_to_unit(data), torch.from_numpy(labels), 10


# ---------------------------------------------------------------------------------------------
# ImageNet 64x64 (downsampled-ImageNet npz).


def _imagenet_root(cfg: DataConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    return Path(os.environ.get("SCT_IMAGENET64_ROOT", "data/imagenet64"))


def _batch_number(p: Path) -> int:
    m = re.search(r"(\d+)\.npz$", p.name)
    return int(m.group(1)) if m else 0


def _read_imagenet_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data, labels = np.asarray(z["data"]), np.asarray(z["labels"], dtype=np.int64)
    except KeyError:
        raise DataError(f"{path}: npz lacks 'data' or 'labels'; {_IMAGENET_HINT}") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}); {_IMAGENET_HINT}") from None
    side = int(round((data.shape[1] / 3) ** 0.5)) if data.ndim == 2 else 0
    ok = data.dtype == np.uint8 and data.ndim == 2 and 3 * side * side == data.shape[1]
    if not ok or len(labels) != len(data):
        got = f"{data.dtype} {data.shape}, {len(labels)} labels"
        raise DataError(f"{path}: expected uint8 data [N, 3*S*S] and N labels, got {got}; {_IMAGENET_HINT}")
    if len(labels) and (labels.min() < 1 or labels.max() > 1000):
        raise DataError(f"{path}: labels outside 1..1000; {_IMAGENET_HINT}")
    return data.reshape(-1, 3, side, side), labels - 1  # labels are 1-based in these files


def _load_imagenet64(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    root = _require_dir(_imagenet_root(cfg), _IMAGENET_HINT)
    train = sorted(root.glob("train_data_batch_*.npz"), key=_batch_number)
    paths = {"train": train, "test": [root / "val_data.npz"], "all": [*train, root / "val_data.npz"]}[split]
    if not train and split != "test":
        raise DataError(f"{root / 'train_data_batch_*.npz'}: no files found; {_IMAGENET_HINT}")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: file not found; {_IMAGENET_HINT}")
    parts = [_read_imagenet_npz(p) for p in paths]
    if len({p[0].shape[1:] for p in parts}) != 1:
        raise DataError(f"{root}: npz files hold images of different sizes; {_IMAGENET_HINT}")
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _uint8_to_unit(data), torch.from_numpy(labels), 1000


# ---------------------------------------------------------------------------------------------
# Folder of PNGs, one subfolder per class.


def _read_png(path: Path) -> np.ndarray:
    """PNG as uint8 [C, H, W]: grayscale -> 1 channel, anything else -> RGB (alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            arr = np.asarray(im.convert("L" if gray else "RGB"))
    except Exception as e:
        raise DataError(f"{path}: not a readable PNG ({type(e).__name__})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_folder(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    if cfg.root is None:
        raise DataError("data.root: the folder dataset needs a directory of <class_name>/*.png")
    root = _require_dir(Path(cfg.root), "expected <root>/<class_name>/*.png")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class subfolders; expected <root>/<class_name>/*.png")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).glob("*.png"))]
    if not files:
        raise DataError(f"{root}: no PNG files in its class subfolders")
    images, shape0 = [], None
    for f, _ in files:
        a = _read_png(f)
        if shape0 is None:
            shape0 = a.shape
        elif a.shape != shape0:
            raise DataError(f"{f}: image is {tuple(a.shape)} (C, H, W) but {files[0][0]} is {tuple(shape0)}")
        images.append(a)
    idx = _permuted_split(len(files), split)
    data = np.stack(images)[idx]
    labels = np.asarray([c for _, c in files], dtype=np.int64)[idx]
    return _uint8_to_unit(data), torch.from_numpy(labels), len(classes)
