"""training.py: EMA, the DVA training step, the checkpoint layout, resume, the sample grid and the classifier loop.

Everything runs on CPU with the tiny preset (32x32 UNet) and random weights. The frozen encoders keep their real
sizes (IR-SE50 at 112 px, BiSeNet at 512 px), so runs are a few steps on a few frames; the overfit test replaces the
frozen encoders by fixed features to afford 30 optimiser steps.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

import identity
import templates
import training
from config import ClsConfig, to_dict
from model.autoencoder import DiffusionVideoAutoencoder
from model.nn import ema_update
from model.pretrained import load_dva


def make_clip_root(root: Path, frames_dir: Path, size: int = 32, videos: dict[str, int] | None = None) -> Path:
    """ROOT/{split}/<video>/<i>.png from square centre crops of the sample frames, resized to `size`."""
    videos = videos or {'train/vid1': 6, 'train/vid2': 6, 'train/vid10': 6, 'test/a': 5, 'test/b': 5}
    sources = sorted(frames_dir.glob('*.jp*g'))
    k = 0
    for name, n in videos.items():
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(n):
            with Image.open(sources[(3 * k) % len(sources)]) as img:
                w, h = img.size
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
                img.convert('RGB').crop(box).resize((size, size), Image.BILINEAR).save(folder / f'{j}.png')
            k += 1
    return root


@pytest.fixture(scope='module')
def clip_root(tmp_path_factory, sample_video_dir) -> Path:
    return make_clip_root(tmp_path_factory.mktemp('clips'), sample_video_dir)


def tiny_cfg(root: Path | None = None, **train):
    cfg = templates.tiny()
    data = cfg.data if root is None else replace(cfg.data, root=str(root))
    return replace(cfg, data=data, train=replace(cfg.train, **train))


CPU = {'accelerator': 'cpu', 'devices': 1, 'enable_progress_bar': False}


# --------------------------------------------------------------------------------------------------------------------
# EMA


def test_ema_copy_shares_frozen_encoders_and_averages_trainable_only():
    model = DiffusionVideoAutoencoder(templates.tiny())
    ema = training.make_ema(model)
    for name in model.encoder.FROZEN:
        assert getattr(ema.encoder, name) is getattr(model.encoder, name)
    assert ema.encoder.linear is not model.encoder.linear
    assert not any(p.requires_grad for p in ema.parameters())
    names = model.trainable_state_keys()
    assert 'encoder.linear.weight' in names and not any(k.startswith('encoder.idnet') for k in names)

    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    ema_update(ema, model, decay=0.75)
    after, params = ema.state_dict(), dict(model.named_parameters())
    for k in names:
        torch.testing.assert_close(after[k], 0.75 * before[k] + 0.25 * params[k].detach())
    for k, v in after.items():
        if k not in names:
            assert torch.equal(v, before[k]), k  # frozen nets and buffers are not averaged


# --------------------------------------------------------------------------------------------------------------------
# The training step


def test_training_step_runs_frozen_encoders_once_without_grad():
    torch.manual_seed(0)
    module = training.DVAModule(templates.tiny())
    with torch.no_grad():  # undo the zero init of the output convs, so that gradients reach z_face
        for p in module.model.trainable_parameters():
            if not p.any():
                p.normal_(0, 0.02)
    enc = module.model.encoder
    calls = {}

    def counting(name):
        fn = getattr(enc, name)

        def wrapper(img, *args):
            calls.setdefault(name, []).append((img.shape[0], torch.is_grad_enabled()))
            return fn(img, *args)
        return wrapper

    for name in ('identity', 'landmarks', 'mask'):
        setattr(enc, name, counting(name))
    clips = torch.rand(2, 1, 3, 32, 32) * 2 - 1  # B=2 clips of K=1 frame: flattened to 2 frames, never squeezed
    loss = module.training_step({'img': clips}, 0)
    assert calls == {'identity': [(2, False)], 'landmarks': [(2, False)], 'mask': [(2, False)]}
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert enc.linear.weight.grad is not None and enc.linear.weight.grad.abs().sum() > 0
    assert module.model.out[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for name in enc.FROZEN for p in getattr(enc, name).parameters())
    assert all(p.grad is None for p in module.ema_model.parameters())
    with pytest.raises(ValueError, match='clips'):
        module.training_step({'img': clips[:, 0]}, 0)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.loss, self.loss_eps = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(float(outputs['loss']))
        self.loss_eps.append(float(trainer.callback_metrics['loss_eps']))


def test_short_overfit_lowers_the_loss(tmp_path):
    import lightning as L

    L.seed_everything(0, verbose=False)
    steps = 30
    cfg = tiny_cfg(lr=2e-3, max_steps=steps, ckpt_every=10**6, sample_every=0)
    module = training.DVAModule(cfg)
    g = torch.Generator().manual_seed(0)
    clip = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, size=32, mode='bilinear')
    id_feat = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=1)
    lnd_feat = torch.rand(2, 102, generator=g)
    enc = module.model.encoder  # fixed features stand in for the (slow, frozen) encoders
    enc.identity = lambda img: id_feat[: img.shape[0]]
    enc.landmarks = lambda img: lnd_feat[: img.shape[0]]
    enc.mask = lambda img, kind='train': torch.ones_like(img[:, :1])
    rec = LossRecorder()
    trainer = training.build_trainer(cfg, tmp_path, callbacks=[rec], **CPU)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([{'img': clip}] * steps, batch_size=1))
    assert trainer.global_step == steps and len(rec.loss) == steps
    first, last = slice(0, 10), slice(-10, None)
    assert np.mean(rec.loss_eps[last]) < 0.75 * np.mean(rec.loss_eps[first]), rec.loss_eps
    assert np.mean(rec.loss[last]) < np.mean(rec.loss[first]), rec.loss
    # the EMA (decay 0.9999) has barely moved from the initial weights, the model has
    ema_w, w = module.ema_model.out[-1].weight, module.model.out[-1].weight
    assert w.abs().sum() > 0 and ema_w.abs().max() < 0.01 * w.abs().max()


# --------------------------------------------------------------------------------------------------------------------
# A real run: checkpoints, sample grid, load_dva, resume


@pytest.fixture(scope='module')
def short_run(tmp_path_factory, clip_root) -> tuple[Path, object]:
    """Two steps with real (random) encoders: checkpoint and sample grid at step 2, in the paper's mixed precision
    ('16-mixed', which Lightning runs as bf16 autocast on CPU; tests/test_cuda.py runs fp16 + GradScaler on a GPU)."""
    run = tmp_path_factory.mktemp('run') / 'tiny'
    cfg = tiny_cfg(clip_root, max_steps=2, ckpt_every=2, sample_every=2, precision='16-mixed')
    module = training.run_training(cfg, run, random_encoders=True, trainer_kwargs=CPU)
    assert module.trainer.precision == 'bf16-mixed'
    losses = {k: v for k, v in module.trainer.callback_metrics.items() if 'loss' in k}
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    return run, cfg


def test_checkpoint_has_the_released_layout_and_loads_with_load_dva(short_run, parity_dir):
    run, cfg = short_run
    assert (run / 'last.ckpt').is_file() and (run / 'step=0000002.ckpt').is_file()
    # one copy on disk: last.ckpt is a relative link to the newest numbered checkpoint (survives moving the run)
    assert (run / 'last.ckpt').is_symlink() and os.readlink(run / 'last.ckpt') == 'step=0000002.ckpt'
    ckpt = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    keys = list(DiffusionVideoAutoencoder(cfg).state_dict())
    assert set(ckpt['state_dict']) == {f'model.{k}' for k in keys} | {f'ema_model.{k}' for k in keys}
    assert ckpt['global_step'] == 2 and ckpt['dva_config'] == to_dict(cfg) and ckpt['encoders'] == 'random'
    assert ckpt['optimizer_states'] and ckpt['optimizer_states'][0]['state']
    # mixed precision keeps fp32 master weights
    assert {v.dtype for v in ckpt['state_dict'].values() if v.is_floating_point()} == {torch.float32}

    # the frozen-encoder and fusion keys are exactly the released ones (keys/dva.tsv lists the released file)
    with open(parity_dir / 'keys' / 'dva.tsv') as f:
        released = {row[0] for row in csv.reader((line for line in f if not line.startswith('#')), delimiter='\t')}
    ours = set(ckpt['state_dict'])
    for prefix in ('model.encoder.', 'ema_model.encoder.'):
        assert {k for k in ours if k.startswith(prefix)} == {k for k in released if k.startswith(prefix)}

    ema, ema_cfg, meta = load_dva(run / 'last.ckpt', templates.diffusion_video_autoencoder())
    model, _, _ = load_dva(run / 'last.ckpt', templates.diffusion_video_autoencoder(), which='model')
    assert ema_cfg == cfg and meta['global_step'] == 2
    assert not torch.equal(ema.out[-1].weight, model.out[-1].weight)  # the EMA lags the trained weights
    torch.testing.assert_close(ema.encoder.idnet.backbone.input_layer[0].weight,
                               model.encoder.idnet.backbone.input_layer[0].weight, rtol=0, atol=0)
    # the frozen nets are stored once: the EMA copy shares their storage
    sd = ckpt['state_dict']
    k = 'encoder.bgnet.backbone.cp.resnet.conv1.weight'
    if f'model.{k}' in sd:
        assert sd[f'model.{k}'].untyped_storage().data_ptr() == sd[f'ema_model.{k}'].untyped_storage().data_ptr()


def test_sample_grid_and_logs_are_written(short_run):
    run, cfg = short_run
    grid = run / 'samples' / 'step=0000002.png'
    assert grid.is_file()
    with Image.open(grid) as img:  # 3 rows (original, reconstruction, random x_T) of sample_batch frames
        s, n, pad = cfg.unet.image_size, cfg.train.sample_batch, 2
        assert img.size == (n * (s + pad) + pad, 3 * (s + pad) + pad)
    assert list((run / 'tb').glob('events.out.tfevents.*'))
    assert (run / 'config.json').is_file()


class OptimizerProbe(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step
        self.ema = {k: v.clone() for k, v in pl_module.ema_model.state_dict().items()}
        self.state = {i: {k: v.clone() for k, v in s.items()} for i, s in
                      enumerate(trainer.optimizers[0].state[p] for p in trainer.optimizers[0].param_groups[0]['params'])}


def test_resume_restores_step_optimizer_and_ema(short_run, tmp_path):
    run0, cfg = short_run
    run = tmp_path / 'resumed'
    shutil.copytree(run0, run)
    saved = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    probe = OptimizerProbe()
    stored = training.read_run_config(run / 'last.ckpt')
    assert stored == cfg
    fp32 = replace(stored.train, precision='32')  # bf16 kernels are ~3x slower on the test machine's CPU
    module = training.run_training(replace(stored, train=replace(fp32, max_steps=4)), run,
                                   resume=run / 'last.ckpt', trainer_kwargs=CPU, callbacks=[probe])
    assert probe.step == 2
    for k, v in probe.ema.items():
        assert torch.equal(v, saved['state_dict'][f'ema_model.{k}']), k
    saved_state = saved['optimizer_states'][0]['state']
    assert len(probe.state) == len(saved_state)
    for i, s in saved_state.items():
        torch.testing.assert_close(probe.state[i]['exp_avg'], s['exp_avg'], rtol=0, atol=0)
        torch.testing.assert_close(probe.state[i]['exp_avg_sq'], s['exp_avg_sq'], rtol=0, atol=0)
    final = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    assert final['global_step'] == 4 and (run / 'step=0000004.ckpt').is_file()
    assert torch.load(run / 'step=0000002.ckpt', map_location='cpu', weights_only=True)['global_step'] == 2
    # a run ending between checkpoints writes a real last.ckpt, never through the link into step=0000004.ckpt
    training.run_training(replace(stored, train=replace(fp32, max_steps=5)), run, resume=run / 'last.ckpt',
                          trainer_kwargs=CPU)
    assert not (run / 'last.ckpt').is_symlink()
    assert torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)['global_step'] == 5
    assert torch.load(run / 'step=0000004.ckpt', map_location='cpu', weights_only=True)['global_step'] == 4
    assert float(final['optimizer_states'][0]['state'][0]['step']) == 4
    assert module.global_step == 4


def test_fresh_run_refuses_a_folder_with_checkpoints(short_run, tmp_path):
    run0, _ = short_run
    run = tmp_path / 'again'
    run.mkdir()
    shutil.copy(run0 / 'last.ckpt', run / 'last.ckpt')
    (run / 'latent.pkl').write_bytes(b'keep me')
    with pytest.raises(SystemExit, match='--resume'):
        training.prepare_run_dir(run, resume=False, overwrite=False)
    training.prepare_run_dir(run, resume=True, overwrite=False)
    assert (run / 'last.ckpt').exists()
    training.prepare_run_dir(run, resume=False, overwrite=True)
    assert not (run / 'last.ckpt').exists() and (run / 'latent.pkl').read_bytes() == b'keep me'


def test_resume_rejects_a_checkpoint_without_optimizer_state(short_run, tmp_path):
    run0, cfg = short_run
    ckpt = torch.load(run0 / 'last.ckpt', map_location='cpu', weights_only=True)
    del ckpt['optimizer_states']
    torch.save(ckpt, tmp_path / 'weights_only.ckpt')
    module = training.DVAModule(cfg)
    module.on_load_checkpoint(ckpt)  # without a Trainer (plain load) it is accepted
    module._trainer = object()
    with pytest.raises(ValueError, match='--init_from'):
        module.on_load_checkpoint(ckpt)
    other = {**ckpt, 'dva_config': to_dict(replace(cfg, unet=replace(cfg.unet, model_channels=8)))}
    with pytest.raises(ValueError, match='unet'):
        module.on_load_checkpoint(other)


class FailAtStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError('boom before the first step')


def test_a_run_failing_before_its_first_step_leaves_no_folder(tmp_path, clip_root):
    run = tmp_path / 'runs' / 'new' / 'tiny'  # runs/new/tiny are created by the run
    with pytest.raises(RuntimeError, match='boom'):
        training.run_training(tiny_cfg(clip_root, max_steps=1), run, random_encoders=True, trainer_kwargs=CPU,
                              callbacks=[FailAtStart()])
    assert list(tmp_path.iterdir()) == []


def test_quiet_lightning_drops_only_the_noise():
    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    handler = Records()
    logging.getLogger('lightning').addHandler(handler)
    logging.getLogger('lightning.pytorch').addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter('always')
            with training.quiet_lightning():
                L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False)
                rank_zero_warn('Checkpoint directory /runs/a exists and is not empty.')
                rank_zero_warn('Found 585 module(s) in eval mode at the start of training. This may lead to ...')
                warnings.warn('a real problem', UserWarning)
            rank_zero_warn('Checkpoint directory /runs/b exists and is not empty.')  # the filters end with the block
            quiet_logs = list(handler.messages)
            L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False)
    finally:
        logging.getLogger('lightning').removeHandler(handler)
        logging.getLogger('lightning.pytorch').removeHandler(handler)
    assert [str(w.message) for w in seen] == ['a real problem', 'Checkpoint directory /runs/b exists and is not empty.']
    assert quiet_logs and not any('litlogger' in m for m in quiet_logs)  # 'GPU available: ...' is kept
    assert any('litlogger' in m for m in handler.messages[len(quiet_logs):])


# --------------------------------------------------------------------------------------------------------------------
# Identity statistics and the classifier loop


def test_identity_stats_and_frame_selection():
    conds = torch.randn(7, 512)
    stats = identity.identity_stats(conds)
    assert stats['conds'].dtype == torch.float32 and stats['conds'].shape == (7, 512)
    torch.testing.assert_close(stats['conds_mean'], conds.mean(0))
    torch.testing.assert_close(stats['conds_std'], torch.from_numpy(np.std(conds.numpy(), axis=0, ddof=1)))
    with pytest.raises(ValueError):
        identity.identity_stats(conds[:1])
    frames = [Path(f'{i}.png') for i in range(10)]
    assert identity.select_frames(frames, None) == frames
    assert identity.select_frames(frames, 3) == [Path('0.png'), Path('4.png'), Path('9.png')]
    assert identity.select_frames(frames, 20) == frames


def test_classifier_loop_learns_separable_attributes():
    g = torch.Generator().manual_seed(0)
    n, d, c = 400, 512, 40
    latent = torch.randn(n, 4, generator=g)  # identities vary along a few directions, as real ones mostly do
    feats = torch.randn(1, d, generator=g) + latent @ torch.randn(4, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    feats = torch.nn.functional.normalize(feats, dim=1)
    stats = identity.identity_stats(feats)
    z = (feats - stats['conds_mean']) / stats['conds_std']
    labels = (z @ torch.randn(d, c, generator=g) > 0).float()
    cfg = ClsConfig(batch_size=32, max_steps=300, val_fraction=0.25, precision='32', num_workers=0)
    clf, report = identity.train_attribute_classifier(torch.stack([feats, feats], 1), labels, stats, cfg,
                                                      progress=False)
    assert report['val_size'] == 100 and report['train_size'] == 300
    assert report['loss_last'] < 0.5 * report['loss_first']
    assert np.mean(report['train_accuracy']) > 0.95
    assert np.mean(report['val_accuracy']) > 0.9
    torch.testing.assert_close(clf.conds_mean, stats['conds_mean'][None])
    # EMA at 0.9999 over 300 steps stays close to its start, the classifier does not
    assert (clf.ema_classifier.weight - clf.classifier.weight).abs().max() > 0.01
    with pytest.raises(ValueError, match='labels'):
        identity.train_attribute_classifier(feats, labels[:, :3], stats, cfg, progress=False)
