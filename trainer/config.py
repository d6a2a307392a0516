"""TrainConfig: every setting of one training run, as plain pydantic data.

Defaults follow docs/algorithms.md (ECT CIFAR-10 code unless noted). Unknown keys are
errors everywhere (``extra="forbid"``), so a typo in a YAML file never silently does nothing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.errors import ConfigError
from trainer.yaml_io import read_yaml

# Upper bounds of counts: beyond them a value is a typo, not a plan (and some would overflow torch).
MAX_ITERATIONS = 10**9
MAX_BATCH = 2**20
MAX_SEED = 2**32 - 1  # numpy and torch both take seeds in 0 .. 2**32-1


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in any float field (also inside lists, tuples, unions) is refused
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Which images to train on. Tensors are in [-1, 1]; labels are 0..num_classes-1."""

    name: Literal["digits", "fashion_mnist", "cifar10", "imagenet64", "folder"] = "digits"
    root: Path | None = None  # data directory; None = the dataset's default location
    resolution: int | None = Field(None, gt=0, le=4096)  # digits: 8 (native) or 16; others: native size
    conditional: bool = False  # train a class-conditional model (labels go to the network)
    on_device: bool = True  # keep the whole dataset as one tensor on the training device


Arch = Literal["compact", "ddpmpp", "ncsnpp", "adm", "edm2"]


