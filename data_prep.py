"""Data preparation as library functions: raw videos or frame folders -> FFHQ-aligned face frames in ROOT/{train,test}/.

    status = prepare(['raw_videos/'], 'datasets/mine', test_fraction=0.1)       # the whole run: 0 ok, 1 a failure
    # or step by step:
    config = check_root(root, image_settings(settings), overwrite=False)       # RootError: cannot resume this root
    sources, problems = video_sources.discover_inputs(inputs, exclude=root)
    names = video_sources.video_names(sources)
    splits = assign_splits(root, sources, names, test_fraction=0.1, seed=0)   # resume: a group keeps its split
    jobs, skipped, notes = plan_jobs(root, names, sources, splits, manifest['videos'])
    run_jobs(jobs, settings, pretrained_dir, workers=1, progress=False, on_result=record)  # prepare_video per job

Layout and rules (prepare_data.py is the command line):
- A video is written into the hidden folder ROOT/<split>/.<video>.partial (ignored by the dataset loader) and renamed
  to ROOT/<split>/<video> once complete; a later run skips completed videos and redoes partial ones.
- ROOT/config.json holds the settings that define the images (IMAGE_SETTINGS: a later run must use the same ones)
  and one entry per run; ROOT/manifest.json has one record per video: source, split, status ('done', 'no_face',
  'too_few_frames', 'failed'), frames written, frames without a face, fps, and what decoding found (`decode`:
  frames the container declares and frames that decode; a `warning` when they differ).
- Splits: see video_sources.assign_splits; with groups (--split_by), a group some of whose videos are already
  prepared stays in that split.

Torch-free (numpy, PIL, dlib, PyAV): the spawned worker processes import it cheaply.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cli import write_json
from faces import NoFaceError, align_video, crop_face
from video_io import IMAGE_EXTS, FrameSource
from video_sources import assign_splits as assign_by_hash
from video_sources import split_groups

SPLITS = ('train', 'test')
JPEG_QUALITY = 95
TOOL = 'prepare_data.py'
# Settings that define the images; every video of one ROOT must share them.
IMAGE_SETTINGS = ('size', 'format', 'every', 'max_frames', 'center_sigma', 'xy_sigma', 'drop_missing')


class UsageError(ValueError):
    """A setting or input `prepare` refuses before any work (prepare_data.py exits 2 with it)."""


class RootError(UsageError):
    """The output root cannot be used as asked (other settings, not made by this tool, unreadable JSON)."""


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


def image_settings(settings: Settings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if k in IMAGE_SETTINGS}


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


def _open(job: Job, settings: Settings) -> tuple[_Selection, dict[str, Any]]:
    """The selected frames of a job and the record of what opening found (fps, size, decode report, warning)."""
    max_num = None if settings.max_frames is None else (settings.max_frames - 1) * settings.every + 1
    with warnings.catch_warnings():  # a truncated video is recorded (and reported by the caller), not warned here
        warnings.simplefilter('ignore', UserWarning)
        source = FrameSource(job.source, max_num=max_num)
    frames = _Selection(source, settings.every)
    rec: dict[str, Any] = {'fps': source.fps, 'source_size': list(source.size), 'frames_selected': len(frames)}
    if source.is_video:
        rec['decode'] = source.decode_report()
    if source.truncated:
        rec['warning'] = (f'the container declares {source.frames_expected} frames but only {source.frames_decoded} '
                          'decode (truncated or damaged file?); the frames that decode were used')
    return frames, rec


def prepare_video(job: Job, detector: Any, settings: Settings, progress: bool = False, position: int = 1
                  ) -> dict[str, Any]:
    """Align and crop one video into ROOT/<split>/<name>/ (through ROOT/<split>/.<name>.partial).

    Never raises for a problem of the input: the returned manifest record has 'status' 'done', 'no_face',
    'too_few_frames' or 'failed' (with 'error'); KeyboardInterrupt propagates and leaves the partial folder behind.
    """
    rec: dict[str, Any] = {'source': job.source, 'split': job.split, 'status': 'failed'}
    split_dir = Path(settings.root) / job.split
    final, partial = split_dir / job.name, split_dir / f'.{job.name}.partial'
    try:
        frames, opened = _open(job, settings)
        rec.update(opened)
        if len(frames) < settings.min_frames:
            return {**rec, 'status': 'too_few_frames',
                    'error': f'{len(frames)} frames selected, fewer than --min_frames {settings.min_frames}'}
        if progress:
            frames.bar = {'desc': f'{job.name}: faces', 'position': position}
        try:
            alignment = align_video(frames, detector, settings.center_sigma, settings.xy_sigma, progress=False,
                                    keep_landmarks=False)
        except NoFaceError:
            return {**rec, 'status': 'no_face', 'error': f'no face detected in any of its {len(frames)} frames'}
        missing = set(alignment.missing)
        keep = [i for i in range(len(frames)) if not (settings.drop_missing and i in missing)]
        rec.update(frames_missing_face=len(missing), missing_frames=[frames.names[i] for i in sorted(missing)],
                   dropped_missing=settings.drop_missing)
        if len(keep) < settings.min_frames:
            return {**rec, 'status': 'too_few_frames',
                    'error': f'{len(keep)} frames with a face, fewer than --min_frames {settings.min_frames}'}
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
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        message = str(e) if isinstance(e, (OSError, ValueError)) else f'{type(e).__name__}: {e}'
        return {**rec, 'status': 'failed', 'error': message}


def make_detector(pretrained_dir: str | None) -> Any:
    """The dlib landmark detector the editing scripts use (`faces.DlibDetector`)."""
    from faces import DlibDetector

    return DlibDetector(pretrained_dir=pretrained_dir)


def check_detector(pretrained_dir: str | None) -> str:
    """Path of the dlib landmark model; ImportError (no dlib) or FileNotFoundError (no model) otherwise."""
    import dlib  # noqa: F401

    from faces import find_shape_predictor

    return str(find_shape_predictor(pretrained_dir))


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


def run_jobs(jobs: list[Job], settings: Settings, pretrained_dir: str | None, workers: int, progress: bool,
             on_result: Callable[[Job, dict[str, Any]], None]) -> None:
    """Prepare `jobs` (in-process for workers=1, else in a spawn process pool) and call on_result(job, record)."""
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
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(pretrained_dir, lock, counter, progress)) as pool:
                futures = {pool.submit(_run_in_worker, job, settings): job for job in jobs}
                try:
                    for future in as_completed(futures):
                        job = futures[future]
                        try:
                            rec = future.result()
                        except Exception as e:  # noqa: BLE001 - a worker died (e.g. out of memory)
                            rec = {'source': job.source, 'split': job.split, 'status': 'failed',
                                   'error': f'worker process failed: {type(e).__name__}: {e}'}
                        on_result(job, rec)
                        overall.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            tqdm.set_lock(old_lock)
    finally:
        overall.close()


# ----------------------------------------------------------------------------------------------------------------------
# The dataset root: config, manifest, resume and split rules


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RootError(f'cannot read {path}: {e} (fix or remove it, or pass --overwrite)') from e


def completed_split(root: Path, name: str) -> str | None:
    """The split holding a completed ROOT/<split>/<name>, or None."""
    return next((s for s in SPLITS if (root / s / name).is_dir()), None)


def reset_root(root: Path) -> None:
    """--overwrite: remove what this tool writes (train/, test/, config.json, manifest.json), nothing else."""
    for s in SPLITS:
        if (root / s).exists():
            shutil.rmtree(root / s)
    for f in ('config.json', 'manifest.json'):
        (root / f).unlink(missing_ok=True)


def check_root(root: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Check that an existing root can be resumed with image `settings`; returns its config.json ({} if none).
    RootError when it was made with other settings or not by this tool."""
    if overwrite:
        return {}
    if (root / 'config.json').exists():
        config = read_json(root / 'config.json')
        if config.get('tool') != TOOL:
            raise RootError(f'{root / "config.json"} was not written by {TOOL}; choose another --out')
        old = config.get('settings', {})
        diff = [f'{k}: {old.get(k)!r} -> {settings[k]!r}' for k in IMAGE_SETTINGS if old.get(k) != settings[k]]
        if diff:
            raise RootError(f'{root} was prepared with other settings ({"; ".join(diff)}); use the same settings to '
                            'resume or add videos, --overwrite to start over, or another --out')
        return config
    if any((root / s).exists() for s in SPLITS):
        raise RootError(f'{root} holds train/ or test/ folders but no config.json, so it was not made by {TOOL};'
                        ' choose another --out or pass --overwrite to replace them')
    return {}


