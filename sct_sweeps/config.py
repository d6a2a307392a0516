"""SweepSpec: the sweep YAML as pydantic data, validated down to every value of every search axis.

A sweep is a base TrainConfig (the defaults of every trial) plus a search space keyed by dotted
TrainConfig paths (``sct.ref_batch``, ``network.model_channels``, ...). Every axis value is checked
by building the TrainConfig it would produce, so an error names the exact spot, e.g.
``search.sct.ref_batch.grid[2]: must be a positive integer or 'all'``. Relative paths are made
absolute against the current directory here, once: Ray moves a trial's working directory.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sct_sweeps.errors import SpecError
from sct_sweeps.variants import training_axes
from trainer.config import MAX_ITERATIONS, TrainConfig, format_validation_error, is_eval_only, leaf_field, override
from trainer.errors import ConfigError, TrainerError
from trainer.yaml_io import read_yaml

AXIS_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
PATH_FIELDS = ("data.root", "pretrain.checkpoint", "eval.inception_weights", "out_dir")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_INCEPTION_DATASETS = ("cifar10", "imagenet64")


def check_name(name: str, where: str = "name") -> str:
    """A sweep name safe for paths and MLflow: letters, digits, `_`, `.`, `-`; no leading dot."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise SpecError(f"{where}: {name!r} is not a valid sweep name; use letters, digits, '_', '.', '-'")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `.inf` / `.nan` refused in every float


class Axis(_Strict):
    """One search axis: exactly one of grid / choice (lists) or uniform / loguniform / randint ([lo, hi])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # lo inclusive, hi exclusive (as Ray's tune.randint)

    @model_validator(mode="after")
    def _one_kind(self) -> Axis:
        given = [k for k in AXIS_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(AXIS_KINDS)} (got {len(given)})")
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind}: must list at least one value")
        if kind in ("grid", "choice"):
            for i, x in enumerate(getattr(self, kind)):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{kind}[{i}]: {x} is not a finite number")
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: needs lo < hi, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: needs lo > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        """grid, choice, uniform, loguniform or randint."""
        return next(k for k in AXIS_KINDS if getattr(self, k) is not None)

    def probe_values(self) -> list[tuple[str, Any]]:
        """(location, value) pairs that cover the axis: every listed value, or both ends of a range."""
        kind = self.kind
        v = getattr(self, kind)
        if kind in ("grid", "choice"):
            return [(f"{kind}[{i}]", x) for i, x in enumerate(v)]
        hi = v[1] - 1 if kind == "randint" else v[1]  # randint's upper end is exclusive
        return [(f"{kind}[0]", v[0]), (f"{kind}[1]", hi)]


class SchedulerSpec(_Strict):
    """Trial scheduler: `none` (every trial runs its full budget) or ASHA early stopping."""

    type: Literal["none", "asha"] = "none"
    time_attr: str = "iteration"  # any monotone reported key: iteration, images_seen, flops
    grace_period: int = Field(100, gt=0, le=MAX_ITERATIONS)  # in time_attr units
    reduction_factor: float = Field(2.0, gt=1.0)
    max_t: int | None = Field(None, gt=0, le=MAX_ITERATIONS)  # None = the largest `iterations` of the sweep


class Resources(_Strict):
    """Resources of one trial (and of one pretraining task).

    With `workers: N > 1` a trial is N data-parallel processes (Ray Train): `cpu` and `gpu` are then per
    worker, and `placement` says whether its workers share a node where they can (pack) or spread out.
    """

    cpu: float = Field(1.0, gt=0.0)
    gpu: float | Literal["auto"] = "auto"  # auto = 1 where the cluster has GPUs, else 0
    workers: int = Field(1, ge=1, le=4096)  # processes per trial; the global batch is split over them
    placement: Literal["pack", "spread"] = "pack"  # of one trial's workers over the nodes (Ray Train)

    @field_validator("gpu")
    @classmethod
    def _non_negative(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        return v


class Estimate(_Strict):
    """Measured speed the plan's cost estimate scales from (iterations/s at `at_channels` width)."""

    it_per_s: float = Field(gt=0.0)  # tuning iterations per second per trial
    pretrain_it_per_s: float | None = Field(None, gt=0.0)  # None = same as it_per_s
    at_channels: int = Field(32, gt=0, le=16384)  # network.model_channels the speed was measured at
    width_exponent: float = Field(1.5, ge=0.0)  # cost ~ (channels / at_channels) ** width_exponent
    measured_on: str = ""  # free text: the machine the numbers come from


