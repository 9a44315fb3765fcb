"""run_train.py, run_eval.py and run_cls.py end to end on CPU: tiny preset, random weights, a few frames.

The DDP test launches `python run_train.py ... --strategy ddp --devices 2` in a subprocess (Lightning re-launches the
script for rank 1), so that no process group is left in the pytest process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import make_clip_root

import run_cls
import run_eval
import run_train
import templates
from config import CELEBA_ATTRIBUTES
from dataset import image_to_tensor, write_celebahq_lmdb
from model.autoencoder import DiffusionVideoAutoencoder
from model.classifier import AttributeClassifier
from model.encoders import IdentityEncoder
from model.pretrained import load_classifier, load_dva
from training import ClipDataModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def clip_root(tmp_path_factory, sample_video_dir) -> Path:
    return make_clip_root(tmp_path_factory.mktemp('clips'), sample_video_dir)


def train_args(data: Path, logdir: Path, *extra: str) -> list[str]:
    return ['--template', 'tiny', '--data', str(data), '--logdir', str(logdir), '--accelerator', 'cpu',
            '--devices', '1', '--no_progress', *extra]


@pytest.fixture(scope='module')
def released_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A released-layout checkpoint of a tiny model: {'state_dict': model.*/ema_model.*, 'global_step', 'epoch'},
    no config, no optimizer. The EMA UNet and the EMA identity net differ from the training copy."""
    torch.manual_seed(1)
    model = DiffusionVideoAutoencoder(templates.tiny())
    sd = model.state_dict()
    ema = dict(sd)
    gen = torch.Generator().manual_seed(2)
    for k in ('out.2.weight', 'encoder.linear.weight', 'encoder.idnet.backbone.input_layer.0.weight'):
        ema[k] = sd[k] + 0.05 * torch.randn(sd[k].shape, generator=gen)
    path = tmp_path_factory.mktemp('released') / 'epoch=51-step=1000000.ckpt'
    state = {**{f'model.{k}': v for k, v in sd.items()}, **{f'ema_model.{k}': v for k, v in ema.items()}}
    torch.save({'state_dict': state, 'global_step': 1_000_000, 'epoch': 51}, path)
    return path, sd, ema


@pytest.fixture(scope='module')
def ir_se50_dir(tmp_path_factory) -> Path:
    """pretrained_models/model_ir_se50.pth with random (seeded) weights, in the released plain state-dict format."""
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp('pretrained_models')
    torch.save(IdentityEncoder().backbone.state_dict(), folder / 'model_ir_se50.pth')
    return folder


def identity_net(ir_se50_dir: Path) -> IdentityEncoder:
    net = IdentityEncoder()
    net.backbone.load_state_dict(torch.load(ir_se50_dir / 'model_ir_se50.pth', weights_only=True))
    return net.eval()


# --------------------------------------------------------------------------------------------------------------------
# run_train.py


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    run = tmp_path / 'run'
    assert run_train.main(train_args(tmp_path, run, '--set', 'train.lr=0.001', '--max_steps', '7', '--dry-run')) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = out['dva_config']
    assert cfg['train']['lr'] == 0.001 and cfg['train']['max_steps'] == 7 and cfg['data']['root'] == str(tmp_path)
    assert cfg['unet']['image_size'] == 32 and out['run_dir'] == str(run)
    assert not run.exists()


@pytest.mark.parametrize('override', ['train.nope=1', 'lr=1e-3', 'train.lr=fast', 'train.precision=64'])
def test_bad_override_is_an_error(tmp_path, capsys, override):
    with pytest.raises(SystemExit) as e:
        run_train.main(train_args(tmp_path, tmp_path / 'run', '--set', override, '--dry-run'))
    assert e.value.code == 2
    assert override.split('=')[0] in capsys.readouterr().err


def test_missing_data_or_weights_is_a_clear_error(tmp_path, clip_root):
    with pytest.raises(SystemExit, match='does not exist'):
        run_train.main(train_args(tmp_path / 'nowhere', tmp_path / 'runs' / 'run1', '--random_encoders'))
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    with pytest.raises(SystemExit, match='no video folders'):
        run_train.main(train_args(tmp_path / 'empty', tmp_path / 'run2', '--random_encoders'))
    with pytest.raises(SystemExit, match='model_ir_se50.pth'):  # a fresh run needs the frozen encoder weights
        run_train.main(train_args(clip_root, tmp_path / 'run3', '--pretrained_dir', str(tmp_path / 'nothing')))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty']  # the failed runs left no folder behind
    (tmp_path / 'mine').mkdir()  # a folder that existed before the run is kept
    with pytest.raises(SystemExit, match='no video folders'):
        run_train.main(train_args(tmp_path / 'empty', tmp_path / 'mine', '--random_encoders'))
    assert (tmp_path / 'mine').is_dir()


