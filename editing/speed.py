"""Inference speed helpers: the batch size that fits the device, channels_last / torch.compile, device peak FLOP/s.

These decide HOW the UNet runs, never WHAT it computes: a model returned by `optimize_for_inference` gives the same
eps as the original (up to kernel rounding), and `auto_batch_size` only changes how frames are grouped.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from cli import autocast

CPU_BATCH_SIZE = 4
"""Frames per batch on CPU (the released default). CPU convolution kernels already keep every core busy at batch 1
for 256x256 inputs, so images/s saturates at small batches: the paper UNet runs 7.05 s/image at batch 1 and 7.26 at
batch 4 on 2 cores (bench/README.md), while larger batches only add memory (0.6 GB at batch 1, 2.3 GB at batch 4)
and latency. Small images (the tiny preset) still gain from batching, which amortises the per-layer overhead."""

CPU_MICRO_BATCH_MIN_SIZE = 128
"""From this image size on, `micro_batch_size` runs the network one image at a time on CPU (see there)."""

SAFETY = 0.8
"""Fraction of the free CUDA memory that `auto_batch_size` plans to fill (the rest covers fragmentation, the
sampler's own tensors and the cuDNN workspace, which the probe forward does not always show)."""

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendor data sheets, by a substring of the device name.
# 'tf32' is what fp32 convolutions use by default (torch.backends.cudnn.allow_tf32 is True); 'fp32' is plain FP32.
# Order matters: the first matching entry wins ('H100 PCIe' before 'H100').
_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('H200', {'bf16': 989.0, 'fp16': 989.0, 'tf32': 494.0, 'fp32': 67.0}),
    ('H100 PCIe', {'bf16': 756.0, 'fp16': 756.0, 'tf32': 378.0, 'fp32': 51.0}),
    ('H100 NVL', {'bf16': 835.0, 'fp16': 835.0, 'tf32': 418.0, 'fp32': 60.0}),
    ('H100', {'bf16': 989.0, 'fp16': 989.0, 'tf32': 494.0, 'fp32': 67.0}),  # SXM
    ('A100', {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
    ('L40S', {'bf16': 362.0, 'fp16': 362.0, 'tf32': 183.0, 'fp32': 91.6}),
    ('A10G', {'bf16': 70.0, 'fp16': 70.0, 'tf32': 35.0, 'fp32': 31.2}),
    ('L4', {'bf16': 121.0, 'fp16': 121.0, 'tf32': 60.0, 'fp32': 30.3}),
    ('V100', {'fp16': 125.0, 'fp32': 15.7}),
    ('RTX 4090', {'bf16': 165.0, 'fp16': 165.0, 'tf32': 82.6, 'fp32': 82.6}),
)


def cuda_peak_tflops(device: torch.device | str, precision: Literal['bf16', 'fp16', 'fp32'] = 'bf16') -> float | None:
    """Dense peak TFLOP/s of a CUDA device at `precision`, or None (CPU, unknown GPU, or no such unit).

    Examples: H100 SXM and H200 989 (bf16), A100 312 (bf16). For 'fp32' the TF32 tensor-core peak is returned when
    cuDNN may use TF32 (PyTorch's default for convolutions), else the plain FP32 peak.
    """
    device = torch.device(device)
    if device.type != 'cuda' or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    key = precision
    if precision == 'fp32' and torch.backends.cudnn.allow_tf32:
        key = 'tf32'
    for pattern, table in _PEAK_TFLOPS:
        if pattern in name:
            return table.get(key, table.get(precision))
    return None


def _probe_inputs(model: nn.Module, batch: int, image_size: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    cfg = getattr(model, 'cfg', None)
    unet_cfg = getattr(cfg, 'unet', cfg)
    channels = getattr(unet_cfg, 'in_channels', 3)
    x = torch.randn(batch, channels, image_size, image_size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    z_dim = getattr(model, 'z_dim', None)
    z = torch.randn(batch, z_dim, device=device) if z_dim else None
    return x, t, z


@torch.no_grad()
def _peak_forward_bytes(model: nn.Module, batch: int, image_size: int, device: torch.device, precision: str) -> int:
    """Peak CUDA memory above the current allocation during one no-grad forward at `batch` (inputs included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x, t, z = _probe_inputs(model, batch, image_size, device)
    with autocast(device, precision):
        out = model(x, t, z)
    del out, x, t, z
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_batch_size(
    model: nn.Module,
    image_size: int,
    device: torch.device | str,
    precision: str = 'fp32',
    max_batch: int = 64,
) -> int:
    """Frames per network batch for editing on `device`, in 1..max_batch.

    CUDA: one no-grad forward at batch 1 and one at batch 2 give the peak memory above the current allocation; their
    difference is the per-sample activation cost and the rest a fixed cost. The batch is the largest that fits
    SAFETY x (free memory + memory PyTorch has cached but not allocated); when the network has a per-sample cost of
    zero (impossible in practice) max_batch is returned. The model must already be on `device`.
    CPU: CPU_BATCH_SIZE (see there: images/s saturates at small batches, larger ones only cost memory).
    Call it before `optimize_for_inference(..., compile=True)`: probing a compiled model would compile it for
    batches 1 and 2.
    """
    device = torch.device(device)
    if max_batch < 1:
        raise ValueError(f'max_batch={max_batch} must be at least 1')
    if device.type != 'cuda':
        return min(CPU_BATCH_SIZE, max_batch)
    peak1 = _peak_forward_bytes(model, 1, image_size, device, precision)
    peak2 = _peak_forward_bytes(model, 2, image_size, device, precision)
    per_sample = max(peak2 - peak1, 1)
    fixed = max(peak1 - per_sample, 0)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    batch = int((SAFETY * free - fixed) // per_sample)
    return max(1, min(max_batch, batch))


def micro_batch_size(device: torch.device | str, image_size: int) -> int | None:
    """Images per network call inside a frame batch: 1 on CPU for images of CPU_MICRO_BATCH_MIN_SIZE px and more,
    else None (the whole batch in one call).

    On CPU a large-image forward costs the same per image at any batch size (within a few %, either way), so running
    a batch of frames as consecutive batch-1 calls (`chunked`) makes a batch-B DDIM loop cost exactly B batch-1
    forwards per step, with a quarter of the activation memory at B=4. On CUDA, batching is what fills the GPU.
    """
    device = torch.device(device)
    return 1 if device.type == 'cpu' and image_size >= CPU_MICRO_BATCH_MIN_SIZE else None


def chunked(fn: Callable[..., Tensor], chunk: int | None) -> Callable[..., Tensor]:
    """fn(*args) evaluated on consecutive slices of at most `chunk` samples along dim 0, concatenated.

    Every tensor argument with the leading batch size is sliced (x_t [B,C,H,W], t [B], z_face [B,D]); others (None,
    scalars, 0-d tensors) are passed whole. chunk None or >= B calls fn once. Example: `chunked(model, 1)(x_t, t, z)`.
    """
    if chunk is None:
        return fn
    if chunk < 1:
        raise ValueError(f'chunk={chunk} must be at least 1')

    def call(*args):
        batch = args[0].shape[0]
        if batch <= chunk:
            return fn(*args)
        outs = []
        for start in range(0, batch, chunk):
            sl = slice(start, min(batch, start + chunk))
            outs.append(fn(*(a[sl] if isinstance(a, Tensor) and a.ndim and a.shape[0] == batch else a
                             for a in args)))
        return torch.cat(outs)

    return call


def optimize_for_inference(
    model: nn.Module,
    device: torch.device | str,
    channels_last: bool = True,
    compile: bool = False,
    compile_mode: str | None = 'max-autotune-no-cudagraphs',
) -> nn.Module:
    """Move an eval-mode model to `device` and prepare it for fast inference without changing what it computes.

    - channels_last: convert the 4-D weights to NHWC memory format. On CUDA, cuDNN's tensor-core convolutions are
      NHWC and the outputs stay NHWC whatever the input's format (the UNet accepts any memory format). On CPU it is
      neutral for the DVA UNet (same time within noise, bench/README.md) and is applied too, so that one code path is
      tested everywhere. Outputs equal the NCHW model's up to kernel rounding (~1e-6).
    - compile: `torch.compile(model, mode=compile_mode)` (None = PyTorch's default mode; the default
      'max-autotune-no-cudagraphs' benchmarks kernels at the first call of every new input shape, so the first
      batch is slow, and avoids CUDA graphs, whose static buffers the sampling loop would have to copy around).
      The returned module has the same forward signature and state dict keys under `_orig_mod.`.
    - on CUDA, cuDNN autotuning is switched on (`torch.backends.cudnn.benchmark`): every DDIM step repeats the same
      shapes, so the fastest convolution algorithm is measured once per shape and reused T times per batch.
    Returns the model (the original module, converted in place, or its compiled wrapper).
    """
    device = torch.device(device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, mode=compile_mode)
    return model
