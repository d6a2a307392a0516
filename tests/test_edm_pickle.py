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


# --- As a pretrained checkpoint: tuning, conversion, sampling --------------------------------------


def _rgb_folder(root: Path, n: int = 24, size: int = 32) -> Path:
    """A tiny `folder` dataset of random-noise RGB PNGs (one class)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    (root / "a").mkdir(parents=True)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(root / "a" / f"{i}.png")
    return root


@pytest.fixture
def folder_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Base settings of a 5-iteration tuning run on 32x32 RGB PNGs, FID by a random-weights Inception."""
    from trainer.metrics.inception import FidInceptionV3

    monkeypatch.setenv("SCT_CACHE_DIR", str(tmp_path / "cache"))
    torch.save(FidInceptionV3().state_dict(), tmp_path / "inception_random.pth")
    return {
        "data": {"name": "folder", "root": str(_rgb_folder(tmp_path / "pngs"))},
        "iterations": 5, "device": "cpu", "log_every": 5, "checkpoint_every": 5,
        "optim": {"batch_size": 8}, "sct": {"ref_batch": 8}, "sampler": {"steps": [1]},
        "eval": {"every": 5, "fid_samples": 8, "batch_size": 8, "online": False, "at_start": False,
                 "inception_weights": str(tmp_path / "inception_random.pth")},
    }


@pytest.mark.slow
def test_tune_from_pickle_then_import_then_sample(tmp_path: Path, folder_run: dict) -> None:
    from typer.testing import CliRunner

    from sct_sweeps.cli import app
    from trainer.config import TrainConfig
    from trainer.data import load_dataset
    from trainer.edm_pickle import pretrained_config
    from trainer.train import build_model, load_pretrained, train

    path = fixture("ddpmpp_uncond_tiny")
    for method in ("ect", "sct"):
        cfg = TrainConfig.model_validate({**folder_run, "method": method, "out_dir": str(tmp_path / method),
                                          "pretrain": {"checkpoint": str(path)}})
        result = train(cfg)
        assert result.iterations == 5 and result.params == 393_331  # the file's network, not the default
        assert not (tmp_path / method / "pretrain.pt").exists()  # phase one skipped
    runner = CliRunner()
    converted = tmp_path / "ddpmpp.pt"
    done = runner.invoke(app, ["import-edm", str(path), "--out", str(converted)])
    assert done.exit_code == 0, done.output
    assert "ddpmpp, 32x32x3" in done.output and "unconditional" in done.output and "0.39M" in done.output
    cfg = pretrained_config(TrainConfig.model_validate({**folder_run, "pretrain": {"checkpoint": str(converted)}}))
    model = build_model(cfg, load_dataset(cfg.data, "train"))
    load_pretrained(model, converted)
    original, _ = load_edm(path)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    grid = tmp_path / "grid.png"
    done = runner.invoke(app, ["sample", str(result.checkpoint_dir), "--n", "4", "--device", "cpu",
                               "--out", str(grid)])
    assert done.exit_code == 0, done.output
    assert grid.is_file()


def test_contradicting_network_is_refused_in_one_line(tmp_path: Path) -> None:
    from trainer.config import TrainConfig
    from trainer.edm_pickle import pretrained_config
    from trainer.errors import ConfigError

    path = fixture("ddpmpp_uncond_tiny")
    cfg = TrainConfig.model_validate({"network": {"model_channels": 64, "dropout": 0.2},
                                      "pretrain": {"checkpoint": str(path)}})
    with pytest.raises(ConfigError, match=rf"^network.model_channels: 64 contradicts {path} \(16\)$"):
        pretrained_config(cfg)
    same = TrainConfig.model_validate({"network": {"arch": "ddpmpp", "model_channels": 16, "dropout": 0.2},
                                       "pretrain": {"checkpoint": str(path)}})
    net = pretrained_config(same).network
    assert (net.num_blocks, net.augment_dim, net.resample_filter, net.dropout) == (1, 9, [1, 1], 0.2)


def test_import_edm_refuses_a_non_pickle_with_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sct_sweeps.cli import app

    bad = _write_pickle(tmp_path / "evil.pkl", {"ema": _Touch(tmp_path / "ran")})
    done = CliRunner().invoke(app, ["import-edm", str(bad), "--out", str(tmp_path / "o.pt")])
    assert done.exit_code == 2 and "refuses global" in done.output and len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o.pt").exists()