MAX_TRIALS_ENV = "SCT_MAX_TRIALS"
DEFAULT_MAX_TRIALS = 10_000


def max_trials() -> int:
    """The most trials one sweep may have: $SCT_MAX_TRIALS, else 10,000."""
    raw = os.environ.get(MAX_TRIALS_ENV, "")
    if not raw:
        return DEFAULT_MAX_TRIALS
    if not raw.isdigit():
        raise SpecError(f"{MAX_TRIALS_ENV}: {raw!r} is not a number of trials")
    return int(raw)


def check_trial_count(algorithm: str, search: dict[str, Axis], num_samples: int) -> None:
    """Refuse more than `max_trials()` trials, counted from the axes' lengths (the grid is never expanded)."""
    grid = [len(a.grid) for a in search.values() if a.grid is not None] if algorithm == "grid" else []
    n, limit = math.prod(grid) * num_samples, max_trials()
    if n > limit:
        raise ValueError(
            f"search: {n:,} trials ({' x '.join(map(str, grid + [num_samples]))}) is more than the "
            f"{limit:,} a sweep may have (raise {MAX_TRIALS_ENV} if you mean it)"
        )


class SweepSpec(_Strict):
    """A whole sweep: base TrainConfig, search space, search algorithm, scheduler, resources, stores."""

    name: str
    description: str = ""
    base: TrainConfig = Field(default_factory=TrainConfig)
    search: dict[str, Axis]
    algorithm: Literal["grid", "optuna"] = "grid"
    metric: str = "fid_1step"  # what Optuna and ASHA optimise and `status` ranks by
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, gt=0, le=10**6)  # grid: repeats of the whole grid; optuna: number of trials
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: int | None = Field(None, gt=0, le=10**6)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(1, ge=-1, le=10**6)  # retries of a failed trial from its last checkpoint; -1 = forever
    storage: Path | None = None  # Ray results root (absolute); None = <project>/ray_results
    tracking_uri: str | None = None  # None = sqlite:////<project>/mlruns.db
    mlflow_flush_s: float = Field(5.0, ge=0)  # a trial's metrics reach MLflow this often (0 = every report)
    artifact_root: Path | None = None  # local stores only; None = <project>/mlartifacts
    pretrain_cache: Path | None = None  # None = <project>/.cache/pretrain; shared storage on a cluster
    estimate: Estimate | None = None
    # Grid axes on evaluation-only settings are evaluated on every training, not trained per value
    # (sct_sweeps/variants.py); false trains each value separately.
    share_training: bool = True

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v in (".", ".."):
            raise ValueError("use letters, digits, '_', '.', '-' (no leading dot, at most 100 characters)")
        return v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if not self.search:
            raise ValueError("search: empty search space; add at least one axis (e.g. seed: {grid: [0, 1]})")
        check_trial_count(self.algorithm, training_axes(self), self.num_samples)
        _check_workers(self)
        for path, axis in self.search.items():
            _check_axis(self, path, axis)
        steps = None if "sampler.steps" in self.search else self.base.sampler.steps
        metric_re = r"fid_(\d+)step(_online)?"
        m = re.fullmatch(metric_re, self.metric)
        if self.metric != "loss" and (m is None or (steps is not None and int(m.group(1)) not in steps)):
            known = ", ".join(f"fid_{k}step" for k in (steps or [1, 2]))
            raise ValueError(f"metric: {self.metric!r} is not reported; use {known} (or _online), or loss")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > self.max_iterations():
            raise ValueError(
                f"scheduler.grace_period: {self.scheduler.grace_period} exceeds the longest trial "
                f"({self.max_iterations()} iterations)"
            )
        return self

    def max_iterations(self) -> int:
        """The largest tuning budget any trial can get."""
        axis = self.search.get("iterations")
        if axis is None:
            return self.base.iterations
        return int(max(v for _, v in axis.probe_values()))


