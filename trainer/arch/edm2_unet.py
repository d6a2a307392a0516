"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"; NVlabs/edm2 `training/networks_edm2.py`), written for this trainer.

Every layer keeps the expected magnitude (RMS) of its activations at 1: weights are normalised in the forward
pass and scaled by 1/√fan_in, there are no biases (a constant input channel stands in) and no group norms (a
pixel norm in the encoder), and sums and concatenations are weighted so that unit-magnitude inputs give a
unit-magnitude output. The network ends in a learned scalar gain that starts at 0, so the untrained F is 0.

`EDM2UNet` takes the original `UNet`'s constructor arguments and defaults and has the same state-dict keys and
shapes, so a published checkpoint's tensors load strictly; `forward(x, noise_labels, class_labels)` computes
the original's F (class_labels one-hot rows [N, label_dim] or None = all-zero rows, EDM's "no class").
Differences that leave the output unchanged up to float rounding: weights stay float32 (the trainer's
autocast picks the compute dtype, where the original casts to fp16 itself), dropout goes through the
trainer's tape, attention uses `scaled_dot_product_attention`, and the in-place forced weight normalisation
runs only in passes that build a graph (see `MPConv`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import NetworkConfig
from trainer.errors import ConfigError
from trainer.networks import DropoutTape, apply_dropout


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit RMS over `dim` (default: all but the first), eps-guarded (EDM2 eq. 66 uses it on weights)."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))  # ‖x‖ / √(elements per norm)
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its output RMS for unit-normal input, 0.596  (EDM2 eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 − t)·a + t·b) / √((1 − t)² + t²): unit-magnitude inputs, unit-magnitude sum  (EDM2 eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation in which a and b contribute (1 − t) : t of the output magnitude, kept at 1  (EDM2 eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(n_a)), b * (scale * t / math.sqrt(n_b))], dim=dim)


def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or up-sampling with the separable, normalised FIR filter `f` per channel ('keep' = as is)."""
    if mode == "keep":
        return x
    if mode not in ("down", "up") or len(f) % 2:
        raise ValueError(f"resample: mode must be keep/down/up and the filter even-length, got {mode!r}, {f}")
    taps = torch.as_tensor(f, dtype=torch.float32)
    taps = taps / taps.sum()
    channels, pad = x.shape[1], (len(f) - 1) // 2
    kernel = torch.outer(taps, taps).to(dtype=x.dtype, device=x.device).tile([channels, 1, 1, 1])
    if mode == "down":
        return F.conv2d(x, kernel, groups=channels, stride=2, padding=pad)
    return F.conv_transpose2d(x, kernel * 4, groups=channels, stride=2, padding=pad)  # x4: keep the gain at 1


class MPFourier(nn.Module):
    """Random Fourier features √2·cos(2π(f·x + φ)) of a scalar per sample, unit RMS  (EDM2 eq. 75).

    `freqs` (2π·f, f ~ N(0, bandwidth²)) and `phases` (2π·φ, φ ~ U[0, 1)) are persistent buffers, as in the original.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free convolution (kernel [k, k]) or linear layer (kernel []) with magnitude-preserving weights.

    The weight is used as ŵ = gain · normalize(w) / √fan_in, so unit-magnitude input gives unit-magnitude output
    (EDM2 eq. 47). Forced weight normalisation (EDM2 eq. 66) also writes normalize(w) back into the parameter, so
    that its norm cannot grow over training. It is done in training mode in passes that build a graph only
    (`torch.is_grad_enabled()`), not in every training-mode pass as in the original: the consistency loss runs
    the target pass in training mode (same dropout) under `no_grad` after the prediction pass, and an in-place
    write there would bump the version of a weight the prediction's graph saved, failing its backward. Skipping
    it changes no output: the pass uses normalize(w), which does not depend on w's scale (beyond the 1e-4 eps),
    and after a graph-building pass in the same step w is already normalised. (Two graph-building passes before
    one backward would still conflict, as they do in the original.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        w = self.weight.to(torch.float32)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation (EDM2 eq. 66)
        w = normalize(w)  # the weight seen by the gradient: w / ‖w‖ per output channel (EDM2 eq. 66)
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)  # 1/√fan_in: unit-magnitude output (EDM2 eq. 47)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') residual block with optional self-attention (EDM2 Figure 21).

    An encoder block resamples, projects to `out_channels` (1x1) and pixel-normalises its input before the
    residual branch; a decoder block projects its (concatenated) input after it. The residual branch is
    SiLU-conv, scaled by 1 + the embedding's per-channel gain, SiLU-dropout-conv; `res_balance` and
    `attn_balance` are the branch weights of the magnitude-preserving sums.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = tuple(resample_filter), resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0  # 0 heads = no attention
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))  # starts at 0: the embedding's modulation starts off
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tape: DropoutTape | None = None) -> torch.Tensor:
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm (EDM2 Figure 21)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # 1 + gain·(W emb): per-channel modulation
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        y = self.conv_res1(apply_dropout(y, self.dropout, training=self.training, tape=tape))

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels, q/k/v pixel-normalised per head (EDM2 Figure 21)."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)  # channel = (head, c, qkv)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each [n, heads, c/heads, hw]
        q, k, v = (t.transpose(2, 3) for t in (q, k, v))  # [n, heads, hw, c/heads]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √(c/heads)) v
        return self.attn_proj(out.transpose(2, 3).reshape(n, c, h, w))


