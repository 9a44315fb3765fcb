"""End-to-end editing on real frames with the tiny preset and random weights written in the released formats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import centre_crops
import editing_classifier
import editing_CLIP
import templates
from video_io import read_video_info

N_FRAMES = 3


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> dict[str, Path]:
    """A tiny DVA checkpoint and a classifier checkpoint, both in the released layouts, with random weights (the
    zero-initialised output layers re-initialised, else every render would equal its x_T)."""
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.tiny(), tmp_path_factory.mktemp('weights'), seed=0)
    return {'ckpt': dva, 'cls': cls}


def frames_folder(sample_video_dir: Path, dest: Path, n: int = N_FRAMES) -> Path:
    dest.mkdir(parents=True)
    for p in sorted(sample_video_dir.glob('*.jpeg'))[:n]:
        shutil.copy(p, dest / p.name)
    return dest


def common(weights, out: Path, cache: Path) -> list[str]:
    return ['--checkpoint', str(weights['ckpt']), '--template', 'tiny', '--T', '5', '--batch_size', '2', '--device', 'cpu',
            '--out', str(out), '--cache_dir', str(cache), '--quiet']


def cls_args(weights, out, cache, video, *extra) -> list[str]:
    return ['--video_path', str(video), '--cls_checkpoint', str(weights['cls']), *common(weights, out, cache), *extra]


def outside_quad(frame_shape, quad: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels outside the quad's bounding box (plus one pixel of bilinear spill)."""
    h, w = frame_shape[:2]
    x0, y0 = np.floor(quad.min(0)).astype(int) - 1
    x1, y1 = np.ceil(quad.max(0)).astype(int) + 2
    m = np.ones((h, w), bool)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = False
    return m


def test_classifier_edit_end_to_end_and_cache(weights, sample_video_dir, tmp_path):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    summary = editing_classifier.main(cls_args(weights, out, cache, sample_video_dir, '--max_num', str(N_FRAMES),
                                               '--attribute', 'Mustache', 'Eyeglasses', '--scale', '0', '0.5',
                                               '--save_recon'))
    assert summary['frames'] == N_FRAMES and summary['cache_hits'] == {'align': False, 'invert': False}
    src = [np.asarray(Image.open(p).convert('RGB')) for p in sorted(sample_video_dir.glob('*.jpeg'))[:N_FRAMES]]
    names = [p.stem for p in sorted(sample_video_dir.glob('*.jpeg'))[:N_FRAMES]]
    crops = sorted((out / 'crops').glob('*.png'))
    assert [p.stem for p in crops] == names and Image.open(crops[0]).size == (32, 32)
    cached = list(cache.glob('align-*'))
    assert len(cached) == 1
    quads = np.load(cached[0] / 'quads.npy')
    for folder in ('Mustache_0.00', 'Mustache_0.50', 'Eyeglasses_0.00', 'Eyeglasses_0.50'):
        d = out / folder
        assert sorted(p.stem for p in (d / 'frames').glob('*.png')) == names
        assert len(list((d / 'blend').glob('*.png'))) == N_FRAMES
        n, fps, size = read_video_info(d / 'out.mp4')
        assert (n, round(fps), size) == (N_FRAMES, 20, (1920, 1080))
        assert read_video_info(d / 'side_by_side.mp4')[0] == N_FRAMES
        cfg = json.loads((d / 'config.json').read_text())
        assert cfg['config']['T'] == 5 and 'torch' in cfg['software']
        for i, name in enumerate(names):
            edited = np.asarray(Image.open(d / 'frames' / f'{name}.png'))
            assert edited.shape == src[i].shape
            keep = outside_quad(edited.shape, quads[i])
            assert np.array_equal(edited[keep], src[i][keep])  # only the face region is pasted
            assert not np.array_equal(edited, src[i])
    # scale 0 reproduces the plain reconstruction; a non-zero scale does not
    for name in names:
        recon = np.asarray(Image.open(out / 'recon' / f'{name}.png')).astype(int)
        zero = np.asarray(Image.open(out / 'Mustache_0.00' / 'frames' / f'{name}.png')).astype(int)
        edit = np.asarray(Image.open(out / 'Mustache_0.50' / 'frames' / f'{name}.png')).astype(int)
        assert np.abs(recon - zero).max() <= 1
        assert np.abs(recon - edit).max() > 1
    # a second edit of the same video skips alignment and inversion
    summary = editing_classifier.main(cls_args(weights, out, cache, sample_video_dir, '--max_num', str(N_FRAMES),
                                               '--attribute', 'Smiling', '--scale', '-0.3'))
    assert summary['cache_hits'] == {'align': True, 'invert': True}
    assert 'invert' not in summary['seconds'] and (out / 'Smiling_-0.30' / 'out.mp4').is_file()
    # an existing result is never overwritten silently
    with pytest.raises(SystemExit, match='already exists'):
        editing_classifier.main(cls_args(weights, out, cache, sample_video_dir, '--max_num', str(N_FRAMES),
                                         '--attribute', 'Smiling', '--scale', '-0.3'))
    editing_classifier.main(cls_args(weights, out, cache, sample_video_dir, '--max_num', str(N_FRAMES),
                                     '--attribute', 'Smiling', '--scale', '-0.3', '--overwrite', '--blend', 'feather'))
    assert json.loads((out / 'Smiling_-0.30' / 'config.json').read_text())['blend'] == 'feather'


