"""Parity of the CLIP edit path with the released code (fixtures_clip.pt; its README defines tensors and tolerances).

The small random CLIP (OpenAI layout, written by the folder's make_clip.py) is loaded through OUR loader, the same
code path as the real ViT-B/16 file. The folder comes from DVA_CLIP_FIXTURES (default ../shared/fixtures/official_clip)
and every setting (texts, lr, loss weights, scale, n_train_step, iterations) from its config, so the same tests run
unchanged on another set. The DVA weights are the official fixture weights (DVA_PARITY_FIXTURES).

Chained float32 loops on these random-weight networks are chaotic (README section 4), so every check starts from
recorded inputs ("teacher-forced"): each DDIM step from the recorded state, each iteration's loss terms and gradients
at the recorded parameter e_k with the recorded R, M0 and d_text, and Adam replayed from the recorded gradients.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, _require
from conftest import parity_base_config as base_config

from diffusion import NoiseSchedule, ddim_step
from editing import core
from editing.clip_edit import (
    ADAM_BETAS,
    ADAM_EPS,
    CLIPDirectionalLoss,
    SearchReference,
    apply_clip_direction,
    batched_step,
    identity_optimizer,
    load_clip,
    search_terms,
)
from editing.text_templates import format_templates
from model.pretrained import load_dva


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def clip_dir() -> Path:
    return _require(Path(os.environ.get('DVA_CLIP_FIXTURES', SHARED / 'fixtures' / 'official_clip')),
                    'CLIP parity fixtures')


@pytest.fixture(scope='module')
def fx(clip_dir) -> dict:
    return torch.load(clip_dir / 'fixtures_clip.pt', weights_only=True)


@pytest.fixture(scope='module')
def clip_loss(clip_dir, fx, tmp_path_factory) -> CLIPDirectionalLoss:
    """The fixture CLIP written by the folder's own make_clip.py and read by `load_clip` (our loader)."""
    make_clip = _module(clip_dir / 'make_clip.py', 'dva_make_clip')
    path = make_clip.write_clip(tmp_path_factory.mktemp('clip'), clip_dir / fx['config']['clip']['keys'])
    model, pre = load_clip(path, 'cpu')
    sd = torch.load(path, weights_only=True)
    assert make_clip.content_digest(sd) == fx['config']['clip']['content_sha256']
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())  # fp16-exact values survive the loader's round trip
    return CLIPDirectionalLoss(model, pre)


@pytest.fixture(scope='module')
def ema(parity, parity_weights, fx):
    model, cfg, _ = load_dva(parity_weights / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt',
                             base_config(parity['config']), which='ema')
    assert cfg.unet.model_channels == fx['config']['net_ch'] and cfg.unet.image_size == fx['config']['img_size']
    return model


@pytest.fixture(scope='module')
def ref(fx, ema) -> SearchReference:
    """The search's fixed inputs as recorded (R, M0, f_src, d_text, z0) and our landmarks of I0."""
    cfg = fx['config']
    schedule = NoiseSchedule.linear().respace(cfg['n_train_step'])
    assert schedule.timesteps.tolist() == cfg['train_timesteps']
    with torch.no_grad():
        lnd0 = ema.encoder.landmarks(fx['x0'][:1])
    return SearchReference(z0=fx['z0'], lnd0=lnd0, mask0=fx['M0'], states=fx['R'], f_src=fx['f_src'],
                           direction=fx['d_text'][0], schedule=schedule)


def maxabs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def test_tokens_text_features_and_direction(fx, clip_loss):
    cfg = fx['config']
    for side in ('src', 'trg'):
        prompts = format_templates(cfg[f'{side}_txt'])
        assert len(prompts) == cfg['n_templates']
        assert torch.equal(clip_loss.tokenizer(prompts).long(), fx[f'text_tokens_{side}'].long()), side
        assert maxabs(clip_loss.encode_text(prompts), fx[f'text_feats_{side}']) < 1e-5, side
    assert maxabs(clip_loss.text_direction(cfg['src_txt'], cfg['trg_txt']), fx['d_text'][0]) < 1e-5


def test_image_embeddings_after_released_preprocessing(fx, clip_loss):
    """Under autograd, as the release computes them (open_clip's no-grad fast path differs by ~1e-7)."""
    assert maxabs(clip_loss.encode_image(fx['x0'], normalize=False), fx['x0_clip_embed_raw']) < 1e-5
    assert maxabs(clip_loss.encode_image(fx['x0']), fx['x0_clip_embed']) < 1e-5
    assert maxabs(clip_loss.encode_image(fx['R'][1:]), fx['f_src']) < 1e-5


