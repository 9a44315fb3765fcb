"""Editing spread over processes with torchrun (gloo on CPU) on real frames: the same outputs as one process (bit for
bit in float64), every frame once, a killed rank resumed by re-running the command, many videos each edited once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import templates
from conftest import ROOT

N = 4


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> dict[str, Path]:
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.tiny(), tmp_path_factory.mktemp('weights'), seed=0)
    return {'ckpt': dva, 'cls': cls}


def clip(sample_video_dir: Path, dest: Path, n: int = N, first: int = 0) -> Path:
    dest.mkdir(parents=True)
    for p in sorted(sample_video_dir.glob('*.jpeg'))[first:first + n]:
        shutil.copy(p, dest / p.name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def edit_args(weights, video, out: Path, cache: Path, *extra: str) -> list[str]:
    return ['--video_path', *([str(v) for v in video] if isinstance(video, list) else [str(video)]),
            '--checkpoint', str(weights['ckpt']), '--cls_checkpoint', str(weights['cls']), '--template', 'tiny',
            '--T', '5', '--batch_size', '1', '--device', 'cpu', '--precision', 'fp64', '--quiet', '--out', str(out),
            '--cache_dir', str(cache), '--attribute', 'Mustache', '--scale', '0.5', *extra]


def torchrun(args: list[str], nproc: int = 2, mark: str = '', wait: bool = True):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DVA_DIST_TIMEOUT': '120', 'DVA_TEST_MARK': mark}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_addr',
           '127.0.0.1', '--master_port', str(free_port()), str(ROOT / 'editing_classifier.py'), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def images(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob('*.png'))}


@pytest.fixture
def one_thread(monkeypatch):
    """The single-process reference runs with the ranks' kernels: one thread (torchrun's OMP_NUM_THREADS=1). On the
    random-weight network DDIM with x0 clipping turns a thread count's float64 rounding (1e-16) into 2e-5."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_ranks_write_what_one_process_writes(weights, sample_video_dir, tmp_path, one_thread):
    import editing_classifier

    video = clip(sample_video_dir, tmp_path / 'clip')
    editing_classifier.main(edit_args(weights, video, tmp_path / 'one', tmp_path / 'cache1'))
    torchrun(edit_args(weights, video, tmp_path / 'two', tmp_path / 'cache2'))
    one, two = images(tmp_path / 'one'), images(tmp_path / 'two')
    assert len(one) == 3 * N and one.keys() == two.keys()  # crops, frames, blends: every frame once
    for k in one:
        assert np.array_equal(one[k], two[k]), k
    summary = json.loads((tmp_path / 'two' / 'summary.json').read_text())
    assert summary['frames'] == N and summary['ranks'] == 2
    # the cached latents are the single-process ones (float64: bit for bit)
    for name in ('x_T', 'id_feats', 'masks'):
        a = np.load(next((tmp_path / 'cache1').glob('encode-*')) / f'{name}.npy')
        b = np.load(next((tmp_path / 'cache2').glob('encode-*')) / f'{name}.npy')
        assert np.array_equal(a, b), name
    # each rank encoded its frames as a segment of each video, rank 0 joined them: every frame, in order
    from video_io import FrameSource

    edit = tmp_path / 'two' / 'Mustache_0.50'
    frames = [two[f'Mustache_0.50/frames/{p.stem}.png'] for p in sorted(video.iterdir())]
    decoded = list(FrameSource(edit / 'out.mp4'))
    assert len(decoded) == len(FrameSource(edit / 'side_by_side.mp4')) == N and not list(edit.glob('.*.mp4'))
    mse = np.array([[np.mean((got.astype(float) - want) ** 2) for want in frames] for got in decoded])
    assert (10 * np.log10(255 ** 2 / mse.diagonal()) > 35).all()  # H.264 at crf 18: close, not equal
    assert (mse.argmin(axis=1) == np.arange(N)).all()  # in order: each nearest to its own frame


def worker_pid(mark: str, local_rank: int) -> int | None:
    for env in Path('/proc').glob('[0-9]*/environ'):
        try:
            data = env.read_bytes().split(b'\0')
        except OSError:
            continue
        if f'DVA_TEST_MARK={mark}'.encode() in data and f'LOCAL_RANK={local_rank}'.encode() in data:
            return int(env.parent.name)
    return None


def test_a_killed_rank_is_resumed_by_the_same_command(weights, sample_video_dir, tmp_path, one_thread):
    import editing_classifier

    video = clip(sample_video_dir, tmp_path / 'clip', 6)
    args = edit_args(weights, video, tmp_path / 'out', tmp_path / 'cache', '--T', '100')
    mark = uuid.uuid4().hex
    proc = torchrun(args, mark=mark, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill rank 1 once it has inverted a frame
        marks = list((tmp_path / 'cache').glob('partial-encode-*/x_T.r1.done.npy'))
        if marks and np.load(marks[0]).any():
            break
        time.sleep(0.05)
    pid = worker_pid(mark, 1)
    assert pid is not None and proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (tmp_path / 'out' / 'Mustache_0.50').exists()  # no half-written result
    again = torchrun(args)
    assert 'resuming' in again  # the frames finished before the kill are not computed again
    editing_classifier.main(args[:-2] + ['--out', str(tmp_path / 'one'), '--cache_dir', str(tmp_path / 'cache1'),
                                         '--T', '100'])
    one, resumed = images(tmp_path / 'one'), images(tmp_path / 'out')
    assert one.keys() == resumed.keys() and all(np.array_equal(one[k], resumed[k]) for k in one)
    assert not list((tmp_path / 'out').glob('*.partial'))


def test_many_videos_are_spread_across_ranks_each_edited_once(weights, sample_video_dir, tmp_path):
    videos = [clip(sample_video_dir, tmp_path / f'v{i}', 2, first=10 * i) for i in range(3)]
    listing = tmp_path / 'videos.txt'
    listing.write_text('\n'.join(map(str, videos)) + '\n')
    out = tmp_path / 'out'
    torchrun(edit_args(weights, listing, out, tmp_path / 'cache'))
    summary = json.loads((out / 'videos_summary.json').read_text())
    assert [r['video'] for r in summary['videos']] == [str(v) for v in videos] and summary['failed'] == []
    for v in videos:
        result = out / v.name / 'Mustache_0.50'
        assert sorted(p.stem for p in (result / 'frames').glob('*.png')) == sorted(p.stem for p in v.glob('*.jpeg'))
        assert json.loads((out / v.name / 'summary.json').read_text())['cache_hits'] == {'align': False,
                                                                                       'invert': False}
    assert len(list((tmp_path / 'cache').glob('encode-*'))) == 3  # each video inverted once, by one rank


def test_a_rank_left_alone_stops_with_a_clear_message(tmp_path):
    """A collective whose peer has gone does not hang: RankError names the rank and how to resume."""
    script = tmp_path / 'lonely.py'
    script.write_text(
        'import os, sys\n'
        f'sys.path.insert(0, {str(ROOT)!r})\n'
        'from editing import distributed\n'
        'ranks = distributed.from_env("cpu")\n'
        'if ranks.rank == 1:\n'
        '    os._exit(0)\n'
        'try:\n'
        '    ranks.barrier("rendering")\n'
        'except distributed.RankError as e:\n'
        '    print("ERROR", e)\n')
    env = {**os.environ, 'DVA_DIST_TIMEOUT': '10'}
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                          '127.0.0.1', '--master_port', str(free_port()), str(script)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert 'ERROR rank 0: rendering failed, another rank has stopped' in run.stdout + run.stderr
    assert 're-run the same command to resume' in run.stdout + run.stderr
