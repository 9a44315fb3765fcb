"""The assembled autoencoder, strict loading errors, device resolution and the loss's gradient flow (tiny preset)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import cli
import templates
from diffusion import NoiseSchedule, dva_loss
from model.autoencoder import DiffusionVideoAutoencoder
from model.pretrained import (WeightsError, load_classifier, load_dva, load_identity_stats, load_landmark_weights,
                              load_pretrained_encoders)


@pytest.fixture(scope='module')
def tiny() -> DiffusionVideoAutoencoder:
    torch.manual_seed(0)
    return DiffusionVideoAutoencoder(templates.tiny())


def released_ckpt(model, path, drop=None, rename=None):
    sd = dict(model.state_dict())
    if drop:
        sd.pop(drop)
    if rename:
        sd[rename[1]] = sd.pop(rename[0])
    torch.save({'state_dict': {**{f'model.{k}': v for k, v in sd.items()}, **{f'ema_model.{k}': v for k, v in sd.items()}},
                'global_step': 7}, path)
    return path


def test_tiny_autoencoder_builds_and_runs(tiny):
    cfg = tiny.cfg
    x = torch.rand(2, 3, cfg.unet.image_size, cfg.unet.image_size) * 2 - 1
    with torch.no_grad():
        z = tiny.encoder(x)
        assert z.shape == (2, cfg.encoder.z_dim)
        assert tiny(x, torch.tensor([3, 900]), z).shape == x.shape
        assert tiny.encoder.mask(x, 'video').shape == (2, 1, *x.shape[2:])
    assert tiny.encoder.linear.in_features == cfg.encoder.id_dim + 2 * cfg.encoder.n_landmarks
    tiny.train()
    assert not tiny.encoder.idnet.training and not tiny.encoder.bgnet.training  # frozen nets stay in eval mode
    tiny.eval()


def test_loss_is_finite_and_trains_only_trainable_parameters(tiny):
    cfg = tiny.cfg
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give the zero-initialised output layers values so gradients reach every layer
        for p in tiny.parameters():
            if p.requires_grad and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    x0 = torch.rand(2, 3, cfg.unet.image_size, cfg.unet.image_size, generator=g) * 2 - 1
    tiny.zero_grad(set_to_none=True)
    with torch.no_grad():
        id_feat, lnd, mask = tiny.encoder.identity(x0), tiny.encoder.landmarks(x0), tiny.encoder.mask(x0)
    z = tiny.encoder.combine(id_feat, lnd)
    out = dva_loss(lambda x, t: tiny(x, t, z.repeat(2, 1)), x0, torch.tensor([10, 700]), torch.randn_like(x0),
                   torch.randn_like(x0), mask, NoiseSchedule.linear())
    assert all(torch.isfinite(v) for v in out.values())
    out['loss'].backward()
    for name, p in tiny.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert tiny.encoder.linear.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_strict_loading_round_trip_and_errors(tiny, tmp_path):
    base = templates.tiny()
    model, cfg, meta = load_dva(released_ckpt(tiny, tmp_path / 'ok.ckpt'), base)
    assert meta['global_step'] == 7 and cfg.unet == base.unet
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values()))
    with pytest.raises(WeightsError, match=r'not found: .*missing\.ckpt.*download_requirements\.sh'):
        load_dva(tmp_path / 'missing.ckpt', base)
    with pytest.raises(WeightsError, match=r'missing keys: encoder\.linear\.bias'):
        load_dva(released_ckpt(tiny, tmp_path / 'drop.ckpt', drop='encoder.linear.bias'), base)
    with pytest.raises(WeightsError, match=r'unexpected keys: encoder\.fusion\.weight'):
        load_dva(released_ckpt(tiny, tmp_path / 'rename.ckpt', rename=('encoder.linear.weight', 'encoder.fusion.weight')),
                 base)
    with pytest.raises(WeightsError, match='wrong shapes.*--template'):  # same layout, other widths
        load_dva(tmp_path / 'ok.ckpt', replace(base, unet=replace(base.unet, channel_mult=(1, 3))))
    (tmp_path / 'text.ckpt').write_text('not a checkpoint')
    with pytest.raises(WeightsError, match='cannot read .*text.ckpt as a torch file'):
        load_dva(tmp_path / 'text.ckpt', base)
    cls = tmp_path / 'cls.ckpt'
    torch.save({'state_dict': {'classifier.weight': torch.zeros(40, 512), 'classifier.bias': torch.zeros(40)}}, cls)
    with pytest.raises(WeightsError, match='classifier checkpoint: pass it as --cls_checkpoint'):
        load_dva(cls, base)
    with pytest.raises(WeightsError, match='DVA checkpoint, not a classifier'):
        load_classifier(tmp_path / 'ok.ckpt')
    with pytest.raises(WeightsError, match='missing keys: conds_mean'):
        load_classifier(cls)
    torch.save({'conds': torch.zeros(2, 512)}, tmp_path / 'latent.pkl')
    with pytest.raises(WeightsError, match='identity-statistics'):
        load_identity_stats(tmp_path / 'latent.pkl')
    torch.save({'state_dict': {'module.nope': torch.zeros(1)}}, tmp_path / 'mobilenet.pth.tar')
    with pytest.raises(WeightsError, match='does not match the mobilenet network'):
        load_landmark_weights(tiny.encoder.lndnet, tmp_path / 'mobilenet.pth.tar')
    with pytest.raises(WeightsError, match='model_ir_se50.pth'):
        load_pretrained_encoders(tiny.encoder, tmp_path / 'no_such_dir')


def test_untrusted_pickles_are_refused_with_advice(tiny, tmp_path):
    path = tmp_path / 'pickled.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'callable': print}}, path)
    with pytest.raises(WeightsError, match='--trust_checkpoint'):
        load_dva(path, templates.tiny())


def test_device_resolution_and_autocast():
    assert cli.resolve_device('cpu') == torch.device('cpu')
    assert cli.resolve_device('auto').type in ('cpu', 'cuda')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='CUDA is not available'):
            cli.resolve_device('cuda:0')
    with pytest.raises(SystemExit, match='not a device'):
        cli.resolve_device('gpu0')
    with cli.autocast(torch.device('cpu'), 'bf16'):  # CPU: a no-op, the network stays in fp32
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError):
        cli.autocast(torch.device('cpu'), 'int8')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bf16_autocast_wraps_the_network_only(tiny):
    from editing.core import conditioned_eps

    model = tiny.cuda()
    x = torch.randn(2, 3, 32, 32, device='cuda')
    z = torch.randn(2, 512, device='cuda')
    eps = conditioned_eps(model, z, 'bf16')(x, torch.tensor([1, 2], device='cuda'))
    assert eps.dtype == torch.float32
    tiny.cpu()
