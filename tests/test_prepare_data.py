"""prepare_data.py: discovery, naming, splits, resume, failures; real dlib alignment on the shared sample frames.

Most tests swap dlib for `FakeDetector` (fixed landmarks on any frame that is not black) to test the bookkeeping in
milliseconds; the tests marked by the `real_root` fixture run the real detector on a few real frames.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_prep
from prepare_data import main
from video_sources import assign_splits, discover_inputs, split_groups, video_names


class FakeDetector:
    """Landmarks of a face centred in the frame (quad side = frame height) on any frame that is not all black."""

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        if rgb.max() == 0:
            return []
        h, w = rgb.shape[:2]
        cx, cy, s = w / 2, h / 2, h / 8
        lm = np.tile([cx, cy], (68, 1)).astype(np.float64)
        lm[36:42] = [cx - s, cy - s / 2]
        lm[42:48] = [cx + s, cy - s / 2]
        lm[48], lm[54] = [cx - 0.7 * s, cy + s], [cx + 0.7 * s, cy + s]
        return [lm]


@pytest.fixture
def fake_dlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_prep, 'make_detector', lambda pretrained_dir: FakeDetector())
    monkeypatch.setattr(data_prep, 'check_detector', lambda pretrained_dir: 'fake')


def noise_frames(folder: Path, n: int, black: tuple[int, ...] = (), size: tuple[int, int] = (96, 72), seed: int = 0):
    """n random RGB frames 0.png .. {n-1}.png (frames listed in `black` all zero); returns the folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr * (i not in black)).save(folder / f'{i}.png')
    return folder


def run(*args: object) -> int:
    return main([str(a) for a in args] + ['--no_progress'])


def manifest(root: Path) -> dict:
    return json.loads((root / 'manifest.json').read_text())['videos']


def frame_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------------------
# Discovery, names and splits (no detector)


def test_discover_inputs_and_names(tmp_path: Path) -> None:
    data = tmp_path / 'data'
    for folder in ('a/clip', 'b/clip', 'b/.hidden', 'nested/deep/v10', 'nested/deep/v2'):
        noise_frames(data / folder, 1)
    for f in ('b/clip.mp4', 'nested/x.mkv', 'nested/notes.txt', 'nested/deep/v2/extra.mp4'):
        (data / f).write_bytes(b'')
    (data / 'empty').mkdir()
    (data / 'out').mkdir()
    noise_frames(data / 'out' / 'train' / 'old', 1)  # a previous output inside the input folder: never an input
    lone = noise_frames(tmp_path / 'lone', 1)

    sources, problems = discover_inputs(
        [
            data,
            data / 'a' / 'clip',
            tmp_path / 'missing',
            data / 'nested' / 'notes.txt',
            data / 'empty',
            lone / '0.png',
        ],
        exclude=data / 'out',
    )
    rel = [p.relative_to(data).as_posix() for p in sources]
    # Natural order inside folders (v2 before v10), frame folders are leaves (their own videos still count),
    # hidden entries and the output folder skipped, the explicit duplicate of a/clip dropped.
    assert rel == ['a/clip', 'b/clip', 'b/clip.mp4', 'nested/deep/v2', 'nested/deep/v2/extra.mp4',
                   'nested/deep/v10', 'nested/x.mkv']  # fmt: skip
    messages = dict(problems)
    assert len(problems) == 4
    assert 'not found' in messages[str(tmp_path / 'missing')]
    assert 'neither a video file' in messages[str(data / 'nested' / 'notes.txt')]
    assert 'no video file' in messages[str(data / 'empty')]
    assert 'single image' in messages[str(lone / '0.png')]

    assert video_names(sources) == ['a_clip', 'b_clip', 'clip_mp4', 'v2', 'extra', 'v10', 'x']
    assert video_names([data / 'y' / 'v.mp4', data / 'z' / 'v.mp4', data / 'w' / 'y' / 'v.mp4']) == [
        'data_y_v', 'z_v', 'w_y_v']  # fmt: skip
    assert video_names([data / '.dot']) == ['dot']