def _check_workers(spec: SweepSpec) -> None:
    """With several workers per trial, every global batch must split evenly over them, and each GPU worker
    needs a GPU of its own (NCCL refuses two ranks on one device)."""
    n, gpu = spec.resources.workers, spec.resources.gpu
    if n > 1 and isinstance(gpu, float) and gpu != int(gpu):
        raise ValueError(f"resources.gpu: {gpu:g} GPU per worker; workers of one trial need whole GPUs (0, 1, ...)")
    axis = spec.search.get("optim.batch_size")
    if axis is None:
        sizes = [("base.optim.batch_size", spec.base.optim.batch_size)]
    else:
        sizes = [(f"search.optim.batch_size.{loc}", v) for loc, v in axis.probe_values()]
    for where, size in sizes:
        if isinstance(size, int) and size % n:
            raise ValueError(f"{where}: the global batch {size} does not split evenly over resources.workers = {n}")


def _first_error(err: ValidationError, path: str) -> str:
    """The pydantic message for `path`, or the whole first error when another field broke."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if loc == path or not loc:
        return msg
    return f"makes {format_validation_error(err)}"


def _check_axis(spec: SweepSpec, path: str, axis: Axis) -> None:
    where = f"search.{path}"
    why = leaf_field(path) or ("the sweep sets it from the evaluation-only axes; sweep those instead"
                               if path == "eval.variants" else None)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    if spec.algorithm == "optuna":
        if axis.kind == "grid" and not (spec.share_training and is_eval_only(path)):
            raise ValueError(f"{where}.grid: Optuna cannot search a grid; use choice (or algorithm: grid); a grid "
                             "is allowed on an evaluation-only setting (every trial evaluates it)")
        if axis.kind == "choice" and any(not isinstance(v, (str, int, float, bool)) for v in axis.choice):
            raise ValueError(f"{where}.choice: Optuna choices must be numbers, strings or booleans")
    if axis.kind in ("uniform", "loguniform") and path in ("iterations", "seed"):
        raise ValueError(f"{where}.{axis.kind}: {path} takes integers; use randint, grid or choice")
    for loc, value in axis.probe_values():
        try:
            cfg = override(spec.base, {path: value})
        except ValidationError as e:
            raise ValueError(f"{where}.{loc}: {_first_error(e, path)}") from None
        if path in PATH_FIELDS or path == "data.name":
            check_files(cfg, f"{where}.{loc}")


def absolute_paths(cfg: TrainConfig, relative_to: Path | None = None) -> TrainConfig:
    """A copy whose path settings are absolute (relative ones taken against `relative_to` or the cwd)."""
    root = (relative_to or Path.cwd()).resolve()
    flat = {}
    for path in PATH_FIELDS:
        section, _, leaf = path.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, leaf)
        if value is not None and not Path(value).is_absolute():
            flat[path] = (root / value).resolve()
    return override(cfg, flat) if flat else cfg


def data_root(cfg: TrainConfig) -> Path | None:
    """The directory the trainer will read `cfg.data` from (None for the bundled digits)."""
    from trainer.data import resolve_root  # the trainer owns the default locations and their env variables

    root = resolve_root(cfg.data)
    return Path(root).resolve() if root is not None and cfg.data.name != "folder" else root


def check_files(cfg: TrainConfig, where: str = "base") -> None:
    """Refuse missing data, pretrain checkpoint and Inception weights before anything runs.

    `where` prefixes the field path: ``base`` gives ``base.data.root: ...``, an axis location
    like ``search.data.root.grid[1]`` gives ``search.data.root.grid[1]: data.root: ...``.
    """
    at = f"{where}." if where == "base" else f"{where}: "
    if cfg.data.name == "folder" and cfg.data.root is None:
        raise SpecError(f"{at}data.root: the folder dataset needs a directory of <class>/*.png")
    root = data_root(cfg)
    if root is not None and not root.is_dir():
        raise SpecError(f"{at}data.root: {root}: directory not found for dataset {cfg.data.name}")
    ckpt = cfg.pretrain.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise SpecError(f"{at}pretrain.checkpoint: {ckpt}: file not found")
    if ckpt is not None and Path(ckpt).suffix == ".pkl":  # an EDM/EDM2 pickle: its network must agree now
        from trainer.edm_pickle import pretrained_config

        try:
            pretrained_config(cfg)
        except TrainerError as e:
            raise SpecError(f"{at}{e}") from None
    weights = cfg.eval.inception_weights
    if cfg.data.name in _INCEPTION_DATASETS and weights is None:
        raise SpecError(
            f"{at}eval.inception_weights: {cfg.data.name} FID needs the Inception-v3 weights file "
            "pt_inception-2015-12-05-6726825d.pth; set its local path"
        )
    if weights is not None and not Path(weights).is_file():
        raise SpecError(f"{at}eval.inception_weights: {weights}: file not found")


def parse_spec(raw: Any, source: str = "spec", default_name: str | None = None) -> SweepSpec:
    """Validate a loaded YAML mapping; raise SpecError with one line naming the field path."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: top level must be a mapping of settings (name, base, search, ...)")
    raw = dict(raw)
    if "name" not in raw and default_name is not None:
        raw["name"] = default_name
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: {format_validation_error(e)}") from None
    spec = spec.model_copy(update={"base": absolute_paths(spec.base)})
    try:
        check_files(spec.base)
        check_networks(spec)
    except (SpecError, ConfigError) as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


