"""fp8 (e4m3) storage of depth K/V slots: one float32 scale per row of ``d`` values.

A row (one token's K or V for one KV head in one slot) is stored as ``round_e4m3(x / s)`` with
``s = amax(|x|) / 448``, so its largest element lands on e4m3's largest finite value and every
other keeps 3 mantissa bits: the relative error of an element is at most 2^-4 where ``x / s`` is
a normal e4m3 value (``|x| >= 2^-6 s``), and the absolute error at most 2^-10 ``s`` below that.
A row of zeros gets ``s = 1``. The kernels multiply by ``s`` in registers.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_dtype() -> torch.dtype:
    """torch.float8_e4m3fn; ValueError where this torch has no float8 dtypes."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ValueError(f"an fp8 depth stream needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    return dtype


def check_fp8_device(device: torch.device) -> None:
    """ValueError unless the fp8 kernels can run on ``device``: the CPU (reference path, or the
    Triton interpreter) or a GPU of compute capability >= 8.9 (Ada, Hopper and later)."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(
            f"an fp8 depth stream needs a GPU with fp8 (compute capability >= 8.9, e.g. L4, H100); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use depth_stream_dtype=None")


def quantize_fp8(x: torch.Tensor, out: torch.Tensor | None = None,
                 scale_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[..., d]`` float -> (values ``[..., d]`` float8_e4m3fn, scales ``[...]`` float32).

    ``out`` and ``scale_out`` (any strides, e.g. one slot of a stream's buffers) receive them in
    place when given."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor [..., d], got {got}")
    fp8 = fp8_dtype()
    for name, t, shape, dtype in (("out", out, x.shape, fp8), ("scale_out", scale_out, x.shape[:-1], torch.float32)):
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != x.device):
            raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    # times the float32 reciprocal, not "/ 448": CUDA divides a tensor by a Python number that way
    # and the CPU does not, and the codes must not depend on the device
    scale = torch.where(amax > 0, amax, FP8_MAX) * (1.0 / FP8_MAX)
    values = x.detach() / scale  # float32: the division is rounded once, before the cast
    if out is None:
        out = values.to(fp8)
    else:
        out.copy_(values)
    scale = scale.squeeze(-1)
    if scale_out is None:
        return out, scale
    scale_out.copy_(scale)
    return out, scale_out


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values ``[..., d]`` float8_e4m3fn, scales ``[...]`` -> ``values * scales`` ``[..., d]`` in ``dtype``."""
    if not isinstance(values, torch.Tensor) or values.dtype != fp8_dtype():
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"values must be a float8_e4m3fn tensor, got {got}")
    if not isinstance(scales, torch.Tensor) or scales.shape != values.shape[:-1]:
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"scales must be a tensor {tuple(values.shape[:-1])} (values' shape without the last "
                         f"dim), got {got}")
    return (values.float() * scales.float()[..., None]).to(dtype)
