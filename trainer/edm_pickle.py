"""A safe reader of NVIDIA's published EDM / EDM2 network pickles.

`load_edm(path)` returns this project's `ConsistencyModel` (whose `denoise` is the file's denoiser
D(x; σ, class)) and a TrainConfig describing its network. Nothing of the file is executed: the
pickle is read by an unpickler that knows only the globals of that format, and every "persistent"
class of EDM's code (pickled as `_reconstruct_persistent_obj(meta)`, with the defining module's
source inside) comes back as plain data — its class name and state — never by running that source.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import NetworkConfig, PrecondConfig, TrainConfig
from trainer.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

EDM_PRECOND = "EDMPrecond"  # NVlabs/edm training/networks.py
EDM2_PRECOND = "Precond"  # NVlabs/edm2 training/networks_edm2.py
EDM_MODELS = {"SongUNet", "DhariwalUNet"}


class PersistentObject:
    """A persistent EDM object as plain data: its class name and its `__dict__` (never its code)."""

    def __init__(self, class_name: str, state: dict[str, Any]) -> None:
        self.class_name, self.state = class_name, state


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> PersistentObject:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: keeps `meta` as data."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed persistent object")
    return PersistentObject(str(meta.get("class_name")), meta["state"])


class TorchContainer:
    """Stand-in for torch's plain modules (ModuleDict, ModuleList, ...): their pickled state as data."""

    class_name = "Module"

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


def _container(name: str) -> type[TorchContainer]:
    return type(name, (TorchContainer,), {"class_name": name})


class _EasyDict(dict):
    """Stand-in for `dnnlib.util.EasyDict` (a dict with attribute access): a plain dict."""


def _load_from_bytes(b: bytes) -> Any:
    """Stand-in for `torch.storage._load_from_bytes`: the nested payload, read with weights_only."""
    return torch.load(io.BytesIO(b), weights_only=True)


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """A numpy scalar of a plain (object-free) dtype."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalar of an object dtype")
    return np.frombuffer(data or b"", dtype=dtype)[0]


_MODULES = "torch.nn.modules.container"
ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("torch", "Size"): torch.Size,
    **{(_MODULES, n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential", "ParameterDict",
                                              "ParameterList")},
    **{("torch", n): getattr(torch, n) for n in ("float16", "bfloat16", "float32", "float64", "int64", "int32")},
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED; anything else is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refuses global '{module}.{name}'")


def read_pickle(path: Path) -> Any:
    """The file's object tree, as plain data; CheckpointError (one line, naming the file) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            return SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]} (not an EDM/EDM2 network pickle)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, OSError) as e:
        why = "truncated" if isinstance(e, EOFError) else f"unreadable: {type(e).__name__}: {str(e)[:80]}"
        raise CheckpointError(f"{path}: {why} (not an EDM/EDM2 network pickle)".replace("\n", " ")) from None


