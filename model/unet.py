"""The DVA noise-prediction UNet: eps = UNet(x_t, t, z_face).

Layout (released `BeatGANsAutoencModel` without its encoder, dims=2, no class labels):
    input_blocks.0       conv3x3 in_channels -> model_channels * channel_mult[0]
    per level            num_res_blocks ResBlocks (+ attention at `attention_resolutions`),
                         then a down-ResBlock (2x2 avg pool) except at the last level
    middle_block         ResBlock, AttentionBlock, ResBlock
    per level, reversed  num_res_blocks + 1 ResBlocks taking cat([h, skip]) (+ attention), then an up-ResBlock
                         (nearest x2) except at the first level
    out                  GN -> SiLU -> zero-initialised conv3x3 -> in_channels
Every ResBlock gets the same time embedding (sinusoid of the integer t -> Linear -> SiLU -> Linear) and z_face.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from config import UNetConfig
from model.blocks import AttentionBlock, Resample, ResBlock
from model.nn import compute_dtype, group_norm, timestep_embedding, zero_module


class TimeEmbedding(nn.Module):
    """t: [B] integer timesteps -> [B, embed_channels]. Keys `time_embed.0/.2` (released `TimeStyleSeperateEmbed`)."""

    def __init__(self, model_channels: int, embed_channels: int) -> None:
        super().__init__()
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, embed_channels),
            nn.SiLU(),
            nn.Linear(embed_channels, embed_channels),
        )

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.time_embed[0].weight.dtype
        emb = timestep_embedding(t, self.model_channels, dtype=compute_dtype(dtype))  # float32, or float64 weights
        return self.time_embed(emb.to(dtype))


class EmbedSequential(nn.Sequential):
    """A Sequential whose ResBlocks also receive (t_emb, z_face); other layers get the feature map only."""

    def forward(self, h: Tensor, t_emb: Tensor, z_face: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, t_emb, z_face) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """Noise-prediction UNet of DVA, conditioned on the timestep and on the face feature z_face.

    Args:
        cfg: widths, depths, attention resolutions, dropout and attention implementation.
        z_dim: width of z_face (512 in the released model).
    """

    def __init__(self, cfg: UNetConfig, z_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.z_dim = z_dim
        mc, groups = cfg.model_channels, cfg.max_norm_groups

        def resblock(c_in: int, c_out: int, resample: Resample = 'none') -> ResBlock:
            return ResBlock(c_in, c_out, cfg.embed_channels, z_dim, cfg.dropout, groups, resample)

        def attention(c: int) -> AttentionBlock:
            return AttentionBlock(c, groups, cfg.attention)

        self.time_embed = TimeEmbedding(mc, cfg.embed_channels)

        ch = mc * cfg.channel_mult[0]
        resolution = cfg.image_size
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mc * mult)]
                ch = mc * mult
                if resolution in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(resblock(ch, ch, 'down')))
                skip_channels.append(ch)
                resolution //= 2

        self.middle_block = EmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if resolution in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resblock(ch, ch, 'up'))
                    resolution *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(ch, groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.in_channels, 3, padding=1)),
        )

    def forward(self, x_t: Tensor, t: Tensor, z_face: Tensor | None = None) -> Tensor:
        """Predict the noise eps in x_t.

        Args:
            x_t: [B, C, H, W] noisy images (any memory format), C = cfg.in_channels, H and W divisible by
                2^(len(channel_mult) - 1).
            t: [B] (or scalar) integer timesteps in 0..T-1 of the ORIGINAL schedule (not respaced indices).
            z_face: [B, z_dim] face feature, or None to skip the z_face modulation.

        Returns:
            eps: [B, C, H, W].
        """
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        t_emb = self.time_embed(t)
        h = x_t
        skips = []  # one LIFO stack; popping it visits each level's encoder outputs last-in first-out
        for block in self.input_blocks:
            h = block(h, t_emb, z_face)
            skips.append(h)
        h = self.middle_block(h, t_emb, z_face)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, z_face)
        return self.out(h)
