"""Training cost in FLOPs, measured once per step shape with torch.utils.flop_counter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` runs (forward, and backward when it calls backward); 1 MAC = 2 FLOPs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