def test_interrupted_inversion_resumes_from_the_saved_batches(weights, sample_video_dir, tmp_path, monkeypatch, capsys):
    import editing.core as core

    real, calls = core.ddim_invert, []

    def flaky(eps_fn, x0, schedule, **kw):
        calls.append(len(x0))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the run (or the machine goes away) during the second batch
        return real(eps_fn, x0, schedule, **kw)

    args = ['--max_num', str(N_FRAMES), '--attribute', 'Smiling', '--scale', '0.4']  # batches of 2: frames 0-1, 2
    cache = tmp_path / 'cache'
    monkeypatch.setattr(core, 'ddim_invert', flaky)
    with pytest.raises(SystemExit) as stop:
        editing_classifier.main(cls_args(weights, tmp_path / 'out', cache, sample_video_dir, *args))
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert 'interrupted: re-run the same command to resume (2 of 3 frames of the invert stage done)' in err
    assert 'Traceback' not in err
    assert not (tmp_path / 'out').exists() and not list(cache.glob('encode-*'))  # no empty result folder is left
    assert np.load(next(cache.glob('partial-encode-*')) / 'x_T.done.npy').tolist() == [True, True, False]
    calls.clear()
    monkeypatch.setattr(core, 'ddim_invert', lambda *a, **kw: (calls.append(len(a[1])), real(*a, **kw))[1])
    summary = editing_classifier.main(cls_args(weights, tmp_path / 'out', cache, sample_video_dir, *args))
    assert calls == [1] and summary['cache_hits']['invert'] is False  # only frame 2 was inverted again
    assert 'resuming the inversion: 2 of 3 frames' in capsys.readouterr().out
    assert not list(cache.glob('partial-*'))  # progress is dropped once the whole inversion is cached
    # the result is the uninterrupted one
    clean = tmp_path / 'clean_cache'
    editing_classifier.main(cls_args(weights, tmp_path / 'out_clean', clean, sample_video_dir, *args))
    resumed = np.load(next(cache.glob('encode-*')) / 'x_T.npy')
    fresh = np.load(next(clean.glob('encode-*')) / 'x_T.npy')
    np.testing.assert_allclose(resumed, fresh, rtol=0, atol=1e-6)
    # renders resume the same way: a new edit interrupted in its second batch re-renders only that batch
    render, calls = core.ddim_sample, []

    def flaky_render(eps_fn, x, schedule, **kw):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return render(eps_fn, x, schedule, **kw)

    bald = ['--max_num', str(N_FRAMES), '--attribute', 'Bald', '--scale', '0.4']
    monkeypatch.setattr(core, 'ddim_sample', flaky_render)
    with pytest.raises(SystemExit):
        editing_classifier.main(cls_args(weights, tmp_path / 'out', cache, sample_video_dir, *bald))
    assert len(list(cache.glob('partial-render-*'))) == 1 and not (tmp_path / 'out' / 'Bald_0.40').exists()
    before = {p.name: p.read_bytes() for p in (tmp_path / 'out' / 'Smiling_0.40').rglob('*') if p.is_file()}
    calls.clear()
    monkeypatch.setattr(core, 'ddim_sample', lambda *a, **kw: (calls.append(len(a[1])), render(*a, **kw))[1])
    editing_classifier.main(cls_args(weights, tmp_path / 'out', cache, sample_video_dir, *bald))
    assert calls == [1] and 'resuming render Bald_0.40: 2 of 3 frames' in capsys.readouterr().out
    assert (tmp_path / 'out' / 'Bald_0.40' / 'out.mp4').is_file() and not list(cache.glob('partial-*'))
    after = {p.name: p.read_bytes() for p in (tmp_path / 'out' / 'Smiling_0.40').rglob('*') if p.is_file()}
    assert before == after  # an earlier result is untouched


