"""run_metrics.py end to end on CPU: the tiny preset with random weights, crops cut from the real sample frames."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation
import reporting
import run_metrics
import templates
from metrics import ALEXNET_FILE

FACE_BOX = (265, 27, 435, 197)  # square around the face in the sample frames reduced 4x (480x270)
T_VALID = 5  # 1000 steps with stride 200


def _face_crops(sample_video_dir: Path, indices: range, size: int) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for i in indices:
        with Image.open(sample_video_dir / f'{i:04d}.jpeg') as im:
            face = im.convert('RGB').reduce(4).crop(FACE_BOX)
        out.append(np.asarray(face.resize((size, size), Image.BICUBIC)))
    return out


def _save(folder: Path, images: list[np.ndarray], names: list[str] | None = None) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        Image.fromarray(img).save(folder / f'{names[k] if names else f"{k:04d}"}.png')
    return folder


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def tiny_written(tmp_path_factory):
    """The tiny DVA with random weights (zero-initialised layers re-initialised, so that renders depend on the
    input), saved in the released Lightning layout: (checkpoint path, the model)."""
    from bench.bench_edit import write_random_checkpoints

    dva, _, model = write_random_checkpoints(templates.tiny(), tmp_path_factory.mktemp('ckpt'), seed=0)
    return dva, model


@pytest.fixture(scope='module')
def tiny_model(tiny_written):
    return tiny_written[1]


@pytest.fixture(scope='module')
def tiny_ckpt(tiny_written) -> Path:
    return tiny_written[0]


@pytest.fixture(scope='module')
def aligned_root(sample_video_dir: Path, tmp_path_factory) -> Path:
    """ROOT/test/{vid_a,vid_b}/{0000,0001,0002}.png: 32x32 face crops of 6 real frames."""
    root = tmp_path_factory.mktemp('vox')
    crops = _face_crops(sample_video_dir, range(0, 60, 10), 32)
    _save(root / 'test' / 'vid_a', crops[:3])
    _save(root / 'test' / 'vid_b', crops[3:])
    return root


@pytest.fixture(scope='module')
def face_crops(sample_video_dir: Path) -> list[np.ndarray]:
    return _face_crops(sample_video_dir, range(0, 20, 5), 160)


@pytest.fixture(scope='module')
def source_dir(face_crops, tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp('crops') / 'crops', face_crops)


@pytest.fixture(scope='module')
def edit_dir(face_crops, tmp_path_factory) -> Path:
    """A stand-in edit: the source crops with seeded noise and a brightening of the lower half."""
    rng = np.random.default_rng(0)
    edited = []
    for img in face_crops:
        x = img.astype(np.float32) + rng.normal(0, 12, img.shape)
        x[img.shape[0] // 2:] += 30
        edited.append(np.clip(x, 0, 255).round().astype(np.uint8))
    return _save(tmp_path_factory.mktemp('edit') / 'blend', edited)


def _recon_args(root: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ['recon', '--data', str(root), '--checkpoint', str(ckpt), '--template', 'tiny', '--T', str(T_VALID),
            '--device', 'cpu', '--batch_size', '4', '--out', str(out), '--quiet', *extra]


def test_recon_on_two_ranks_is_the_single_process_report(aligned_root: Path, tiny_ckpt: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    """torchrun with 2 gloo ranks: whole videos per rank, rank 0 writes the report; float64 with one thread per
    process, so the per-frame metrics equal a single process's exactly."""
    import subprocess
    import sys

    from test_distributed import free_port

    args = _recon_args(aligned_root, tiny_ckpt, tmp_path / 'two', '--precision', 'fp64', '--no_lpips')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                          '127.0.0.1', '--master_port', str(free_port()), 'run_metrics.py', *args],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, tmp_path / 'one', '--precision', 'fp64', '--no_lpips'))
    finally:
        torch.set_num_threads(threads)
    assert _read_csv(tmp_path / 'two' / 'frames.csv') == _read_csv(tmp_path / 'one' / 'frames.csv')
    assert json.loads((tmp_path / 'two' / 'config.json').read_text())['ranks'] == 2


# ----------------------------------------------------------------------------------------------------------------------
# Selection helpers


def test_choose_videos() -> None:
    names = [f'v{i}' for i in range(30)]
    a = evaluation.choose_videos(names, 20, seed=0)
    assert a == evaluation.choose_videos(list(reversed(names)), 20, seed=0)  # input order does not matter
    assert len(set(a)) == 20 and set(a) <= set(names) and a == sorted(a)
    assert a != evaluation.choose_videos(names, 20, seed=1)
    assert evaluation.choose_videos(names[:3], 20, seed=0) == sorted(names[:3])