def flat_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a reconstructed module tree: `_parameters`, persistent `_buffers`, `_modules`."""
    state = obj.state if isinstance(obj, PersistentObject | TorchContainer) else {}
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for key in ("_parameters", "_buffers"):
        for name, t in (state.get(key) or {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = t.detach().float() if t.is_floating_point() else t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(flat_state(child, f"{prefix}{name}."))
    return out


def _network(tree: Any, path: Path) -> PersistentObject:
    """The network object of a training snapshot (key `ema`), an EDM2 reconstruction, or a bare network."""
    net = tree.get("ema") if isinstance(tree, dict) else tree
    if not isinstance(net, PersistentObject) or net.class_name not in (EDM_PRECOND, EDM2_PRECOND):
        found = type(net).__name__ if not isinstance(net, PersistentObject) else net.class_name
        raise CheckpointError(f"{path}: holds no EDMPrecond / EDM2 Precond network (found {found})")
    return net


def _arch_and_kwargs(net: PersistentObject, path: Path) -> tuple[str, dict[str, Any], str]:
    """(arch, the inner network's constructor kwargs, the inner network's attribute name)."""
    inner_name = "model" if net.class_name == EDM_PRECOND else "unet"
    inner = (net.state.get("_modules") or {}).get(inner_name)
    if not isinstance(inner, PersistentObject):
        raise CheckpointError(f"{path}: {net.class_name} has no '{inner_name}' network")
    kwargs = dict(inner.state.get("_init_kwargs") or {})
    if inner.state.get("_init_args"):
        raise CheckpointError(f"{path}: {inner.class_name} was built with positional arguments (not supported)")
    if net.class_name == EDM2_PRECOND:
        return "edm2", kwargs, inner_name
    if inner.class_name == "DhariwalUNet":
        return "adm", kwargs, inner_name
    if inner.class_name == "SongUNet":
        return ("ncsnpp" if kwargs.get("embedding_type") == "fourier" else "ddpmpp"), kwargs, inner_name
    raise CheckpointError(f"{path}: unsupported network class {inner.class_name!r}")


_IGNORED_KWARGS = {"img_resolution", "in_channels", "out_channels", "img_channels", "label_dim"}


def network_config(arch: str, kwargs: dict[str, Any], path: Path) -> NetworkConfig:
    """NetworkConfig of an original network's constructor kwargs (every knob explicit)."""
    fields: dict[str, Any] = {"arch": arch}
    for key, value in kwargs.items():
        name = "embedding" if key == "embedding_type" else key
        if name in _IGNORED_KWARGS:
            continue
        if name not in NetworkConfig.model_fields:
            raise CheckpointError(f"{path}: network argument {key}={value!r} is not supported here")
        fields[name] = list(value) if isinstance(value, tuple) else value
    if arch in ("ddpmpp", "ncsnpp"):
        from trainer.arch import SONG_PRESETS  # the original's defaults for what the file leaves out

        defaults = dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16],
                        dropout=0.1, channel_mult_emb=4, **SONG_PRESETS["ddpmpp"])
        defaults["embedding"] = defaults.pop("embedding_type")
        fields = {**defaults, **fields}
    else:  # adm / edm2: the original's defaults
        attn, dropout = ([32, 16, 8], 0.1) if arch == "adm" else ([16, 8], 0.0)
        fields = {**dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=attn,
                         dropout=dropout), **fields}
    try:
        return NetworkConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{path}: network arguments not understood ({str(e).splitlines()[0]})") from None


def _data_name(resolution: int, channels: int) -> str:
    """The shipped dataset of that image shape, else `folder` (the user's own images)."""
    return {(32, 3): "cifar10", (64, 3): "imagenet64"}.get((resolution, channels), "folder")


def read_network(path: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], tuple[int, int, int]]:
    """(config, ConsistencyModel state dict, (resolution, channels, label_dim)) of an EDM/EDM2 pickle."""
    path = Path(path)
    net = _network(read_pickle(path), path)
    arch, kwargs, inner = _arch_and_kwargs(net, path)
    st = net.state
    try:
        shape = int(st["img_resolution"]), int(st["img_channels"]), int(st["label_dim"])
        sigma_data = float(st.get("sigma_data", 0.5))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: {net.class_name} lacks its image shape / label count") from None
    if st.get("use_fp16"):
        log.info("%s: trained with use_fp16; loaded as float32 (precision decides autocast)", path)
    cfg = TrainConfig.model_validate({
        "data": {"name": _data_name(shape[0], shape[1]), "resolution": shape[0], "conditional": shape[2] > 0},
        "network": network_config(arch, kwargs, path).model_dump(),
        "precond": {"sigma_data": sigma_data},
    })
    state = {}
    for key, value in flat_state(net).items():
        head, _, rest = key.partition(".")
        state["net." + ("unet." + rest if head == inner else key)] = value
    return cfg, state, shape


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a pickle's state into `model` (strict; a head the model lacks, EDM2's logvar, is dropped)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("net.logvar_")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not match the network it describes ({str(e).splitlines()[1:2]})") from None


