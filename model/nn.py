"""Small building blocks shared by the networks: sinusoidal time embedding, GroupNorm in at least fp32, zero init."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a numerically sensitive op (time embedding, GroupNorm, softmax) runs in: at least float32.

    fp16/bf16 -> float32 (the released islands), float32 -> float32, float64 -> float64: a float64 model has no
    float32 island, so its outputs are float64 all the way.
    """
    return torch.promote_types(dtype, torch.float32)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of the ORIGINAL diffusion timesteps, cosine half first (as released).

    Args:
        t: [B] timesteps, integer (or float) values in 0..T-1, never rescaled.
        dim: embedding width; the released model uses `model_channels` (128).
        max_period: controls the lowest frequency, freq_k = max_period^(-k / (dim // 2)).
        dtype: float32 (released) or float64; every op runs in it.

    Returns:
        [B, dim] in `dtype`: [cos(t * freq), sin(t * freq)], zero-padded by one column when `dim` is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.reshape(-1, 1).to(dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero in place and return it (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm_groups(channels: int, max_groups: int) -> int:
    """Number of GroupNorm groups for `channels`: min(max_groups, channels), lowered until it divides `channels`.

    With the released widths (multiples of 32) and `max_groups=32` this is always 32.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f'norm_groups needs positive sizes, got channels={channels}, max_groups={max_groups}')
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in `compute_dtype` (float32 for fp16/bf16/fp32 inputs, float64 for float64) and cast back
    to the input dtype (stable under fp16/bf16, no float32 island in a float64 model).

    Input [B, C, ...] of any float dtype and memory format; output has the same shape and dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x.dtype)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int, max_groups: int) -> GroupNorm32:
    """`GroupNorm32` over `channels` with `norm_groups(channels, max_groups)` groups and eps 1e-5."""
    return GroupNorm32(norm_groups(channels, max_groups), channels)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, names: Sequence[str] | None = None) -> None:
    """ema_p <- decay * ema_p + (1 - decay) * p for the parameters `names` (default: those of `model` needing grad).

    Frozen networks and buffers are not averaged: they never change (the released EMA also averaged them, which
    truncates the integer BatchNorm counters through float).
    """
    params = dict(model.named_parameters())
    ema_params = dict(ema.named_parameters())
    names = [k for k, p in params.items() if p.requires_grad] if names is None else list(names)
    missing = [k for k in names if k not in ema_params]
    if missing:
        raise KeyError(f'EMA model lacks parameters {missing[:5]}: it is not a copy of the model')
    for k in names:
        ema_params[k].lerp_(params[k].detach().to(ema_params[k].dtype), 1.0 - decay)
