"""Parity with the released implementation: the fixture weights, loaded through our normal loading path, must give
the tensors the released code computed. The folder comes from DVA_PARITY_FIXTURES; every size and T from its config.

Network outputs are compared in float32 with fixtures.pt (1e-4). The DDIM loops are compared in float64 with
fixtures_f64.pt at 1e-8 max-abs on every value: on this random-weight network, float32 DDIM with x0 clipping turns
1e-5 kernel differences into 1e-2..0.5, which no float32 tolerance can separate from a wrong index.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import _require, parity_base_config

from diffusion import NoiseSchedule, ddim_invert, ddim_sample
from editing import core
from model.autoencoder import FaceEncoder
from model.pretrained import load_classifier, load_dva, load_pretrained_encoders

NET_TOL = 1e-4  # float32 network outputs against fixtures.pt
EXACT_TOL = 1e-8  # float64 against fixtures_f64.pt


@pytest.fixture(scope='module')
def loaded(parity, parity_weights):
    ckpt = parity_weights / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt'
    ema, cfg, _ = load_dva(ckpt, parity_base_config(parity['config']), which='ema')
    model, _, _ = load_dva(ckpt, parity_base_config(parity['config']), which='model')
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


@pytest.fixture(scope='module')
def ref64(parity_dir) -> dict:
    """fixtures_f64.pt: every tensor of fixtures.pt recomputed by the released code with no op outside float64."""
    return torch.load(_require(parity_dir / 'fixtures_f64.pt', 'float64 parity fixtures'), weights_only=False)


@pytest.fixture(scope='module')
def ema64(loaded):
    return copy.deepcopy(loaded[0]).double()


def assert_exact(ours, ref, what, tol=EXACT_TOL):
    """Float64 against the released float64 computation: every value within `tol` (no percentiles)."""
    assert ours.dtype == ref.dtype == torch.float64, what
    err = (ours - ref).abs().max().item()
    assert err < tol, f'{what}: max-abs {err:.3e} >= {tol:.0e}'


@torch.no_grad()
def test_float64_encoders_unet_and_classifier_edit(ema64, ref64, parity_dir):
    """The networks in float64 equal the released float64 run to rounding (no float32 constant or island left)."""
    x0 = ref64['x0']
    enc = ema64.encoder
    assert_exact(enc.identity(x0), ref64['id_feats'], 'id_feats')
    assert_exact(enc.landmarks(x0), ref64['lnd_feats'], 'lnd_feats')
    assert_exact(enc.combine(ref64['id_feats'], ref64['lnd_feats']), ref64['z_face'], 'z_face')
    sure = ref64['mask_margin'] > 1e-6
    for kind in ('train', 'video'):
        m = enc.mask(x0, kind)
        assert m.dtype == torch.float64 and torch.equal(m[sure], ref64[f'mask_{kind}'][sure]), kind
    assert_exact(ema64(ref64['x_t'], ref64['t'], ref64['z_face']), ref64['eps_ema'], 'eps_ema')
    avg = core.average_identity(ref64['id_feats'])
    assert_exact(avg, ref64['pipe_avg_id'], 'pipe_avg_id')
    assert_exact(enc.combine(avg, ref64['lnd_feats']), ref64['pipe_z_face_avg'], 'pipe_z_face_avg')
    clf = load_classifier(parity_dir / 'classifier' / 'last.ckpt')[0].double()
    edited = clf.edit_identity(ref64['pipe_avg_id'], int(ref64['cls_id']), float(ref64['cls_scale']))
    assert_exact(edited, ref64['cls_avg_id_edited'], 'cls_avg_id_edited')
    assert_exact(enc.combine(edited, ref64['lnd_feats']), ref64['cls_z_face_edited'], 'cls_z_face_edited')


def loop_frames(j: int, b: int) -> list[int]:
    """Frames on which loop j is checked: frame j mod b, so that the five loops together cover every frame of a
    batch up to 5; all frames with DVA_PARITY_ALL_FRAMES=1 (float64 costs ~1.5 s per frame and network call on
    2 CPU cores, ~50 calls per frame for the five loops)."""
    return list(range(b)) if os.environ.get('DVA_PARITY_ALL_FRAMES') == '1' else [j % b]


@torch.no_grad()
def test_float64_ddim_loops_and_classifier_edit(ema64, ref64):
    """Every DDIM loop of fixtures_f64.pt at 1e-8 max-abs on every value of the checked frames.

    In float64 the loops are not chaotic at this level (the fixture README: an independent float64 DDIM reproduces
    them within 1e-10, other batch layouts within 2e-9), so a wrong index, coefficient, clip or conditioning shows.
    Each loop starts from the reference's own input; the network is per sample, so loops sharing a schedule run as
    one batch (`loop_frames` says which frames each loop checks).
    """
    T, x0 = ref64['config']['T'], ref64['x0']
    sched = NoiseSchedule.linear().respace(T)
    fr = [loop_frames(j, len(x0)) for j in range(5)]

    def run(loop, starts):
        """One batched loop over [(start key, condition key, frames)]; returns the results split per entry."""
        x = torch.cat([(x0 if k == 'x0' else ref64[k])[f] for k, _, f in starts])
        z = torch.cat([ref64[c][f] for _, c, f in starts])
        return loop(lambda x_t, t: ema64(x_t, t, z), x, sched).split([len(f) for *_, f in starts])

    # 1. inversion of x0 with its per-frame z_face, and with the video's averaged identity (the editing pipeline)
    inv, pipe_inv = run(ddim_invert, [('x0', 'z_face', fr[0]), ('x0', 'pipe_z_face_avg', fr[1])])
    assert_exact(inv, ref64[f'xT_T{T}'][fr[0]], 'inversion')
    assert_exact(pipe_inv, ref64[f'pipe_avg_xT_T{T}'][fr[1]], 'pipeline inversion')
    # 2. renders from the reference x_T: per-frame, reconstruction with the averaged identity, classifier edit
    render, recon, edit = (core.to_unit(x) for x in run(ddim_sample, [
        (f'xT_T{T}', 'z_face', fr[2]), (f'pipe_avg_xT_T{T}', 'pipe_z_face_avg', fr[3]),
        (f'pipe_avg_xT_T{T}', 'cls_z_face_edited', fr[4])]))
    assert_exact(render, ref64[f'render_T{T}'][fr[2]], 'render')
    assert_exact(recon, ref64[f'pipe_recon_T{T}'][fr[3]], 'reconstruction')
    assert_exact(edit, ref64[f'pipe_edit_render_T{T}'][fr[4]], 'edited render')
    # 3. the edit blended into the crop with the video face mask
    mask = ema64.encoder.mask(x0[fr[4]], 'video')
    sure = (ref64['mask_margin'][fr[4]] > 1e-6).expand_as(edit)
    assert sure.float().mean() > 0.999
    pasted = core.blend(edit * 2 - 1, x0[fr[4]], mask)
    assert_exact(pasted[sure], ref64[f'pipe_paste_bg_T{T}'][fr[4]][sure], 'blend')