# ----------------------------------------------------------------------------------------------------------------------
# recon


def test_recon_end_to_end(aligned_root: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / 'recon'
    res = run_metrics.main(_recon_args(aligned_root, tiny_ckpt, out, '--num_videos', '5', '--random_lpips'))
    for name in reporting.OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert (out / 'plot.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    mean = res['mean']
    assert 'ms_ssim' not in mean  # 32 px is below MS-SSIM's minimum
    assert 0 < mean['mse'] < 1 and -1 <= mean['ssim'] < 1 and math.isfinite(mean['psnr'])
    assert math.isfinite(mean['lpips'])  # random LPIPS heads can be negative: only finiteness is meaningful

    frames = _read_csv(out / 'frames.csv')
    assert [(r['video'], r['frame']) for r in frames] == [(v, f'{i:04d}.png') for v in ('vid_a', 'vid_b')
                                                          for i in range(3)]
    for r in frames:  # per frame: PSNR is 10 log10(1 / MSE); everything in range
        assert 0 < float(r['mse']) <= 1 and -1 <= float(r['ssim']) <= 1 and math.isfinite(float(r['lpips']))
        assert float(r['psnr']) == pytest.approx(-10 * math.log10(float(r['mse'])), rel=1e-4)
    rows = _read_csv(out / 'metrics.csv')
    assert [r['video'] for r in rows] == ['vid_a', 'vid_b', 'mean (all frames)', 'mean (per-video means)']
    assert float(rows[2]['ssim']) == pytest.approx(np.mean([float(r['ssim']) for r in frames]), rel=1e-4)
    assert float(rows[0]['mse']) == pytest.approx(np.mean([float(r['mse']) for r in frames[:3]]), rel=1e-4)

    report = (out / 'report.md').read_text()
    for text in ('0.922', '0.989', '0.045', '0.002', str(tiny_ckpt), 'T = 5', 'MS-SSIM skipped', 'RANDOM weights',
                 '2 of 2 videos', 'only 2 videos'):
        assert text in report, text
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['T'] == T_VALID and cfg['videos'] == ['vid_a', 'vid_b'] and cfg['frames'] == 6
    assert cfg['network_calls_per_frame'] == 2 * T_VALID - 1 and 'torch' in cfg['software']

    # from Python, without argparse: one video, its first and last frames, replacing the earlier report
    res2 = evaluation.run_recon(out, aligned_root, num_videos=1, seed=3, frames_per_video=2, T=T_VALID,
                                checkpoint=str(tiny_ckpt), template='tiny', device='cpu', batch_size=4, lpips='none',
                                overwrite=True, quiet=True)
    (video,) = evaluation.choose_videos(['vid_a', 'vid_b'], 1, seed=3)
    frames2 = _read_csv(out / 'frames.csv')
    assert [(r['video'], r['frame']) for r in frames2] == [(video, '0000.png'), (video, '0002.png')]
    assert 'lpips' not in res2['mean'] and 'skipped (--no_lpips)' in (out / 'report.md').read_text()
    # frame 0000 of a video: averaged identity over different frames (2 vs 3), so only close, not equal
    first = next(r for r in frames if r['video'] == video and r['frame'] == '0000.png')
    assert float(frames2[0]['ssim']) == pytest.approx(float(first['ssim']), abs=0.2)


def test_recon_compares_against_the_inputs(aligned_root: Path, tiny_ckpt: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With a perfect reconstruction every metric is at its optimum: the inputs are what is compared."""
    monkeypatch.setattr(evaluation, 'reconstruct', lambda rt, crops: crops.clone())
    res = run_metrics.main(_recon_args(aligned_root, tiny_ckpt, tmp_path / 'r', '--random_lpips'))
    assert res['mean']['mse'] == 0 and res['mean']['ssim'] == pytest.approx(1, abs=1e-6)
    assert res['mean']['lpips'] == pytest.approx(0, abs=1e-6) and math.isinf(res['mean']['psnr'])
    assert '| PSNR (dB) ↑ | inf |' in (tmp_path / 'r' / 'report.md').read_text()


def test_recon_ssim_border(aligned_root: Path, tiny_ckpt: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--ssim_border zero reaches metrics.ssim for every frame (not the default 'valid'), and the report says so."""
    from metrics import ssim

    monkeypatch.setattr(evaluation, 'reconstruct', lambda rt, crops: (crops * 0.8).flip(-1))
    out = tmp_path / 'zero'
    run_metrics.main(_recon_args(aligned_root, tiny_ckpt, out, '--no_lpips', '--ssim_border', 'zero'))
    got = [float(r['ssim']) for r in _read_csv(out / 'frames.csv')][:3]
    assert 'SSIM border: zero' in (out / 'report.md').read_text()
    assert json.loads((out / 'config.json').read_text())['ssim_border'] == 'zero'
    assert all((out / f).stat().st_mode & 0o077 for f in reporting.OUTPUT_FILES)  # not 0600: others may read
    crops = evaluation.load_crops(sorted((aligned_root / 'test' / 'vid_a').iterdir()), 32)
    a, b = (crops + 1) / 2, ((crops * 0.8).flip(-1) + 1) / 2
    assert got == pytest.approx(ssim(a, b, border='zero').tolist(), abs=1e-5)
    assert got != pytest.approx(ssim(a, b).tolist(), abs=1e-3)


def test_recon_errors(aligned_root: Path, tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match='nearest valid values: 250 or 334'):
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, tmp_path / 'a', '--T', '300'))
    with pytest.raises(SystemExit, match='--data: .*does not exist'):
        run_metrics.main(_recon_args(tmp_path / 'nowhere', tiny_ckpt, tmp_path / 'a'))
    (tmp_path / 'empty' / 'test').mkdir(parents=True)
    with pytest.raises(SystemExit, match='--data: no video folders'):
        run_metrics.main(_recon_args(tmp_path / 'empty', tiny_ckpt, tmp_path / 'a'))
    with pytest.raises(SystemExit, match='--num_videos must be at least 1'):
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, tmp_path / 'a', '--num_videos', '0'))
    with pytest.raises(evaluation.EvaluationError, match='--frames_per_video must be at least 1'):
        evaluation.run_recon(tmp_path / 'a', aligned_root, frames_per_video=0, checkpoint=str(tiny_ckpt))
    with pytest.raises(evaluation.EvaluationError, match="ssim_border must be one of valid, zero, got 'zeros'"):
        evaluation.run_recon(tmp_path / 'a', aligned_root, ssim_border='zeros', checkpoint=str(tiny_ckpt))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))  # keep a real hub cache out of the search
    with pytest.raises(SystemExit, match=f'{ALEXNET_FILE}.*--no_lpips'):
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, tmp_path / 'a', '--lpips_dir', str(tmp_path)))
    with pytest.raises(SystemExit, match='dva weights not found'):
        run_metrics.main(_recon_args(aligned_root, tmp_path / 'missing.ckpt', tmp_path / 'a', '--no_lpips'))
    done = tmp_path / 'done'
    done.mkdir()
    (done / 'report.md').write_text('earlier result')
    with pytest.raises(SystemExit, match='already holds a report; pass --overwrite'):
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, done, '--no_lpips'))
    (done / 'notes.txt').write_text('not ours')
    with pytest.raises(SystemExit, match='did not write .*notes.txt'):
        run_metrics.main(_recon_args(aligned_root, tiny_ckpt, done, '--no_lpips', '--overwrite'))
    assert (done / 'report.md').read_text() == 'earlier result'


