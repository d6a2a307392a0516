"""Original-architecture networks (network.arch): published layouts, dropout tape, bf16, FLOPs, every method."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from trainer.config import LossConfig, NetworkConfig, PrecondConfig, TrainConfig
from trainer.loss import consistency_loss
from trainer.networks import build_network, forward_flops
from trainer.precond import ConsistencyModel

# Published layouts, summarised from NVlabs/edm's own SongUNet / DhariwalUNet built with these
# settings (EDM's CIFAR-10 DDPM++ / NCSN++ and ImageNet-64 ADM): parameter count, number of
# state-dict tensors, and the sha256 (first 16 hex) of the JSON list of [key, shape] in order.
PUBLISHED = {
    "ddpmpp": (dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9),
               32, 0, 55_733_891, 425, "9253875ede86b0b2"),
    "ncsnpp": (dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], augment_dim=9),
               32, 0, 56_397_827, 432, "98d8efb1f70d5752"),
    "adm": (dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8]),
            64, 1000, 295_899_267, 553, "6c5442f4a6349ecf"),
}
SOME_SHAPES = {  # a few entries of the same layouts, readable
    "ddpmpp": {"map_augment.weight": [128, 9], "enc.8x8_down.skip.resample_filter": [1, 1, 2, 2]},
    "ncsnpp": {"map_noise.freqs": [128], "enc.8x8_down.skip.resample_filter": [1, 1, 4, 4],
               "dec.8x8_block0.conv0.weight": [256, 512, 3, 3]},
    "adm": {"map_layer0.weight": [768, 192], "dec.16x16_block1.proj.bias": [576], "out_conv.bias": [3]},
}

TINY = {
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "ncsnpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "adm": dict(model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8]),  # 64 = one head
    "edm2": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
}


def layout(net: torch.nn.Module) -> tuple[int, int, str, dict[str, list[int]]]:
    """(parameters, state-dict tensors, digest of the [key, shape] list, shapes) with the original's key names."""
    sd = {k.removeprefix("unet."): list(v.shape) for k, v in net.state_dict().items()}
    digest = hashlib.sha256(json.dumps([[k, v] for k, v in sd.items()]).encode()).hexdigest()[:16]
    return sum(p.numel() for p in net.parameters()), len(sd), digest, sd


def _arch(arch: str) -> str:
    if arch == "edm2" and importlib.util.find_spec("trainer.arch.edm2_unet") is None:
        pytest.skip("EDM2 network not built yet (trainer/arch/edm2_unet.py)")
    return arch


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_layout(arch: str) -> None:
    knobs, res, classes, params, tensors, digest = PUBLISHED[arch]
    with torch.device("meta"):
        net = build_network(NetworkConfig(arch=arch, **knobs), res, 3, classes)
    *counts, shapes = layout(net)
    assert counts == [params, tensors, digest]
    assert {k: shapes[k] for k in SOME_SHAPES[arch]} == SOME_SHAPES[arch]


def tiny_model(arch: str, dropout: float = 0.0, classes: int = 0) -> ConsistencyModel:
    torch.manual_seed(0)
    net = build_network(NetworkConfig(arch=arch, dropout=dropout, **TINY[arch]), 16, 1, classes)
    return ConsistencyModel(net, PrecondConfig())


@pytest.mark.parametrize("arch", list(TINY))
def test_dropout_tape_replays_the_same_masks(arch: str) -> None:
    """With r = t the target point is x_t, so one shared dropout mask makes the loss exactly 0; the
    recorded-and-replayed masks give the same loss and gradients as masks redrawn from the RNG."""
    model = tiny_model(_arch(arch), dropout=0.5).train()
    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((4,), 1.5)
    cfg = LossConfig(distance="l2", weighting="snrpk")
    torch.manual_seed(0)
    assert consistency_loss(model, x, None, t, t, cfg=cfg, method="ect", replay_dropout=True).loss.item() == 0.0

    start = {k: v.clone() for k, v in model.state_dict().items()}  # EDM2 re-normalises its weights in place

    def run(replay: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.load_state_dict(start)
        model.zero_grad()
        torch.manual_seed(3)
        out = consistency_loss(model, x, None, t, t * 0.5, cfg=LossConfig(), method="ect", replay_dropout=replay)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (l1, g1), (l2, g2) = run(True), run(False)
    assert l1 > 0 and torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert model.net.tape is None


@pytest.mark.parametrize("arch", list(TINY))
def test_bf16_autocast_and_flops(arch: str) -> None:
    model = tiny_model(_arch(arch), classes=10)
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.5, 2.0]), labels)
    out.float().square().mean().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    one, four = forward_flops(model.net, 1), forward_flops(model.net, 4)
    assert one > 0 and four == pytest.approx(4 * one, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("method,over", [("edm", {}), ("ect", {}), ("sct", {"sct": {"ref_batch": 16}}),
                                         ("ict", {}), ("sct", {"sct": {"ref_batch": 16, "phases": 2}})],
                         ids=["edm", "ect", "sct", "ict", "phased"])
def test_every_method_trains_every_arch(tmp_path: Path, arch: str, method: str, over: dict) -> None:
    from trainer.train import train

    raw = {"method": method, "iterations": 2, "device": "cpu", "out_dir": str(tmp_path / "run"),
           "data": {"name": "digits", "resolution": 16, "conditional": True},
           "network": {"arch": _arch(arch), **TINY[arch]}, "pretrain": {"iterations": 2, "batch_size": 16},
           "optim": {"batch_size": 16}, "log_every": 1, "checkpoint_every": 2, "sampler": {"steps": [1]},
           "eval": {"every": 2, "fid_samples": 32, "batch_size": 32, "online": False, "at_start": False}, **over}
    result = train(TrainConfig.model_validate(raw))
    assert result.iterations == 2 and result.checkpoint_dir is not None
    assert result.params == sum(p.numel() for p in tiny_model(arch, classes=10).net.parameters())


@pytest.mark.parametrize("name", ["cifar10_ect", "cifar10_sct"])
def test_paper_specs_use_the_published_ddpmpp(name: str) -> None:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml").read_text())
    with torch.device("meta"):
        net = build_network(NetworkConfig(**raw["base"]["network"]), 32, 3, 0)
    assert list(layout(net)[:3]) == list(PUBLISHED["ddpmpp"][3:])