@torch.no_grad()
def test_identities_conditions_and_masks(fx, ema):
    x0, enc = fx['x0'], ema.encoder
    ids, lnds = enc.identity(x0), enc.landmarks(x0)
    assert maxabs(ids, fx['z_id_frames']) < 1e-4
    assert maxabs(core.average_identity(ids), fx['z_bar']) < 1e-4
    assert maxabs(ids[:1], fx['z0']) < 1e-4
    assert maxabs(enc.combine(fx['z0'], lnds[:1]), fx['c0']) < 1e-4
    assert maxabs(enc.combine(fx['z_bar'], lnds), fx['z_face_avg']) < 1e-4
    assert maxabs(enc.combine(fx['z_edit'], lnds), fx['z_face_edit']) < 1e-4
    for mask, key, margin in ((enc.mask(x0[:1], 'train'), 'M0', 'M0_margin'),
                              (enc.mask(x0, 'video'), 'mask_video', 'mask_video_margin')):
        sure = fx[margin].abs() > 1e-3
        assert sure.float().mean() > 0.99 and torch.equal(mask[sure], fx[key][sure]), key


@torch.no_grad()
def test_every_ddim_step_of_the_reference_trajectory(fx, ema, ref):
    """Inv(x0[0]) -> inv_states[0] -> ... -> x_800 and Step(R[k], n-1-k) -> R[k+1], each from the recorded state and
    with the recorded c0, one state at a time (batch 1) as released. 1e-4: the float noise of one step at t=800."""
    sched, c0 = ref.schedule, fx['c0']
    n = len(sched)
    inv_in = [fx['x0'][:1], *fx['inv_states'].split(1)]
    inv_out = [*fx['inv_states'].split(1), fx['x_800']]
    for i, (x, target) in enumerate(zip(inv_in, inv_out, strict=True)):
        eps = ema(x, sched.t_at(i, 1, x.device), c0)
        assert maxabs(ddim_step(x, eps, sched.at(i, x), sched.at(i + 1, x))[0], target) < 1e-4, f'inversion {i}'
    assert len(inv_in) == n - 1 and torch.equal(fx['x_800'], fx['R'][:1])
    for k in range(n):
        x, i = fx['R'][k:k + 1], n - 1 - k
        eps = ema(x, sched.t_at(i, 1, x.device), c0)
        assert maxabs(ddim_step(x, eps, sched.at(i, x), sched.at(i - 1, x))[0], fx['R'][k + 1]) < 1e-4, f'step {k}'


def _row(fx: dict, name: str, k: int) -> torch.Tensor:
    """Row k of iter_<name>, or of long_<name> past the short run (rows 0-4 of both are the same run)."""
    short = fx.get(f'iter_{name}')
    return short[k] if short is not None and k < len(short) else fx[f'long_{name}'][k]


def checked_iterations(fx: dict) -> list[int]:
    """Every iteration of the short run after the degenerate iteration 0, and the last of the long run (each costs
    a batch-5 UNet forward and two backward passes); DVA_CLIP_ALL_ITERS=1 checks every recorded iteration."""
    n, n_long = fx['config']['n_iter'], fx['config']['n_iter_long']
    if os.environ.get('DVA_CLIP_ALL_ITERS') == '1':
        return list(range(1, n_long))
    return [*range(1, n), n_long - 1]


@torch.no_grad()
def test_iteration0_batched_step_and_defined_terms(fx, ema, clip_loss, ref):
    """At e = z0 the batched step reproduces it0_B; the directional term there is float noise (README section 4),
    so only the id and l1 terms are compared and the CLIP term is checked to be finite."""
    terms = search_terms(ema, ema.encoder.combine, clip_loss, ref, fx['iter_e'][:1])
    assert maxabs(terms['B'], fx['it0_B']) < 5e-4
    assert maxabs(batched_step(ema, fx['R'], fx['c0'], ref.schedule), fx['R'][1:]) < 1e-4  # as R was built
    assert abs(terms['id'].item() - fx['it0_loss_id'].item()) < 1e-5
    assert abs(terms['l1'].item() - fx['it0_loss_l1'].item()) < 1e-5
    assert torch.isfinite(terms['clip'])


