"""trainer.data: every dataset source on tiny real files, and the error paths."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data import ImageDataset, _permuted_split, dataset_std, load_dataset
from trainer.errors import DataError

# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shape_range_labels() -> None:
    ds = load_dataset(DataConfig(name="digits"), "all")
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.shape == (1, 8, 8) and len(ds) == 1797
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    # x = v/8 - 1: every value is on the 1/8 grid (docs/algorithms.md §8)
    assert torch.equal((ds.images + 1) * 8, ((ds.images + 1) * 8).round())
    assert 0.6 < dataset_std(ds) < 0.9


def test_digits_are_scikit_learns_load_digits() -> None:
    """Read from the bundled CSV without importing scikit-learn, yet the same images and labels."""
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = load_dataset(DataConfig(name="digits"), "all")
    order = torch.from_numpy(_permuted_split(len(ref.target), "all"))
    assert torch.equal(ds.labels, torch.from_numpy(ref.target)[order])
    assert torch.equal(ds.images, torch.from_numpy(ref.images.astype(np.float32))[order, None] / 8.0 - 1.0)


def test_digits_split_is_deterministic_and_disjoint() -> None:
    train = load_dataset(DataConfig(), "train")
    test = load_dataset(DataConfig(), "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    again = load_dataset(DataConfig(), "test")
    assert torch.equal(test.images, again.images)
    rows = {tuple(r) for r in train.images.flatten(1).tolist()}
    # digits has a few duplicated images; nearly all test rows must be unseen in train
    assert sum(tuple(r) in rows for r in test.images.flatten(1).tolist()) < 10


def test_digits_16x16_resize() -> None:
    ds = load_dataset(DataConfig(resolution=16), "train")
    assert ds.shape == (1, 16, 16)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    native = load_dataset(DataConfig(resolution=8), "train")
    ref = torch.nn.functional.interpolate(native.images, size=16, mode="bilinear", align_corners=False)
    assert torch.allclose(ds.images, ref.clamp(-1, 1))
    assert torch.equal(ds.images[..., 0, 0], native.images[..., 0, 0])  # corners kept (align_corners=False)
    assert torch.allclose(ds.images.mean((1, 2, 3)), native.images.mean((1, 2, 3)), atol=0.05)


def test_to_returns_copy() -> None:
    ds = load_dataset(DataConfig(), "test")
    moved = ds.to("cpu")
    assert moved is not ds and moved.name == "digits" and moved.num_classes == 10


def test_bad_split() -> None:
    with pytest.raises(DataError, match="split"):
        load_dataset(DataConfig(), "valid")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: tiny IDX gz files


def _write_idx(path: Path, arr: np.ndarray, magic: int, extra: bytes = b"", cut: int = 0) -> None:
    raw = struct.pack(f">{1 + arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes() + extra
    if cut:
        raw = raw[:-cut]
    path.write_bytes(gzip.compress(raw))


def _fmnist_dir(root: Path, n_train: int = 3, n_test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[0, 0, 0], imgs[0, 27, 27] = 255, 0
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs, 2051)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return root


def test_fmnist_tiny_padding_and_scaling(tmp_path: Path) -> None:
    root = _fmnist_dir(tmp_path)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=root), "train")
    assert ds.images.shape == (3, 1, 32, 32) and ds.num_classes == 10
    assert ds.labels.tolist() == [0, 1, 2]
    x = ds.images[:, 0]
    # pad 28 -> 32 with the background value -1: 2 pixels each side
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, -2:] == -1)
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, -2:] == -1)
    assert x[0, 2, 2] == 1.0 and x[0, 29, 29] == -1.0  # 255 -> 1, 0 -> -1
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    v = np.frombuffer(raw, np.uint8, offset=16).reshape(3, 28, 28)
    expect = torch.from_numpy(v.astype(np.float32)) / 127.5 - 1  # x = v/127.5 - 1
    assert torch.allclose(x[:, 2:30, 2:30], expect)
    assert len(load_dataset(DataConfig(name="fashion_mnist", root=root), "test")) == 2
    assert len(load_dataset(DataConfig(name="fashion_mnist", root=root), "all")) == 5


def test_fmnist_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCT_FMNIST_ROOT", str(_fmnist_dir(tmp_path)))
    assert len(load_dataset(DataConfig(name="fashion_mnist"), "test")) == 2


@pytest.mark.parametrize("case", ["wrong_magic", "truncated", "extra_bytes", "bad_gzip", "missing"])
def test_fmnist_malformed(tmp_path: Path, case: str) -> None:
    root = _fmnist_dir(tmp_path)
    bad = root / "train-images-idx3-ubyte.gz"
    imgs = np.zeros((3, 28, 28), np.uint8)
    if case == "wrong_magic":
        _write_idx(bad, imgs, 2049)
    elif case == "truncated":
        _write_idx(bad, imgs, 2051, cut=100)
    elif case == "extra_bytes":
        _write_idx(bad, imgs, 2051, extra=b"\0" * 7)
    elif case == "bad_gzip":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.unlink()
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(name="fashion_mnist", root=root), "train")
    msg = str(e.value)
    assert str(bad.name) in msg and "\n" not in msg
    assert "install with: make install (Debian package dataset-fashion-mnist)" in msg


def test_fmnist_label_count_mismatch(tmp_path: Path) -> None:
    root = _fmnist_dir(tmp_path)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(5), 2049)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset(DataConfig(name="fashion_mnist", root=root), "test")


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.fmnist
@pytest.mark.skipif(not REAL_FMNIST.is_file(), reason=f"{REAL_FMNIST} not installed (make install)")
def test_real_fmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCT_FMNIST_ROOT", raising=False)
    cfg = DataConfig(name="fashion_mnist", root=REAL_FMNIST.parent)
    ds = load_dataset(cfg, "train")
    assert ds.images.shape == (60000, 1, 32, 32)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert ds.num_classes == 10 and torch.equal(ds.labels.bincount(), torch.full((10,), 6000))
    assert abs(dataset_std(ds) - 0.66) < 0.02  # docs/algorithms.md §8
    assert len(load_dataset(cfg, "test")) == 10000


# ---------------------------------------------------------------------------------------------
# CIFAR-10: tiny pickle batches


def _cifar_dir(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(d))
    return root


def test_cifar10_tiny(tmp_path: Path) -> None:
    root = _cifar_dir(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=root), "train")
    assert ds.images.shape == (10, 3, 32, 32) and ds.num_classes == 10
    first = pickle.loads((root / "data_batch_1").read_bytes())[b"data"][0]
    # row-major 3x32x32: first 1024 values are the red plane
    assert ds.images[0, 0, 0, 1].item() == pytest.approx(first[1] / 127.5 - 1)
    assert ds.images[0, 1, 0, 0].item() == pytest.approx(first[1024] / 127.5 - 1)
    assert len(load_dataset(DataConfig(name="cifar10", root=root), "test")) == 2
    assert len(load_dataset(DataConfig(name="cifar10", root=root), "all")) == 12


def test_cifar10_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_dataset(DataConfig(name="cifar10", root=tmp_path / "nope"))
    root = _cifar_dir(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: file not found.*cifar-10-python"):
        load_dataset(DataConfig(name="cifar10", root=root))
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="test_batch: expected uint8 data"):
        load_dataset(DataConfig(name="cifar10", root=root), "test")


# ---------------------------------------------------------------------------------------------
# ImageNet 64x64: tiny npz


def _imagenet_dir(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for i, n in ((1, 2), (2, 1), (10, 3)):
        labels = np.full(n, i)  # 1-based, tagged by batch number to check the order
        data = rng.integers(0, 256, (n, 12288), np.uint8)
        np.savez(root / f"train_data_batch_{i}.npz", data=data, labels=labels)
    np.savez(root / "val_data.npz", data=np.full((2, 12288), 255, np.uint8), labels=np.array([1, 1000]))
    return root


def test_imagenet64_tiny(tmp_path: Path) -> None:
    root = _imagenet_dir(tmp_path)
    ds = load_dataset(DataConfig(name="imagenet64", root=root), "train")
    assert ds.images.shape == (6, 3, 64, 64) and ds.num_classes == 1000
    assert ds.labels.tolist() == [0, 0, 1, 9, 9, 9]  # natural batch order, labels - 1
    test = load_dataset(DataConfig(name="imagenet64", root=root), "test")
    assert test.labels.tolist() == [0, 999] and torch.all(test.images == 1.0)
    assert len(load_dataset(DataConfig(name="imagenet64", root=root), "all")) == 8


def test_imagenet64_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_data_batch_"):
        load_dataset(DataConfig(name="imagenet64", root=tmp_path))
    with pytest.raises(DataError, match="val_data.npz: file not found"):
        load_dataset(DataConfig(name="imagenet64", root=tmp_path), "test")
    np.savez(tmp_path / "val_data.npz", images=np.zeros((1, 12288), np.uint8))
    with pytest.raises(DataError, match="val_data.npz: npz lacks"):
        load_dataset(DataConfig(name="imagenet64", root=tmp_path), "test")


# ---------------------------------------------------------------------------------------------
# folder of PNGs


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_grayscale_and_rgb(tmp_path: Path) -> None:
    for c, name in enumerate(["b_cat", "a_dog"]):
        for i in range(5):
            _png(tmp_path / "gray" / name / f"{i}.png", np.full((6, 6), 50 * c + i, np.uint8))
            _png(tmp_path / "rgb" / name / f"{i}.png", np.full((4, 4, 3), 255, np.uint8))
    ds = load_dataset(DataConfig(name="folder", root=tmp_path / "gray"), "all")
    assert ds.images.shape == (10, 1, 6, 6) and ds.num_classes == 2
    assert ds.labels.tolist() == [0] * 5 + [1] * 5  # sorted class names: a_dog = 0
    assert ds.images[0, 0, 0, 0].item() == pytest.approx(50 / 127.5 - 1)
    rgb = load_dataset(DataConfig(name="folder", root=tmp_path / "rgb"), "train")
    assert rgb.shape == (3, 4, 4) and len(rgb) == 8 and torch.all(rgb.images == 1.0)
    assert len(load_dataset(DataConfig(name="folder", root=tmp_path / "rgb"), "test")) == 2


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root"):
        load_dataset(DataConfig(name="folder"))
    with pytest.raises(DataError, match=str(tmp_path / "none")):
        load_dataset(DataConfig(name="folder", root=tmp_path / "none"))
    _png(tmp_path / "x" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "x" / "a" / "1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match=r"1\.png: image is \(1, 5, 5\)"):
        load_dataset(DataConfig(name="folder", root=tmp_path / "x"))
    (tmp_path / "x" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1\.png: not a readable PNG"):
        load_dataset(DataConfig(name="folder", root=tmp_path / "x"))