def test_assign_splits_deterministic() -> None:
    names = [f'video{i}' for i in range(20)]
    a = assign_splits(names, 0.25, seed=7)
    assert a.count('test') == 5 and set(a) == {'train', 'test'}
    assert a == assign_splits(names, 0.25, seed=7)
    # Depends on the names, not on their order.
    rev = assign_splits(names[::-1], 0.25, seed=7)[::-1]
    assert rev == a
    assert any(assign_splits(names, 0.25, seed=s) != a for s in range(8, 12))
    assert assign_splits(names, 0.0) == ['train'] * 20
    assert assign_splits(names, 1.0) == ['test'] * 20
    assert assign_splits(['only'], 0.5) == ['train']  # one video stays in train when the fraction is below 1
    with pytest.raises(ValueError):
        assign_splits(names, 1.5)


def test_split_groups_keep_each_group_in_one_split() -> None:
    sources = [f'/vox/id{10000 + i // 3}/yt{i}/0000{i % 3}.mp4' for i in range(30)]  # 10 identities x 3 clips
    groups = split_groups(sources, r'id\d+')
    assert len(set(groups)) == 10 and groups[0] == groups[2] != groups[3]
    names = [f'clip{i}' for i in range(30)]
    splits = assign_splits(names, 0.2, seed=1, groups=groups)
    assert splits.count('test') == 6  # 2 of 10 identities, all 3 clips each
    by_group: dict[str, set[str]] = {}
    for g, sp in zip(groups, splits):
        by_group.setdefault(g, set()).add(sp)
    assert all(len(v) == 1 for v in by_group.values())
    # a capture group names the group; a path the pattern misses is a group of its own
    assert split_groups(['/a/person_7/x.mp4', '/b/person_7/y.mp4', '/c/z.mp4'], r'person_(\d+)')[:2] == ['group:7'] * 2
    assert split_groups(['/c/z.mp4', '/a/person_1/x.mp4'], r'person_\d+')[0] == 'path:/c/z.mp4'
    assert split_groups(['/data/vid1/a.mp4', '/data/id1/b.mp4'], r'id\d+') == ['path:/data/vid1/a.mp4', 'group:id1']
    # without groups: exactly the per-video assignment
    assert assign_splits(names, 0.2, seed=1, groups=names) == assign_splits(names, 0.2, seed=1)
    with pytest.raises(ValueError, match='matches no folder'):
        split_groups(sources, r'speaker\d+')
    with pytest.raises(ValueError, match='not a valid regular expression'):
        split_groups(sources, r'id(\d+')


# ----------------------------------------------------------------------------------------------------------------------
# Bookkeeping with the fake detector


def test_split_by_identity_end_to_end_and_on_rerun(tmp_path: Path, fake_dlib, capsys) -> None:
    data = tmp_path / 'vox'
    for person in ('id1', 'id2', 'id3', 'id4'):
        for clip in ('c1', 'c2'):
            noise_frames(data / person / f'{person}_{clip}', 4)
    root = tmp_path / 'root'
    one = ['--max_frames', '1', '--min_frames', '1', '--seed', '5']
    assert run(data, '--out', root, '--test_fraction', '0.5', '--split_by', r'id\d', *one) == 0
    m = manifest(root)
    assert len(m) == 8 and sorted(v['split'] for v in m.values()).count('test') == 4
    for person in ('id1', 'id2', 'id3', 'id4'):
        assert m[f'{person}_c1']['split'] == m[f'{person}_c2']['split']
    assert json.loads((root / 'config.json').read_text())['runs'][-1]['split_by'] == r'id\d'
    # new clips of known people join their people's split, whatever the new group count does to the ranking
    for person in ('id1', 'id2', 'id3', 'id4', 'id5', 'id6', 'id7'):
        noise_frames(data / person / f'{person}_c3', 4)
    assert run(data, '--out', root, '--test_fraction', '0.5', '--split_by', r'id\d', *one) == 0
    m = manifest(root)
    for person in ('id1', 'id2', 'id3', 'id4'):
        assert m[f'{person}_c3']['split'] == m[f'{person}_c1']['split']
    # a pattern that matches nothing is a command-line error, before any work
    with pytest.raises(SystemExit):
        run(data, '--out', tmp_path / 'typo', '--split_by', 'speaker', *one)
    assert 'matches no folder' in capsys.readouterr().err and not (tmp_path / 'typo').exists()


