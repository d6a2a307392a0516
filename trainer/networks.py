"""A small EDM-style U-Net (DDPM++ flavour of NVlabs/edm `SongUNet`, compact).

Structure as in EDM's DDPM++: a 3x3 input conv, per level `num_blocks` residual blocks (the
levels below the top begin with a down-sampling residual block), a middle pair of blocks, a
decoder of `num_blocks + 1` blocks per level fed by encoder skips, and a GroupNorm-SiLU-conv
output head whose conv starts at 1e-5 scale so the untrained denoiser D = c_skip x + c_out F
starts near c_skip x. The noise level enters through a positional (or Fourier) embedding and a
2-layer MLP; class labels through an embedding whose last index `num_classes` is the null label.
Dropout uses the global torch RNG, so restoring the RNG state replays the same mask (docs/algorithms.md §3 step 4);
inside `same_dropout(net)` the first pass keeps its masks and the next one reuses them instead.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import NetworkConfig
from trainer.errors import ConfigError

SKIP_SCALE = math.sqrt(0.5)  # EDM skip_scale: keeps the residual sum at unit variance


def _init(layer: nn.Conv2d | nn.Linear, weight: float = 1.0) -> nn.Module:
    """EDM init: xavier-uniform weight scaled by `weight`, zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, weight: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), weight)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (EDM), groups dividing `channels`."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps)


class PositionalEmbedding(nn.Module):
    """Transformer sin/cos embedding of a scalar per sample (EDM, endpoint=True)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True) -> None:
        super().__init__()
        half = num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        self.register_buffer("freqs", (1 / max_positions) ** freqs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).ger(self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar per sample (EDM NCSN++, scale 16)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).ger(2 * math.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


class DropoutTape:
    """The dropout masks of one forward pass, kept so that a second pass reuses them (docs/algorithms.md §3 step 4).

    A mask is drawn as CPU `F.dropout` draws it (`bernoulli_(1 − p)`, then `/ (1 − p)`), so on the
    CPU a recorded pass equals `F.dropout` bit for bit; replaying skips drawing the masks again.
    """

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.replaying = False
        self._next = 0

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """x · mask, the mask drawn and kept (recording) or the next kept one (replaying)."""
        if self.replaying:
            mask = self.masks[self._next]
            self._next += 1
        else:
            mask = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
            self.masks.append(mask)
        return x * mask

    def replay(self) -> None:
        """From now on, every pass reuses the recorded masks in order."""
        self.replaying, self._next = True, 0


def apply_dropout(x: torch.Tensor, p: float, *, training: bool, tape: DropoutTape | None) -> torch.Tensor:
    """Dropout of every network here: through `tape` when one records/replays masks, else `F.dropout`."""
    if tape is not None and training and p > 0:
        return tape.dropout(x, p)
    return F.dropout(x, p=p, training=training)


class UNetBlock(nn.Module):
    """Residual block: norm-SiLU-conv, + embedding, norm-SiLU-dropout-conv, skip, optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        attention: bool = False,
        resample: str | None = None,  # None | "down" (2x2 average) | "up" (2x nearest)
        takes_skip: bool = False,  # concatenates an encoder skip before running (decoder)
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.resample, self.takes_skip = dropout, resample, takes_skip
        self.norm0 = group_norm(in_channels)
        self.conv0 = _conv(in_channels, out_channels, 3)
        self.affine = _init(nn.Linear(emb_channels, out_channels))
        self.norm1 = group_norm(out_channels)
        self.conv1 = _conv(out_channels, out_channels, 3, weight=1e-5)  # EDM init_zero
        needs_skip = in_channels != out_channels or resample is not None
        self.skip = _conv(in_channels, out_channels, 1) if needs_skip else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = _conv(out_channels, out_channels * 3, 1, weight=math.sqrt(0.2))  # EDM init_attn
            self.proj = _conv(out_channels, out_channels, 1, weight=1e-5)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tape: DropoutTape | None = None) -> torch.Tensor:
        orig = x
        x = self.conv0(self._resample(F.silu(self.norm0(x))))
        x = x + self.affine(emb)[:, :, None, None].to(x.dtype)  # additive embedding (DDPM++)
        x = self.conv1(apply_dropout(F.silu(self.norm1(x)), self.dropout, training=self.training, tape=tape))
        skip = self.skip(self._resample(orig)) if self.skip is not None else orig
        x = (x + skip) * SKIP_SCALE
        if self.attention:
            n, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, 3, c, h * w).transpose(2, 3).unbind(1)  # [n, hw, c]
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, one head
            x = (self.proj(a.transpose(1, 2).reshape(n, c, h, w)) + x) * SKIP_SCALE
        return x


