"""Write a network of ours as an EDM-format pickle (tests only): persistent objects with `module_src`.

The layout is the one described for NVIDIA's files: a dict with key `ema` holding an `EDMPrecond`
persistent object whose `model` is the network; every module is pickled as
`torch_utils.persistence._reconstruct_persistent_obj(meta)`. The `module_src` written here would
raise if anything ever executed it.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import nn

HOSTILE_SRC = "raise SystemExit('module_src was executed')\n"


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:  # never called: a name to pickle by
    raise AssertionError("not for loading")


class _Persistent:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return _reconstruct_persistent_obj, (self.meta,)


def _state(module: nn.Module, class_name: str, init_kwargs: dict[str, Any], extra: dict[str, Any]) -> _Persistent:
    skip = module._non_persistent_buffers_set
    state = {
        "training": False,
        "_parameters": OrderedDict((k, v) for k, v in module._parameters.items()),
        "_buffers": OrderedDict((k, v) for k, v in module._buffers.items() if k not in skip),
        "_non_persistent_buffers_set": set(),
        "_modules": OrderedDict((k, None if m is None else _state(m, type(m).__name__, {}, {}))
                                for k, m in module._modules.items()),
        "_init_args": (), "_init_kwargs": init_kwargs, **extra,
    }
    meta = {"type": "class", "version": 6, "module_src": HOSTILE_SRC, "class_name": class_name, "state": state}
    return _Persistent(meta)


def write_edm_pickle(path: Path, unet: nn.Module, *, model_kwargs: dict[str, Any], resolution: int, channels: int,
                     label_dim: int = 0, bare: bool = False) -> Path:
    """`unet` (a SongUNet / DhariwalUNet of ours) as EDM's `EDMPrecond` snapshot pickle at `path`
    (`bare`: the network object itself at the top level instead of a snapshot dict)."""
    precond = {"img_resolution": resolution, "img_channels": channels, "label_dim": label_dim, "use_fp16": False,
               "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5}
    holder = nn.Module()
    holder.model = unet
    model = _state(unet, type(unet).__name__, {"img_resolution": resolution, "in_channels": channels,
                                               "out_channels": channels, "label_dim": label_dim, **model_kwargs}, {})
    top = _state(holder, "EDMPrecond", {**precond, **model_kwargs}, precond)
    top.meta["state"]["_modules"]["model"] = model
    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": fake})
    try:
        path.write_bytes(pickle.dumps(top if bare else {"ema": top, "loss_fn": None}, protocol=4))
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]
        _reconstruct_persistent_obj.__module__ = __name__
    return path