def assign_splits(root: Path, sources: Sequence[Path], names: Sequence[str], split: str | None = None,
                  test_fraction: float = 0.1, seed: int = 0, split_by: str | None = None
                  ) -> tuple[list[str], str | None]:
    """(split per video, a warning or None). `split` puts every video there; else video_sources.assign_splits by
    video, or by the groups of the `split_by` pattern, a group some of whose videos the root already holds keeping
    that split. The warning says when test_fraction > 0 gives no test video. ValueError for a bad pattern."""
    if split:
        return [split] * len(names), None
    groups = split_groups(sources, split_by) if split_by else None
    splits = assign_by_hash(names, test_fraction, seed, groups)
    if groups is not None:
        held: dict[str, str] = {}
        for g, name in zip(groups, names):
            done = completed_split(root, name)
            if done is not None:
                held.setdefault(g, done)
        splits = [held.get(g, s) for g, s in zip(groups, splits)]
    warning = None
    if test_fraction > 0 and 'test' not in splits:
        n = len(set(groups)) if groups is not None else len(names)
        what = 'groups' if groups is not None else 'videos'
        warning = (f'--test_fraction {test_fraction} of {n} {what} rounds to no test video; pass a larger fraction, '
                   'more videos, or prepare held-out videos with --split test')
    return splits, warning


