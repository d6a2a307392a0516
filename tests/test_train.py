"""The training loop end to end on digits with tiny networks: real steps, real FID, real checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import TrainConfig
from trainer.errors import DivergenceError
from trainer.train import load_for_sampling, pretrain, train

TINY = {
    "network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.1},
    "pretrain": {"iterations": 10, "batch_size": 32},
    "optim": {"batch_size": 32, "lr": 1e-3},
    "eval": {"every": 10, "fid_samples": 64, "batch_size": 64, "online": False},
    "log_every": 5,
    "checkpoint_every": 5,
    "device": "cpu",
}


def tiny(tmp_path: Path, **over) -> TrainConfig:
    raw = {**TINY, "out_dir": str(tmp_path / "run"), "iterations": 20, **over}
    return TrainConfig.model_validate(raw)


class Collect:
    """A reporter that keeps everything it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict, Path | None]] = []
        self.artifacts: list[Path] = []

    def report(self, step, metrics, checkpoint_dir=None):
        self.rows.append((step, dict(metrics), checkpoint_dir))

    def log_artifact(self, path):
        self.artifacts.append(Path(path))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(s, m[key]) for s, m, _ in self.rows if key in m]


@pytest.mark.slow
def test_sct_run_reports_fid_cost_and_checkpoints(tmp_path):
    rep = Collect()
    result = train(tiny(tmp_path, method="sct", sct={"ref_batch": 64}), rep)
    fid1, fid2 = rep.series("fid_1step"), rep.series("fid_2step")
    assert [s for s, _ in fid1] == [0, 10, 20] and len(fid2) == 3
    assert all(v > 0 and v == v for _, v in fid1 + fid2)
    losses = rep.series("loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    flops = [m["flops"] for _, m, _ in rep.rows if "loss" in m]
    assert flops == sorted(flops) and flops[0] > 0 and len(set(flops)) == len(flops)  # cumulative FLOPs
    assert rep.series("images_seen")[-1][1] == 20 * 32
    assert any(k.startswith("ess_t") for _, m, _ in rep.rows for k in m)
    assert result.checkpoint_dir is not None and (result.checkpoint_dir / "state.pt").is_file()
    assert any(p.name.startswith("grid_1step") for p in rep.artifacts)
    assert (tmp_path / "run" / "pretrain.pt").is_file()


@pytest.mark.slow
def test_resume_continues_from_checkpoint(tmp_path):
    cfg = tiny(tmp_path, method="ect", iterations=10)
    first = train(cfg, Collect())
    rep = Collect()
    cfg2 = cfg.model_copy(update={"iterations": 20})
    train(cfg2, rep, resume_from=first.checkpoint_dir)
    steps = [s for s, m, _ in rep.rows if "loss" in m]
    assert steps[0] == 15 and steps[-1] == 20  # no step before the checkpoint is redone
    assert rep.series("images_seen")[-1][1] == 20 * 32


def test_pretrain_checkpoint_initialises_tuning_and_is_shared(tmp_path):
    cfg = tiny(tmp_path, method="ect", iterations=0)
    path = pretrain(cfg, tmp_path / "shared.pt")
    mtime = path.stat().st_mtime_ns
    assert pretrain(cfg, path) == path and path.stat().st_mtime_ns == mtime  # produced once
    model, loaded_cfg, state = load_for_sampling(path, "cpu")
    assert state["kind"] == "pretrain" and loaded_cfg.network.model_channels == 8
    cfg2 = tiny(tmp_path, method="ect", iterations=5, pretrain={"checkpoint": str(path)})
    cfg2.eval.every = 5
    res = train(cfg2, Collect())
    assert not (tmp_path / "run" / "pretrain.pt").exists()  # used the shared checkpoint
    assert res.iterations == 5


def test_nan_loss_stops_with_clear_error(tmp_path):
    cfg = tiny(tmp_path, method="ect", iterations=30, optim={"batch_size": 32, "lr": 1e30, "name": "adam"})
    cfg.pretrain.iterations = 0
    cfg.eval.at_start = False
    with pytest.raises(DivergenceError, match="loss became"):
        train(cfg, Collect())


@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        {"method": "edm"},
        {"method": "ict", "pretrain": {"iterations": 0}},
        {"method": "sct", "sct": {"ref_batch": "all", "phases": 2}, "sampler": {"steps": [1, 2]}},
        {"method": "sct", "guidance": {"strength": 1.5, "bad_fraction": 0.5}},
        {"method": "sct", "guidance": {"strength": 1.5, "bad_fraction": 0.3, "snapshot_fractions": [0.5]}},
        {"method": "sct", "data": {"conditional": True}, "guidance": {"mode": "classic", "strength": 1.5}},
    ],
    ids=["edm", "ict", "sct-phased-all", "sct-autoguidance", "sct-autoguidance-unlisted-fraction",
         "sct-conditional-classic"],
)
def test_methods_train(tmp_path, over):
    rep = Collect()
    res = train(tiny(tmp_path, **over), rep)
    assert res.metrics["fid_1step"] > 0
    if "guidance" in over:
        assert res.metrics["guided"] == 1.0  # the final evaluation used guidance


