"""Diagnostics of depth retrieval: attention mass on depth vs sequence, attention sink, layer
usefulness, hidden-state and gradient norms, AttnRes source weights (``flash-depth analyze``)."""

from .diagnostics import Recorder, analyze_model, depth_slot_names
from .figures import make_figures, write_outputs

__all__ = ["Recorder", "analyze_model", "depth_slot_names", "make_figures", "write_outputs"]