def test_splits_names_format_and_stride(tmp_path: Path, fake_dlib) -> None:
    data = tmp_path / 'data'
    folders = {'a_clip': 'a/clip', 'b_clip': 'b/clip', 'c': 'c', 'd': 'd', 'e': 'e'}
    for folder in folders.values():
        noise_frames(data / folder, 11)
    root = tmp_path / 'root'
    args = ['--test_fraction', '0.4', '--seed', '3', '--every', '3', '--max_frames', '4', '--format', 'jpg']
    assert run(data, '--out', root, *args, '--size', '64') == 0
    names = list(folders)
    expected = dict(zip(names, assign_splits(names, 0.4, seed=3)))
    assert sorted(expected.values()).count('test') == 2
    m = manifest(root)
    for name, split in expected.items():
        assert frame_files(root / split / name) == ['0.jpg', '3.jpg', '6.jpg', '9.jpg']
        assert m[name]['split'] == split and m[name]['status'] == 'done' and m[name]['frames_written'] == 4
        assert m[name]['source'] == str(data / folders[name]) and m[name]['fps'] is None
        with Image.open(root / split / name / '3.jpg') as im:
            assert im.format == 'JPEG' and im.size == (64, 64)
    config = json.loads((root / 'config.json').read_text())
    assert config['settings']['size'] == 64 and config['settings']['every'] == 3
    assert config['runs'][-1]['seed'] == 3 and 'numpy' in config['runs'][-1]['versions']

    # Same seed, another root: the same assignment. --split puts everything in one split.
    one = ['--max_frames', '1', '--min_frames', '1']
    assert run(data, '--out', tmp_path / 'again', '--test_fraction', '0.4', '--seed', '3', *one) == 0
    assert {n: v['split'] for n, v in manifest(tmp_path / 'again').items()} == expected
    assert run(data, '--out', tmp_path / 'all_test', '--split', 'test', *one) == 0
    assert sorted(p.name for p in (tmp_path / 'all_test' / 'test').iterdir()) == names
    assert not (tmp_path / 'all_test' / 'train').exists()


def test_drop_missing_and_min_frames(tmp_path: Path, fake_dlib, capsys) -> None:
    blanked = noise_frames(tmp_path / 'in' / 'blanked', 6, black=(2,))
    noise_frames(tmp_path / 'in' / 'short', 3)
    noise_frames(tmp_path / 'in' / 'mostly_black', 6, black=(0, 1, 2, 4))

    keep = tmp_path / 'keep'
    assert run(tmp_path / 'in', '--out', keep, '--split', 'train') == 0
    assert len(frame_files(keep / 'train' / 'blanked')) == 6
    m = manifest(keep)
    assert m['blanked']['frames_missing_face'] == 1 and m['blanked']['missing_frames'] == ['2']
    assert m['mostly_black']['status'] == 'done' and m['mostly_black']['frames_written'] == 6
    assert m['short']['status'] == 'too_few_frames' and not (keep / 'train' / 'short').exists()
    err = capsys.readouterr().err
    assert 'skipping short' in err and 'min_frames' in err

    drop = tmp_path / 'drop'
    assert run(tmp_path / 'in', '--out', drop, '--split', 'train', '--drop_missing') == 0
    assert frame_files(drop / 'train' / 'blanked') == ['0.png', '1.png', '3.png', '4.png', '5.png']
    m = manifest(drop)
    assert m['blanked']['frames_written'] == 5 and m['blanked']['missing_frames'] == ['2']
    assert m['mostly_black']['status'] == 'too_few_frames'  # 2 frames with a face < --min_frames 4
    assert not (drop / 'train' / 'mostly_black').exists()
    assert run(blanked, '--out', tmp_path / 'low', '--drop_missing', '--min_frames', '5') == 0


