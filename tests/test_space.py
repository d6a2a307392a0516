"""SweepSpec -> Ray Tune param_space, trial configs, plan and the pretraining cache key."""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer

from sct_sweeps.config import parse_spec
from sct_sweeps.pretrain import enumerate_configs
from sct_sweeps.space import grid_points, param_space, plan, run_name, scheduler, search_alg, trial_config
from trainer.config import TrainConfig
from trainer.fingerprint import is_pretrain_field, needs_pretrain, pretrain_fingerprint

SPEC = {
    "name": "space",
    "base": {"iterations": 100, "network": {"model_channels": 16}, "pretrain": {"iterations": 50}},
    "search": {
        "network.model_channels": {"grid": [16, 32]},
        "iterations": {"grid": [100, 200, 400]},
        "sct.ref_batch": {"choice": [1, 64, "all"]},
        "sampler.eta": {"uniform": [0.0, 0.5]},
        "optim.lr": {"loguniform": [1e-5, 1e-3]},
        "schedule.double_every": {"randint": [10, 50]},
    },
    "num_samples": 2,
}


def test_param_space_domains() -> None:
    space = param_space(parse_spec(SPEC))
    assert space["network.model_channels"] == tune.grid_search([32, 16])  # largest first
    assert isinstance(space["sct.ref_batch"], Categorical) and space["sct.ref_batch"].categories == [1, 64, "all"]
    assert isinstance(space["sampler.eta"], Float) and (space["sampler.eta"].lower, space["sampler.eta"].upper) == (
        0.0,
        0.5,
    )
    assert isinstance(space["optim.lr"].sampler, Float._LogUniform)
    assert isinstance(space["schedule.double_every"], Integer)


def test_grid_sweep_runs_its_longest_trials_first() -> None:
    from ray.tune.search.variant_generator import generate_variants

    raw = {"name": "order", "search": {
        "seed": {"grid": [0, 1]},
        "network.model_channels": {"grid": [16, 8, 32]},
        "iterations": {"grid": [100, 400, 200]},
        "sct.ref_batch": {"grid": [64, 32]},  # not a cost: the spec's order stays
    }}  # fmt: skip
    space = param_space(parse_spec(raw))
    assert space["sct.ref_batch"] == tune.grid_search([64, 32]) and space["seed"] == tune.grid_search([0, 1])
    order = [cfg for _, cfg in generate_variants(space)]  # the order Ray Tune's grid walks
    assert len(order) == 36

    def cost(c: dict) -> int:
        return c["iterations"] * c["network.model_channels"]

    assert cost(order[0]) == 400 * 32  # the most expensive trial starts first
    assert [cost(c) for c in order[-2:]] == [200 * 8, 100 * 8]  # the sweep ends on its two cheapest


def test_trial_config_applies_dotted_overrides() -> None:
    spec = parse_spec(SPEC)
    flat = {"network.model_channels": 32, "iterations": 200, "sct.ref_batch": "all", "sampler.eta": 0.25,
            "optim.lr": 1e-4, "schedule.double_every": 20, "unrelated": 1}  # fmt: skip
    cfg = trial_config(spec, flat)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.network.model_channels, cfg.iterations, cfg.sct.ref_batch) == (32, 200, "all")
    assert cfg.sampler.eta == 0.25 and cfg.schedule.double_every == 20
    assert cfg.pretrain.iterations == 50  # base kept
    assert spec.base.network.model_channels == 16  # base not mutated
    assert cfg.out_dir.is_absolute()
    assert run_name(cfg, {"network.model_channels": 32, "iterations": 200, "sct.ref_batch": "all"}) == (
        "sct-w32-it200-s0-refall"
    )


def test_trial_count_and_plan() -> None:
    spec = parse_spec(SPEC)
    assert len(grid_points(spec)) == 6
    p = plan(spec, total_cpus=4)
    assert p.trials == 12 and p.concurrency == 4
    assert p.tuning_iterations == 12 * (100 + 200 + 400) / 3
    assert p.pretrains == 2 and p.pretrains_complete  # one phase one per width
    assert p.est_compute_s is None and any("cost estimate: none" in line for line in p.lines())
    est = parse_spec({**SPEC, "estimate": {"it_per_s": 10.0, "at_channels": 16, "width_exponent": 2.0}})
    q = plan(est, total_cpus=2)
    # widths 16 and 32 cost 1x and 4x: mean 2.5; 12 trials x 233.3 iterations x 2.5 / 10 it/s
    assert abs(q.est_compute_s - (12 * 700 / 3 * 2.5 / 10 + 50 * (1 + 4) / 10)) < 1e-6
    assert q.est_wall_s < q.est_compute_s
    opt = parse_spec({**SPEC, "algorithm": "optuna", "num_samples": 5,
                      "search": {"sampler.eta": {"uniform": [0.0, 0.5]}}})  # fmt: skip
    assert plan(opt).trials == 5