def test_video_file_input_keeps_source_rate(weights, test_videos_dir, tmp_path):
    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, out, tmp_path / 'cache', test_videos_dir / 'sample_24f_540p.mp4',
                                     '--start', '2', '--max_num', '2', '--attribute', 'Bald', '--scale', '0.2',
                                     '--batch_size', 'auto', '--decoder', 'dpm++2m', '--decoder_steps', '3'))
    n, fps, size = read_video_info(out / 'Bald_0.20' / 'out.mp4')
    assert (n, round(fps), size) == (2, 25, (960, 540))
    cfg = json.loads((out / 'Bald_0.20' / 'config.json').read_text())
    assert cfg['batch_size'] == 4 and cfg['config']['decoder'] == 'dpm++2m'
    assert sorted(p.stem for p in (out / 'Bald_0.20' / 'frames').glob('*.png')) == ['000002', '000003']


def test_an_unwritable_cache_does_not_lose_the_edit(weights, sample_video_dir, tmp_path):
    cache = tmp_path / 'cache_is_a_file'
    cache.write_text('not a folder')  # every cache write fails, as on a full disk or a read-only mount
    with pytest.warns(UserWarning, match='cannot'):
        summary = editing_classifier.main(cls_args(weights, tmp_path / 'out', cache, sample_video_dir, '--max_num',
                                                   '2', '--attribute', 'Smiling', '--scale', '0.4'))
    assert summary['frames'] == 2 and (tmp_path / 'out' / 'Smiling_0.40' / 'out.mp4').is_file()
    assert cache.read_text() == 'not a folder'


def test_edited_video_keeps_the_source_sound(weights, sample_video_dir, tmp_path, capsys):
    from test_video_io import decoded_sound, dominant_hz, video_with_sound

    video = video_with_sound(sample_video_dir, tmp_path / 'talk.mp4', n=8, size=(640, 360))
    out = tmp_path / 'out'
    editing_classifier.main(cls_args(weights, out, tmp_path / 'cache', video, '--start', '3', '--max_num', '3',
                                     '--attribute', 'Bald', '--scale', '0.2'))
    for name in ('out.mp4', 'side_by_side.mp4'):
        samples, rate = decoded_sound(out / 'Bald_0.20' / name)
        assert 0.12 * rate <= len(samples) <= 0.12 * rate + 2048  # 3 frames at 25 fps
        assert dominant_hz(samples[: int(0.12 * rate)], rate) == pytest.approx(1000, abs=50)  # after the switch
    # another output rate cannot keep the sound in sync: none, and the user is told
    editing_classifier.main(cls_args(weights, tmp_path / 'out10', tmp_path / 'cache', video, '--start', '3',
                                     '--max_num', '3', '--attribute', 'Bald', '--scale', '0.2', '--fps', '10',
                                     '--no-save_frames'))
    edit = tmp_path / 'out10' / 'Bald_0.20'
    assert decoded_sound(edit / 'out.mp4') is None
    assert 'carry no sound' in capsys.readouterr().out
    # --no-save_frames: the full frames live in the videos only
    assert read_video_info(edit / 'out.mp4')[0] == 3 and len(list((edit / 'blend').glob('*.png'))) == 3
    assert not (edit / 'frames').exists() and (out / 'Bald_0.20' / 'frames').is_dir()


