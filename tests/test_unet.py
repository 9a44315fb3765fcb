"""The noise-prediction UNet: released parity, structure, init and conditioning behaviour.

Everything except the parity tests runs on the tiny preset (32x32, widths 16/32) with random weights.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import templates
from config import UNetConfig
from model.blocks import AttentionBlock, ResBlock
from model.nn import GroupNorm32, norm_groups, timestep_embedding
from model.unet import UNet

RELEASED_UNET_PARAMS = 190_576_643


def _tiny_cfg(**changes) -> UNetConfig:
    return dataclasses.replace(templates.tiny().unet, **changes)


def _z_dim() -> int:
    return templates.tiny().encoder.z_dim


def _perturb_zero_init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every all-zero parameter (zero-init convs, GN biases) small random values, so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _inputs(cfg: UNetConfig, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    z_face = torch.randn(batch, _z_dim(), generator=gen)
    return x_t, t, z_face


@pytest.fixture(scope='module')
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return _perturb_zero_init(UNet(_tiny_cfg(), _z_dim())).eval()


# ----------------------------------------------------------------------------------------------------------------
# Parity with the released implementation (fixture model: net_ch from the fixture config, 256x256)


def _parity_cfg(config: dict, attention: str) -> UNetConfig:
    assert config['attn_head'] == 1
    return UNetConfig(
        image_size=config['img_size'],
        model_channels=config['net_ch'],
        channel_mult=tuple(config['net_ch_mult']),
        attention_resolutions=tuple(config['net_attn']),
        num_res_blocks=config['num_res_blocks'],
        embed_channels=config['embed_channels'],
        dropout=config['dropout'],
        attention=attention,
    )


@pytest.fixture(scope='module')
def released_unet_state_dicts(parity_weights: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = torch.load(parity_weights / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt', weights_only=True)
    out = {}
    for prefix in ('ema_model.', 'model.'):
        out[prefix] = {
            k[len(prefix):]: v for k, v in ckpt['state_dict'].items() if k.startswith(prefix) and '.encoder.' not in k
        }
    return out


@pytest.mark.parametrize('attention', ['math', 'sdpa'])
@pytest.mark.parametrize(('prefix', 'expected'), [('ema_model.', 'eps_ema'), ('model.', 'eps_model')])
def test_released_parity(parity: dict, released_unet_state_dicts: dict, prefix: str, expected: str, attention: str):
    print(parity['config'])
    unet = UNet(_parity_cfg(parity['config'], attention), z_dim=parity['z_face'].shape[1])
    unet.load_state_dict(released_unet_state_dicts[prefix], strict=True)
    with torch.no_grad():
        eps = unet.eval()(parity['x_t'], parity['t'], parity['z_face'])
    assert eps.shape == parity[expected].shape
    err = (eps - parity[expected]).abs().max().item()
    assert err < 1e-4, f'{prefix} {attention}: max-abs error {err:.3g}'


# ----------------------------------------------------------------------------------------------------------------
# Structure


def test_released_parameter_count_and_key_layout():
    with torch.device('meta'):
        unet = UNet(UNetConfig(), z_dim=512)
    assert sum(p.numel() for p in unet.parameters()) == RELEASED_UNET_PARAMS
    keys = unet.state_dict().keys()
    assert len(keys) == 758
    assert not list(unet.buffers())
    assert not hasattr(unet, 'encoder')
    for key in ('time_embed.time_embed.0.weight', 'time_embed.time_embed.2.bias', 'input_blocks.0.0.weight',
                'input_blocks.3.0.out_layers.6.weight', 'input_blocks.13.0.skip_connection.weight',
                'input_blocks.13.1.qkv.weight', 'middle_block.1.proj_out.bias',
                'middle_block.2.cond_emb_layers.1.weight', 'output_blocks.2.1.in_layers.2.weight',
                'output_blocks.17.0.out_layers.3.bias', 'out.2.weight'):
        assert key in keys, key
    assert 'output_blocks.2.1.skip_connection.weight' not in keys  # up/down blocks keep the identity skip
    assert sum(isinstance(m, ResBlock) for m in unet.modules()) == 42
    assert sum(isinstance(m, AttentionBlock) for m in unet.modules()) == 6
    assert tuple(unet.state_dict()['output_blocks.5.0.in_layers.2.weight'].shape) == (512, 768, 3, 3)


def test_fresh_unet_predicts_zero_and_zero_init_layers():
    torch.manual_seed(0)
    unet = UNet(_tiny_cfg(), _z_dim()).eval()
    gn_biases = {f'{n}.bias' for n, m in unet.named_modules() if isinstance(m, GroupNorm32)}
    for name, p in unet.named_parameters():
        zero_init = '.out_layers.6.' in name or '.proj_out.' in name or name.startswith('out.2.')
        if zero_init or name in gn_biases:
            assert not p.any(), name
        else:
            assert p.any(), name
    x_t, t, z_face = _inputs(unet.cfg)
    with torch.no_grad():
        assert torch.equal(unet(x_t, t, z_face), torch.zeros_like(x_t))


def test_tiny_shapes(tiny_unet: UNet):
    cfg = tiny_unet.cfg
    x_t, t, z_face = _inputs(cfg, batch=2)
    with torch.no_grad():
        eps = tiny_unet(x_t, t, z_face)
    assert eps.shape == x_t.shape and eps.dtype == x_t.dtype
    assert torch.isfinite(eps).all() and eps.abs().max() > 0
    n_levels = len(cfg.channel_mult)
    assert len(tiny_unet.input_blocks) == 1 + n_levels * cfg.num_res_blocks + (n_levels - 1)
    assert len(tiny_unet.output_blocks) == n_levels * (cfg.num_res_blocks + 1)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning and numerics


def test_z_face_none_skips_only_the_z_modulation(tiny_unet: UNet):
    x_t, t, z_face = _inputs(tiny_unet.cfg)
    with torch.no_grad():
        eps_none = tiny_unet(x_t, t, None)
        eps_z = tiny_unet(x_t, t, z_face)
    assert eps_none.shape == x_t.shape and torch.isfinite(eps_none).all()
    assert (eps_none - eps_z).abs().max() > 1e-3
    # with every z FiLM at zero (scale 0, shift 0) the conditioned path equals the unconditioned one
    no_z = UNet(tiny_unet.cfg, _z_dim()).eval()
    no_z.load_state_dict(tiny_unet.state_dict())
    with torch.no_grad():
        for m in no_z.modules():
            if isinstance(m, ResBlock):
                m.cond_emb_layers[1].weight.zero_()
                m.cond_emb_layers[1].bias.zero_()
        torch.testing.assert_close(no_z(x_t, t, z_face), no_z(x_t, t, None), rtol=0, atol=1e-6)


def test_per_sample_t_batched_equals_one_by_one(tiny_unet: UNet):
    x_t, t, z_face = _inputs(tiny_unet.cfg, batch=3)
    t = torch.tensor([0, 421, 999])
    with torch.no_grad():
        batched = tiny_unet(x_t, t, z_face)
        single = torch.cat([tiny_unet(x_t[i:i + 1], t[i:i + 1], z_face[i:i + 1]) for i in range(3)])
        scalar_t = tiny_unet(x_t, torch.tensor(421), z_face)
        same_t = tiny_unet(x_t, torch.full((3,), 421), z_face)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)  # outputs are O(1); conv kernels vary with B
    assert (batched[0] - tiny_unet(x_t[:1], t[1:2], z_face[:1])).abs().max() > 1e-4  # t actually matters
    torch.testing.assert_close(scalar_t, same_t, rtol=0, atol=0)


def test_sdpa_matches_math(tiny_unet: UNet):
    x_t, t, z_face = _inputs(tiny_unet.cfg)
    outs = {}
    for impl in ('math', 'sdpa'):
        unet = UNet(_tiny_cfg(attention=impl), _z_dim()).eval()
        unet.load_state_dict(tiny_unet.state_dict())
        with torch.no_grad():
            outs[impl] = unet(x_t, t, z_face)
    assert (outs['math'] - outs['sdpa']).abs().max() < 1e-5


def test_attention_block_math_formula():
    torch.manual_seed(0)
    block = _perturb_zero_init(AttentionBlock(16, max_norm_groups=8, impl='math'))
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        got = block(x)
        flat = x.reshape(2, 16, 16)
        qkv = block.qkv(block.norm(flat))
        q, k, v = qkv[:, :16], qkv[:, 16:32], qkv[:, 32:]  # consecutive slices (legacy ordering)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1)  # [B, queries, keys]
        want = (flat + block.proj_out(v @ attn.transpose(1, 2))).reshape(2, 16, 4, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_channels_last_input(tiny_unet: UNet):
    x_t, t, z_face = _inputs(tiny_unet.cfg)
    with torch.no_grad():
        ref = tiny_unet(x_t, t, z_face)
        got = tiny_unet(x_t.to(memory_format=torch.channels_last), t, z_face)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)  # same maths, different conv kernels


def test_bf16_weights_run():
    torch.manual_seed(0)
    unet = _perturb_zero_init(UNet(_tiny_cfg(), _z_dim())).eval()
    x_t, t, z_face = _inputs(unet.cfg, batch=2)
    with torch.no_grad():
        ref = unet(x_t, t, z_face)
        got = unet.to(torch.bfloat16)(x_t.bfloat16(), t, z_face.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_gradient_reaches_z_face_conditioning():
    torch.manual_seed(0)
    unet = _perturb_zero_init(UNet(_tiny_cfg(), _z_dim())).train()
    x_t, t, z_face = _inputs(unet.cfg, batch=2)
    z_face.requires_grad_(True)
    unet(x_t, t, z_face).square().mean().backward()
    assert z_face.grad is not None and z_face.grad.abs().max() > 0
    for name, m in unet.named_modules():
        if isinstance(m, ResBlock):
            grad = m.cond_emb_layers[1].weight.grad
            assert grad is not None and grad.abs().max() > 0, name
    assert all(p.grad is not None for p in unet.parameters())


# ----------------------------------------------------------------------------------------------------------------
# model/nn.py helpers


def test_timestep_embedding_is_cos_first_on_original_t():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4, dtype=torch.float32) / 4)
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, want)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_norm_groups_and_fp32_group_norm():
    assert norm_groups(128, 32) == 32
    assert norm_groups(16, 32) == 16
    assert norm_groups(16, 8) == 8
    assert norm_groups(24, 16) == 12
    gn = GroupNorm32(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    x = 3 + 10 * torch.randn(2, 8, 5, 5)
    y = gn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), gn(x.bfloat16().float()).bfloat16().float(), rtol=0, atol=0)
    y16 = gn.to(torch.bfloat16)(x.bfloat16())  # bf16 affine parameters are upcast too
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16.float()).all()