# ----------------------------------------------------------------------------------------------------------------------
# consistency


def _cons_args(src: Path, edit: Path, out: Path, *extra: str) -> list[str]:
    return ['consistency', '--source', str(src), '--edit', str(edit), '--out', str(out), '--quiet', *extra]


def test_consistency_dlib(source_dir: Path, edit_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip('dlib')
    same = shutil.copytree(source_dir, tmp_path / 'same')
    res = evaluation.run_consistency(tmp_path / 'self', source_dir, same, embedder='dlib', quiet=True)  # from Python
    assert res['tl_id'] == 1.0 and res['tg_id'] == 1.0  # each ratio is x / x
    assert res['src_adjacent'] == res['edit_adjacent'] and res['src_edit_similarity'] == pytest.approx(1, abs=1e-6)

    out = tmp_path / 'edit'
    res = run_metrics.main(_cons_args(source_dir, edit_dir, out, '--embedder', 'dlib'))
    for name in ('report.md', 'metrics.csv', 'frames.csv', 'plot.png', 'config.json'):
        assert (out / name).is_file(), name
    assert all(math.isfinite(res[k]) for k in ('tl_id', 'tg_id', 'src_adjacent', 'edit_adjacent'))
    assert 0.5 < res['tl_id'] < 1.5 and 0.5 < res['tg_id'] < 1.5 and res['src_edit_similarity'] < 1
    rows = _read_csv(out / 'frames.csv')
    assert [r['frame'] for r in rows] == ['0000', '0001', '0002', '0003', 'mean']
    assert float(rows[0]['src_sim_to_first']) == pytest.approx(1, abs=1e-6) and rows[3]['src_sim_to_next'] == ''
    ratios = [float(r['next_ratio']) for r in rows[:3]]
    assert np.mean(ratios) == pytest.approx(res['tl_id'], rel=1e-5) == float(rows[-1]['next_ratio'])
    scalars = {r['metric']: float(r['value']) for r in _read_csv(out / 'metrics.csv')}
    assert scalars['tg_id'] == pytest.approx(res['tg_id'], rel=1e-5)
    report = (out / 'report.md').read_text()
    for text in ('0.995', '0.996', '0.997', '0.961', 'dlib', '- frames: 4', str(edit_dir)):
        assert text in report, text
    assert json.loads((out / 'config.json').read_text())['embedder'] == 'dlib'


def test_consistency_arcface(source_dir: Path, edit_dir: Path, tiny_model, tiny_ckpt: Path, tmp_path: Path) -> None:
    src, edit = (_save(tmp_path / name, [_read(p) for p in sorted(folder.iterdir())[:3]])
                 for name, folder in (('src', source_dir), ('edit', edit_dir)))
    res = run_metrics.main(_cons_args(src, edit, tmp_path / 'random', '--random_encoder', '--device', 'cpu',
                                      '--batch_size', '2'))
    assert math.isfinite(res['tl_id']) and math.isfinite(res['tg_id']) and res['settings']['frames'] == 3
    assert 'RANDOM weights' in (tmp_path / 'random' / 'report.md').read_text()
    assert (tmp_path / 'random' / 'plot.png').is_file()

    # --checkpoint: the EMA identity encoder of a DVA checkpoint, i.e. exactly the model's idnet
    net, source = evaluation.identity_network('tiny', checkpoint=str(tiny_ckpt))
    expected = tiny_model.encoder.idnet.state_dict()
    assert net.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in net.state_dict().items())
    assert str(tiny_ckpt) in source and not net.training