def plan_jobs(root: Path, names: Sequence[str], sources: Sequence[Path], splits: Sequence[str],
              videos: dict[str, dict[str, Any]]) -> tuple[list[Job], int, list[str]]:
    """The resume rule: (jobs for the videos not completed in root, number skipped, notes for the user).

    A completed video stays where it is (its split wins); one completed but not recorded (a run killed in between)
    is recorded in `videos` (updated in place) from the frames on disk."""
    jobs, skipped, notes = [], 0, []
    for name, source, split in zip(names, sources, splits):
        done = completed_split(root, name)
        if done is None:
            jobs.append(Job(name, str(source), split))
            continue
        skipped += 1
        old = videos.get(name)
        if old is None or old.get('status') != 'done':
            n = sum(1 for f in (root / done / name).iterdir() if f.suffix.lower() in IMAGE_EXTS)
            videos[name] = {'source': str(source), 'split': done, 'status': 'done', 'frames_written': n}
        elif Path(old['source']).absolute() != Path(source).absolute():
            notes.append(f'warning: {root / done / name} was prepared from {old["source"]}, not {source}; kept as it '
                         'is (--overwrite to redo)')
        if done != split:
            notes.append(f'note: {name} is already prepared in {done}/ (this run would put it in {split}/); kept there')
    return jobs, skipped, notes


def root_config(old: dict[str, Any], settings: Settings, run_info: dict[str, Any]) -> dict[str, Any]:
    """config.json of the root: the image settings and every run so far (this one last)."""
    return {'tool': TOOL, 'layout': 'ROOT/{train,test}/<video>/<frame>.' + settings.format,
            'settings': {**image_settings(settings),
                         'jpeg_quality': JPEG_QUALITY if settings.format == 'jpg' else None,
                         'crop': 'faces.crop_face(frame, quad, max(1024, size), size)'},
            'runs': [*old.get('runs', []), run_info]}