def test_blanked_face_is_interpolated_and_non_images_ignored(weights, sample_video_dir, tmp_path):
    video = frames_folder(sample_video_dir, tmp_path / 'clip')
    middle = sorted(video.glob('*.jpeg'))[1]
    Image.new('RGB', Image.open(middle).size).save(middle)
    (video / 'notes.txt').write_text('not a frame')
    (video / 'sub').mkdir()
    summary = editing_classifier.main(cls_args(weights, tmp_path / 'out', tmp_path / 'cache', video,
                                               '--attribute', 'Mustache', '--scale', '0.3'))
    assert summary['frames'] == N_FRAMES and summary['faces_missing'] == [middle.stem]
    assert json.loads((tmp_path / 'out' / 'summary.json').read_text())['faces_missing'] == [middle.stem]
    # the faceless frame is left as it is (no face patch pasted onto it), the others are edited
    black = np.asarray(Image.open(tmp_path / 'out' / 'Mustache_0.30' / 'frames' / f'{middle.stem}.png'))
    assert not black.any()
    # ... and its features do not count in the video identity (the one the frames were inverted with)
    from config import EditConfig
    from editing.api import Editor

    editor = Editor(EditConfig(checkpoint=str(weights['ckpt']), template='tiny', T=5, device='cpu', quiet=True,
                               cache_dir=str(tmp_path / 'cache')))
    encoded = editor.encode(video)
    assert encoded.cache_hits == {'align': True, 'invert': True} and encoded.missing == [1]
    ids = encoded.id_feats
    assert torch.equal(encoded.identity, ids[[0, 2]].mean(0, keepdim=True))
    assert not torch.allclose(encoded.identity, ids.mean(0, keepdim=True))
    # --faceless edit: the released behaviour, an edit pasted at the interpolated quad
    editing_classifier.main(cls_args(weights, tmp_path / 'out2', tmp_path / 'cache', video, '--attribute', 'Mustache',
                                     '--scale', '0.3', '--faceless', 'edit'))
    assert np.asarray(Image.open(tmp_path / 'out2' / 'Mustache_0.30' / 'frames' / f'{middle.stem}.png')).any()


def test_aligned_crops_skip_detection_and_replace_the_face_region(weights, sample_video_dir, tmp_path):
    """--aligned: square face crops in, no dlib; the edit is pasted into the whole crop inside the face mask."""
    video = centre_crops(sample_video_dir, tmp_path / 'crops_in', N_FRAMES, 48)
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    summary = editing_classifier.main(cls_args(weights, out, cache, video, '--aligned', '--attribute', 'Smiling',
                                               '--scale', '0.5', '--pretrained_dir', str(tmp_path / 'no_dlib_here')))
    assert summary['frames'] == N_FRAMES and summary['faces_missing'] == []
    n, _, size = read_video_info(out / 'Smiling_0.50' / 'out.mp4')
    assert (n, size) == (N_FRAMES, (48, 48))
    for p in sorted(video.glob('*.png')):
        src = np.asarray(Image.open(p))
        crop = np.asarray(Image.open(out / 'crops' / p.name))
        assert crop.shape == (32, 32, 3)  # resampled straight to the model size
        small = np.asarray(Image.fromarray(src).resize((32, 32), Image.BILINEAR)).astype(int)
        assert np.abs(crop.astype(int) - small).mean() < 6
        edited = np.asarray(Image.open(out / 'Smiling_0.50' / 'frames' / p.name))
        assert edited.shape == src.shape and not np.array_equal(edited, src)
    # the cached alignment of aligned input is not the one of detected faces (and vice versa)
    assert len(list(cache.glob('align-*'))) == 1
    # a non-square frame is refused before any work, naming the fix
    Image.new('RGB', (48, 40)).save(tmp_path / 'wide.png')
    wide = tmp_path / 'wide'
    wide.mkdir()
    (tmp_path / 'wide.png').rename(wide / '0.png')
    with pytest.raises(SystemExit, match='drop --aligned'):
        editing_classifier.main(cls_args(weights, tmp_path / 'out2', cache, wide, '--aligned', '--attribute',
                                         'Smiling', '--scale', '0.5'))
    assert not (tmp_path / 'out2' / 'Smiling_0.50').exists()


