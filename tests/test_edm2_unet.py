"""trainer.arch.edm2_unet: EDM2's magnitude-preserving U-Net against the original's layout and outputs,
its layers' magnitude preservation, and training with it (ECT steps, shared dropout, bf16 autocast)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from trainer.arch.edm2_unet import (
    EDM2Logvar,
    EDM2UNet,
    MPConv,
    build_edm2,
    edm2_img64_config,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
)
from trainer.config import LossConfig, NetworkConfig, PrecondConfig
from trainer.errors import ConfigError
from trainer.loss import consistency_loss
from trainer.precond import ConsistencyModel, c_in, c_noise, c_out, c_skip

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "edm"
# The tiny fixture's UNet arguments (fixture README: EDM2 img64 layout, 16 channels, 1 block).
TINY_KWARGS = dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=16,
                   channel_mult=[1, 2, 3, 4], num_blocks=1, attn_resolutions=[16, 8], dropout=0.0)


def tiny_net(label_dim: int = 0, dropout: float = 0.0, seed: int = 0) -> EDM2UNet:
    """An 8x8x1 EDM2 U-Net with attention at 4x4, its zero-initialised gains set to 1 so F is O(1)."""
    torch.manual_seed(seed)
    net = EDM2UNet(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=16, dropout=dropout)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


def _batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- Layout: state-dict names and shapes as the original's ----------------------------------------------------

def test_state_dict_layout_equals_original() -> None:
    """Names and shapes of EDM2's `Precond(**TINY_KWARGS)` (unet + logvar head), recorded from the original code."""
    expected = json.loads((Path(__file__).parent / "data" / "edm2_precond_img64_tiny_shapes.json").read_text())
    ours = {f"unet.{k}": list(v.shape) for k, v in EDM2UNet(**TINY_KWARGS).state_dict().items()}
    ours |= {k: list(v.shape) for k, v in EDM2Logvar(128).state_dict().items()}
    assert ours == expected


# EDM2 img64 presets on the meta device: (size, parameters, enc 16x16 attn_qkv, dec 8x8_in0 attn_qkv), counted
# from the original `UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=...)`.
PRESETS = [
    ("s", 280_209_253, [1728, 576, 1, 1], [2304, 768, 1, 1]),
    ("m", 497_803_045, [2304, 768, 1, 1], [3072, 1024, 1, 1]),
    ("xl", 1_119_276_709, [3456, 1152, 1, 1], [4608, 1536, 1, 1]),
]


@pytest.mark.parametrize(("size", "params", "enc_qkv", "dec_qkv"), PRESETS)
def test_img64_presets_match_original_sizes(size: str, params: int, enc_qkv: list[int], dec_qkv: list[int]) -> None:
    with torch.device("meta"):
        net = build_edm2(edm2_img64_config(size), resolution=64, channels=3, num_classes=1000)
    width = net.enc["64x64_conv"].weight.shape[0]
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == 200
    assert list(net.enc["64x64_conv"].weight.shape) == [width, 4, 3, 3]  # + the constant channel
    assert list(net.emb_label.weight.shape) == [4 * width, 1000]
    assert list(net.enc["16x16_block0"].attn_qkv.weight.shape) == enc_qkv
    assert list(net.dec["8x8_in0"].attn_qkv.weight.shape) == dec_qkv
    assert list(net.dec["64x64_block3"].conv_skip.weight.shape) == [width, 2 * width, 1, 1]
    assert net.enc["32x32_block0"].attn_qkv is None  # no attention at 32x32


def test_img64_preset_dropout_and_bad_size() -> None:
    assert edm2_img64_config("s").dropout == 0.0 and edm2_img64_config("xl").dropout == 0.1
    with pytest.raises(ConfigError, match="size"):
        edm2_img64_config("xxl")


def test_build_rejects_resolution_the_levels_cannot_halve() -> None:
    with pytest.raises(ConfigError, match="network.channel_mult"):
        build_edm2(NetworkConfig(channel_mult=[1, 2, 3]), resolution=10, channels=1, num_classes=0)


def test_build_passes_the_edm2_knobs() -> None:
    cfg = NetworkConfig(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                        channels_per_head=8, channel_mult_emb=3, res_balance=0.4, clip_act=None, dropout=0.2)
    net = build_edm2(cfg, resolution=8, channels=1, num_classes=0)
    blk = net.enc["4x4_block0"]
    assert net.emb_noise.weight.shape == (48, 16) and blk.num_heads == 4
    assert (blk.res_balance, blk.clip_act, blk.dropout) == (0.4, None, 0.2)


# --- The original's outputs: the fixture, through the safe reader -----------------------------------------------

def test_fixture_denoiser_equals_original() -> None:
    """D(x; σ, class) of the EDM2 fixture's weights equals the original code's answer (and None = all-zero row)."""
    pkl, ref_path = FIXTURES / "edm2_img64_tiny.pkl", FIXTURES / "edm2_img64_tiny.ref.pt"
    if not pkl.is_file() or not ref_path.is_file():
        pytest.skip(f"fixture absent: {pkl}")
    if importlib.util.find_spec("trainer.edm_pickle") is None:
        pytest.skip("trainer.edm_pickle (the safe pickle reader) is not on this branch")
    from trainer.edm_pickle import load_edm

    ref = torch.load(ref_path, weights_only=True)
    model, _ = load_edm(pkl)
    with torch.no_grad():
        assert _rel(model.denoise(ref["x"], ref["sigma"], ref["labels"]), ref["denoised"].float()) < 1e-4
        unet = next(m for m in model.modules() if isinstance(m, EDM2UNet))
        sigma = ref["sigma"].reshape(-1, 1, 1, 1)
        raw = unet(c_in(sigma, 0.5) * ref["x"], c_noise(sigma).flatten(), torch.zeros(4, 1000))
        no_class = c_skip(sigma, 0.5) * ref["x"] + c_out(sigma, 0.5) * raw
        assert _rel(model.denoise(ref["x"], ref["sigma"], None), no_class) < 1e-6


