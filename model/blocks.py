"""UNet building blocks: the two-condition ResBlock, single-head self-attention, parameter-free resampling.

State-dict names follow the released checkpoint (`in_layers.0/2`, `emb_layers.1`, `cond_emb_layers.1`,
`out_layers.0/2/3/6`, `skip_connection`; attention `norm`, `qkv`, `proj_out`), so released weights load strictly.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.nn import compute_dtype, group_norm, zero_module

Resample = Literal['none', 'up', 'down']
AttentionImpl = Literal['sdpa', 'math']


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, no convolution: [B,C,H,W] -> [B,C,2H,2W]."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode='nearest')


class Downsample(nn.Module):
    """2x2 average pooling, no convolution: [B,C,H,W] -> [B,C,H/2,W/2]."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2)


def _film(h: Tensor, params: Tensor) -> Tensor:
    """h * (1 + scale) + shift, with params [B, 2C] split as (scale, shift) and broadcast over H, W."""
    scale, shift = params[:, :, None, None].chunk(2, dim=1)
    return h * (1 + scale) + shift


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding and, separately, on z_face (DVA's two-condition block).

    h = Conv_in(resample(SiLU(GN_in(x))))
    h = SiLU(FiLM_t(GN_a(h)));  h = GN_b(Conv_mid(h));  h = SiLU(FiLM_z(h));  h = Conv_out(Dropout(h))
    out = skip(resample(x)) + h

    FiLM_t uses Linear(SiLU(t_emb)) and FiLM_z uses Linear(SiLU(z_face)); each gives [scale ; shift] of width
    2*C_out. `Conv_out` starts at zero, so a fresh block is its skip path. `skip` is the identity when the widths
    match, else a 1x1 conv. In the decoder the caller passes x = cat([h, skip_tensor]) with C_in counting both.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_channels: int,
        z_dim: int,
        dropout: float = 0.0,
        max_norm_groups: int = 32,
        resample: Resample = 'none',
    ) -> None:
        super().__init__()
        if resample not in ('none', 'up', 'down'):
            raise ValueError(f'resample={resample!r} is not one of none/up/down')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.in_layers = nn.Sequential(
            group_norm(in_channels, max_norm_groups),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.resample = {'none': nn.Identity, 'up': Upsample, 'down': Downsample}[resample]()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_channels, 2 * out_channels))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(z_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, max_norm_groups),  # 0: GN_a, then FiLM with the time embedding
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),  # 2: Conv_mid
            group_norm(out_channels, max_norm_groups),  # 3: GN_b, then FiLM with z_face
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),  # 6: Conv_out
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, t_emb: Tensor, z_face: Tensor | None = None) -> Tensor:
        """x: [B, C_in, H, W]; t_emb: [B, embed_channels]; z_face: [B, z_dim] or None (skips the z FiLM).

        Returns [B, C_out, H', W'] with H' = 2H (up), H/2 (down) or H.
        """
        norm_in, act_in, conv_in = self.in_layers
        h = conv_in(self.resample(act_in(norm_in(x))))
        x = self.resample(x)

        norm_a, act_a, conv_mid, norm_b, act_b, drop, conv_out = self.out_layers
        h = act_a(_film(norm_a(h), self.emb_layers(t_emb)))
        h = norm_b(conv_mid(h))
        if z_face is not None:
            h = _film(h, self.cond_emb_layers(z_face))
        h = conv_out(drop(act_b(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    GN -> 1x1 qkv (q, k, v are consecutive C-channel slices, the released "legacy" order) -> softmax(q.k / sqrt(C))
    over keys -> weighted sum of v -> zero-initialised 1x1 `proj_out` -> x + out.
    `impl='math'` is the released formula (q and k each scaled by C^-1/4, softmax in at least fp32); `impl='sdpa'`
    calls `scaled_dot_product_attention`, which is the same maths in one fused kernel.
    """

    def __init__(self, channels: int, max_norm_groups: int = 32, impl: AttentionImpl = 'sdpa') -> None:
        super().__init__()
        if impl not in ('sdpa', 'math'):
            raise ValueError(f'attention impl={impl!r} is not one of sdpa/math')
        self.channels = channels
        self.impl = impl
        self.norm = group_norm(channels, max_norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        q, k, v = self.qkv(self.norm(flat)).chunk(3, dim=1)  # each [B, C, N]
        if self.impl == 'math':
            scale = c ** -0.25
            logits = torch.einsum('bcn,bcm->bnm', q * scale, k * scale)  # [B, N(queries), N(keys)]
            weights = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1).to(logits.dtype)
            out = torch.einsum('bnm,bcm->bcn', weights, v)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
            )  # [B, 1, N, C]
            out = out[:, 0].transpose(1, 2)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)