def test_clip_edit_runs_saves_and_reuses_direction(weights, sample_video_dir, tmp_path):
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    args = ['--video_path', str(sample_video_dir), '--max_num', '2', *common(weights, out, cache), '--random_clip', 'tiny',
            '--n_iter', '3', '--n_train_step', '2', '--attribute', 'beard', '--trg_txt', 'face with beard',
            '--id_loss_w', '0.5']
    editing_CLIP.main(args + ['--scale', '1'])
    directions = list((out / 'directions').glob('*.pt'))
    assert len(directions) == 1
    folder = out / f'{directions[0].stem}_scale1.00'
    assert read_video_info(folder / 'out.mp4')[0] == 2
    assert json.loads((folder / 'config.json').read_text())['direction'] == str(directions[0])
    summary = editing_CLIP.main(args + ['--scale', '2'])
    assert summary['cache_hits'] == {'align': True, 'invert': True} and 'clip search' not in summary['seconds']
    assert (out / f'{directions[0].stem}_scale2.00' / 'out.mp4').is_file()
    # other texts, same --attribute: a new direction and new folders; the first result and its direction stay as they are
    before = {p: p.read_bytes() for p in [directions[0], *folder.rglob('*')] if p.is_file()}
    editing_CLIP.main(args[:-4] + ['--trg_txt', 'face with glasses', '--id_loss_w', '0.5', '--scale', '1'])
    assert len(list((out / 'directions').glob('*.pt'))) == 2
    assert len([p for p in out.iterdir() if p.name.endswith('_scale1.00')]) == 2
    assert before == {p: p.read_bytes() for p in before}


@pytest.mark.parametrize('case', ['empty', 'unreadable', 'sizes', 'noface', 'attribute', 'T', 'checkpoint', 'missing'])
def test_bad_input_fails_clearly_and_writes_no_result(case, weights, sample_video_dir, tmp_path):
    video = tmp_path / 'clip'
    extra = ['--attribute', 'Mustache', '--scale', '0.3']
    w = dict(weights)
    expect = {'empty': 'no image', 'unreadable': 'broken.png', 'sizes': 'must have the same size',
              'noface': 'no face', 'attribute': 'unknown attribute', 'T': 'nearest valid values: 36 or 38',
              'checkpoint': 'not found', 'missing': 'not found'}[case]
    if case == 'empty':
        video.mkdir()
        (video / 'readme.txt').write_text('x')
    elif case == 'missing':
        pass
    elif case == 'noface':
        video.mkdir()
        for i in range(2):
            Image.new('RGB', (320, 240)).save(video / f'{i}.png')
    else:
        frames_folder(sample_video_dir, video, 2)
        if case == 'unreadable':
            (video / 'broken.png').write_bytes(b'not a png')
        elif case == 'sizes':
            Image.new('RGB', (64, 64)).save(video / 'small.png')
        elif case == 'attribute':
            extra = ['--attribute', 'Moustache', '--scale', '0.3']
        elif case == 'T':
            extra += ['--T', '37']
        elif case == 'checkpoint':
            w['ckpt'] = tmp_path / 'nope.ckpt'
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match=expect):
        editing_classifier.main(cls_args(w, out, tmp_path / 'cache', video, *extra))
    assert not (out / 'Mustache_0.30').exists()


def test_progress_bars_count_every_network_step(capsys, tmp_path):
    """The DDIM bars advance per step and frame (rate and ETA from the first step), not once per finished batch."""
    import templates
    from editing import core, pipeline
    from editing.cache import Arrays
    from model.autoencoder import DiffusionVideoAutoencoder

    model = DiffusionVideoAutoencoder(templates.tiny()).eval()
    crops = Arrays(tmp_path / 'a')
    crops.put('crops', np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    enc, out = Arrays(tmp_path / 'e'), Arrays(tmp_path / 'r')
    pipeline.encode(core.Sampler(model, 5), crops, enc, np.array([], int), 2)
    assert '12/12' in capsys.readouterr().err  # (names checked below)
    pipeline.render(core.Sampler(model, 5), enc, torch.zeros(1, 512), out, 2, 'render')
    pipeline.render(core.Sampler(model, 5, decoder='dpm++2m', decoder_steps=3), enc, torch.zeros(1, 512),
                    Arrays(tmp_path / 'f'), 2, 'fast')
    err = capsys.readouterr().err
    assert '15/15' in err and 'render (3 frames x 5 steps)' in err
    assert '9/9' in err and 'fast (3 frames x 3 steps)' in err