class UNet(nn.Module):
    """EDM DDPM++-style U-Net F(x, c_noise, class) -> same shape as x."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.1,
        num_classes: int = 0,
        embedding: str = "positional",
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if img_resolution % (1 << (levels - 1)):
            raise ValueError(f"resolution {img_resolution} is not divisible by 2^{levels - 1} ({levels=})")
        if embedding not in ("positional", "fourier"):
            raise ValueError(f"embedding must be positional or fourier, got {embedding!r}")
        self.img_resolution, self.in_channels, self.num_classes = img_resolution, in_channels, num_classes
        self.tape: DropoutTape | None = None  # set inside `same_dropout`
        noise_channels, emb_channels = model_channels, model_channels * 4  # EDM: mult_noise 1, mult_emb 4
        block = dict(emb_channels=emb_channels, dropout=dropout)

        # Embedding: noise level (+ class) -> 2-layer MLP with SiLU.
        emb_cls = PositionalEmbedding if embedding == "positional" else FourierEmbedding
        self.map_noise = emb_cls(noise_channels)
        self.map_label = nn.Embedding(num_classes + 1, noise_channels) if num_classes > 0 else None
        self.map_layer0 = _init(nn.Linear(noise_channels, emb_channels))
        self.map_layer1 = _init(nn.Linear(emb_channels, emb_channels))

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = model_channels
        self.conv_in = _conv(in_channels, cout, 3)
        skips = [cout]
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, resample="down", **block)
                skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block
                )
                skips.append(cout)

        # Middle and decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=attn, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, resample="up", **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                    cin, cout, attention=attn, takes_skip=True, **block
                )
        assert not skips
        self.norm_out = group_norm(cout)
        self.conv_out = _conv(cout, in_channels, 3, weight=1e-5)  # EDM init_zero: F starts near 0

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, C, H, W], noise_labels [N] (c_noise), class_labels [N] int64 or None (= null label).

        Class labels are ignored by an unconditional network (num_classes = 0).
        """
        emb = self.map_noise(noise_labels.reshape(-1).expand(x.shape[0]))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.map_label(class_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        x = self.conv_in(x)
        skips = [x]
        for blk in self.enc.values():
            x = blk(x, emb, self.tape)
            skips.append(x)
        for blk in self.dec.values():
            if blk.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb, self.tape)
        return self.conv_out(F.silu(self.norm_out(x)))


@contextmanager
def same_dropout(net: nn.Module) -> Iterator[DropoutTape]:
    """Inside: `net`'s first forward pass records its dropout masks; after `tape.replay()` the next
    passes reuse them, drawing no new ones (the consistency target's pass, docs/algorithms.md §3 step 4)."""
    net.tape = tape = DropoutTape()
    try:
        yield tape
    finally:
        net.tape = None


def build_network(cfg: NetworkConfig, resolution: int, channels: int, num_classes: int) -> nn.Module:
    """The network of `cfg` for images channels x resolution x resolution (num_classes 0 = unconditional):
    the compact U-Net, or an original-architecture net in its `EdmNet` adapter (`network.arch`)."""
    levels = len(cfg.channel_mult)
    if resolution % (1 << (levels - 1)) or (resolution >> (levels - 1)) < 2:
        raise ConfigError(
            f"network.channel_mult: {levels} levels need a resolution divisible by {1 << (levels - 1)} "
            f"leaving at least 2x2 at the bottom; data resolution is {resolution}"
        )
    if cfg.arch != "compact":
        from trainer.arch import build_arch  # the original-architecture nets build on this module's layers

        return build_arch(cfg, resolution=resolution, channels=channels, num_classes=num_classes)
    return UNet(
        img_resolution=resolution,
        in_channels=channels,
        model_channels=cfg.model_channels,
        channel_mult=tuple(cfg.channel_mult),
        num_blocks=cfg.num_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        num_classes=num_classes,
        embedding=cfg.embedding or "positional",
    )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def forward_flops(net: nn.Module, batch_size: int = 1) -> int:
    """FLOPs of one forward pass at `batch_size` (torch.utils.flop_counter; a multiply-add = 2).

    Counted on a meta-device copy: no compute, the network itself is untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(net).to("meta")
    x = torch.zeros(batch_size, net.in_channels, net.img_resolution, net.img_resolution, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta") if net.num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x, torch.zeros(batch_size, device="meta"), labels)
    return int(counter.get_total_flops())