def _read(path: Path) -> np.ndarray:
    from video_io import read_image

    return read_image(path)


def test_consistency_errors(source_dir: Path, face_crops, tmp_path: Path) -> None:
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match='--edit: frame folder not found'):
        run_metrics.main(_cons_args(source_dir, tmp_path / 'missing', out, '--random_encoder'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match='--source: no image file'):
        run_metrics.main(_cons_args(tmp_path / 'empty', source_dir, out, '--random_encoder'))
    other = _save(tmp_path / 'other', face_crops, ['0000', '0001', '0002', 'extra'])
    with pytest.raises(SystemExit, match=r'1 only in --source \(0003\); 1 only in --edit \(extra\)'):
        run_metrics.main(_cons_args(source_dir, other, out, '--random_encoder'))
    many = _save(tmp_path / 'many', face_crops + face_crops, [f'x{i}' for i in range(8)])
    with pytest.raises(SystemExit, match=r'4 only in --source \(0000, 0001, 0002, 0003\); '
                                         r'8 only in --edit \(x0, x1, x2, x3, x4, \.\.\.\)'):
        run_metrics.main(_cons_args(source_dir, many, out, '--random_encoder'))
    one = _save(tmp_path / 'one', face_crops[:1])
    with pytest.raises(SystemExit, match='at least 2 frames'):
        run_metrics.main(_cons_args(one, one, out, '--random_encoder'))
    _save(tmp_path / 'dup', face_crops[:1], ['0000'])
    (tmp_path / 'dup' / '0000.jpg').write_bytes((tmp_path / 'dup' / '0000.png').read_bytes())
    with pytest.raises(SystemExit, match="two files share the name '0000'"):
        run_metrics.main(_cons_args(source_dir, tmp_path / 'dup', out, '--random_encoder'))
    with pytest.raises(SystemExit, match='not for --embedder dlib'):
        run_metrics.main(_cons_args(source_dir, source_dir, out, '--embedder', 'dlib', '--random_encoder'))
    with pytest.raises(SystemExit, match='model_ir_se50.pth'):
        run_metrics.main(_cons_args(source_dir, source_dir, out, '--pretrained_dir', str(tmp_path)))
    out.mkdir(exist_ok=True)
    (out / 'report.md').write_text('earlier result')
    with pytest.raises(SystemExit, match='pass --overwrite'):
        run_metrics.main(_cons_args(source_dir, source_dir, out, '--random_encoder'))
    assert not (out / 'metrics.csv').exists()