def test_none_label_is_the_all_zero_row() -> None:
    net = tiny_net(label_dim=5).eval()
    x, noise = _batch(3), torch.tensor([-1.0, 0.0, 1.0])
    with torch.no_grad():
        none, zeros = net(x, noise, None), net(x, noise, torch.zeros(3, 5))
        one_hot = net(x, noise, torch.eye(5)[:3])
    assert torch.allclose(none, zeros, atol=1e-6) and not torch.allclose(none, one_hot, atol=1e-3)


# --- Magnitude preservation (EDM2 §3) -------------------------------------------------------------------------

def test_layers_preserve_unit_magnitude() -> None:
    """Unit-normal inputs give outputs of RMS ~1 through mp_silu, mp_sum, mp_cat and MPConv at gain 1."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, 8, 8, generator=g), torch.randn(64, 96, 8, 8, generator=g)

    def rms(t: torch.Tensor) -> float:
        return t.square().mean().sqrt().item()

    assert rms(mp_silu(a)) == pytest.approx(1.0, abs=0.02)
    assert rms(mp_sum(a, b[:, :32], t=0.3)) == pytest.approx(1.0, abs=0.02)
    cat = mp_cat(a, b, t=0.7)
    assert cat.shape[1] == 128 and rms(cat) == pytest.approx(1.0, abs=0.02)
    assert rms(cat[:, 32:]) / rms(cat[:, :32]) == pytest.approx(0.7 / 0.3 * math.sqrt(32 / 96), rel=0.02)
    conv = MPConv(32, 48, kernel=[3, 3]).eval()
    with torch.no_grad():
        assert rms(conv(a)[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.05)  # interior: no zero padding
        conv.weight.mul_(7.0)  # the weight's scale does not matter (weight normalisation)
        assert rms(conv(a)[:, :, 1:-1, 1:-1]) == pytest.approx(1.0, abs=0.05)


def test_forced_weight_normalisation_only_in_graph_building_training_passes() -> None:
    """Training with grad: weights are written back at unit RMS per output channel; no_grad or eval: untouched."""
    net = tiny_net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, noise = _batch(2), torch.zeros(2)
    with torch.no_grad():
        net.train()(x, noise)
    net.eval()(x, noise)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.train()(x, noise)
    for name, p in net.named_parameters():
        if p.ndim > 0:
            rms = p.detach().flatten(1).square().mean(1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), name
            assert torch.allclose(p.detach(), normalize(before[name]), atol=1e-6), name


# --- Training with the consistency loss -----------------------------------------------------------------------

T = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 20.0])
R = T * 0.8


def test_ect_steps_train_and_backward_after_target_pass() -> None:
    """A few ECT steps (prediction with grad, target in training mode under no_grad, Adam): finite, weights move."""
    model = ConsistencyModel(tiny_net(dropout=0.1), PrecondConfig(sigma_data=0.5)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    conv = model.net.enc["8x8_block0"].conv_res0
    start = normalize(conv.weight.detach()).clone()
    torch.manual_seed(3)
    for _ in range(3):
        out = consistency_loss(model, _batch(), None, T, R, cfg=LossConfig(), method="ect")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (normalize(conv.weight.detach()) - start).abs().max() > 1e-3


def test_in_place_weight_write_between_passes_would_fail_backward() -> None:
    """Why the target pass must not renormalise in place (what the original does in every training pass)."""
    model = ConsistencyModel(tiny_net(), PrecondConfig(sigma_data=0.5)).train()
    loss = model(_batch(), T).square().mean()
    conv = model.net.enc["8x8_block0"].conv_res0
    with torch.no_grad():
        conv.weight.copy_(normalize(conv.weight))
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("replay", [True, False])
def test_shared_dropout_mask(replay: bool) -> None:
    """r = t: the target is f(x_t, t) itself, so with the prediction's dropout masks the loss is exactly 0."""
    model = ConsistencyModel(tiny_net(dropout=0.5), PrecondConfig(sigma_data=0.5)).train()
    cfg = LossConfig(distance="l2", weighting="snrpk")
    torch.manual_seed(0)
    assert consistency_loss(model, _batch(), None, T, T, cfg=cfg, method="ect",
                            replay_dropout=replay).loss.item() == 0.0
    assert model.net.tape is None
    torch.manual_seed(0)
    a, b = model(_batch(), T), model(_batch(), T)  # control: two passes, two masks
    assert (a - b).abs().max() > 1e-2


# --- Precision --------------------------------------------------------------------------------------------------

def test_bf16_autocast_on_cpu() -> None:
    """Under bf16 autocast the forward runs in bf16 (fp32 weights kept), close to fp32, and a step backpropagates."""
    net = tiny_net(label_dim=5)
    x, noise, labels = _batch(4), torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.eye(5)[:4]
    with torch.no_grad():
        ref = net.eval()(x, noise, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, noise, labels)
    assert low.dtype == torch.bfloat16 and _rel(low.float(), ref) < 0.05
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x, noise, labels).float().square().mean()
    loss.backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())


def test_logvar_head() -> None:
    head = EDM2Logvar(8)
    assert head(torch.tensor([0.1, -0.3])).shape == (2, 1, 1, 1)
    assert sorted(head.state_dict()) == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