@pytest.mark.slow
def test_cli_runs_and_bad_config_exits_2(tmp_path):
    cfg = {**TINY, "method": "ect", "iterations": 5, "out_dir": str(tmp_path / "cli")}
    cfg["eval"] = {**TINY["eval"], "every": 5}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "trainer", "--config", str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert any("fid_1step" in json.loads(line) for line in lines)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "sct": {"ref_batch": -3}}))
    out = subprocess.run([sys.executable, "-m", "trainer", "--config", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "sct.ref_batch" in err[0] and "bad.yaml" in err[0]


def test_phased_model_tunes_from_a_one_phase_pretrain(tmp_path):
    """The sweep shares one pretrain across `sct.phases` values: phase edges are not in the weights."""
    path = pretrain(tiny(tmp_path, method="ect", iterations=0), tmp_path / "shared.pt")
    cfg = tiny(tmp_path, method="sct", iterations=5, sct={"phases": 4}, pretrain={"checkpoint": str(path)})
    cfg.eval.every = 5
    cfg.eval.at_start = False
    res = train(cfg, Collect())
    assert res.metrics["fid_1step"] > 0
    state = torch.load(res.checkpoint_dir / "state.pt", weights_only=True)
    assert "phase_edges" not in state["model"]


def _null_row_grad(tmp_path: Path, method: str, **guidance) -> torch.Tensor:
    """The gradient of the null label's embedding row after one real training step of a conditional model."""
    from trainer.step import TrainState, make_optimizer, train_step
    from trainer.train import _load_data, build_model

    cfg = tiny(tmp_path, method=method, data={"conditional": True}, guidance=guidance)
    torch.manual_seed(0)
    data = _load_data(cfg, torch.device("cpu"))
    model = build_model(cfg, data)
    state = TrainState(model, make_optimizer(cfg, model), None)  # type: ignore[arg-type]  (no EMA needed)
    train_step(cfg, state, data, 0, device=torch.device("cpu"), replay=True)
    return model.net.map_label.weight.grad[data.num_classes]


@pytest.mark.parametrize("method", ["edm", "sct"])
def test_classic_guidance_trains_the_null_label(tmp_path, method):
    """Classic CFG mixes with the null label, so training drops labels to it (rate 0.1 by default): its
    embedding gets gradient. Auto guidance draws no label dropout unless asked, and leaves it untouched."""
    assert _null_row_grad(tmp_path, method, mode="classic").abs().sum() > 0
    assert _null_row_grad(tmp_path, method, mode="auto", label_dropout=0.2).abs().sum() > 0
    assert _null_row_grad(tmp_path, method, mode="auto").abs().sum() == 0


def test_classic_guidance_is_refused_without_label_dropout(tmp_path):
    from trainer.errors import ConfigError
    from trainer.train import check_classic_guidance

    with pytest.raises(ValueError, match="guidance.label_dropout > 0"):
        tiny(tmp_path, data={"conditional": True}, guidance={"mode": "classic", "label_dropout": 0.0})
    with pytest.raises(ValueError, match="classic needs data.conditional"):
        tiny(tmp_path, guidance={"mode": "classic"})
    with pytest.raises(ConfigError, match="trained without it"):
        check_classic_guidance(Path("ckpt"), {"label_dropout": 0.0})
    with pytest.raises(ConfigError, match="trained without it"):
        check_classic_guidance(Path("ckpt"), {})  # a checkpoint from before label dropout existed
    check_classic_guidance(Path("ckpt"), {"label_dropout": 0.1})


@pytest.mark.slow
def test_classic_checkpoint_records_label_dropout_and_samples(tmp_path):
    """A classic-CFG run records the label-dropout rate it trained with; `sct-sweep sample` then guides with
    the null label, and refuses an auto-guidance checkpoint of the same model switched to classic."""
    from sct_sweeps.sampling import sample_grid
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.errors import ConfigError

    cfg = tiny(tmp_path, method="sct", iterations=10, data={"conditional": True},
               guidance={"mode": "classic", "strength": 1.5})
    res = train(cfg, Collect())
    state = load_checkpoint(res.checkpoint_dir / "state.pt")
    assert state["label_dropout"] == pytest.approx(0.1)
    grid = dict(steps=1, eta=None, strength=1.5, n=16, seed=0, device="cpu")
    assert sample_grid(res.checkpoint_dir, **grid, out=tmp_path / "g.png").is_file()
    state["label_dropout"] = 0.0  # as an auto-guidance run leaves it
    save_checkpoint(tmp_path / "old" / "state.pt", state)
    with pytest.raises(ConfigError, match="trained without it"):
        sample_grid(tmp_path / "old", **grid, out=tmp_path / "h.png")


def test_checkpoint_pruning_keeps_the_newest_two_and_drops_stale_newer_ones(tmp_path):
    """A retried attempt resumed from it10 may find it900/it950 left by the attempt that failed: sorted with
    them, the checkpoint just written (it15) would be the one dropped. Newer stale ones go instead."""
    from trainer.train import prune_checkpoints

    root = tmp_path / "checkpoints"
    for it in (5, 10, 15, 900, 950):
        (root / f"it{it:07d}").mkdir(parents=True)
        (root / f"it{it:07d}" / "state.pt").write_bytes(b"x")
    prune_checkpoints(root, 15)
    assert sorted(p.name for p in root.iterdir()) == ["it0000010", "it0000015"]



@pytest.mark.slow
def test_every_checkpoint_reaches_the_reporter(tmp_path):
    """`checkpoint_every` checkpoints are reported (with their directory) like evaluation ones, so a sweep's
    trial killed between evaluations resumes from the latest of them, not from the last evaluation."""
    cfg = tiny(tmp_path, method="ect", iterations=20, checkpoint_every=5)
    cfg.eval.every, cfg.eval.at_start = 20, False
    rep = Collect()
    train(cfg, rep)
    reported = [(s, c) for s, _, c in rep.rows if c is not None]
    assert [s for s, _ in reported] == [5, 10, 15, 20]
    assert all(c.name == f"it{s:07d}" for s, c in reported)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["it0000015", "it0000020"]


def test_eval_only_settings_are_declared_and_leave_training_alone(tmp_path):
    """trainer/config.py's EVAL_ONLY names real settings; changing them leaves the training fingerprint
    and — trained for real — the weights, EMA and snapshots bit for bit; a training setting changes both."""
    from trainer.checkpoint import load_checkpoint
    from trainer.config import EVAL_ONLY, PLACEMENT, is_eval_only, leaf_field
    from trainer.fingerprint import training_fingerprint

    assert all(leaf_field(p) is None for p in (*EVAL_ONLY, *PLACEMENT))
    assert is_eval_only("sampler.eta") and not is_eval_only("optim.lr") and not is_eval_only("guidance.mode")
    base = tiny(tmp_path / "a", method="sct", iterations=6, guidance={"strength": 1.0})
    base.eval.every, base.eval.at_start, base.pretrain.iterations = 6, False, 0
    evaluated = base.model_copy(deep=True)
    evaluated.out_dir = tmp_path / "b"
    evaluated.sampler.eta, evaluated.sampler.steps, evaluated.guidance.strength = 0.3, [1, 2, 4], 1.5
    evaluated.guidance.bad_fraction, evaluated.eval.fid_samples = 0.25, 32
    retrained = base.model_copy(deep=True)
    retrained.out_dir, retrained.optim.lr = tmp_path / "c", 2e-3
    assert training_fingerprint(evaluated) == training_fingerprint(base) != training_fingerprint(retrained)
    states = []
    for cfg in (base, evaluated, retrained):
        res = train(cfg, Collect())
        states.append(load_checkpoint(res.checkpoint_dir / "state.pt"))
    a, b, c = states
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert not all(torch.equal(a[key][k], c[key][k]) for k in a[key])
    assert a["snapshots"].keys() == b["snapshots"].keys()
    snaps_a, snaps_b = a["snapshots"], b["snapshots"]
    assert all(torch.equal(snaps_a[f][k], snaps_b[f][k]) for f in snaps_a for k in snaps_a[f])


def test_evaluated_variants_score_the_same_weights_with_the_same_noise(tmp_path):
    """eval.variants: one training scores every variant at every evaluation point, and each variant's FIDs
    equal — exactly — those of a training run with that variant's settings (the same weights, the same
    sampler noise); the training itself is the same whatever the variants; a training setting is refused."""
    from trainer.config import split_variant_metric, variant_metric

    variants = [{"sampler.eta": 0.0}, {"sampler.eta": 0.5, "guidance.strength": 1.5, "guidance.bad_fraction": 0.4}]
    common = {"method": "sct", "iterations": 6, "sampler": {"steps": [1, 4], "edge_skip_mode": "ddim_skip"},
              "pretrain": {"iterations": 0}, "guidance": {"snapshot_fractions": []}}

    def cfg(name: str, **over):
        c = tiny(tmp_path / name, **{**common, **over})
        c.eval.every, c.eval.at_start, c.eval.online = 3, False, False
        return c

    shared = Collect()
    res = train(cfg("shared", eval={**TINY["eval"], "variants": variants}), shared)
    for k, variant in enumerate(variants):
        alone = Collect()
        res_k = train(cfg(f"alone{k}", **{"sampler": {**common["sampler"], "eta": variant["sampler.eta"]},
                                          "guidance": {"snapshot_fractions": [],
                                                       "strength": variant.get("guidance.strength", 1.0),
                                                       "bad_fraction": variant.get("guidance.bad_fraction", 0.5)}}),
                      alone)
        for key in ("fid_1step", "fid_4step", "guided"):
            assert shared.series(variant_metric(k, key)) == alone.series(key), (k, key)
        a = torch.load(res.checkpoint_dir / "state.pt", weights_only=True)
        b = torch.load(res_k.checkpoint_dir / "state.pt", weights_only=True)
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert shared.series(variant_metric(1, "guided")) == [(3, 1.0), (6, 1.0)]  # the snapshot at 0.4 is kept
    assert shared.series(variant_metric(0, "fid_4step")) != shared.series(variant_metric(1, "fid_4step"))
    assert split_variant_metric("v12/fid_2step") == (12, "fid_2step") and split_variant_metric("fid_1step")[0] is None
    with pytest.raises(ValueError, match="optim.lr is not an evaluation-only setting"):
        cfg("bad", eval={**TINY["eval"], "variants": [{"optim.lr": 1e-3}]})
