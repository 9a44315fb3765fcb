"""Training data: frame-folder video clips for the DVA and CelebA-HQ images with 40 attributes for the classifier.

Layouts:
    video clips   ROOT/{train,test}/<video>/<frame>.{jpg,jpeg,png,...}   one folder of face frames per video
                  (the released data are STIT-aligned VoxCeleb1 frames, already square)
    CelebA-HQ     an LMDB whose keys are b'256-%05d' % idx (PIL-decodable image bytes), or a folder of
                  <idx>.jpg / <idx>.png files, plus CelebAMask-HQ-attribute-anno.txt

Every image becomes a float32 [3,S,S] tensor in [-1,1]: Resize(S) on the shorter side (bilinear, as released),
CenterCrop(S), optional horizontal flip, then (x - 0.5) / 0.5. The released video transform has no crop because its
frames are already square; for square frames the crop is a no-op, and for other frames it keeps the centre instead of
producing clips that cannot be stacked. Frames of one video may have different sizes: each is resized on its own.

Changes from the released `Voxceleb` dataset (spec section 3, defects 24-25):
    * the folder tree is indexed once at construction, not globbed on every item;
    * only image files are used (natural order: 2.jpg before 10.jpg); other files are ignored;
    * videos with fewer than K frames are skipped with one warning instead of crashing `random.sample` in a worker;
    * the horizontal flip is drawn once per clip (`flip='clip'`); `flip='frame'` keeps the released per-frame flips;
    * the K sampled frame indices are returned in temporal order (the loss does not depend on their order);
    * batches are [B,K,3,S,S] and are flattened with an explicit reshape (`flatten_clips`), never `squeeze()`.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from config import CELEBA_ATTRIBUTES
from video_io import list_frames, natural_key

FlipMode = Literal['clip', 'frame', 'none']
_LAYOUT = 'ROOT/{split}/<video>/<frame>.jpg (one sub-folder of image frames per video)'


def _image_names(folder: Path) -> list[str]:
    """Image file names of an existing folder in natural order (`video_io.list_frames`); [] when it holds none."""
    try:
        return [p.name for p in list_frames(folder)]
    except ValueError:  # the folder holds no image file
        return []


def _scan_split(root: str | Path, split: str) -> list[tuple[str, list[str]]]:
    """[(video name, frame file names)] for every video folder of ROOT/split, natural order, empty videos included."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'video dataset root {root} does not exist or is not a folder; expected {_LAYOUT}')
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f'split folder {split_dir} does not exist (sub-folders of {root}: {present}); expected {_LAYOUT}')
    with os.scandir(split_dir) as it:
        videos = sorted((e.name for e in it if e.is_dir() and not e.name.startswith('.')), key=natural_key)
    if not videos:
        loose = len(_image_names(split_dir))
        hint = f'; it holds {loose} image files directly, put them in a sub-folder per video' if loose else ''
        raise ValueError(f'no video folders in {split_dir}{hint}; expected {_LAYOUT}')
    return [(name, _image_names(split_dir / name)) for name in videos]


def list_videos(root: str | Path, split: str) -> list[tuple[str, list[Path]]]:
    """Every video of ROOT/split with its image frames, videos and frames in natural order.

    Folders without any image file are left out. Raises FileNotFoundError for a missing root or split folder and
    ValueError when the split holds no frame at all.
    """
    split_dir = Path(root) / split
    out = [(name, [split_dir / name / f for f in frames]) for name, frames in _scan_split(root, split) if frames]
    if not out:
        raise ValueError(f'no image frames under {split_dir}; expected {_LAYOUT}')
    return out


# --------------------------------------------------------------------------------------------------------------------
# Image decoding and transform


def load_rgb(source: str | Path | bytes, what: str | None = None) -> Image.Image:
    """Decode an image file (or encoded bytes) fully and convert it to RGB.

    A file that cannot be decoded raises ValueError naming it (`what`, default the path), never an opaque PIL error.
    """
    if what is None:
        what = 'image bytes' if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert('RGB')
    except FileNotFoundError as e:
        raise FileNotFoundError(f'{what} no longer exists (was it removed after the dataset was indexed?)') from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f'cannot decode image {what}: {type(e).__name__}: {e}') from e


def image_to_tensor(img: Image.Image, image_size: int, flip: bool = False) -> Tensor:
    """PIL image -> float32 [3,S,S] in [-1,1]: Resize(S) shorter side (bilinear), CenterCrop(S), optional h-flip."""
    import torchvision.transforms.functional as TF

    img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [image_size, image_size])
    x = (TF.to_tensor(img) - 0.5) / 0.5
    return x.flip(-1) if flip else x


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')


