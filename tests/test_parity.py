"""Parity with the released implementation: the fixture weights, loaded through our normal loading path, must give
the tensors the released code computed. The folder comes from DVA_PARITY_FIXTURES; every size and T from its config.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import templates
from diffusion import NoiseSchedule
from editing import core
from editing.pipeline import EncodedVideo, Runtime, encode_crops, finish_identity, render_identity
from model.autoencoder import FaceEncoder
from model.pretrained import load_classifier, load_dva, load_pretrained_encoders

NET_TOL, LOOP_TOL = 1e-4, 1e-3


def base_config(fx_cfg: dict):
    cfg = templates.diffusion_video_autoencoder()
    unet = replace(cfg.unet, image_size=fx_cfg['img_size'], channel_mult=tuple(fx_cfg['net_ch_mult']),
                   attention_resolutions=tuple(fx_cfg['net_attn']), embed_channels=fx_cfg['embed_channels'],
                   num_res_blocks=fx_cfg['num_res_blocks'], dropout=fx_cfg['dropout'])
    return replace(cfg, unet=unet)


@pytest.fixture(scope='module')
def loaded(parity, parity_weights):
    ckpt = parity_weights / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt'
    ema, cfg, _ = load_dva(ckpt, base_config(parity['config']), which='ema')
    model, _, _ = load_dva(ckpt, base_config(parity['config']), which='model')
    assert cfg.unet.model_channels == parity['config']['net_ch']
    return ema, model


def maxabs(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_checkpoint_encoders_equal_pretrained_files(loaded, parity_weights):
    ema, _ = loaded
    enc = FaceEncoder(ema.cfg.encoder)
    load_pretrained_encoders(enc, parity_weights / 'pretrained_models')
    ours = enc.state_dict()
    for k, v in ema.encoder.state_dict().items():
        if not k.startswith('linear.'):
            assert torch.equal(v, ours[k]), k


@torch.no_grad()
def test_encoder_features_and_masks(loaded, parity):
    ema, _ = loaded
    x0 = parity['x0']
    id_feat, lnd = ema.encoder.identity(x0), ema.encoder.landmarks(x0)
    assert maxabs(id_feat, parity['id_feats']) < NET_TOL
    assert maxabs(lnd, parity['lnd_feats']) < NET_TOL
    assert maxabs(ema.encoder.combine(id_feat, lnd), parity['z_face']) < NET_TOL
    sure = parity['mask_margin'] > 1e-4
    for kind in ('train', 'video'):
        m = ema.encoder.mask(x0, kind)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m[sure], parity[f'mask_{kind}'][sure]), kind


@torch.no_grad()
def test_unet_noise_prediction_ema_and_model(loaded, parity):
    ema, model = loaded
    assert maxabs(ema(parity['x_t'], parity['t'], parity['z_face']), parity['eps_ema']) < NET_TOL
    assert maxabs(model(parity['x_t'], parity['t'], parity['z_face']), parity['eps_model']) < NET_TOL


def test_respaced_timesteps(parity):
    full = NoiseSchedule.linear()
    for key in parity:
        if key.startswith('timesteps_T'):
            n = int(key[len('timesteps_T'):])
            r = full.respace(n)
            assert torch.equal(r.timesteps, parity[key].long()), key
            assert torch.equal(r.alpha_bar, parity[f'alphas_cumprod_T{n}'].double()), key


def assert_loop_close(ours, ref, what):
    """DDIM loops at the fixture tolerance, robust to float noise that the random network makes chaotic.

    The fixture network has random weights, and DDIM with x0 clipping amplifies the last-bit differences between
    CPU kernels (our UNet already differs from itself by ~1.4e-5 between batch sizes 1 and 2, and adding 1e-5 noise
    to eps moves a T=10 inversion by ~2e-2 on a few pixels). So the 1e-3 tolerance is asserted on 99% of the
    values, with the mean held to 1e-4: any wrong coefficient, index, clip or conditioning breaks all three.
    Each loop starts from the fixture's own input, so errors do not compound from one loop into the next.
    """
    err = (ours.float() - ref.float()).abs().flatten()
    q99, mean = err.quantile(0.99).item(), err.mean().item()
    assert q99 < LOOP_TOL and mean < LOOP_TOL / 10, f'{what}: 99th percentile {q99:.2e}, mean {mean:.2e}'
    assert (err > LOOP_TOL).float().mean().item() < 0.02, what


@torch.no_grad()
def test_ddim_inversion_render_and_classifier_edit_pipeline(loaded, parity, parity_dir):
    ema, _ = loaded
    T, x0, dev = parity['config']['T'], parity['x0'], torch.device('cpu')
    sched = NoiseSchedule.linear().respace(T)
    bs = len(x0)
    # per-frame identity: inversion, and rendering back from the released x_T
    assert_loop_close(core.invert(ema, x0, parity['z_face'], sched, bs, dev), parity[f'xT_T{T}'], 'inversion')
    render = core.render(ema, parity[f'xT_T{T}'], parity['z_face'], sched, bs, dev)
    assert_loop_close(core.to_unit(render), parity[f'render_T{T}'], 'render')
    # the editing pipeline: identity averaged over the video, as the editing scripts do
    rt = Runtime(ema, Path('fixture'), dev, T, bs, progress=False)
    enc = encode_crops(rt, x0)
    avg = core.average_identity(enc['id_feats'])
    assert maxabs(avg, parity['pipe_avg_id']) < NET_TOL
    assert maxabs(core.z_faces(ema, avg, enc['lnd_feats'], dev), parity['pipe_z_face_avg']) < NET_TOL
    assert_loop_close(enc['x_T'], parity[f'pipe_avg_xT_T{T}'], 'pipeline inversion')
    sure = (parity['mask_margin'] > 1e-4)
    assert torch.equal(enc['masks'][sure], parity['mask_video'][sure])
    enc['x_T'] = parity[f'pipe_avg_xT_T{T}']
    video = EncodedVideo(names=[str(i) for i in range(bs)], quads=None, missing=[], crops=None, **enc)
    recon = render_identity(rt, video, video.avg_id)
    assert_loop_close(core.to_unit(recon), parity[f'pipe_recon_T{T}'], 'reconstruction')
    # classifier edit with the fixture classifier, released (unit-norm) identity
    clf, _ = load_classifier(parity_dir / 'classifier' / 'last.ckpt')
    edited = finish_identity(clf.edit_identity(avg, int(parity['cls_id']), float(parity['cls_scale'])), avg, 'unit')
    assert maxabs(edited, parity['cls_avg_id_edited']) < NET_TOL
    assert maxabs(core.z_faces(ema, edited, enc['lnd_feats'], dev), parity['cls_z_face_edited']) < NET_TOL
    out = render_identity(rt, video, edited)
    assert_loop_close(core.to_unit(out), parity[f'pipe_edit_render_T{T}'], 'edited render')
    pasted = core.blend(out, x0, enc['masks'])
    assert_loop_close(pasted[sure.expand_as(out)], parity[f'pipe_paste_bg_T{T}'][sure.expand_as(out)], 'blend')