def load_edm(path: Path | str) -> tuple[Any, TrainConfig]:
    """(ConsistencyModel in eval mode, float32, whose `denoise` is the file's D(x; σ, class), its config)."""
    from trainer.networks import build_network
    from trainer.precond import ConsistencyModel

    cfg, state, (resolution, channels, label_dim) = read_network(Path(path))
    net = build_network(cfg.network, resolution, channels, label_dim)
    model = ConsistencyModel(net, cfg.precond)
    load_state(model, state, Path(path))
    return model.eval(), cfg


# --- Use as a pretrained checkpoint -------------------------------------------------------------

_TUNING_FIELDS = ("dropout", "label_dropout")  # may differ from the file's: tuning's own choice


def is_edm_pickle(path: Path) -> bool:
    """A raw pickle (EDM/EDM2's format) rather than a `torch.save` zip: by extension, else by content."""
    path = Path(path)
    if path.suffix == ".pkl":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and head[1] >= 2 and path.suffix not in (".pt", ".pth")


def _file_config(path: Path) -> TrainConfig | None:
    """The config an EDM pickle or an `import-edm` conversion describes; None for other checkpoints."""
    if is_edm_pickle(path):
        return read_network(path)[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
    except Exception:  # noqa: BLE001 - not ours to judge here: load_pretrained reports a bad file
        return None
    if not isinstance(state, dict) or "edm_source" not in state:
        return None
    return TrainConfig.model_validate_json(state["config"])


def merge_network(user: NetworkConfig, given: NetworkConfig, path: Path) -> NetworkConfig:
    """`given` (the file's network) with the user's tuning choices (dropout, label_dropout).

    A knob the user moved off its default and that differs from the file is refused in one line;
    knobs left at their defaults take the file's values.
    """
    default = NetworkConfig()
    for name in NetworkConfig.model_fields:
        mine, theirs = getattr(user, name), getattr(given, name)
        if name not in _TUNING_FIELDS and mine is not None and mine != theirs and mine != getattr(default, name):
            raise ConfigError(f"network.{name}: {mine} contradicts {path} ({theirs})")
    tuning = {n: getattr(user, n) for n in _TUNING_FIELDS if getattr(user, n) != getattr(default, n)}
    return given.model_copy(update=tuning)


def pretrained_config(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the network and sigma_data of its `pretrain.checkpoint` when that is an EDM/EDM2 pickle
    or an `import-edm` conversion (other checkpoints: `cfg` unchanged). Raises ConfigError on a contradiction."""
    path = cfg.pretrain.checkpoint
    if path is None or not Path(path).is_file():
        return cfg
    given = _file_config(Path(path))
    if given is None:
        return cfg
    if cfg.data.conditional != given.data.conditional:
        raise ConfigError(f"data.conditional: {cfg.data.conditional} contradicts {path} ({given.data.conditional})")
    sd = given.precond.sigma_data
    if cfg.precond.sigma_data not in (sd, PrecondConfig().sigma_data):
        raise ConfigError(f"precond.sigma_data: {cfg.precond.sigma_data} contradicts {path} ({sd})")
    network = merge_network(cfg.network, given.network, Path(path))
    return cfg.model_copy(update={"network": network, "precond": cfg.precond.model_copy(update={"sigma_data": sd})})


def load_pretrained_pickle(model: torch.nn.Module, path: Path) -> None:
    """Initialise a model built from `pretrained_config` with the weights of an EDM/EDM2 pickle."""
    _, state, _ = read_network(Path(path))
    device = next(model.parameters()).device
    load_state(model, {k: v.to(device) for k, v in state.items()}, Path(path))


def import_edm(src: Path, out: Path) -> dict[str, Any]:
    """Convert an EDM/EDM2 pickle into a pretrain checkpoint (atomic; config inside) and say what it holds."""
    from trainer.checkpoint import save_checkpoint

    model, cfg = load_edm(src)
    save_checkpoint(Path(out), {"kind": "pretrain", "model": model.state_dict(), "iteration": 0,
                                "config": cfg.model_dump_json(), "edm_source": Path(src).name})
    return {"arch": cfg.network.arch, "resolution": cfg.data.resolution, "channels": model.net.in_channels,
            "classes": model.net.label_dim, "params": sum(p.numel() for p in model.net.parameters())}