def _spec_with(path: Path | None, tmp_path: Path) -> dict:
    base = {"method": "sct", "iterations": 20, "data": {"name": "digits"}, "pretrain": {"iterations": 500}}
    if path is not None:
        base["pretrain"]["checkpoint"] = str(path)
    return {"name": "frompkl", "base": base, "search": {"seed": {"grid": [0, 1]}},
            "estimate": {"it_per_s": 10.0, "at_channels": 32}, "pretrain_cache": str(tmp_path / "cache")}


def test_validate_shows_the_given_pickle_and_leaves_it_out_of_the_cost(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from sct_sweeps.cli import app
    from sct_sweeps.config import parse_spec
    from sct_sweeps.pretrain import enumerate_configs
    from sct_sweeps.space import plan

    path = fixture("ddpmpp_uncond_tiny")
    given, trained = parse_spec(_spec_with(path, tmp_path)), parse_spec(_spec_with(None, tmp_path))
    phase_ones = enumerate_configs(trained)[0]
    assert enumerate_configs(given) == ([], True) and phase_ones
    p, q = plan(given, 4), plan(trained, 4)
    assert p.pretrains == 0 and p.est_compute_s < q.est_compute_s
    left_out = sum(c.pretrain.iterations for c in phase_ones) / 10.0  # it_per_s 10, width as the estimate's
    assert p.est_compute_s == pytest.approx(q.est_compute_s - left_out)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(_spec_with(path, tmp_path)))
    done = CliRunner().invoke(app, ["validate", str(spec)])
    assert done.exit_code == 0, done.output
    assert f"pretraining: from {path} (0 iterations, 0 h)" in done.output
    bad = _spec_with(path, tmp_path)
    bad["base"]["network"] = {"model_channels": 64}
    spec.write_text(yaml.safe_dump(bad))
    done = CliRunner().invoke(app, ["validate", str(spec)])
    assert done.exit_code == 2 and f"base.network.model_channels: 64 contradicts {path} (16)" in done.output


SONG_DIGITS = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1,
                   embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1])


def digits_pickle(path: Path, bare: bool = False) -> Path:
    """An EDM-format pickle (tests/_edm_format.py) of a digits-sized DDPM++ (8x8, 1 channel)."""
    from _edm_format import write_edm_pickle

    from trainer.arch.song_unet import SongUNet

    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, **SONG_DIGITS)
    return write_edm_pickle(path, net, model_kwargs=SONG_DIGITS, resolution=8, channels=1, bare=bare)


def test_written_edm_format_reads_back_without_running_module_src(tmp_path: Path) -> None:
    model, cfg = load_edm(digits_pickle(tmp_path / "d.pkl"))  # module_src would raise SystemExit if run
    assert (cfg.network.arch, cfg.network.model_channels, cfg.data.resolution) == ("ddpmpp", 8, 8)
    bare, _ = load_edm(digits_pickle(tmp_path / "bare.pkl", bare=True))  # a network object at the top level
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.denoise(x, 1.0), bare.denoise(x, 1.0))


@pytest.mark.slow
def test_sweep_from_a_pickle_pretrains_nothing(
    tmp_path: Path, cli_env: dict[str, str], pretrain_cache: Path, folder_run: dict
) -> None:
    """A sweep whose `pretrain.checkpoint` is the DDPM++ fixture (made by EDM's own code) tunes from it:
    no phase one is built, and every trial logs the file's network."""
    import subprocess

    import yaml
    from conftest import sct_sweep, tiny_spec

    from sct_sweeps import tracking

    raw = tiny_spec("frompkl", pretrain_cache, seeds=[0, 1], iterations=5)
    raw["base"] = {**folder_run, "method": "sct", "pretrain": {"checkpoint": str(fixture("ddpmpp_uncond_tiny"))}}
    spec = tmp_path / "frompkl.yaml"
    spec.write_text(yaml.safe_dump(raw))
    before = sorted(pretrain_cache.rglob("*"))
    env = {**cli_env, "SCT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sct_sweep(), "run", str(spec), "--num-cpus", "2", "--no-report"], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 trials, 0 failed" in done.stdout, done.stdout
    assert sorted(pretrain_cache.rglob("*")) == before  # no phase one built
    client = tracking.client(f"sqlite:///{Path(cli_env['SCT_PROJECT_DIR']) / 'mlruns.db'}")
    exp = client.get_experiment_by_name("frompkl")
    children = client.search_runs([exp.experiment_id], "tags.`sct.role` = 'trial'")
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED" and c.data.metrics["fid_1step"] > 0
        assert (c.data.params["network.arch"], c.data.params["network.model_channels"]) == ("ddpmpp", "16")