# --------------------------------------------------------------------------------------------------------------------
# Video clips


class VideoClipDataset(Dataset):
    """One item per video: K distinct frames drawn at random (not contiguous), as in the released `Voxceleb`.

    Args:
        root: dataset root holding `{split}/<video>/<frames>`.
        split: sub-folder, 'train' or 'test'.
        frames_per_clip: K, frames drawn without replacement per item; videos with fewer frames are skipped (warned).
        image_size: S, output side.
        flip: 'clip' flips all K frames together with probability 0.5; 'frame' flips each frame independently
            (released behaviour); 'none' never flips.
        seed: None draws from torch's global RNG (seeded per DataLoader worker; use `L.seed_everything(s,
            workers=True)` for reproducible training). An integer makes item i a fixed function of (seed, i): the
            same clip every epoch, for evaluation and tests.

    An item is {'img': float32 [K,3,S,S] in [-1,1], 'video': folder name, 'index': int64 [K] positions of the frames
    in the video's natural-sorted frame list, increasing}.
    """

    def __init__(self, root: str | Path, split: str = 'train', frames_per_clip: int = 4, image_size: int = 256,
                 flip: FlipMode = 'clip', seed: int | None = None) -> None:
        check_positive('frames_per_clip', frames_per_clip)
        check_positive('image_size', image_size)
        if flip not in ('clip', 'frame', 'none'):
            raise ValueError(f"flip={flip!r} is not one of ('clip', 'frame', 'none')")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f'seed must be None or a non-negative integer, got {seed!r}')
        self.root, self.split = Path(root), split
        self.frames_per_clip, self.image_size, self.flip, self.seed = frames_per_clip, image_size, flip, seed

        videos = _scan_split(root, split)
        short = [(name, len(frames)) for name, frames in videos if len(frames) < frames_per_clip]
        kept = [(name, frames) for name, frames in videos if len(frames) >= frames_per_clip]
        if not kept:
            raise ValueError(f'no video in {self.root / split} has at least frames_per_clip={frames_per_clip} image '
                             f'frames ({len(videos)} video folders; lower data.frames_per_clip or add frames)')
        if short:
            listed = ', '.join(f'{name} ({n})' for name, n in short[:5]) + (', ...' if len(short) > 5 else '')
            warnings.warn(f'skipping {len(short)} of {len(videos)} videos in {self.root / split} with fewer than '
                          f'{frames_per_clip} frames: {listed}', stacklevel=2)
        self.videos: list[str] = [name for name, _ in kept]
        # One numpy string array per video rather than millions of Python strings: cheap to pickle to workers and
        # free of the copy-on-access growth that lists of str cause in forked workers.
        self._frames: list[np.ndarray] = [np.array(frames) for _, frames in kept]

    def __len__(self) -> int:
        return len(self.videos)

    def num_frames(self, i: int) -> int:
        return len(self._frames[i])

    def frame_path(self, i: int, j: int) -> Path:
        """Path of frame j (natural order) of video i."""
        return self.root / self.split / self.videos[i] / str(self._frames[i][j])

    def _generator(self, i: int) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0]))
        return g

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f'video index {i} out of range for {len(self)} videos')
        g, k = self._generator(i), self.frames_per_clip
        index = torch.randperm(self.num_frames(i), generator=g)[:k].sort().values
        if self.flip == 'none':
            flips = torch.zeros(k, dtype=torch.bool)
        else:
            flips = (torch.rand(1 if self.flip == 'clip' else k, generator=g) < 0.5).expand(k)
        frames = []
        for j, f in zip(index.tolist(), flips.tolist(), strict=True):
            path = self.frame_path(i, j)
            frames.append(image_to_tensor(load_rgb(path), self.image_size, f))
        return {'img': torch.stack(frames), 'video': self.videos[i], 'index': index}