def test_failures_are_reported_and_the_run_goes_on(tmp_path: Path, fake_dlib, capsys) -> None:
    good = noise_frames(tmp_path / 'in' / 'good', 5)
    corrupt = noise_frames(tmp_path / 'in' / 'corrupt', 5)
    (corrupt / '2.png').write_bytes(b'this is not a png')
    truncated = noise_frames(tmp_path / 'in' / 'truncated', 5, size=(320, 240))
    data = (truncated / '3.png').read_bytes()
    (truncated / '3.png').write_bytes(data[: len(data) // 2])
    (tmp_path / 'in' / 'broken.mp4').write_bytes(b'\x00' * 1000)
    root = tmp_path / 'root'

    assert run(tmp_path / 'in', tmp_path / 'nowhere', '--out', root, '--split', 'train') == 1
    out = capsys.readouterr()
    text = out.out + out.err
    for named in (corrupt / '2.png', truncated / '3.png', tmp_path / 'in' / 'broken.mp4', tmp_path / 'nowhere'):
        assert str(named) in text
    assert '4 input(s) FAILED' in out.out
    assert len(frame_files(root / 'train' / 'good')) == 5
    m = manifest(root)
    assert m['good']['status'] == 'done'
    for name in ('corrupt', 'truncated', 'broken'):
        assert m[name]['status'] == 'failed' and not (root / 'train' / name).exists()
    assert not list((root / 'train').glob('.*'))  # no partial folder left behind by a failure
    assert json.loads((root / 'manifest.json').read_text())['failed_inputs'][0]['input'] == str(tmp_path / 'nowhere')

    # Only faceless or missing inputs: nothing prepared -> exit 1.
    black = noise_frames(tmp_path / 'black', 4, black=(0, 1, 2, 3))
    assert run(black, '--out', tmp_path / 'none') == 1
    assert manifest(tmp_path / 'none')['black']['status'] == 'no_face'
    assert run(tmp_path / 'nowhere', '--out', tmp_path / 'none2') == 1
    assert not (tmp_path / 'none2').exists()
    assert good.exists()


def test_resume_settings_and_overwrite(tmp_path: Path, fake_dlib) -> None:
    data = tmp_path / 'data'
    for name in ('v1', 'v2'):
        noise_frames(data / name, 5)
    root = data / 'prepared'  # inside the input folder: its frame folders must not become inputs
    assert run(data, '--out', root, '--split', 'train') == 0
    assert run(data, '--out', root, '--split', 'train') == 0
    assert sorted(manifest(root)) == ['v1', 'v2']

    mtimes = {p: p.stat().st_mtime_ns for p in (root / 'train' / 'v2').iterdir()}
    (root / 'train' / 'v1').rename(root / 'train' / '.v1.partial')
    (root / 'train' / '.v1.partial' / '3.png').unlink()
    assert run(data, '--out', root, '--split', 'train') == 0
    assert frame_files(root / 'train' / 'v1') == [f'{i}.png' for i in range(5)]
    assert not (root / 'train' / '.v1.partial').exists()
    assert {p: p.stat().st_mtime_ns for p in (root / 'train' / 'v2').iterdir()} == mtimes

    with pytest.raises(SystemExit) as e:
        run(data, '--out', root, '--split', 'train', '--size', '32')
    assert e.value.code == 2
    assert run(data, '--out', root, '--split', 'train', '--size', '32', '--overwrite') == 0
    with Image.open(root / 'train' / 'v2' / '0.png') as im:
        assert im.size == (32, 32)
    assert len(json.loads((root / 'config.json').read_text())['runs']) == 1

    foreign = tmp_path / 'foreign'
    noise_frames(foreign / 'train' / 'x', 4)
    with pytest.raises(SystemExit) as e:
        run(data, '--out', foreign)
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------------------
# Real dlib alignment on real frames


@pytest.fixture(scope='module')
def real_inputs(sample_video_dir: Path, test_videos_dir: Path, tmp_path_factory) -> Path:
    """talk/: 6 sample frames (1920x1080, frame 0003 blanked); sample_24f_540p.mp4; black/: 4 black frames."""
    pytest.importorskip('dlib')
    try:
        data_prep.check_detector('pretrained_models')
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    inputs = tmp_path_factory.mktemp('inputs')
    (inputs / 'talk').mkdir()
    for i in range(6):
        src = sample_video_dir / f'{i:04d}.jpeg'
        if i == 3:
            with Image.open(src) as im:
                Image.new('RGB', im.size).save(inputs / 'talk' / src.name)
        else:
            shutil.copy(src, inputs / 'talk' / src.name)
    shutil.copy(test_videos_dir / 'sample_24f_540p.mp4', inputs)
    noise_frames(inputs / 'black', 4, black=(0, 1, 2, 3), size=(160, 120))
    return inputs


@pytest.fixture(scope='module')
def real_root(real_inputs: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('real') / 'root'
    assert run(real_inputs, '--out', root, '--max_frames', '6', '--split', 'train') == 0
    return root


def test_real_videos_are_aligned_faces(real_root: Path, real_inputs: Path) -> None:
    from faces import DlibDetector

    train = real_root / 'train'
    assert sorted(p.name for p in train.iterdir()) == ['sample_24f_540p', 'talk']
    assert frame_files(train / 'talk') == [f'{i:04d}.png' for i in range(6)]
    assert frame_files(train / 'sample_24f_540p') == [f'{i:06d}.png' for i in range(6)]

    m = manifest(real_root)
    assert m['black']['status'] == 'no_face' and not (train / 'black').exists()
    assert m['talk']['missing_frames'] == ['0003'] and m['talk']['frames_written'] == 6
    assert m['talk']['source'] == str(real_inputs / 'talk') and m['talk']['source_size'] == [1920, 1080]
    assert m['sample_24f_540p']['fps'] == pytest.approx(25.0) and m['sample_24f_540p']['frames_missing_face'] == 0

    detector = DlibDetector()
    for video, frame in (('talk', '0000'), ('talk', '0005'), ('sample_24f_540p', '000002')):
        img = np.asarray(Image.open(train / video / f'{frame}.png'))
        assert img.shape == (256, 256, 3) and img.std() > 20
        faces = detector(img)
        assert len(faces) == 1
        # An FFHQ-aligned crop: eyes level, a little above the centre; mouth below it.
        lm = faces[0]
        eyes, mouth = lm[36:48].mean(axis=0), lm[48:68].mean(axis=0)
        assert abs(lm[36:42, 1].mean() - lm[42:48, 1].mean()) < 10
        assert 90 < eyes[1] < 128 < mouth[1] < 200 and abs(eyes[0] - 128) < 15


def test_prepare_from_python_equals_the_script(real_root: Path, real_inputs: Path, tmp_path: Path) -> None:
    """data_prep.prepare (no argparse) writes the same frames as prepare_data.py; a bad setting raises UsageError
    before anything is written."""
    root = tmp_path / 'api'
    with pytest.raises(data_prep.UsageError, match='--size must be >= 8'):
        data_prep.prepare([real_inputs / 'talk'], root, size=4)
    with pytest.raises(data_prep.UsageError, match="got 'jpeg'"):
        data_prep.prepare([real_inputs / 'talk'], root, format='jpeg')
    assert not root.exists()
    assert data_prep.prepare([real_inputs / 'talk'], root, max_frames=6, split='train', progress=False) == 0
    got, want = root / 'train' / 'talk', real_root / 'train' / 'talk'
    assert [f.read_bytes() for f in sorted(got.iterdir())] == [f.read_bytes() for f in sorted(want.iterdir())]
    assert json.loads((root / 'config.json').read_text())['runs'][0]['command'] is None


def test_real_root_loads_in_the_dataset(real_root: Path) -> None:
    from dataset import VideoClipDataset

    ds = VideoClipDataset(real_root, 'train', frames_per_clip=2, image_size=64)
    assert ds.videos == ['sample_24f_540p', 'talk']
    item = ds[1]
    assert item['img'].shape == (2, 3, 64, 64) and item['img'].std() > 0.1


def test_real_resume_redoes_a_partial_video(real_root: Path, real_inputs: Path, tmp_path: Path) -> None:
    from dataset import VideoClipDataset

    root = tmp_path / 'root'
    shutil.copytree(real_root, root)
    video_files = sorted((root / 'train' / 'sample_24f_540p').iterdir())
    mtimes = [p.stat().st_mtime_ns for p in video_files]
    reference = (root / 'train' / 'talk' / '0001.png').read_bytes()
    partial = root / 'train' / '.talk.partial'
    (root / 'train' / 'talk').rename(partial)
    for p in list(partial.iterdir())[:3]:
        p.unlink()
    assert VideoClipDataset(root, 'train', frames_per_clip=2, image_size=64).videos == ['sample_24f_540p']

    assert run(real_inputs, '--out', root, '--max_frames', '6', '--split', 'train') == 0
    assert not partial.exists()
    assert frame_files(root / 'train' / 'talk') == [f'{i:04d}.png' for i in range(6)]
    assert (root / 'train' / 'talk' / '0001.png').read_bytes() == reference
    assert [p.stat().st_mtime_ns for p in video_files] == mtimes


def test_real_workers_match_serial(real_root: Path, real_inputs: Path, tmp_path: Path) -> None:
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    shutil.copy(real_inputs / 'sample_24f_540p.mp4', inputs)
    shutil.copytree(real_inputs / 'black', inputs / 'black')
    root = tmp_path / 'root'
    assert main([str(inputs), '--out', str(root), '--max_frames', '6', '--split', 'train', '--workers', '2']) == 0
    assert manifest(root)['black']['status'] == 'no_face'
    for p in sorted((real_root / 'train' / 'sample_24f_540p').iterdir()):
        assert (root / 'train' / 'sample_24f_540p' / p.name).read_bytes() == p.read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# data_prep's rules on their own (no detector, no main)


def test_split_rules_hold_groups_and_warn_without_test(tmp_path: Path) -> None:
    root = tmp_path / 'root'
    sources = [tmp_path / person / f'{person}_{c}' for person in ('id1', 'id2', 'id3') for c in ('a', 'b')]
    names = [s.name for s in sources]
    assert data_prep.assign_splits(root, sources, names, split='test') == (['test'] * 6, None)
    by_video, warning = data_prep.assign_splits(root, sources, names, test_fraction=0.5, seed=1)
    assert by_video == assign_splits(names, 0.5, seed=1) and warning is None
    grouped, _ = data_prep.assign_splits(root, sources, names, test_fraction=0.34, seed=1, split_by=r'id\d')
    assert grouped == assign_splits(names, 0.34, seed=1, groups=split_groups(sources, r'id\d'))
    # a group with a completed video in the root keeps that split, whatever the hash says now
    other = 'train' if grouped[0] == 'test' else 'test'
    (root / other / 'id1_b').mkdir(parents=True)
    held, _ = data_prep.assign_splits(root, sources, names, test_fraction=0.34, seed=1, split_by=r'id\d')
    assert held[:2] == [other, other] and held[2:] == grouped[2:]
    # 3 videos and 10%: no test video, and the user is told
    splits, warning = data_prep.assign_splits(root, sources[:3], names[:3], test_fraction=0.1)
    assert splits == ['train'] * 3 and 'no test video' in warning and '3 videos' in warning
    with pytest.raises(ValueError, match='matches no folder'):
        data_prep.assign_splits(root, sources, names, split_by='nobody')


def test_resume_rules_and_root_checks(tmp_path: Path) -> None:
    root = tmp_path / 'root'
    (root / 'test' / 'done').mkdir(parents=True)
    (root / 'test' / 'done' / '0.png').write_bytes(b'')
    (root / 'train' / '.partial_one.partial').mkdir(parents=True)
    sources = [tmp_path / 'in' / n for n in ('done', 'partial_one', 'new')]
    videos: dict = {}
    jobs, skipped, notes = data_prep.plan_jobs(root, ['done', 'partial_one', 'new'], sources, ['train'] * 3, videos)
    assert [j.name for j in jobs] == ['partial_one', 'new'] and skipped == 1  # a partial video is redone
    assert videos['done'] == {'source': str(sources[0]), 'split': 'test', 'status': 'done', 'frames_written': 1}
    assert notes == ['note: done is already prepared in test/ (this run would put it in train/); kept there']
    _, _, notes = data_prep.plan_jobs(root, ['done'], [tmp_path / 'elsewhere'], ['test'], videos)
    assert 'was prepared from' in notes[0]

    settings = data_prep.image_settings(data_prep.Settings(str(root)))
    with pytest.raises(data_prep.RootError, match='no config.json'):
        data_prep.check_root(root, settings, overwrite=False)
    assert data_prep.check_root(root, settings, overwrite=True) == {}
    config = data_prep.root_config({}, data_prep.Settings(str(root)), {'seed': 0})
    (root / 'config.json').write_text(json.dumps(config))
    assert data_prep.check_root(root, settings, overwrite=False)['runs'] == [{'seed': 0}]
    with pytest.raises(data_prep.RootError, match=r'size: 256 -> 64'):
        data_prep.check_root(root, {**settings, 'size': 64}, overwrite=False)
    (root / 'config.json').write_text('{')
    with pytest.raises(data_prep.RootError, match='cannot read'):
        data_prep.check_root(root, settings, overwrite=False)


def test_truncated_video_is_recorded_and_reported(tmp_path: Path, test_videos_dir: Path, fake_dlib,
                                                  capsys) -> None:
    from test_video_io import truncated_copy

    (tmp_path / 'in').mkdir()
    truncated_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path / 'in' / 'cut.mp4', 6)
    assert run(tmp_path / 'in', '--out', tmp_path / 'root', '--split', 'train', '--min_frames', '1') == 0
    rec = manifest(tmp_path / 'root')['cut']
    assert rec['status'] == 'done' and rec['frames_written'] == 6
    assert rec['decode'] == {'frames_expected': 24, 'frames_decoded': 6, 'truncated': True}
    assert 'declares 24 frames but only 6 decode' in rec['warning']
    assert 'warning: cut' in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    for name in ('manifest.json', 'config.json'):  # the usual mode, not mkstemp's 0600
        assert (tmp_path / 'root' / name).stat().st_mode & 0o777 == 0o666 & ~umask