def test_videos_with_too_few_frames_are_skipped_or_rejected(tmp_path, sample_video_dir):
    root = make_clip_root(tmp_path / 'data', sample_video_dir, videos={'train/long': 4, 'train/short': 1})
    with pytest.raises(SystemExit, match='frames_per_clip'):
        run_train.main(train_args(root, tmp_path / 'run', '--random_encoders', '--set', 'data.frames_per_clip=5'))
    data = ClipDataModule(replace(templates.tiny().data, root=str(root)), 32, 1)  # frames_per_clip=2
    with pytest.warns(UserWarning, match='short'):
        data.setup('fit')
    assert data.train_set.videos == ['long']


def test_resume_of_a_released_checkpoint_points_to_init_from(tmp_path, released_ckpt, clip_root):
    with pytest.raises(SystemExit, match='--init_from'):
        run_train.main(train_args(clip_root, tmp_path / 'run', '--resume', str(released_ckpt[0])))


def test_init_from_a_released_checkpoint_starts_at_step_zero(tmp_path, released_ckpt, clip_root):
    path, model_sd, ema_sd = released_ckpt
    run = tmp_path / 'finetune'
    run_train.main(train_args(clip_root, run, '--init_from', str(path), '--max_steps', '1',
                              '--set', 'train.sample_every=0', '--set', 'train.ckpt_every=100'))
    ckpt = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    assert ckpt['global_step'] == 1  # one step from 0, not from the released 1,000,000
    state = ckpt['state_dict']
    for k in ('encoder.idnet.backbone.body.0.res_layer.1.weight', 'encoder.bgnet.backbone.cp.resnet.conv1.weight'):
        if k in model_sd:
            assert torch.equal(state[f'model.{k}'], model_sd[k])
    # the EMA starts from the released EMA weights, the model from the released model weights (one Adam step away)
    for k in ('out.2.weight', 'time_embed.time_embed.0.weight'):
        torch.testing.assert_close(state[f'ema_model.{k}'], ema_sd[k], rtol=0, atol=1e-4)
        torch.testing.assert_close(state[f'model.{k}'], model_sd[k], rtol=0, atol=2e-4)
    assert not torch.allclose(state['ema_model.out.2.weight'], state['model.out.2.weight'], atol=1e-2)
    k = 'encoder.idnet.backbone.input_layer.0.weight'  # the frozen nets are shared: they hold the EMA copy's values
    assert torch.equal(state[f'model.{k}'], ema_sd[k]) and torch.equal(state[f'ema_model.{k}'], ema_sd[k])
    config = json.loads((run / 'config.json').read_text())
    assert config['init_from'] == str(path) and config['encoders'] == f'checkpoint:{path}'
    load_dva(run / 'last.ckpt', templates.tiny())
    with pytest.raises(SystemExit, match='--resume'):  # a fresh run may not reuse a folder with checkpoints
        run_train.main(train_args(clip_root, run, '--init_from', str(path)))


def test_ddp_two_cpu_processes(tmp_path, clip_root):
    """Also the output of a run into pipes (a log file): plain progress lines, no bar escape codes, none of the
    Lightning messages that call for no action (on either rank)."""
    run = tmp_path / 'ddp'
    env = {k: v for k, v in os.environ.items() if k not in ('LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'NODE_RANK',
                                                             'PYTHONWARNINGS')}
    env.update(OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    cmd = [sys.executable, 'run_train.py', '--template', 'tiny', '--data', str(clip_root), '--logdir', str(run),
           '--random_encoders', '--accelerator', 'cpu', '--devices', '2', '--strategy', 'ddp', '--max_steps', '2',
           '--set', 'train.ckpt_every=2', '--set', 'train.sample_every=0']
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert 'step 1/2  loss_eps ' in proc.stdout and 'step 2/2  loss_eps ' in proc.stdout
    for noise in ('\r', '\x1b', 'it/s', 'litlogger', 'exists and is not empty', 'eval mode', 'Modules in',
                  'Total params', 'LeafSpec', 'validation_step'):
        assert noise not in out, (noise, out[-3000:])
    ckpt = torch.load(run / 'last.ckpt', map_location='cpu', weights_only=True)
    assert ckpt['global_step'] == 2
    assert json.loads((run / 'config.json').read_text())['world_size'] == 2
    load_dva(run / 'last.ckpt', templates.tiny())


# --------------------------------------------------------------------------------------------------------------------
# run_eval.py


def frames_of(root: Path, split: str) -> list[Path]:
    return [f for v in sorted((root / split).iterdir()) for f in sorted(v.iterdir(), key=lambda p: int(p.stem))]


def features(net: torch.nn.Module, paths: list[Path], size: int) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.stack([image_to_tensor(Image.open(p).convert('RGB'), size) for p in paths]))


