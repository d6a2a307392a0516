"""The device the trainer's tests run on: `SCT_TEST_DEVICE` (default cpu; `cuda` on a GPU machine).

A pytest plugin: tests/conftest.py registers it with `pytest_plugins = ["_device"]`, then any test can
take the `test_device` fixture. `requires_cuda` marks a test `cuda` and skips it where CUDA is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import pytest
import torch

from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.runtime import resolve_device

ENV = "SCT_TEST_DEVICE"
F = TypeVar("F", bound=Callable)


def device_from_env(environ: Mapping[str, str] = os.environ) -> torch.device:
    """The device `SCT_TEST_DEVICE` names (config syntax: auto | cpu | cuda | cuda:N), default cpu.

    Raises pydantic's ValidationError (a ValueError) for a malformed name, DeviceError for an absent GPU.
    """
    device_spec = environ.get(ENV, "").strip() or "cpu"
    TrainConfig(device=device_spec)  # the config's own validation of the device string
    return resolve_device(device_spec)


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """torch.device of `SCT_TEST_DEVICE`; a bad or unavailable value fails the test with one line."""
    try:
        return device_from_env()
    except (TrainerError, ValueError) as e:
        pytest.fail(f"{ENV}={os.environ.get(ENV)!r}: {str(e).splitlines()[0]}", pytrace=False)


def requires_cuda(fn: F) -> F:
    """Mark `fn` as a CUDA test (`-m cuda`) and skip it with reason "no CUDA device" where CUDA is absent."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    return pytest.mark.cuda(skip(fn))
