"""trainer.networks: shapes, class/null labels, size knobs, dropout replay, gradients, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.config import NetworkConfig
from trainer.errors import ConfigError
from trainer.networks import (
    PositionalEmbedding,
    UNet,
    UNetBlock,
    build_network,
    count_parameters,
    forward_flops,
    group_norm,
    same_dropout,
)


def _wake(net: UNet) -> UNet:
    """Re-initialise the near-zero layers so the output depends visibly on every input."""
    torch.manual_seed(123)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return net


def _inputs(n: int, ch: int, res: int, num_classes: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ch, res, res, generator=g)
    t = torch.randn(n, generator=g)
    c = torch.randint(0, num_classes, (n,), generator=g) if num_classes else None
    return x, t, c


@pytest.mark.parametrize(
    "res, ch, mult, num_classes, attn, embedding",
    [
        (8, 1, [1, 2], 0, [], "positional"),
        (8, 1, [1, 2], 10, [4], "positional"),
        (16, 3, [1, 2], 10, [8], "fourier"),
        (32, 1, [1, 2, 2], 0, [], "positional"),
        (32, 3, [1, 2, 4], 10, [16], "positional"),
        (64, 3, [1, 2, 2, 2], 0, [], "fourier"),
    ],
)
def test_output_shape(
    res: int, ch: int, mult: list[int], num_classes: int, attn: list[int], embedding: str
) -> None:
    cfg = NetworkConfig(model_channels=16, channel_mult=mult, attn_resolutions=attn, embedding=embedding)
    net = build_network(cfg, res, ch, num_classes)
    assert any(getattr(b, "attention", False) for b in net.modules()) == bool(attn)
    x, t, c = _inputs(2, ch, res, num_classes)
    y = net(x, t, c)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_null_label() -> None:
    net = _wake(build_network(NetworkConfig(), 8, 1, num_classes=10)).eval()
    x, t, c = _inputs(4, 1, 8, 10)
    null = torch.full((4,), 10)
    assert torch.equal(net(x, t, None), net(x, t, null))  # None means the null label
    assert not torch.allclose(net(x, t, c), net(x, t, null))
    assert net.map_label is not None and net.map_label.num_embeddings == 11
    uncond = build_network(NetworkConfig(), 8, 1, num_classes=0).eval()
    assert uncond.map_label is None
    assert torch.equal(uncond(x, t, None), uncond(x, t, c))  # labels ignored without classes


def test_width_sweep_params_and_flops_monotone() -> None:
    params, flops = [], []
    for width in (16, 32, 64):
        net = build_network(NetworkConfig(model_channels=width), 8, 1, 10)
        params.append(count_parameters(net))
        flops.append(forward_flops(net, batch_size=4))
    assert params[0] < params[1] < params[2]
    assert flops[0] < flops[1] < flops[2]
    # conv FLOPs scale ~ width^2: doubling the width roughly quadruples them
    assert 3.0 < flops[2] / flops[1] < 4.5


def test_forward_flops_matches_real_run() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    net = build_network(NetworkConfig(attn_resolutions=[4]), 8, 1, 10)
    x, t, c = _inputs(3, 1, 8, 10)
    with FlopCounterMode(display=False) as counter:
        net(x, t, c)
    assert forward_flops(net, batch_size=3) == counter.get_total_flops() > 0
    assert next(net.parameters()).device.type == "cpu"  # the meta copy left the net alone


def test_dropout_replays_with_restored_rng() -> None:
    net = _wake(build_network(NetworkConfig(dropout=0.5), 8, 1, 10)).train()
    x, t, c = _inputs(4, 1, 8, 10)
    state = torch.random.get_rng_state()
    y1 = net(x, t, c)
    y_other = net(x, t, c)  # RNG advanced: another mask
    torch.random.set_rng_state(state)
    y2 = net(x, t, c)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y_other)
    net.eval()
    assert torch.equal(net(x, t, c), net(x, t, c))


def test_same_dropout_records_then_replays_the_masks() -> None:
    net = _wake(build_network(NetworkConfig(dropout=0.5), 8, 1, 10)).train()
    x, t, c = _inputs(4, 1, 8, 10)
    torch.manual_seed(3)
    plain = net(x, t, c)  # F.dropout
    torch.manual_seed(3)
    with same_dropout(net) as tape:
        recorded = net(x, t, c)
        after_recording = torch.get_rng_state()
        tape.replay()
        replayed = net(x, t, c)
    assert torch.equal(recorded, plain)  # the tape draws its masks exactly as F.dropout does
    assert torch.equal(replayed, recorded) and torch.equal(torch.get_rng_state(), after_recording)  # no new draws
    assert len(tape.masks) == sum(1 for m in net.modules() if isinstance(m, UNetBlock)) and net.tape is None
    assert not torch.equal(net(x, t, c), recorded)  # outside: fresh masks again


def test_gradient_reaches_every_parameter() -> None:
    cfg = NetworkConfig(model_channels=16, attn_resolutions=[4, 8], dropout=0.0)
    net = build_network(cfg, 8, 3, num_classes=5)
    x, t, _ = _inputs(6, 3, 8, 0)
    c = torch.arange(6)  # every class plus the null label 5
    net(x, t, c).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_init_output_is_small() -> None:
    net = build_network(NetworkConfig(model_channels=32, channel_mult=[1, 2, 4]), 32, 1, 10).eval()
    x, t, c = _inputs(2, 1, 32, 10)
    with torch.no_grad():
        y = net(x, t, c)
    assert 0 < y.abs().max() < 1e-3


def test_positional_embedding_formula() -> None:
    emb = PositionalEmbedding(8)  # EDM: freqs = (1/10000)^(i/(half-1)), [cos, sin]
    out = emb(torch.tensor([0.5]))
    freqs = [(1 / 10000) ** (i / 3) for i in range(4)]
    expect = [math.cos(0.5 * f) for f in freqs] + [math.sin(0.5 * f) for f in freqs]
    assert torch.allclose(out[0], torch.tensor(expect), atol=1e-6)


@pytest.mark.parametrize("channels", [16, 28, 30, 84, 132, 256])
def test_group_norm_groups_divide(channels: int) -> None:
    gn = group_norm(channels)
    assert channels % gn.num_groups == 0 and gn.num_groups <= 32


def test_build_network_rejects_bad_resolution() -> None:
    with pytest.raises(ConfigError, match="network.channel_mult"):
        build_network(NetworkConfig(channel_mult=[1, 2, 2, 2]), 8, 1, 0)  # 8 -> 1x1 at the bottom
    with pytest.raises(ConfigError, match="network.channel_mult"):
        build_network(NetworkConfig(channel_mult=[1, 2]), 7, 1, 0)


@pytest.mark.slow
def test_compiles_without_graph_breaks() -> None:
    net = build_network(NetworkConfig(attn_resolutions=[4]), 8, 1, 10).eval()
    x, t, c = _inputs(2, 1, 8, 10)
    compiled = torch.compile(net, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    assert torch.allclose(compiled(x, t, c), net(x, t, c), atol=1e-6)
    assert torch.allclose(compiled(x, t, None), net(x, t, None), atol=1e-6)