class NetworkConfig(_Strict):
    """The denoiser network: `arch` picks it, the rest are its size knobs.

    compact = this project's small DDPM++-style U-Net (the default); ddpmpp / ncsnpp = EDM's
    `SongUNet` in those presets; adm = EDM's `DhariwalUNet`; edm2 = EDM2's magnitude-preserving
    U-Net. The original-architecture nets take published checkpoints (`trainer.edm_pickle`).
    """

    arch: Arch = "compact"
    model_channels: int = Field(32, gt=0, le=16384)  # base width
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2])
    num_blocks: int = Field(2, gt=0, le=256)  # residual blocks per resolution
    attn_resolutions: list[int] = Field(default_factory=list)  # resolutions with self-attention
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    embedding: Literal["positional", "fourier"] | None = None  # None = the arch's (fourier for ncsnpp)
    # EDM SongUNet / DhariwalUNet (arch: ddpmpp, ncsnpp, adm); None = the preset's value.
    encoder_type: Literal["standard", "skip", "residual"] | None = None  # standard DDPM++, residual NCSN++
    decoder_type: Literal["standard", "skip"] | None = None  # standard for both presets
    resample_filter: list[int] | None = None  # [1, 1] DDPM++, [1, 3, 3, 1] NCSN++
    augment_dim: int = Field(0, ge=0, le=1024)  # augmentation-label input (9 in EDM's CIFAR-10 nets; fed zeros)
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # class-label dropout inside the original EDM nets
    # EDM2 (arch: edm2): the magnitude-preserving U-Net's knobs (Karras et al. 2024); other networks ignore them,
    # except the two widths, which EDM's nets share (None there: emb 4; noise 1 for DDPM++/ADM, 2 for NCSN++).
    channel_mult_noise: int | None = Field(None, gt=0, le=64)  # noise-emb. width / channels; None = channel_mult[0]
    channel_mult_emb: int | None = Field(None, gt=0, le=64)  # emb. width / model_channels; None = max(channel_mult)
    channels_per_head: int = Field(64, gt=0, le=16384)  # attention head width
    label_balance: float = Field(0.5, ge=0.0, le=1.0)  # embedding mix: noise level (0) vs class (1)
    concat_balance: float = Field(0.5, ge=0.0, le=1.0)  # decoder input mix: encoder skip (0) vs main path (1)
    res_balance: float = Field(0.3, ge=0.0, le=1.0)  # block output mix: main branch (0) vs residual branch (1)
    attn_balance: float = Field(0.3, ge=0.0, le=1.0)  # block output mix: main branch (0) vs self-attention (1)
    clip_act: float | None = Field(256.0, gt=0.0)  # clip block outputs to [-clip_act, clip_act]; None = no clip
    # end EDM2

    @field_validator("channel_mult")
    @classmethod
    def _positive_mults(cls, v: list[int]) -> list[int]:
        if not v or len(v) > 16 or any(not 0 < m <= 64 for m in v):
            raise ValueError("must be a list of 1 to 16 integers in 1..64")
        return v

    @field_validator("resample_filter")
    @classmethod
    def _filter_taps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not 0 < len(v) <= 8 or any(not 0 < t <= 1024 for t in v)):
            raise ValueError("must be a list of 1 to 8 filter taps in 1..1024, e.g. [1, 1] or [1, 3, 3, 1]")
        return v

    @field_validator("attn_resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        if any(not 0 < r <= 4096 for r in v):
            raise ValueError("must list resolutions in 1..4096")
        return v


class PrecondConfig(_Strict):
    """EDM preconditioning (docs/algorithms.md §1)."""

    sigma_data: float = Field(0.5, gt=0.0)
    sigma_min: float = Field(0.002, gt=0.0)  # sampler's lowest noise level
    sigma_max: float = Field(80.0, gt=0.0)  # sampler's highest noise level
    sigma_min_shift: float = Field(0.003, ge=0.0)  # eval-mode boundary shift (ECT CIFAR); 0 = off


class PretrainConfig(_Strict):
    """Phase one: EDM diffusion pretraining (docs/algorithms.md §2). Its checkpoint initialises tuning."""

    iterations: int = Field(2000, ge=0, le=MAX_ITERATIONS)
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    lr: float = Field(1e-3, gt=0.0)
    p_mean: float = -1.2
    p_std: float = Field(1.2, gt=0.0)
    checkpoint: Path | None = None  # use this pretrained checkpoint instead of training one


class ScheduleConfig(_Strict):
    """ECT noise distribution, mapping r(t) and stage curriculum (docs/algorithms.md §3, §4.2)."""

    p_mean: float = -1.1
    p_std: float = Field(2.0, gt=0.0)
    mapping: Literal["sigmoid", "const"] = "sigmoid"
    q: float = Field(2.0, gt=1.0)
    k: float = Field(8.0, ge=0.0)
    b: float = 1.0
    double_every: int | None = Field(None, gt=0, le=MAX_ITERATIONS)  # stage_iters; None = iterations / 8
    smooth: bool = False  # SCT [R]: continuous stage s(i) = i / stage_iters
    clamp_t: bool = False  # clamp t to [sigma_min, sigma_max] (ECT does not)


class IctConfig(_Strict):
    """iCT discretization curriculum (docs/algorithms.md §6)."""

    s0: int = Field(10, gt=0, le=10**6)
    s1: int = Field(1280, gt=0, le=10**6)
    rho: float = Field(7.0, gt=0.0)


class LossConfig(_Strict):
    """Distance and weighting (docs/algorithms.md §3 steps 5-6)."""

    # pseudo_huber: sqrt(L + c^2) - c of the per-sample squared L2 sum L (ECT's default, with c ~ 0 = sqrt(L));
    # l2: L itself.
    distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
    c: float | None = Field(None, ge=0.0)  # None = method default (ECT/SCT 1e-8, iCT 0.00054*sqrt(d))
    weighting: Literal["inv_dt", "snrpk"] = "inv_dt"


class SctConfig(_Strict):
    """SCT variance-reduced target (docs/algorithms.md §4.1) and phased training (§4.3)."""

    ref_batch: int | Literal["all"] = 256  # reference-set size n, own sample included; 1 = ECT
    phases: int = Field(1, gt=0, le=1000)  # 1 = ordinary ECT/SCT; M > 1 = phased (multistep) model
    log_ess: bool = True  # log effective sample size per t bucket

    @field_validator("ref_batch")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_BATCH:
            raise ValueError(f"must be a positive integer or 'all' (at most {MAX_BATCH})")
        return v


class GuidanceConfig(_Strict):
    """SCT's guidance (docs/algorithms.md §4.5): a weaker EMA snapshot guides the model; classic CFG optional."""

    mode: Literal["auto", "classic"] = "auto"  # auto = guide with an earlier EMA snapshot
    strength: float = Field(1.0, ge=0.0)  # w; 1 = no guidance
    bad_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # when the "bad" EMA snapshot is taken
    snapshot_fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Probability that a conditional model's label becomes the null label during EDM pretraining and
    # tuning, so the null class is trained (classic CFG samples with it). None = 0.1 in classic mode,
    # 0 otherwise (auto guidance needs no null label); any value applies to every conditional model.
    label_dropout: float | None = Field(None, ge=0.0, lt=1.0)

    @property
    def snapshot_at(self) -> list[float]:
        """The fractions of training at which the EMA is kept: `snapshot_fractions` and always `bad_fraction`,
        so the configured guidance has its snapshot whatever the list says."""
        return sorted({*self.snapshot_fractions, self.bad_fraction})

    def label_dropout_rate(self, conditional: bool) -> float:
        """The label-dropout probability training uses (0 for an unconditional model)."""
        if not conditional:
            return 0.0
        if self.label_dropout is not None:
            return self.label_dropout
        return 0.1 if self.mode == "classic" else 0.0


class SamplerConfig(_Strict):
    """Samplers (docs/algorithms.md §4.4, §5)."""

    t_mid: float = Field(0.821, gt=0.0)  # 2-step intermediate time (CIFAR-10 value)
    steps: list[int] = Field(default_factory=lambda: [1, 2])  # step counts evaluated
    # N-step (N > 2) sampling; renoise with eta = 1 is the standard stochastic CM sampler, eta = 0 lands
    # deterministically on each edge; ddim_skip with eta = 0 is edge-to-edge, eta > 0 skips past edges.
    eta: float = Field(1.0, ge=0.0, le=1.0)
    edge_skip_mode: Literal["ddim_skip", "renoise"] = "renoise"
    rho: float = Field(7.0, gt=0.0)  # spacing of N-step time lists / phase edges

    @field_validator("steps")
    @classmethod
    def _steps_positive(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= s <= 1000 for s in v):
            raise ValueError("must be a non-empty list of integers >= 1 (at most 1000)")
        return v


class OptimConfig(_Strict):
    """Optimiser of the tuning phase (docs/algorithms.md §3 step 7)."""

    name: Literal["radam", "adam"] = "radam"
    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = Field(128, gt=0, le=MAX_BATCH)
    grad_clip: float | None = Field(None, gt=0.0)


class EmaConfig(_Strict):
    """EMA of the weights (docs/algorithms.md §3, §8)."""

    beta: float = Field(0.9999, gt=0.0, lt=1.0)
    warmup: bool = True  # beta_i = min(beta, (1 + i) / (10 + i)): sizes the EMA to short runs


class EvalConfig(_Strict):
    """FID-vs-iteration evaluation (issue 3)."""

    every: int = Field(100, gt=0, le=MAX_ITERATIONS)  # iterations between evaluations
    fid_samples: int = Field(1000, gt=0, le=10**7)
    batch_size: int = Field(500, gt=0, le=MAX_BATCH)
    online: bool = True  # also score the online (non-EMA) weights
    inception_weights: Path | None = None  # required for cifar10 / imagenet64
    save_grid: bool = True
    at_start: bool = True  # also evaluate before the first tuning step (the curve's starting point)
    # Evaluated variants: at every evaluation point, each dict of evaluation-only settings (dotted paths of
    # EVAL_ONLY below, e.g. {"sampler.eta": 0.2}) is applied to this config and scored on the same weights
    # with the same noise; metrics come back as `v<k>/<metric>` (trainer/evaluate.py). Empty: the config itself.
    variants: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)

    @field_validator("variants")
    @classmethod
    def _eval_only_variants(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for variant in v:
            for path in variant:
                if not is_eval_only(path) or path == "eval.variants":
                    raise ValueError(f"{path} is not an evaluation-only setting; a variant may set only "
                                     f"{', '.join(p for p in EVAL_ONLY if p != 'eval.variants')}")
        return v


class TrainConfig(_Strict):
    """One training run: phase one (pretrain) then phase two (method), then evaluation."""

    method: Literal["edm", "ect", "sct", "ict"] = "sct"
    iterations: int = Field(400, ge=0, le=MAX_ITERATIONS)  # tuning iterations (phase two)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 = true fp32 (TF32 matmuls off on CUDA, as ECT's code); tf32 = TF32 matmuls/convolutions on
    # CUDA (fp32 on the CPU); bf16 = bf16 autocast of the network passes (docs/algorithms.md §3).
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    compile: bool = False
    out_dir: Path = Path("runs/default")
    checkpoint_every: int = Field(100, gt=0, le=MAX_ITERATIONS)  # also written at every evaluation
    log_every: int = Field(10, gt=0, le=MAX_ITERATIONS)  # iterations between loss/cost reports

    data: DataConfig = Field(default_factory=DataConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    precond: PrecondConfig = Field(default_factory=PrecondConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    ict: IctConfig = Field(default_factory=IctConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    sct: SctConfig = Field(default_factory=SctConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.guidance.mode == "classic" and not self.data.conditional:
            raise ValueError("guidance.mode: classic needs data.conditional: true")
        if self.guidance.mode == "classic" and self.guidance.label_dropout_rate(True) == 0.0:
            raise ValueError("guidance.mode: classic needs guidance.label_dropout > 0 (the null label must be trained)")
        return self

    @property
    def eval_boundary(self) -> float:
        """σ_min of the consistency boundary at sampling time: iCT's training boundary (precond.sigma_min),
        else ECT's eval shift (precond.sigma_min_shift; 0 = plain EDM coefficients)."""
        return self.precond.sigma_min if self.method == "ict" else self.precond.sigma_min_shift

    @property
    def snapshot_fractions_kept(self) -> list[float]:
        """Where the EMA is snapshotted for guidance: `guidance.snapshot_at` and every variant's bad_fraction."""
        wanted = {v["guidance.bad_fraction"] for v in self.eval.variants if "guidance.bad_fraction" in v}
        return sorted({*self.guidance.snapshot_at, *map(float, wanted)})

    @property
    def stage_iters(self) -> int:
        """Iterations per ECT stage: `schedule.double_every`, else iterations / 8 (docs/algorithms.md §3)."""
        return self.schedule.double_every or max(1, self.iterations // 8)


# What phase one (EDM pretraining) reads, declared next to the settings: these TrainConfig sections
# and top-level settings, less the leaves that do not change its result (the checkpoint that replaces
# it; how the data is held). trainer/fingerprint.py keys the shared pretraining cache on exactly this.
PHASE_ONE_READS = ("data", "network", "precond", "pretrain", "seed", "precision")
PHASE_ONE_IGNORES = ("pretrain.checkpoint", "data.on_device")
# Leaves of other sections that phase one reads: a conditional model's label dropout (docs/algorithms.md
# §4.5), whose rate follows guidance.mode when unset; the fingerprint holds the rate they give.
PHASE_ONE_LEAVES = ("guidance.label_dropout", "guidance.mode")

# The settings that only change how a trained model is evaluated — sampled and scored — and never the
# trained weights: one training serves every value of these (every guidance.bad_fraction among its
# guidance.snapshot_fractions, whose EMA snapshots it keeps). Every other setting is
# training-relevant, except PLACEMENT: where and how a run executes, never what it computes.
# trainer/fingerprint.py's training fingerprint reads this; tests/test_train.py checks that changing
# these leaves the trained weights bit for bit.
EVAL_ONLY = (
    "sampler.t_mid", "sampler.steps", "sampler.eta", "sampler.edge_skip_mode",
    "guidance.strength", "guidance.bad_fraction",
    "eval.fid_samples", "eval.batch_size", "eval.online", "eval.save_grid", "eval.inception_weights",
    "eval.variants",
)
PLACEMENT = ("out_dir", "device", "compile", "data.on_device", "data.root", "log_every")


VARIANT_PREFIX = "v"  # metric `v<k>/fid_1step`: variant k's (TrainConfig.eval.variants)


def variant_metric(k: int, key: str) -> str:
    """The name of variant k's metric `key`."""
    return f"{VARIANT_PREFIX}{k}/{key}"


def split_variant_metric(key: str) -> tuple[int | None, str]:
    """(k, metric) of a variant's metric name; (None, key) for any other metric."""
    head, sep, rest = key.partition("/")
    if sep and head.startswith(VARIANT_PREFIX) and head[len(VARIANT_PREFIX):].isdigit():
        return int(head[len(VARIANT_PREFIX):]), rest
    return None, key


def is_eval_only(path: str) -> bool:
    """Whether the dotted TrainConfig path only changes evaluation (see EVAL_ONLY)."""
    return path in EVAL_ONLY


def leaf_field(path: str) -> str | None:
    """None if the dotted `path` names a setting of TrainConfig, else why not."""
    model: type[BaseModel] = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "TrainConfig"
            return f"unknown setting {part!r} in {where}{did_you_mean(part, model.model_fields)}"
        ann = field.annotation
        is_model = isinstance(ann, type) and issubclass(ann, BaseModel)
        if i == len(parts) - 1:
            return f"{path} is a section, not a setting; name one of its fields" if is_model else None
        if not is_model:
            return f"{'.'.join(parts[: i + 1])} is a setting, it has no field {parts[i + 1]!r}"
        model = ann
    return None


def override(base: TrainConfig, flat: dict[str, Any]) -> TrainConfig:
    """`base` with dotted-path settings replaced, validated as a whole (raises pydantic ValidationError)."""
    raw = base.model_dump(mode="python")
    for path, value in flat.items():
        node = raw
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return TrainConfig.model_validate(raw)


# pydantic names the member of a union that refused a value in the error's location: `resources.gpu.float`
_UNION_MEMBER = re.compile(r"(int|float|str|bool|literal\[.*\]|function-\w+\[.*\])")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest of `choices` to a mistyped `word`, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_named(name: str, root: type[BaseModel] = BaseModel) -> type[BaseModel] | None:
    """The pydantic model class called `name` (a ValidationError's title), searched among root's subclasses."""
    for sub in root.__subclasses__():
        if sub.__name__ == name:
            return sub
        found = _model_named(name, sub)
        if found is not None:
            return found
    return None


def _fields_beside(title: str, loc: tuple) -> list[str]:
    """The field names of the model that holds the last element of an error location."""
    model = _model_named(title)
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def format_validation_error(err: Exception, prefix: str = "") -> str:
    """One line naming the first offending field path, e.g. `sct.ref_batch: must be ...`."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        e = err.errors()[0]
        parts = [p for p in e["loc"] if not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts).replace(".[", "[")
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(e["loc"][-1]), _fields_beside(err.title, e["loc"])) if e["loc"] else ""
            msg = f"unknown key (check the spelling; see the documented fields){hint}"
        return f"{loc}: {msg}" if loc else msg
    return str(err)


def load_train_config(path: Path) -> TrainConfig:
    """Read a TrainConfig YAML file; raise ConfigError with a one-line message on any problem."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of settings")
    try:
        return TrainConfig.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError
        raise ConfigError(f"{path}: {format_validation_error(e)}") from None
