"""Original-architecture networks (EDM's SongUNet / DhariwalUNet, EDM2's U-Net) and their adapter.

`build_arch` turns a NetworkConfig into the original network wrapped in `EdmNet`, which takes the
trainer's class indices and hands the network EDM's one-hot rows. State-dict keys are the
original's under `unet.` (plus EDM2's `logvar_*` head), as in EDM2's `Precond`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import NetworkConfig
from trainer.networks import DropoutTape

# SongUNet presets (EDM `train.py`): arch -> (embedding, channel_mult_noise, encoder, decoder, resample filter)
SONG_PRESETS: dict[str, dict[str, Any]] = {
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   decoder_type="standard", resample_filter=[1, 3, 3, 1]),
}


class EdmNet(nn.Module):
    """Adapter: F(x, c_noise, class indices or None) of an original-architecture `unet`.

    Indices become one-hot rows; None and the null index `label_dim` become all-zero rows (EDM's "no
    class") for a conditional net; an unconditional one gets None. `tape` (dropout replay) is forwarded to `unet`.
    """

    def __init__(self, unet: nn.Module, *, label_dim: int, img_resolution: int, in_channels: int,
                 logvar: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.label_dim = self.num_classes = label_dim
        self.img_resolution, self.in_channels = img_resolution, in_channels
        for name, module in (logvar or {}).items():  # EDM2's uncertainty head: loaded, never used here
            self.add_module(name, module)

    @property
    def tape(self) -> DropoutTape | None:
        return self.unet.tape

    @tape.setter
    def tape(self, tape: DropoutTape | None) -> None:
        self.unet.tape = tape

    def one_hot(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
        """EDM's class input: one-hot float rows [n, label_dim], zeros for None; None when unconditional."""
        if not self.label_dim:
            return None
        if labels is None:
            return torch.zeros(n, self.label_dim, device=device)
        # index label_dim is the trainer's null label (label dropout, classic CFG): an all-zero row
        rows = F.one_hot(labels.long().reshape(-1), self.label_dim + 1)[:, : self.label_dim]
        return rows.float().expand(n, -1)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, noise_labels.reshape(-1).expand(x.shape[0]), self.one_hot(labels, x.shape[0], x.device))


def song_kwargs(cfg: NetworkConfig) -> dict[str, Any]:
    """SongUNet's constructor arguments of `cfg` (preset values where `cfg` leaves a knob at None)."""
    preset = SONG_PRESETS[cfg.arch]
    given = dict(embedding_type=cfg.embedding, channel_mult_noise=cfg.channel_mult_noise,
                 encoder_type=cfg.encoder_type, decoder_type=cfg.decoder_type, resample_filter=cfg.resample_filter)
    return {k: (v if v is not None else preset[k]) for k, v in given.items()}


def _edm2(cfg: NetworkConfig, *, resolution: int, channels: int, num_classes: int) -> EdmNet:
    """EDM2's U-Net (module `trainer.arch.edm2_unet`) with its logvar head, as in EDM2's `Precond`."""
    mod = importlib.import_module("trainer.arch.edm2_unet")
    unet = mod.build_edm2(cfg, resolution=resolution, channels=channels, num_classes=num_classes)
    head = mod.EDM2Logvar(128)  # EDM2's default logvar_channels
    logvar = {"logvar_fourier": head.logvar_fourier, "logvar_linear": head.logvar_linear}
    return EdmNet(unet, label_dim=num_classes, img_resolution=resolution, in_channels=channels, logvar=logvar)


def build_arch(cfg: NetworkConfig, *, resolution: int, channels: int, num_classes: int) -> EdmNet:
    """The original-architecture network of `cfg.arch` in its adapter (fp32 weights)."""
    if cfg.arch == "edm2":
        return _edm2(cfg, resolution=resolution, channels=channels, num_classes=num_classes)
    common = dict(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=num_classes,
                  augment_dim=cfg.augment_dim, model_channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
                  channel_mult_emb=cfg.channel_mult_emb or 4, num_blocks=cfg.num_blocks,
                  attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout, label_dropout=cfg.label_dropout)
    if cfg.arch == "adm":
        from trainer.arch.dhariwal_unet import DhariwalUNet

        unet: nn.Module = DhariwalUNet(**common)
    elif cfg.arch in SONG_PRESETS:
        from trainer.arch.song_unet import SongUNet

        unet = SongUNet(**common, **song_kwargs(cfg))
    else:
        raise ValueError(f"not an original architecture: {cfg.arch!r}")
    return EdmNet(unet, label_dim=num_classes, img_resolution=resolution, in_channels=channels)