class Manifest:
    """ROOT/manifest.json: {'tool', 'videos': {name: record}, 'failed_inputs'}, rewritten atomically at most every
    `every` seconds while a run goes on (and on `save(force=True)`)."""

    def __init__(self, root: Path, problems: Sequence[tuple[str, str]] = (), every: float = 10.0) -> None:
        self.path, self.every, self.last = root / 'manifest.json', every, 0.0
        self.videos: dict[str, dict[str, Any]] = read_json(self.path).get('videos', {}) if self.path.exists() else {}
        self.failed_inputs = [{'input': s, 'error': m} for s, m in problems]

    def save(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last > self.every:
            write_json(self.path, {'tool': TOOL, 'videos': self.videos, 'failed_inputs': self.failed_inputs})
            self.last = time.monotonic()


def result_line(job: Job, rec: dict[str, Any]) -> str | None:
    """What the user reads about one prepared video (None when all went well)."""
    if rec['status'] == 'failed':
        return f'error: {job.name} ({job.source}): {rec["error"]}; continuing with the other videos'
    if rec['status'] != 'done':
        return f'warning: skipping {job.name} ({job.source}): {rec["error"]}'
    lines = [f'warning: {job.name} ({job.source}): {rec["warning"]}'] if rec.get('warning') else []
    if rec['frames_missing_face']:
        what = 'dropped' if rec['dropped_missing'] else 'kept with interpolated alignment'
        lines.append(f'note: {job.name}: no face found in {rec["frames_missing_face"]} of {rec["frames_selected"]} '
                     f'frames ({what})')
    return '\n'.join(lines) or None


def summary(root: Path, jobs: Sequence[Job], videos: dict[str, dict[str, Any]], skipped: int,
            failures: Sequence[tuple[str, str]]) -> tuple[str, int]:
    """The closing report and the exit status: 1 when an input failed or the root holds no video, else 0."""
    status: dict[str, list[str]] = {}
    for job in jobs:
        status.setdefault(videos[job.name]['status'], []).append(job.name)
    counts = {s: sum(1 for v in videos.values() if v.get('status') == 'done' and v.get('split') == s) for s in SPLITS}
    lines = [f'{root}: prepared {len(status.get("done", []))} videos this run, {skipped} already done; dataset now '
             f'holds {counts["train"]} train and {counts["test"]} test videos']
    lines += [f'skipped ({what}): {", ".join(status[key])}' for key, what in
              (('no_face', 'no face'), ('too_few_frames', 'too few frames')) if status.get(key)]
    if failures:
        lines += [f'{len(failures)} input(s) FAILED:', *(f'  {src}: {msg}' for src, msg in failures)]
    elif not any(counts.values()):
        lines.append(f'no video was prepared in {root}')
    return '\n'.join(lines), int(bool(failures) or not any(counts.values()))


def log(msg: str) -> None:
    """A message on stderr that does not break the progress bars."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def prepare(inputs: Sequence[str | Path], out: str | Path, size: int = 256, test_fraction: float = 0.1,
            split: str | None = None, seed: int = 0, split_by: str | None = None, every: int = 1,
            max_frames: int | None = None, center_sigma: float = 1.0, xy_sigma: float = 3.0,
            pretrained_dir: str | None = 'pretrained_models', min_frames: int = 4, drop_missing: bool = False,
            format: str = 'png', workers: int = 1, overwrite: bool = False, progress: bool = True,
            command: str | None = None) -> int:
    """Prepare `inputs` (video files, frame folders, folders holding either) into the dataset root `out`, resuming
    an earlier run there (the rules of this module's docstring). Prints the closing report; returns 0 when every input
    was prepared or skipped for its content, 1 when an input failed or the root holds no video.
    Raises UsageError (a bad setting; RootError: a root that cannot be resumed), FileNotFoundError / ImportError
    (dlib or its landmark model missing), all before any work."""
    from cli import software_versions
    from video_sources import discover_inputs, video_names

    for flag, value, low in (('size', size, 8), ('every', every, 1), ('max_frames', max_frames, 1),
                             ('min_frames', min_frames, 1), ('workers', workers, 1)):
        if value is not None and value < low:
            raise UsageError(f'--{flag} must be >= {low}, got {value}')
    if not 0.0 <= test_fraction <= 1.0:
        raise UsageError(f'--test_fraction must be in [0, 1], got {test_fraction}')
    if center_sigma < 0 or xy_sigma < 0:
        raise UsageError('--center_sigma and --xy_sigma must be >= 0')
    if format not in ('png', 'jpg') or split not in (None, *SPLITS):
        raise UsageError(f'--format must be png or jpg and --split train, test or none; got {format!r}, {split!r}')
    root = Path(out)
    settings = Settings(str(root), size, format, every, max_frames, center_sigma, xy_sigma, min_frames, drop_missing)
    config = check_root(root, image_settings(settings), overwrite)
    predictor = check_detector(pretrained_dir)  # fail before any work when dlib or its model is missing
    sources, problems = discover_inputs(inputs, exclude=root)
    for _, msg in problems:
        log(f'error: {msg}' + ('; continuing with the other inputs' if sources else ''))
    if not sources:
        print('nothing to prepare: no input holds a video file or a frame folder')
        return 1
    names = video_names(sources)
    try:
        splits, warning = assign_splits(root, sources, names, split, test_fraction, seed, split_by)
    except ValueError as e:  # a --split_by pattern that does not compile or matches nothing
        raise UsageError(str(e)) from None
    if warning:
        log(f'warning: {warning}')
    if overwrite:
        reset_root(root)
    root.mkdir(parents=True, exist_ok=True)
    run_info = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'command': command, 'cwd': os.getcwd(),
                'inputs': [str(i) for i in inputs], 'split': split, 'test_fraction': None if split else test_fraction,
                'split_by': None if split else split_by, 'seed': seed, 'min_frames': min_frames, 'workers': workers,
                'pretrained_dir': pretrained_dir, 'shape_predictor': predictor, 'versions': software_versions()}
    manifest = Manifest(root, problems)  # RootError for an unreadable manifest.json, before anything is written
    write_json(root / 'config.json', root_config(config, settings, run_info))
    jobs, skipped, notes = plan_jobs(root, names, sources, splits, manifest.videos)
    for note in notes:
        log(note)
    failures = list(problems)

    def on_result(job: Job, rec: dict) -> None:
        manifest.videos[job.name] = rec
        if rec['status'] == 'failed':
            failures.append((job.source, rec['error']))
        if line := result_line(job, rec):
            log(line)
        manifest.save()

    try:
        run_jobs(jobs, settings, pretrained_dir, workers, progress, on_result)
    finally:
        manifest.save(force=True)
    text, status = summary(root, jobs, manifest.videos, skipped, failures)
    print(text)
    return status