def test_run_eval_stats_cover_every_frame(tmp_path, clip_root, ir_se50_dir):
    out = tmp_path / 'latent.pkl'
    run_eval.main(['--pretrained_dir', str(ir_se50_dir), '--template', 'tiny', '--data', str(clip_root),
                   '--split', 'test', '--out', str(out), '--batch_size', '4', '--device', 'cpu'])
    stats = torch.load(out, weights_only=True)
    paths = frames_of(clip_root, 'test')
    assert len(paths) == 10  # 2 videos x 5 frames: batches of 4, 4 and 2, all kept
    expected = features(identity_net(ir_se50_dir), paths, 32)
    assert set(stats) == {'conds', 'conds_mean', 'conds_std'}
    assert stats['conds'].dtype == torch.float32 and stats['conds'].shape == (10, 512)
    torch.testing.assert_close(stats['conds'], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(stats['conds_mean'], expected.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats['conds_std'], expected.std(0, unbiased=True), rtol=1e-4, atol=1e-6)
    side = json.loads(out.with_suffix('.json').read_text())
    assert side['frames'] == 10 and side['videos'] == 2 and side['split'] == 'test'
    with pytest.raises(SystemExit, match='--overwrite'):
        run_eval.main(['--pretrained_dir', str(ir_se50_dir), '--data', str(clip_root), '--out', str(out)])


def test_run_eval_uses_the_ema_identity_net_of_a_checkpoint(tmp_path, clip_root, released_ckpt):
    path, _, ema_sd = released_ckpt
    out = tmp_path / 'latent.pkl'
    run_eval.main(['--checkpoint', str(path), '--data', str(clip_root), '--split', 'test', '--out', str(out),
                   '--max_frames_per_video', '2', '--device', 'cpu', '--template', 'tiny'])
    stats = torch.load(out, weights_only=True)
    net = IdentityEncoder()
    net.load_state_dict({k[len('encoder.idnet.'):]: v for k, v in ema_sd.items() if k.startswith('encoder.idnet.')})
    paths = [p for p in frames_of(clip_root, 'test') if p.stem in ('0', '4')]  # first and last of each video
    torch.testing.assert_close(stats['conds'], features(net.eval(), paths, 32), rtol=0, atol=1e-5)
    assert json.loads(out.with_suffix('.json').read_text())['frames_per_video'] == {'a': 2, 'b': 2}


def test_run_eval_reports_a_corrupt_frame(tmp_path, clip_root):
    root = tmp_path / 'data'
    (root / 'test' / 'v').mkdir(parents=True)
    Image.new('RGB', (32, 32)).save(root / 'test' / 'v' / '0.png')
    (root / 'test' / 'v' / '1.png').write_bytes(b'not a png at all')
    with pytest.raises(ValueError, match='1.png'):
        run_eval.main(['--random_encoder', '--template', 'tiny', '--data', str(root), '--out',
                       str(tmp_path / 'l.pkl'), '--device', 'cpu'])
    with pytest.raises(SystemExit, match='does not exist'):
        run_eval.main(['--random_encoder', '--data', str(tmp_path / 'missing'), '--out', str(tmp_path / 'm.pkl')])


# --------------------------------------------------------------------------------------------------------------------
# run_cls.py


def write_anno(path: Path, labels: dict[int, np.ndarray]) -> Path:
    lines = [str(len(labels)), ' '.join(CELEBA_ATTRIBUTES)]
    lines += [f'{i}.jpg ' + ' '.join('1' if v else '-1' for v in row) for i, row in sorted(labels.items())]
    path.write_text('\n'.join(lines) + '\n')
    return path


def face_family(n: int, size: int, seed: int) -> list[Image.Image]:
    """n images along a line between two smooth random images: their identity features vary along one curve."""
    g = torch.Generator().manual_seed(seed)
    ends = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, size=size, mode='bilinear')
    alpha = torch.rand(n, 1, 1, 1, generator=g)
    imgs = ((1 - alpha) * ends[0] + alpha * ends[1]).clamp(-1, 1).add(1).mul(127.5).round().byte()
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in imgs]