def test_loss_terms_and_gradients_teacher_forced(fx, ema, clip_loss, ref):
    """At each checked iteration k: e = recorded e_k; our search_terms, then d(weighted term)/de for each term."""
    cfg = fx['config']
    w = {'clip': cfg['clip_loss_w'], 'id': cfg['id_loss_w'], 'l1': cfg['l1_loss_w']}
    d = fx['d_text'][0].double()

    def cos_to_text(f_trg):
        u = f_trg.double() - fx['f_src'].double()
        return F.cosine_similarity(u / (u.norm(dim=-1, keepdim=True) + cfg['dir_eps']), d[None], dim=-1)

    for k in checked_iterations(fx):
        e = _row(fx, 'e', k)[None].clone().requires_grad_(True)
        terms = search_terms(ema, ema.encoder.combine, clip_loss, ref, e)
        if k < len(fx['iter_z']):
            assert maxabs(terms['z'], fx['iter_z'][k]) < 1e-6 and maxabs(terms['c'], fx['iter_c'][k]) < 1e-4, k
        assert not _row(fx, 'fallback', k)
        cos_err = (cos_to_text(terms['f_trg'].detach()) - cos_to_text(_row(fx, 'f_trg', k))).abs()
        assert cos_err[:-1].max() < 1e-3 and cos_err[-1] < 2e-2, (k, cos_err)
        assert abs(terms['L_dir'].item() - _row(fx, 'L_dir', k).item()) < 5e-3, k
        assert abs(terms['clip'].item() - _row(fx, 'loss_clip', k).item()) < 5e-3, k
        assert abs(terms['id'].item() - _row(fx, 'loss_id', k).item()) < 1e-6, k
        assert abs(terms['l1'].item() - _row(fx, 'loss_l1', k).item()) < 1e-6, k
        total = sum(w[n] * terms[n] for n in w)
        assert abs(total.item() - _row(fx, 'loss', k).item()) < 2e-2, k
        grads = {n: torch.autograd.grad(w[n] * terms[n], e, retain_graph=n != 'l1')[0][0] for n in ('id', 'clip', 'l1')}
        ref_id = _row(fx, 'grad_id', k)
        assert maxabs(grads['id'], ref_id) < 1e-6 and rel(grads['id'], ref_id) < 1e-5, k
        assert rel(grads['l1'], _row(fx, 'grad_l1', k)) < 5e-2, k
        for ours, key in ((grads['clip'], 'grad_clip'), (sum(grads.values()), 'grad')):
            target = _row(fx, key, k)
            assert rel(ours, target) < 0.1 and F.cosine_similarity(ours, target, dim=0) > 0.99, (k, key)


def test_adam_replayed_from_recorded_gradients(fx):
    cfg = fx['config']
    assert cfg['adam']['betas'] == ADAM_BETAS and cfg['adam']['eps'] == ADAM_EPS
    assert cfg['adam']['weight_decay'] == 0 and not cfg['adam']['amsgrad']
    for run in ('iter', 'long'):
        e_rec, grads = fx[f'{run}_e'], fx[f'{run}_grad']
        e = e_rec[:1].clone().requires_grad_(True)
        opt = identity_optimizer(e, cfg['lr'])
        for k, g in enumerate(grads):
            e.grad = g[None].clone()
            opt.step()
            assert maxabs(e.detach()[0], e_rec[k + 1]) < 1e-7, (run, k)
            state = opt.state[e]
            assert rel(state['exp_avg'][0], fx[f'{run}_adam_exp_avg'][k]) < 1e-5, (run, k)
            assert rel(state['exp_avg_sq'][0], fx[f'{run}_adam_exp_avg_sq'][k]) < 1e-5, (run, k)
    assert maxabs((fx['e_step1'] - fx['z0']).abs(), torch.full((1, 512), cfg['lr'])) < 1e-7


def test_edit_and_paste_from_recorded_values(fx):
    cfg = fx['config']
    for prefix, n in (('', cfg['n_iter']), ('long_', cfg['n_iter_long'])):
        delta = fx[f'{prefix}e' if prefix else 'iter_e'][n][None] - fx['z0']
        assert maxabs(delta, fx[f'{prefix}delta']) < 1e-7
        assert maxabs(apply_clip_direction(fx['z_bar'], fx[f'{prefix}delta'], cfg['scale']), fx[f'{prefix}z_edit']) < 1e-7
    paste = core.blend(fx['render'] * 2 - 1, fx['x0'], fx['mask_video'])
    assert maxabs(paste, fx['paste']) < 1e-6