def collate_clips(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of `VideoClipDataset`: {'img': [B,K,3,S,S], 'video': list of B names, 'index': [B,K]}."""
    if not batch:
        raise ValueError('collate_clips got an empty batch')
    shapes = {tuple(item['img'].shape) for item in batch}
    if len(shapes) > 1:
        raise ValueError(f'clips in one batch must share [K,3,S,S]; got shapes {sorted(shapes)}')
    return {'img': torch.stack([item['img'] for item in batch]),
            'video': [item['video'] for item in batch],
            'index': torch.stack([item['index'] for item in batch])}


def flatten_clips(x: Tensor) -> Tensor:
    """[B,K,C,H,W] -> [B*K,C,H,W], clip-major (frames of clip 0 first). Explicit reshape: B=1 or K=1 stay 4-D."""
    if x.ndim != 5:
        raise ValueError(f'expected clips of shape [B,K,C,H,W], got {tuple(x.shape)}')
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# --------------------------------------------------------------------------------------------------------------------
# CelebA-HQ attributes (classifier data)


def read_attribute_file(path: str | Path) -> tuple[list[str], dict[int, np.ndarray]]:
    """Parse CelebAMask-HQ-attribute-anno.txt.

    Format: line 1 the image count, line 2 the 40 attribute names, then one row per image: `<idx>.jpg` followed by
    40 values of +1/-1, whitespace separated. Returns (names, {idx: uint8 [40] of {0,1}}) with label = value > 0.
    The names must equal `config.CELEBA_ATTRIBUTES` (ValueError otherwise); a row count different from line 1 is
    only warned about.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'attribute file {path} does not exist (expected CelebAMask-HQ-attribute-anno.txt)')
    lines = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if len(lines) < 2:
        raise ValueError(f'{path}: expected a count line and a names line, got {len(lines)} non-empty lines')
    try:
        (count,) = [int(v) for v in lines[0][1]]
    except ValueError:
        raise ValueError(f'{path}: line 1 must hold the number of images, got {" ".join(lines[0][1])!r}') from None
    names = lines[1][1]
    if tuple(names) != CELEBA_ATTRIBUTES:
        diff = next((i for i, (a, b) in enumerate(zip(names, CELEBA_ATTRIBUTES, strict=False)) if a != b), None)
        where = (f'first difference at column {diff}: {names[diff]!r} instead of {CELEBA_ATTRIBUTES[diff]!r}'
                 if diff is not None else f'{len(names)} names instead of {len(CELEBA_ATTRIBUTES)}')
        raise ValueError(f'{path}: attribute names on line 2 differ from config.CELEBA_ATTRIBUTES ({where})')
    table: dict[int, np.ndarray] = {}
    for n, tokens in lines[2:]:
        stem = os.path.splitext(tokens[0])[0]
        if len(tokens) != 1 + len(names) or not stem.isdigit():
            raise ValueError(f'{path}:{n}: expected "<idx>.jpg" and {len(names)} values, got {len(tokens)} fields '
                             f'starting {tokens[0]!r}')
        try:
            values = np.array([int(v) for v in tokens[1:]])
        except ValueError:
            raise ValueError(f'{path}:{n}: attribute values must be integers (+1/-1)') from None
        if int(stem) in table:
            raise ValueError(f'{path}:{n}: duplicate row for image {tokens[0]}')
        table[int(stem)] = (values > 0).astype(np.uint8)
    if len(table) != count:
        warnings.warn(f'{path}: line 1 announces {count} images but {len(table)} rows were read', stacklevel=2)
    return list(names), table


class _CelebAHQBase(Dataset):
    """Shared part of the CelebA-HQ datasets: annotation check, transform and item layout."""

    def __init__(self, anno_path: str | Path, image_size: int, flip: bool, indices: Iterable[int] | None,
                 source: str) -> None:
        check_positive('image_size', image_size)
        self.anno_path, self.image_size, self.flip = Path(anno_path), image_size, flip
        _, table = read_attribute_file(anno_path)
        self.indices: list[int] = sorted(table) if indices is None else [int(i) for i in indices]
        missing = [i for i in self.indices if i not in table]
        if missing:
            listed = ', '.join(map(str, missing[:10])) + (', ...' if len(missing) > 10 else '')
            raise ValueError(f'{len(missing)} images of {source} have no row in {self.anno_path}: indices {listed}')
        self._labels = np.stack([table[i] for i in self.indices]).astype(np.float32) if self.indices else None

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, idx: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = self.indices[i]
        flip = self.flip and bool(torch.rand(()) < 0.5)
        return {'img': image_to_tensor(self._image(idx), self.image_size, flip),
                'labels': torch.from_numpy(self._labels[i].copy()), 'index': idx}


