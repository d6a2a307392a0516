"""EDM's `SongUNet`: the DDPM++ and NCSN++ networks of Song et al. 2021 as EDM re-implemented them.

Same constructor arguments, defaults and state-dict layout as NVlabs/edm `SongUNet`, so a published
`edm-cifar10-32x32-*.pkl` network loads unchanged. Presets (EDM, Table 7 / `train.py`):
DDPM++ = positional embedding, standard encoder/decoder, resample filter [1,1], channel_mult_noise 1;
NCSN++ = Fourier embedding, residual encoder, standard decoder, filter [1,3,3,1], channel_mult_noise 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.arch.edm_layers import Conv2d, GroupNorm, Linear, UNetBlock
from trainer.networks import DropoutTape, FourierEmbedding, PositionalEmbedding


class SongUNet(nn.Module):
    """F(x, c_noise, one-hot class, augment labels) -> same shape as x (raw output, before preconditioning)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be fourier or positional, got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual") or decoder_type not in ("standard", "skip"):
            raise ValueError(f"unknown encoder/decoder type {encoder_type!r}/{decoder_type!r}")
        super().__init__()
        self.img_resolution, self.in_channels, self.label_dim = img_resolution, in_channels, label_dim
        self.label_dropout = label_dropout
        self.tape: DropoutTape | None = None
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        block = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)),
        )

        # Mapping: noise level (+ class, + augmentation) -> embedding.
        if embedding_type == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc, cout = _encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                  attn_resolutions, encoder_type=encoder_type, block=block, init=init,
                                  resample_filter=resample_filter)
        skips = [blk.out_channels for name, blk in self.enc.items() if "aux" not in name]
        self.dec = _decoder(img_resolution, cout, skips, out_channels, model_channels, channel_mult, num_blocks,
                            attn_resolutions, decoder_type=decoder_type, block=block, init_zero=init_zero,
                            resample_filter=resample_filter)

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
               augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # EDM orders sin before cos here
        if self.map_label is not None and class_labels is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([emb.shape[0], 1], device=emb.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self._embed(noise_labels, class_labels, augment_labels)
        skips, aux = [], x
        for name, blk in self.enc.items():
            if "aux_down" in name:
                aux = blk(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + blk(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + blk(aux)) / math.sqrt(2)
            else:
                x = blk(x, emb, self.tape) if isinstance(blk, UNetBlock) else blk(x)
                skips.append(x)
        out, tmp = None, None
        for name, blk in self.dec.items():
            if "aux_up" in name:
                out = blk(out)
            elif "aux_norm" in name:
                tmp = blk(x)
            elif "aux_conv" in name:
                tmp = blk(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if x.shape[1] != blk.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = blk(x, emb, self.tape)
        return out



def _encoder(
    img_resolution: int, in_channels: int, model_channels: int, channel_mult: Sequence[int], num_blocks: int,
    attn_resolutions: Sequence[int], *, encoder_type: str, block: dict, init: dict, resample_filter: Sequence[int],
) -> tuple[nn.ModuleDict, int]:
    """SongUNet's encoder (EDM's module names) and its output channels: per level a down block (below the
    top level) with the `skip` / `residual` encoders' auxiliary paths, then `num_blocks` blocks."""
    enc = nn.ModuleDict()
    cout = caux = in_channels
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            cout = model_channels
            enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, kernel=3, **init)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            if encoder_type == "skip":
                enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
            if encoder_type == "residual":
                enc[f"{res}x{res}_aux_residual"] = Conv2d(
                    caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                )
                caux = cout
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
    return enc, cout


def _decoder(
    img_resolution: int, cout: int, skips: list[int], out_channels: int, model_channels: int,
    channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int], *, decoder_type: str,
    block: dict, init_zero: dict, resample_filter: Sequence[int],
) -> nn.ModuleDict:
    """SongUNet's decoder (EDM's module names): per level from the bottom, the middle pair or an up block,
    `num_blocks + 1` blocks fed by the encoder's skips, and the output head(s) of the `skip` decoder."""
    dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            attn = i == num_blocks and res in attn_resolutions
            dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=attn, **block)
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                    resample_filter=resample_filter)
            dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
            dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)
    return dec