def test_searcher_and_scheduler() -> None:
    assert search_alg(parse_spec(SPEC)) is None
    assert scheduler(parse_spec(SPEC)) is None
    opt = parse_spec({**SPEC, "algorithm": "optuna", "search": {"sampler.eta": {"uniform": [0.0, 0.5]}}})
    assert type(search_alg(opt)).__name__ == "OptunaSearch"
    asha = parse_spec({**SPEC, "scheduler": {"type": "asha", "grace_period": 50}})
    s = scheduler(asha)
    assert type(s).__name__ == "AsyncHyperBandScheduler" and s._time_attr == "iteration"
    assert s.metric == "fid_1step" and s._max_t == 400  # the longest trial of the sweep


def test_pretrain_key_covers_phase_one_only(tmp_path: Path) -> None:
    base = TrainConfig(iterations=100, pretrain={"iterations": 50})
    key = pretrain_fingerprint(base)
    tuning_only = [{"iterations": 999}, {"sct": {"ref_batch": 7}}, {"sampler": {"eta": 0.3}},
                   {"optim": {"lr": 3e-3}}, {"guidance": {"strength": 2.0}}, {"out_dir": str(tmp_path)},
                   {"pretrain": {"iterations": 50, "checkpoint": str(tmp_path / "x.pt")}}]  # fmt: skip
    for change in tuning_only:
        assert pretrain_fingerprint(base.model_copy(update={}).model_validate({**base.model_dump(), **change})) == key
    for change in [{"seed": 1}, {"network": {"model_channels": 48}}, {"pretrain": {"iterations": 60}},
                   {"data": {"resolution": 16}}, {"precision": "bf16"}]:  # fmt: skip
        assert pretrain_fingerprint(TrainConfig.model_validate({**base.model_dump(), **change})) != key, change
    # A conditional model's phase one drops labels at the rate guidance.mode / label_dropout give.
    cond = TrainConfig.model_validate({**base.model_dump(), "data": {"conditional": True}})
    classic = TrainConfig.model_validate({**cond.model_dump(), "guidance": {"mode": "classic"}})
    same_rate = TrainConfig.model_validate({**cond.model_dump(), "guidance": {"label_dropout": 0.1}})
    assert pretrain_fingerprint(classic) != pretrain_fingerprint(cond)
    assert pretrain_fingerprint(classic) == pretrain_fingerprint(same_rate)  # the rate, not how it was set
    unconditional = TrainConfig.model_validate({**base.model_dump(), "guidance": {"label_dropout": 0.2}})
    assert pretrain_fingerprint(unconditional) == key  # no labels, nothing dropped
    assert is_pretrain_field("guidance.label_dropout") and is_pretrain_field("guidance.mode")
    assert is_pretrain_field("network.model_channels") and is_pretrain_field("seed")
    assert not is_pretrain_field("pretrain.checkpoint") and not is_pretrain_field("sct.ref_batch")
    assert needs_pretrain(base) and not needs_pretrain(base.model_copy(update={"method": "ict"}))


def test_enumerate_configs() -> None:
    spec = parse_spec({**SPEC, "search": {**SPEC["search"], "seed": {"grid": [0, 1, 2]}}})
    configs, complete = enumerate_configs(spec)
    assert complete and len(configs) == 6  # 2 widths x 3 seeds; iterations etc. share phase one
    cont = parse_spec({**SPEC, "search": {"pretrain.lr": {"loguniform": [1e-4, 1e-3]}}})
    configs, complete = enumerate_configs(cont)
    assert not complete


def test_evaluation_only_grid_axes_are_variants_not_trials() -> None:
    """A grid on an evaluation-only setting leaves Ray's space and becomes every trial's eval.variants;
    as a distribution, or with share_training false, it stays a trial axis."""
    raw = {"name": "ev", "search": {"seed": {"grid": [0, 1]}, "sampler.eta": {"grid": [0.0, 0.5]},
                                    "guidance.strength": {"grid": [1.0, 2.0]}}}
    spec = parse_spec(raw)
    assert set(param_space(spec)) == {"seed"}
    cfg = trial_config(spec, {"seed": 1})
    assert cfg.seed == 1 and cfg.eval.variants == [
        {"sampler.eta": 0.0, "guidance.strength": 1.0}, {"sampler.eta": 0.0, "guidance.strength": 2.0},
        {"sampler.eta": 0.5, "guidance.strength": 1.0}, {"sampler.eta": 0.5, "guidance.strength": 2.0}]
    alone = parse_spec({**raw, "share_training": False})
    assert set(param_space(alone)) == {"seed", "sampler.eta", "guidance.strength"}
    sampled = parse_spec({**raw, "search": {"seed": {"grid": [0]}, "sampler.eta": {"uniform": [0.0, 0.5]}}})
    assert set(param_space(sampled)) == {"seed", "sampler.eta"}
    assert trial_config(sampled, {"seed": 0}).eval.variants == []