def check_networks(spec: SweepSpec) -> None:
    """Refuse a network (the base's or one an axis value makes) whose training cannot fit in memory here."""
    from trainer.footprint import check_fits, memory_bytes

    memory = memory_bytes()
    check_fits(spec.base, "base.network", memory)
    for path, axis in spec.search.items():
        if path.startswith(("network.", "data.")):
            for loc, value in axis.probe_values():
                check_fits(override(spec.base, {path: value}), f"search.{path}.{loc}: network", memory)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` (a spec as read from YAML) with command-line settings `KEY=VALUE` put in, each VALUE read as YAML:
    `base.iterations=50`, `max_concurrent_trials=1`, `search.seed.grid=[0,1]` (under `search`, the axis is
    everything between `search.` and the last part, its kind: `search.sampler.eta.grid=[0,0.5]`)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise SpecError(f"override {item!r}: expected KEY=VALUE, e.g. base.iterations=50")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise SpecError(f"override {key}: value {text!r} is not valid YAML") from None
        parts = key.split(".")
        if parts[0] == "search" and len(parts) >= 3:
            parts = ["search", ".".join(parts[1:-1]), parts[-1]]
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {key}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_spec(path: Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and validate a sweep YAML file (`trainer.yaml_io`: safe, bounded, no duplicate keys) with any
    command-line `overrides` (`apply_overrides`), validated together; the name defaults to the file stem."""
    path = Path(path)
    try:
        raw = read_yaml(path, "sweep file")
    except ConfigError as e:
        raise SpecError(str(e)) from None
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    return parse_spec(raw, str(path), default_name=stem)


def spec_yaml(spec: SweepSpec) -> str:
    """The validated spec as YAML (what is logged to MLflow and stored beside the results)."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True), sort_keys=False)