def test_run_cls_learns_linearly_separable_attributes(tmp_path, ir_se50_dir, parity_dir):
    n, size = 32, 64
    images = face_family(n, size, seed=0)
    lmdb_path = tmp_path / 'celebahq.lmdb'
    write_celebahq_lmdb(enumerate(images), lmdb_path)
    with torch.no_grad():
        feats = identity_net(ir_se50_dir)(torch.stack([image_to_tensor(img, size) for img in images]))
    stats = {'conds': feats, 'conds_mean': feats.mean(0), 'conds_std': feats.std(0)}
    torch.save(stats, tmp_path / 'latent.pkl')
    # labels: a random linear function of the z-normalised features, thresholded in the widest gap of its middle half
    score = ((feats - stats['conds_mean']) / stats['conds_std']) @ torch.randn(512, 40, generator=torch.Generator()
                                                                              .manual_seed(1))
    ranked = score.sort(0).values
    cut = (ranked[n // 4 + 1:3 * n // 4 + 1] - ranked[n // 4:3 * n // 4]).argmax(0) + n // 4
    cols = torch.arange(40)
    labels = (score > (ranked[cut, cols] + ranked[cut + 1, cols]) / 2).numpy()
    anno = write_anno(tmp_path / 'anno.txt', dict(enumerate(labels)))
    out = tmp_path / 'cls'
    run_cls.main(['--data', str(lmdb_path), '--anno', str(anno), '--stats', str(tmp_path / 'latent.pkl'),
                  '--pretrained_dir', str(ir_se50_dir), '--out', str(out), '--template', 'tiny_cls',
                  '--set', 'val_fraction=0.25', '--max_steps', '300', '--no-flip', '--device', 'cpu'])
    report = json.loads((out / 'val_accuracy.json').read_text())
    assert report['val_size'] == 8 and len(report['attributes']) == 40
    assert np.mean([r['accuracy'] for r in report['attributes']]) > 0.9
    assert (out / 'val_accuracy.csv').read_text().startswith('attribute,accuracy,ema_accuracy,positive_rate')
    clf, meta = load_classifier(out / 'last.ckpt')
    assert isinstance(clf, AttributeClassifier) and meta['global_step'] == 300
    torch.testing.assert_close(clf.conds_mean, stats['conds_mean'][None])
    acc = ((clf(feats) > 0).numpy() == labels).mean()
    assert acc > 0.9
    released, _ = load_classifier(parity_dir / 'classifier' / 'last.ckpt')
    assert type(released) is type(clf) and released.state_dict().keys() == clf.state_dict().keys()
    assert {k: v.shape for k, v in released.state_dict().items()} == {k: v.shape for k, v in clf.state_dict().items()}


def test_run_cls_rejects_images_without_annotation_rows(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for i, img in enumerate(face_family(3, 16, seed=1)):
        img.save(folder / f'{i}.png')
    anno = write_anno(tmp_path / 'anno.txt', {0: np.ones(40), 1: np.zeros(40)})
    torch.save({'conds': torch.randn(4, 512), 'conds_mean': torch.zeros(512), 'conds_std': torch.ones(512)},
               tmp_path / 'latent.pkl')
    args = ['--image_folder', str(folder), '--anno', str(anno), '--stats', str(tmp_path / 'latent.pkl'),
            '--random_encoder', '--out', str(tmp_path / 'cls'), '--template', 'tiny_cls', '--device', 'cpu']
    with pytest.raises(SystemExit, match='no row'):
        run_cls.main(args)
    with pytest.raises(SystemExit, match='latent'):
        run_cls.main([*args[:4], '--stats', str(tmp_path / 'missing.pkl'), *args[6:]])
    assert not (tmp_path / 'cls').exists()
    with pytest.raises(SystemExit, match='does not exist'):
        run_cls.main(['--data', str(tmp_path / 'no.lmdb'), *args[2:]])