class CelebAHQLMDB(_CelebAHQBase):
    """CelebA-HQ from the released LMDB (keys b'256-%05d' % idx) with its 40 attribute labels.

    Args:
        lmdb_path: LMDB directory (or file) such as datasets/celebahq256.lmdb.
        anno_path: CelebAMask-HQ-attribute-anno.txt; every index used must have a row (checked here).
        image_size: S; images go through Resize(S), CenterCrop(S).
        flip: random horizontal flip with probability 0.5 (torch's global RNG).
        indices: image indices to use; None uses every row of the annotation file.

    Item: {'img': float32 [3,S,S] in [-1,1], 'labels': float32 [40] of {0,1}, 'index': idx}. The LMDB is opened
    read-only and lock-free: once per DataLoader worker on its first item, or per item in the main process, so the
    dataset pickles and forks into workers.
    """

    def __init__(self, lmdb_path: str | Path, anno_path: str | Path, image_size: int = 256, flip: bool = True,
                 indices: Iterable[int] | None = None) -> None:
        self.lmdb_path = Path(lmdb_path)
        if not self.lmdb_path.exists():
            raise FileNotFoundError(f'CelebA-HQ LMDB {self.lmdb_path} does not exist')
        super().__init__(anno_path, image_size, flip, indices, source=str(self.lmdb_path))
        self._env = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_env': None}

    def _read(self, key: bytes) -> bytes | None:
        import lmdb

        def open_env() -> lmdb.Environment:
            return lmdb.open(str(self.lmdb_path), readonly=True, lock=False, readahead=False, meminit=False,
                             subdir=self.lmdb_path.is_dir())

        if torch.utils.data.get_worker_info() is None:
            # Main process: open, read, close (about 0.3 ms). An environment left open here would be inherited by
            # forked DataLoader workers, which LMDB forbids and py-lmdb refuses to re-open.
            with open_env() as env, env.begin(write=False) as txn:
                return txn.get(key)
        if self._env is None:  # one environment per worker, opened on its first item
            self._env = open_env()
        with self._env.begin(write=False) as txn:
            return txn.get(key)

    def _image(self, idx: int) -> Image.Image:
        key = b'256-%05d' % idx
        data = self._read(key)
        if data is None:
            raise KeyError(f'key {key.decode()} (image {idx}) is missing from the LMDB {self.lmdb_path}')
        return load_rgb(data, f'{key.decode()} in {self.lmdb_path}')


class CelebAHQFolder(_CelebAHQBase):
    """CelebA-HQ from a folder of `<idx>.jpg` / `<idx>.png` files; same arguments and items as `CelebAHQLMDB`.

    With indices=None every numbered image of the folder is used (each must have an annotation row).
    """

    def __init__(self, folder: str | Path, anno_path: str | Path, image_size: int = 256, flip: bool = True,
                 indices: Iterable[int] | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f'CelebA-HQ image folder {self.folder} does not exist')
        self._files = {int(Path(n).stem): n for n in _image_names(self.folder) if Path(n).stem.isdigit()}
        if indices is None:
            if not self._files:
                raise ValueError(f'no <idx>.jpg / <idx>.png images in {self.folder}')
            indices = sorted(self._files)
        indices = [int(i) for i in indices]
        absent = [i for i in indices if i not in self._files]
        if absent:
            listed = ', '.join(f'{i}.jpg/.png' for i in absent[:10]) + (', ...' if len(absent) > 10 else '')
            raise FileNotFoundError(f'{len(absent)} images are missing from {self.folder}: {listed}')
        super().__init__(anno_path, image_size, flip, indices, source=str(self.folder))

    def _image(self, idx: int) -> Image.Image:
        return load_rgb(self.folder / self._files[idx])


def write_celebahq_lmdb(images: Iterable[tuple[int, Image.Image | bytes]], path: str | Path,
                        image_format: str = 'PNG', map_size: int = 1 << 36) -> int:
    """Write (idx, image) pairs to an LMDB readable by `CelebAHQLMDB`; returns the number of images written.

    PIL images are encoded as `image_format` (lossless PNG by default); bytes are stored as given (e.g. the JPEG files
    of a folder, without re-encoding). Also stores b'length' as the released writer does. `map_size` is the largest
    size the database may reach (sparse on Linux; nothing is allocated up front).
    """
    import lmdb

    Path(path).mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=map_size)
    count = 0
    try:
        txn = env.begin(write=True)
        try:
            for idx, img in images:
                if not isinstance(img, bytes):
                    buffer = io.BytesIO()
                    img.save(buffer, format=image_format)
                    img = buffer.getvalue()
                txn.put(b'256-%05d' % int(idx), img)
                count += 1
                if count % 1000 == 0:  # keep transactions small
                    txn.commit()
                    txn = env.begin(write=True)
            txn.put(b'length', str(count).encode())
        except BaseException:
            txn.abort()
            raise
        txn.commit()
    finally:
        env.close()
    return count
