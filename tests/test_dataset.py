"""dataset.py: video clips (real frames resized small), their loaders, and the CelebA-HQ attribute data."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from config import CELEBA_ATTRIBUTES, DataConfig
from dataset import (
    CelebAHQFolder,
    CelebAHQLMDB,
    VideoClipDataset,
    collate_clips,
    flatten_clips,
    image_to_tensor,
    list_videos,
    natural_key,
    read_attribute_file,
    write_celebahq_lmdb,
)
from training import ClipDataModule

VIDEOS = ('id10001_a', 'id10001_b', 'id10002_a')


def _noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_video(folder: Path, n: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f'{i}.png' for i in range(n)]
    for i, p in enumerate(paths):
        _noise_image(size, seed * 1000 + i).save(p)
    return paths


@pytest.fixture(scope='module')
def video_root(sample_video_dir: Path, tmp_path_factory) -> Path:
    """ROOT/{train,test}/<video>/<frame>.jpg: 3 train videos x 5 real frames (64x48) and 1 test video."""
    sources = sorted(sample_video_dir.glob('*.jp*g'))[:20]
    root = tmp_path_factory.mktemp('vox')
    jobs = [('train', v, sources[5 * i:5 * i + 5]) for i, v in enumerate(VIDEOS)] + [('test', 'id2', sources[15:20])]
    for split, video, frames in jobs:
        (root / split / video).mkdir(parents=True)
        for j, src in enumerate(frames):
            with Image.open(src) as img:
                img.draft('RGB', (240, 135))  # fast reduced-size JPEG decode
                img.convert('RGB').resize((64, 48), Image.BILINEAR).save(root / split / video / f'frame_{j}.jpg')
    return root


# --------------------------------------------------------------------------------------------------------------------
# Video clips


def test_natural_key_orders_numbers_by_value():
    names = ['f10.png', 'f2.png', 'F1.png', 'f2.jpg', 'a.png']
    assert sorted(names, key=natural_key) == ['a.png', 'F1.png', 'f2.jpg', 'f2.png', 'f10.png']
    assert natural_key(Path('x/y/frame_3.jpg')) < natural_key('frame_12.jpg')


def test_clip_shapes_range_and_distinct_frames(video_root):
    ds = VideoClipDataset(video_root, 'train', frames_per_clip=4, image_size=32, seed=0)
    assert len(ds) == 3 and ds.videos == list(VIDEOS)
    for seed in range(5):
        ds.seed = seed
        for i in range(len(ds)):
            item = ds[i]
            img, index = item['img'], item['index']
            assert img.shape == (4, 3, 32, 32) and img.dtype == torch.float32
            assert img.min() >= -1 and img.max() <= 1 and img.min() < -0.3 and img.max() > 0.3
            assert item['video'] == VIDEOS[i]
            assert index.shape == (4,) and index.dtype == torch.int64
            assert len(set(index.tolist())) == 4, 'a frame was drawn twice'
            assert index.tolist() == sorted(index.tolist()) and 0 <= index.min() and index.max() < 5
            for j in range(4):  # distinct frames, not one frame repeated
                assert not torch.equal(img[j], img[(j + 1) % 4])


def test_clip_frames_are_the_indexed_frames(video_root):
    ds = VideoClipDataset(video_root, 'train', frames_per_clip=3, image_size=24, flip='none', seed=3)
    item = ds[1]
    for frame, j in zip(item['img'], item['index'].tolist(), strict=True):
        path = video_root / 'train' / VIDEOS[1] / f'frame_{j}.jpg'
        assert ds.frame_path(1, j) == path
        with Image.open(path) as img:
            assert torch.equal(frame, image_to_tensor(img.convert('RGB'), 24))


def test_k_equal_to_video_length_uses_every_frame(video_root):
    item = VideoClipDataset(video_root, 'train', frames_per_clip=5, image_size=16, seed=0)[0]
    assert item['index'].tolist() == [0, 1, 2, 3, 4]


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 80x40 frame: red | green | blue columns of widths 15 / 50 / 15. Resize(20) -> 40x20 (green in columns 7.5..32.5),
    # CenterCrop(20) keeps columns 10..30: all green. A squashing resize to 20x20 would keep the red and blue edges.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :15, 0], arr[:, 15:65, 1], arr[:, 65:, 2] = 255, 255, 255
    (tmp_path / 'train' / 'v').mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / 'train' / 'v' / '0.png')
    img = VideoClipDataset(tmp_path, 'train', frames_per_clip=1, image_size=20, flip='none')[0]['img'][0]
    assert img.shape == (3, 20, 20)
    assert torch.allclose(img[1], torch.ones(20, 20)) and torch.allclose(img[[0, 2]], -torch.ones(2, 20, 20))


def test_mixed_frame_sizes_are_resized(tmp_path):
    folder = tmp_path / 'train' / 'v'
    for i, size in enumerate([(40, 30), (30, 40), (17, 17), (64, 20)]):
        folder.mkdir(parents=True, exist_ok=True)
        _noise_image(size, i).save(folder / f'{i}.png')
    item = VideoClipDataset(tmp_path, 'train', frames_per_clip=4, image_size=16, seed=0)[0]
    assert item['img'].shape == (4, 3, 16, 16)


def _flip_pattern(ref: torch.Tensor, img: torch.Tensor) -> list[bool]:
    """Per frame: True if img is ref mirrored, False if identical (anything else fails)."""
    out = []
    for r, x in zip(ref, img, strict=True):
        assert not torch.equal(r, r.flip(-1)), 'test frames must not be mirror-symmetric'
        if torch.equal(x, r):
            out.append(False)
        else:
            assert torch.equal(x, r.flip(-1)), 'frame is neither the original nor its mirror image'
            out.append(True)
    return out


@pytest.mark.parametrize('mode', ['clip', 'frame'])
def test_flip_modes(video_root, mode):
    kwargs = dict(frames_per_clip=4, image_size=24)
    patterns = []
    for seed in range(12):
        ref = VideoClipDataset(video_root, 'train', flip='none', seed=seed, **kwargs)[0]
        item = VideoClipDataset(video_root, 'train', flip=mode, seed=seed, **kwargs)[0]
        assert torch.equal(item['index'], ref['index'])  # the flip draw does not change which frames are used
        patterns.append(_flip_pattern(ref['img'], item['img']))
    flags = [f for p in patterns for f in p]
    assert True in flags and False in flags
    mixed = [p for p in patterns if len(set(p)) > 1]
    if mode == 'clip':
        assert not mixed, 'clip mode must flip all frames of a clip together'
    else:
        assert mixed, 'frame mode should flip frames of one clip independently'


def test_seed_determinism(video_root):
    a = VideoClipDataset(video_root, 'train', frames_per_clip=3, image_size=16, seed=7)
    b = pickle.loads(pickle.dumps(VideoClipDataset(video_root, 'train', frames_per_clip=3, image_size=16, seed=7)))
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x['img'], y['img']) and torch.equal(x['index'], y['index'])
    assert torch.equal(a[0]['img'], a[0]['img'])  # seeded: the same clip on every access
    others = [VideoClipDataset(video_root, 'train', frames_per_clip=3, image_size=16, seed=s)[0] for s in range(8)]
    assert len({tuple(o['index'].tolist()) for o in others}) > 1, 'different seeds should give different clips'
    # Unseeded datasets follow torch's global RNG.
    c = VideoClipDataset(video_root, 'train', frames_per_clip=3, image_size=16)
    torch.manual_seed(0)
    first = c[2]
    torch.manual_seed(0)
    assert torch.equal(c[2]['img'], first['img'])


def test_short_videos_skipped_with_one_warning(tmp_path):
    for name, n in [('v1', 5), ('v2', 2), ('v3', 4), ('v4', 0)]:
        (tmp_path / 'train' / name).mkdir(parents=True)
        _write_video(tmp_path / 'train' / name, n)
    with pytest.warns(UserWarning, match=r'skipping 2 of 4 videos') as record:
        ds = VideoClipDataset(tmp_path, 'train', frames_per_clip=4, image_size=8)
    assert len(record) == 1 and 'v2 (2)' in str(record[0].message) and 'v4 (0)' in str(record[0].message)
    assert ds.videos == ['v1', 'v3'] and ds[1]['img'].shape == (4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ds[0], ds[1]  # the warning comes once, at construction, never per item


def test_all_videos_too_short_is_an_error(tmp_path):
    _write_video(tmp_path / 'train' / 'v1', 2)
    _write_video(tmp_path / 'train' / 'v2', 3)
    with pytest.raises(ValueError, match=r'frames_per_clip=4') as err:
        VideoClipDataset(tmp_path, 'train', frames_per_clip=4)
    assert str(tmp_path / 'train') in str(err.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist') as err:
        VideoClipDataset(tmp_path / 'nope')
    assert str(tmp_path / 'nope') in str(err.value) and '<video>' in str(err.value)
    (tmp_path / 'test').mkdir()
    with pytest.raises(FileNotFoundError, match=r"sub-folders of .*\['test'\]") as err:
        VideoClipDataset(tmp_path, 'train')
    assert str(tmp_path / 'train') in str(err.value)
    (tmp_path / 'train').mkdir()
    with pytest.raises(ValueError, match='no video folders'):
        VideoClipDataset(tmp_path, 'train')
    _noise_image((8, 8), 0).save(tmp_path / 'train' / '0.png')  # frames put directly in the split folder
    with pytest.raises(ValueError, match='1 image files directly'):
        VideoClipDataset(tmp_path, 'train')
    with pytest.raises(ValueError, match='no image frames'):
        (tmp_path / 'train' / 'empty_video').mkdir()
        list_videos(tmp_path, 'train')


@pytest.mark.parametrize('kind', ['garbage', 'truncated'])
def test_corrupt_image_error_names_the_file(tmp_path, kind):
    paths = _write_video(tmp_path / 'train' / 'v', 3)
    bad = tmp_path / 'train' / 'v' / '3.jpg'
    if kind == 'garbage':
        bad.write_bytes(b'this is not an image')
    else:
        _noise_image((64, 64), 9).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    ds = VideoClipDataset(tmp_path, 'train', frames_per_clip=4, image_size=8)  # all 4 frames, the bad one included
    with pytest.raises(ValueError, match='cannot decode image') as err:
        ds[0]
    assert str(bad) in str(err.value)
    assert len(paths) == 3


def test_non_image_files_ignored(tmp_path):
    folder = tmp_path / 'train' / 'v'
    _write_video(folder, 5)
    (folder / 'notes.txt').write_text('not a frame')
    (folder / '.hidden.png').write_bytes(b'junk')
    (folder / 'sub.png').mkdir()
    (folder / 'thumbs.db').write_bytes(b'junk')
    (tmp_path / 'train' / 'readme.md').write_text('not a video')
    [(name, frames)] = list_videos(tmp_path, 'train')
    assert name == 'v' and [f.name for f in frames] == [f'{i}.png' for i in range(5)]
    ds = VideoClipDataset(tmp_path, 'train', frames_per_clip=5, image_size=8)
    assert ds.num_frames(0) == 5 and ds[0]['img'].shape == (5, 3, 8, 8)


def test_list_videos_natural_order(tmp_path):
    for name in ['v10', 'v2', 'v1']:
        folder = tmp_path / 'test' / name
        folder.mkdir(parents=True)
        for f in ['10.png', '9.png', '1.png']:
            _noise_image((4, 4), 0).save(folder / f)
    videos = list_videos(tmp_path, 'test')
    assert [v for v, _ in videos] == ['v1', 'v2', 'v10']
    assert [f.name for f in videos[0][1]] == ['1.png', '9.png', '10.png']
    assert videos[2][1][0] == tmp_path / 'test' / 'v10' / '1.png'


def test_dataloader_with_workers(video_root):
    ds = VideoClipDataset(video_root, 'train', frames_per_clip=2, image_size=16)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert [b['img'].shape for b in batches] == [(2, 2, 3, 16, 16), (1, 2, 3, 16, 16)]
    assert batches[0]['video'] == list(VIDEOS[:2]) and batches[0]['index'].shape == (2, 2)


def test_collate_and_flatten():
    items = [{'img': torch.full((3, 3, 4, 4), float(b)), 'video': f'v{b}', 'index': torch.arange(3) + b}
             for b in range(2)]
    batch = collate_clips(items)
    assert batch['img'].shape == (2, 3, 3, 4, 4) and batch['video'] == ['v0', 'v1']
    flat = flatten_clips(batch['img'])
    assert flat.shape == (6, 3, 4, 4)
    assert torch.equal(flat[:3], items[0]['img']) and torch.equal(flat[3:], items[1]['img'])  # clip-major
    assert flatten_clips(torch.zeros(1, 1, 3, 4, 4)).shape == (1, 3, 4, 4)  # no squeeze to 3-D
    with pytest.raises(ValueError, match=r'\[B,K,C,H,W\]'):
        flatten_clips(torch.zeros(2, 3, 4, 4))
    items[1]['img'] = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match='must share'):
        collate_clips(items)


def test_clip_data_module(video_root, tmp_path):
    dm = ClipDataModule(DataConfig(root=str(video_root), frames_per_clip=2, num_workers=0), 32, clips_per_device=2)
    dm.setup('fit')
    train = list(dm.train_dataloader())
    assert len(train) == 1 and train[0]['img'].shape == (2, 2, 3, 32, 32)  # 3 videos, drop_last
    val = list(dm.val_dataloader())
    assert len(val) == 1 and val[0]['img'].shape == (1, 2, 3, 32, 32)
    assert torch.equal(val[0]['img'], next(iter(dm.val_dataloader()))['img'])  # fixed validation clips

    _write_video(tmp_path / 'train' / 'v', 3)
    dm = ClipDataModule(DataConfig(root=str(tmp_path), frames_per_clip=2, num_workers=0), 8, clips_per_device=1)
    dm.setup('fit')
    assert dm.val_dataloader() == [] and len(dm.train_dataloader()) == 1
    with pytest.raises(ValueError, match='clips_per_device=2'):
        ClipDataModule(DataConfig(root=str(tmp_path), frames_per_clip=2), 8, clips_per_device=2).setup('fit')


def test_invalid_arguments(video_root):
    with pytest.raises(ValueError, match='flip'):
        VideoClipDataset(video_root, flip='sometimes')
    with pytest.raises(ValueError, match='frames_per_clip'):
        VideoClipDataset(video_root, frames_per_clip=0)
    with pytest.raises(IndexError):
        VideoClipDataset(video_root, frames_per_clip=2)[3]


# --------------------------------------------------------------------------------------------------------------------
# CelebA-HQ attributes


def _write_anno(path: Path, rows: dict[int, np.ndarray], count: int | None = None,
                names: tuple[str, ...] = CELEBA_ATTRIBUTES) -> Path:
    lines = [str(len(rows) if count is None else count), ' '.join(names)]
    lines += [f'{i}.jpg  ' + ' '.join('1' if v else '-1' for v in row) for i, row in rows.items()]
    path.write_text('\n'.join(lines) + '\n')
    return path


def _rows(indices, seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2, 40).astype(np.uint8) for i in indices}


def test_read_attribute_file(tmp_path):
    rows = _rows([0, 1, 29999])
    names, table = read_attribute_file(_write_anno(tmp_path / 'anno.txt', rows))
    assert names == list(CELEBA_ATTRIBUTES) and sorted(table) == [0, 1, 29999]
    for i, row in rows.items():
        assert table[i].shape == (40,) and np.array_equal(table[i], row)
    with pytest.warns(UserWarning, match='announces 5 images but 3 rows'):
        read_attribute_file(_write_anno(tmp_path / 'count.txt', rows, count=5))


def test_read_attribute_file_errors(tmp_path):
    swapped = list(CELEBA_ATTRIBUTES)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(ValueError, match="column 3: 'Bald' instead of 'Bags_Under_Eyes'"):
        read_attribute_file(_write_anno(tmp_path / 'a.txt', _rows([0]), names=tuple(swapped)))
    with pytest.raises(ValueError, match='39 names instead of 40'):
        read_attribute_file(_write_anno(tmp_path / 'b.txt', _rows([0]), names=CELEBA_ATTRIBUTES[:39]))
    bad = _write_anno(tmp_path / 'c.txt', _rows([0, 1]))
    bad.write_text(bad.read_text() + '2.jpg 1 -1\n')
    with pytest.raises(ValueError, match=r'c\.txt:5: expected'):
        read_attribute_file(bad)
    with pytest.raises(FileNotFoundError, match='missing.txt'):
        read_attribute_file(tmp_path / 'missing.txt')


def test_lmdb_round_trip(tmp_path):
    images = {i: _noise_image((40, 30), i) for i in (0, 5, 7)}
    anno = _write_anno(tmp_path / 'anno.txt', _rows([0, 5, 7, 9]))
    jpeg = tmp_path / 'x.jpg'
    images[7].save(jpeg, quality=90)
    pairs = [(0, images[0]), (5, images[5]), (7, jpeg.read_bytes())]  # PIL images and encoded bytes
    assert write_celebahq_lmdb(pairs, tmp_path / 'celeba.lmdb') == 3

    _, table = read_attribute_file(anno)
    ds = CelebAHQLMDB(tmp_path / 'celeba.lmdb', anno, image_size=16, flip=False, indices=[0, 5, 7])
    assert len(ds) == 3
    ds = pickle.loads(pickle.dumps(ds))
    for k, idx in enumerate([0, 5, 7]):
        item = ds[k]
        assert item['index'] == idx and item['img'].shape == (3, 16, 16)
        assert item['labels'].dtype == torch.float32
        assert torch.equal(item['labels'], torch.from_numpy(table[idx]).float())
    assert torch.equal(ds[0]['img'], image_to_tensor(images[0], 16))  # PNG is lossless
    with Image.open(jpeg) as img:
        assert torch.equal(ds[2]['img'], image_to_tensor(img.convert('RGB'), 16))
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))  # forked workers open their own LMDB environment
    assert batches[0]['img'].shape == (2, 3, 16, 16) and batches[0]['labels'].shape == (2, 40)
    assert batches[1]['index'].tolist() == [7]

    flipped = CelebAHQLMDB(tmp_path / 'celeba.lmdb', anno, image_size=16, flip=True, indices=[0])
    seen = {torch.equal(flipped[0]['img'], ds[0]['img'].flip(-1)) for _ in range(40)}
    assert seen == {True, False}

    missing_key = CelebAHQLMDB(tmp_path / 'celeba.lmdb', anno, image_size=16, indices=[9])
    with pytest.raises(KeyError, match='256-00009'):
        missing_key[0]
    with pytest.raises(ValueError, match=r'no row in .*anno\.txt: indices 11'):
        CelebAHQLMDB(tmp_path / 'celeba.lmdb', anno, indices=[0, 11])
    with pytest.raises(FileNotFoundError, match='nope.lmdb'):
        CelebAHQLMDB(tmp_path / 'nope.lmdb', anno)


def test_celebahq_folder(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    _noise_image((32, 32), 0).save(folder / '0.jpg')
    _noise_image((48, 32), 1).save(folder / '2.png')
    (folder / 'notes.txt').write_text('ignored')
    anno = _write_anno(tmp_path / 'anno.txt', _rows([0, 1, 2]))
    ds = CelebAHQFolder(folder, anno, image_size=16, flip=False)
    assert ds.indices == [0, 2] and [ds[k]['index'] for k in range(2)] == [0, 2]
    assert ds[1]['img'].shape == (3, 16, 16) and ds[1]['labels'].shape == (40,)
    with pytest.raises(FileNotFoundError, match='1.jpg'):
        CelebAHQFolder(folder, anno, indices=[0, 1])
    _noise_image((32, 32), 3).save(folder / '3.jpg')
    with pytest.raises(ValueError, match=r'indices 3') as err:
        CelebAHQFolder(folder, anno)
    assert str(anno) in str(err.value)
    (folder / '4.jpg').write_bytes(b'broken')
    (tmp_path / 'anno.txt').unlink()
    anno = _write_anno(tmp_path / 'anno.txt', _rows([0, 2, 3, 4]))
    ds = CelebAHQFolder(folder, anno, image_size=16)
    with pytest.raises(ValueError, match='4.jpg'):
        ds[3]
