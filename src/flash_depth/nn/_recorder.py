"""The hook through which flash_depth.analysis watches layers: a ``_recorder`` attribute that
``analysis.diagnostics`` sets on the modules it records and removes after."""

from __future__ import annotations

from torch import nn


def record(module: nn.Module, event: str, *args) -> None:
    """Hand tensors to an attached Recorder (none attached: no cost)."""
    recorder = module.__dict__.get("_recorder")
    if recorder is not None:
        getattr(recorder, event)(*args)


def record_layer(module: nn.Module, event: str, *args) -> None:
    """``record`` with the module's ``layer_idx`` first. The index is read only when a recorder
    is attached: torch.compile specialises on int attributes it reads, once per layer."""
    if module.__dict__.get("_recorder") is not None:
        record(module, event, module.layer_idx, *args)
