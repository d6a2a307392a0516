"""The safe EDM/EDM2 pickle reader: published-layout fixtures load exactly, hostile files run nothing."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainer.edm_pickle import load_edm, read_pickle
from trainer.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "edm"
NAMES = ["ddpmpp_uncond_tiny", "adm_cond_tiny", "edm2_img64_tiny"]


def fixture(name: str) -> Path:
    path = FIXTURES / f"{name}.pkl"
    if not path.is_file():
        pytest.skip(f"EDM fixtures absent ({FIXTURES})")
    if name.startswith("edm2") and importlib.util.find_spec("trainer.arch.edm2_unet") is None:
        pytest.skip("EDM2 network not built yet (trainer/arch/edm2_unet.py)")
    return path


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", NAMES)
def test_fixture_denoiser_matches_original(name: str) -> None:
    path = fixture(name)
    ref = torch.load(FIXTURES / f"{name}.ref.pt", weights_only=True)
    model, cfg = load_edm(path)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.data.resolution == ref["x"].shape[-1] and cfg.data.conditional == (ref["labels"] is not None)
    x, sigma = ref["x"].float(), ref["sigma"].float()
    with torch.no_grad():
        out = model.denoise(x, sigma, ref["labels"])
        assert norm_rel(out, ref["denoised"]) < 1e-4
        if ref["labels"] is not None:  # None = all-zero one-hot rows: a different answer, still finite
            none = model.denoise(x, sigma, None)
            assert torch.isfinite(none).all() and norm_rel(none, ref["denoised"]) > 1e-6


def _write_pickle(path: Path, obj: object) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


class _Touch:
    """A reduce that would create a file if it ever ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.target}",))


class _Unknown:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (io.BytesIO, (b"",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write_pickle(tmp_path / "x.pkl", {"ema": _Touch(marker)})
    with pytest.raises(CheckpointError) as err:
        load_edm(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "system'" in msg and "refuses global" in msg
    assert not marker.exists()


def test_unknown_global_is_named(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "y.pkl", [_Unknown()])
    with pytest.raises(CheckpointError, match=r"refuses global '_io\.BytesIO'"):
        read_pickle(path)


def test_truncated_and_wrong_content_are_one_line(tmp_path: Path) -> None:
    src = FIXTURES / "ddpmpp_uncond_tiny.pkl"
    data = src.read_bytes() if src.is_file() else pickle.dumps({"ema": {"a": list(range(1000))}})
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    for path in (cut, tmp_path / "text.pkl", _write_pickle(tmp_path / "plain.pkl", {"ema": [1, 2, 3]})):
        if path.name == "text.pkl":
            path.write_text("hello, not a pickle\n")
        with pytest.raises(CheckpointError) as err:
            load_edm(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