class EDM2UNet(nn.Module):
    """EDM2's U-Net F(x, c_noise, class one-hot) (EDM2 Figure 21), the original `UNet`'s arguments and defaults.

    Encoder: an input conv, then per level a down-sampling block (below the top) and `num_blocks` blocks.
    Decoder: two blocks at the bottom (the first with attention) or an up-sampling block, then
    `num_blocks + 1` blocks per level, each fed an encoder output through `mp_cat`. `block_kwargs` go to
    every `Block` (channels_per_head, dropout, res_balance, attn_balance, clip_act, resample_filter).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        **block_kwargs: object,
    ) -> None:
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.tape: DropoutTape | None = None  # set inside `trainer.networks.same_dropout`
        self.out_gain = nn.Parameter(torch.zeros([]))  # learned output gain, 0 at init: F starts at 0

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None

        def block(cin: int, cout: int, flavor: str, **kwargs: object) -> Block:
            return Block(cin, cout, emb_channels, flavor=flavor, **kwargs, **block_kwargs)

        self.enc = nn.ModuleDict()
        cout = img_channels + 1  # + a constant channel, in place of biases
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, kernel=[3, 3])
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, "enc", resample_mode="down")
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = block(cout, width, "enc", attention=res in attn_resolutions)
                cout = width

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, "dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, "dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, "dec", resample_mode="up")
            for i in range(num_blocks + 1):
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = block(cout + skips.pop(), width, "dec", attention=attn)
                cout = width
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [N, C, H, W], noise_labels [N] (c_noise = ln σ / 4), class_labels one-hot [N, label_dim] or None."""
        emb = self.emb_noise(self.emb_fourier(noise_labels.reshape(-1)))
        if self.emb_label is not None:
            if class_labels is None:  # EDM's "no class": an all-zero row
                class_labels = torch.zeros(1, self.label_dim, device=x.device)
            one_hot = class_labels.to(torch.float32) * math.sqrt(self.label_dim)  # unit-magnitude one-hot row
            emb = mp_sum(emb, self.emb_label(one_hot), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb, self.tape)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb, self.tape)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Logvar(nn.Module):
    """EDM2 `Precond`'s uncertainty head: ln u(σ) from c_noise, the loss's learned log-variance (EDM2 eq. 21).

    Kept so that a published checkpoint round-trips (same names as in `Precond`: `logvar_fourier`,
    `logvar_linear`); the trainer never uses it for training or sampling.
    """

    def __init__(self, logvar_channels: int = 128) -> None:
        super().__init__()
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """ln u(σ) as [N, 1, 1, 1] for c_noise [N]."""
        return self.logvar_linear(self.logvar_fourier(noise_labels.reshape(-1))).reshape(-1, 1, 1, 1)


# EDM2's ImageNet-64 presets (`train_edm2.py`): size -> (model_channels, dropout); channel_mult 1-2-3-4,
# 3 blocks, attention at 16x16 and 8x8 (the UNet's defaults).
EDM2_IMG64: dict[str, tuple[int, float]] = {
    "xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1), "xl": (384, 0.1),
}


def edm2_img64_config(size: str = "s") -> NetworkConfig:
    """The NetworkConfig knobs of EDM2-`size` for ImageNet 64x64 (xs, s, m, l, xl)."""
    if size not in EDM2_IMG64:
        raise ConfigError(f"network: EDM2 img64 size must be one of {sorted(EDM2_IMG64)}, got {size!r}")
    channels, dropout = EDM2_IMG64[size]
    return NetworkConfig(model_channels=channels, channel_mult=[1, 2, 3, 4], num_blocks=3,
                         attn_resolutions=[16, 8], dropout=dropout)


def build_edm2(cfg: NetworkConfig, *, resolution: int, channels: int, num_classes: int) -> EDM2UNet:
    """EDM2's U-Net of `cfg` for images channels x resolution x resolution (num_classes 0 = unconditional)."""
    levels = len(cfg.channel_mult)
    if resolution % (1 << (levels - 1)):
        raise ConfigError(f"network.channel_mult: {levels} levels need a resolution divisible by "
                          f"{1 << (levels - 1)}; data resolution is {resolution}")
    return EDM2UNet(
        img_resolution=resolution, img_channels=channels, label_dim=num_classes,
        model_channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
        channel_mult_noise=cfg.channel_mult_noise, channel_mult_emb=cfg.channel_mult_emb,
        num_blocks=cfg.num_blocks, attn_resolutions=list(cfg.attn_resolutions),
        label_balance=cfg.label_balance, concat_balance=cfg.concat_balance,
        channels_per_head=cfg.channels_per_head, dropout=cfg.dropout, res_balance=cfg.res_balance,
        attn_balance=cfg.attn_balance, clip_act=cfg.clip_act,
    )
