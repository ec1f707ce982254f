"""The ``--device`` argument every command takes."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A --device that names no usable device, with a one-line reason."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; else ``cpu``, ``cuda`` or ``cuda:N``, which must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {device}: no CUDA GPU is visible")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {device}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif dev.type != "cpu":
        raise DeviceError(f"--device {device}: flash-depth runs on cpu or cuda")
    return dev
