"""The demo's work: take an input into a session, preview its faces, edit it with the editing API.

`Demo` loads the model once and runs every job of every session through two `Worker`s, one thread each: `preview`
(face detection on the CPU) and `gpu` (inversion and rendering), so at most one edit runs at a time whatever the web
server does. A job can be stopped by its session (`Demo.stop`): `Cancelled` is raised in the worker thread, which
ends the job the way Ctrl-C ends the command-line editors (the cache keeps the frames already inverted).

Progress is the editing API's own tqdm bars (stage, frames or steps done), which Gradio's `track_tqdm` shows in the
page; `Worker` runs jobs in a copy of the caller's context so that Gradio finds its progress tracker, and `eta_labels`
adds the time left to each bar's label.
"""
from __future__ import annotations

import contextvars
import ctypes
import json
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from typing_extensions import Self

from cli import write_json
from config import CELEBA_ATTRIBUTES, EditConfig
from demo.inputs import InputError, Selection, Session, Sessions, check_upload, extract_frames, select_frames

T_CHOICES = (5, 10, 20, 25, 50, 100, 200)
PREVIEW_WIDTH = 720  # px of the previewed first frame


class Cancelled(BaseException):
    """Raised in a worker thread to stop its job (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` in the pipeline swallows it)."""


class Worker:
    """One thread that runs jobs one at a time, each owned by a session; `stop(owner)` stops the owner's job."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f'dva-{name}')
        self._lock = threading.Lock()
        self._running: tuple[str, int] | None = None  # (owner, thread id) of the job in progress

    def run(self, owner: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the worker thread (after the jobs before it); its result, or its exception re-raised."""
        ctx = contextvars.copy_context()  # Gradio's progress tracker lives in context variables
        return self._pool.submit(ctx.run, self._call, owner, fn, args).result()

    def _call(self, owner: str, fn: Callable[..., Any], args: tuple) -> Any:
        with self._lock:
            self._running = (owner, threading.get_ident())
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running = None

    def busy(self, owner: str) -> bool:
        running = self._running
        return running is not None and running[0] == owner

    def stop(self, owner: str) -> bool:
        """Raise `Cancelled` in the worker thread if it is running a job of `owner` (it takes effect at the next
        Python instruction, i.e. after the network call in progress). Sent at most once per job; True if sent."""
        with self._lock:
            if self._running is None or self._running[0] != owner:
                return False
            ident = self._running[1]
            self._running = None
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(Cancelled))
            return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)



def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
        f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


class EtaLabels:
    """While active, appends the time left to the label of every bar a Gradio progress tracker shows
    ('invert (4 frames x 4 steps) · 1m20s left'), from the bar's start time and the share of it done.

    `progress` is the `gr.Progress` of the event (None: nothing to do); it is only read through its `iterables`
    (the bars it tracks: desc, index, length and the tqdm bar they mirror), so nothing here imports gradio."""

    def __init__(self, progress: Any, every: float = 1.0) -> None:
        self.progress, self.every = progress, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self) -> None:
        for bar in list(getattr(self.progress, 'iterables', None) or []):
            tqdm_bar = getattr(bar, '_tqdm', None)
            done, total = getattr(bar, 'index', None), getattr(bar, 'length', None)
            if tqdm_bar is None or not done or not total or getattr(tqdm_bar, 'start_t', None) is None:
                continue
            label = bar.__dict__.setdefault('_plain_desc', bar.desc)
            elapsed = time.time() - tqdm_bar.start_t
            bar.desc = f'{label} · {_duration(elapsed / done * max(total - done, 0))} left'

    def __enter__(self) -> Self:
        if self.progress is not None:
            def loop() -> None:
                while not self._stop.wait(self.every):
                    self.update()

            self._thread = threading.Thread(target=loop, name='dva-eta', daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


# --------------------------------------------------------------------------------------------------------------------
# Requests and results


@dataclass
class Preview:
    """The first selected frame with the face quad drawn, its aligned crop (PNG paths), and a report."""

    frame: Path
    crop: Path
    text: str
    selection: Selection
    missing: list[int]


@dataclass
class EditRequest:
    """One press of an edit button: classifier attributes x scales, or one CLIP text edit at several scales."""

    mode: Literal['classifier', 'clip']
    scales: list[float]
    attributes: list[str] = field(default_factory=list)
    src_txt: str = ''
    trg_txt: str = ''
    clip_iters: int = 200
    T: int = 20
    decoder: Literal['ddim', 'dpm++2m'] = 'ddim'
    blend: Literal['hard', 'feather'] = 'hard'


@dataclass
class Result:
    """One edit's files: out.mp4, side_by_side.mp4, config.json (in `folder`) and the frames as a zip."""

    name: str
    folder: Path
    frames_zip: Path

    @property
    def video(self) -> Path:
        return self.folder / 'out.mp4'

    @property
    def side_by_side(self) -> Path:
        return self.folder / 'side_by_side.mp4'

    @property
    def config(self) -> Path:
        return self.folder / 'config.json'

    @property
    def downloads(self) -> list[Path]:
        return [self.video, self.side_by_side, self.frames_zip, self.config]


@dataclass
class Run:
    """What one edit request produced: its results, the summary of `Editor.write` and a report for the page."""

    results: list[Result]
    summary: dict[str, Any]
    text: str


def parse_scales(main: float, extra: str | None = None) -> list[float]:
    """The slider's scale plus any comma- or space-separated extra scales, without repeats, in order."""
    values = [float(main)]
    for token in re.split(r'[,\s;]+', (extra or '').strip()):
        if token:
            try:
                values.append(float(token))
            except ValueError:
                raise InputError(f'{token!r} is not a number: write extra scales like "-0.3, 0.5"') from None
    out: list[float] = []
    for v in values:
        if not np.isfinite(v) or abs(v) > 10:
            raise InputError(f'scale {v} is out of range (-10..10)')
        if v not in out:
            out.append(v)
    return out


def slug(text: str) -> str:
    """A folder name for a CLIP edit from its target text: 'face with beard' -> 'face_with_beard'."""
    return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')[:40] or 'clip'


def safe_name(name: str) -> str:
    """An uploaded file's base name, reduced to safe characters (the extension kept)."""
    base = Path(name.replace('\\', '/')).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    return (re.sub(r'[^A-Za-z0-9._-]+', '_', stem).strip('._') or 'upload')[:80] + re.sub(r'[^a-z0-9.]', '', suffix)


def zip_frames(folder: Path, dest: Path) -> Path:
    """The PNG frames of `folder` in a zip (stored: PNGs do not compress further), written atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + '.partial')
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as zf:
        for p in sorted(folder.glob('*.png')):
            zf.write(p, f'{dest.stem}/{p.name}')
    tmp.replace(dest)
    return dest


def draw_quad(frame: np.ndarray, quad: np.ndarray, width: int = PREVIEW_WIDTH) -> Image.Image:
    """The frame scaled to at most `width` px wide with the face quad (TL, BL, BR, TR) outlined."""
    img = Image.fromarray(frame)
    ratio = min(1.0, width / img.width)
    if ratio < 1:
        img = img.resize((round(img.width * ratio), round(img.height * ratio)), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    pts = [tuple(float(v) for v in (p + 0.5) * ratio) for p in np.asarray(quad).reshape(4, 2)]
    line = max(2, round(img.width / 240))
    draw.line(pts + [pts[0]], fill=(0, 255, 64), width=line)
    draw.line([pts[0], pts[3]], fill=(255, 64, 0), width=line)  # the top edge, so the orientation shows
    return img


# --------------------------------------------------------------------------------------------------------------------
# The demo


class Demo:
    """The model, loaded once, and the sessions of the page.

    Args:
        cfg: the editors' settings (checkpoint, template, device, precision, pretrained_dir, cls_checkpoint,
            clip_weights, batch_size, ...); T, decoder and blend come with each request.
        root: the demo's temporary folder; sessions live in root/sessions/.
        max_bytes: the upload size limit (also the limit on a zip's extracted size).
        max_frames: the frame cap: at most this many frames per edit.
        session_ttl: seconds without a request after which a session's folder is removed.
        max_edits: at most this many (attribute, scale) edits per request.
        sample: a video file or frame folder offered as "the sample video" (None: no sample).
    """

    def __init__(self, cfg: EditConfig, root: str | Path, max_bytes: int, max_frames: int, session_ttl: float,
                 max_edits: int = 8, sample: str | Path | None = None) -> None:
        from editing.api import Editor

        self.cfg = replace(cfg, quiet=False, overwrite=True, no_cache=False, out=None, video_path='')
        self.root = Path(root)
        self.max_bytes, self.max_frames, self.max_edits = max_bytes, max_frames, max_edits
        self.sample = Path(sample) if sample and _has_frames(Path(sample)) else None
        # loaded (and compiled, batch size probed) once; every preview and edit derives its Editor with with_settings
        self.base = Editor(replace(self.cfg, no_cache=True))
        self.gpu, self.cpu = Worker('gpu'), Worker('preview')
        self.sessions = Sessions(self.root / 'sessions', session_ttl, on_close=self.stop,
                                 busy=lambda key: self.gpu.busy(key) or self.cpu.busy(key))

    # inputs ---------------------------------------------------------------------------------------------------------

    def receive(self, key: str, path: str | Path, name: str | None = None) -> Session:
        """Move an uploaded file (the web server's copy, which is removed in every case) into the session's folder
        as its current input, after the upload checks; a zip of frames is extracted there."""
        session = self.sessions.get(key)
        path = Path(path)
        name = safe_name(name or path.name)
        try:
            self._check_idle(key)
            session.input = None  # a refused upload leaves no input behind it to edit by mistake
            kind = check_upload(path, self.max_bytes, name)
            folder = session.new_upload()
            if kind == 'zip':
                target = extract_frames(path, folder / Path(name).stem, self.max_bytes, name=name)
            else:
                target = folder / name
                shutil.move(path, target)
        finally:
            path.unlink(missing_ok=True)  # the web server's copy of the upload
        session.input = (target, name)
        return session

    def use_sample(self, key: str) -> Session:
        if self.sample is None:
            raise InputError('this server has no sample video')
        session = self.sessions.get(key)
        self._check_idle(key)
        session.new_upload()
        session.input = (self.sample, self.sample.name)
        return session

    def _check_idle(self, key: str) -> None:
        if self.gpu.busy(key):
            raise InputError('an edit of this page is running on the current video: wait for it or stop it before '
                             'choosing another video')

    def _selection(self, session: Session, start: int | None, end: int | None, cap: int | None):
        if session.input is None:
            raise InputError('upload a video file or a zip of frames first (or pick the sample video)')
        path, name = session.input
        return select_frames(path, start, end, cap, self.max_frames, name)

    # preview --------------------------------------------------------------------------------------------------------

    def preview(self, key: str, start: int | None = 0, end: int | None = None, cap: int | None = None,
                progress: Any = None) -> Preview:
        """Detect and align the face in every selected frame (no diffusion): the first frame with its quad, its
        aligned crop and how many frames show no face."""
        session = self.sessions.get(key)
        with EtaLabels(progress):
            return self.cpu.run(key, self._preview, session, start, end, cap)

    def _preview(self, session: Session, start, end, cap) -> Preview:
        """The edit's own first stage (Editor.align into the session's cache): the edit that follows finds the faces
        found, and the preview shows exactly the alignment the edit will use."""
        from editing.api import EditError
        from faces import crop_face

        selection, source = self._selection(session, start, end, cap)
        try:  # while this page's edit aligns the same frames, this waits for it (Cache.filling) and shows its faces
            alignment = self.editor(session, None, selection).align()
            first = source.read(0)
        except EditError as e:
            text = str(e).replace(str(selection.path), selection.name)
            if 'no face found in any' in text:
                text = (f'no face found in any of the {len(source)} selected frames of {selection.name}: the demo '
                        'edits videos of a frontal face')
            raise InputError(text) from None
        except (ImportError, FileNotFoundError) as e:
            raise InputError(f'the face detector is not available on this server: {e}') from None
        except ValueError as e:
            raise InputError(f'cannot read {selection.name}: {str(e).replace(str(selection.path), selection.name)}'
                             ) from None
        quad = alignment.arrays.read('quads', slice(0, 1))[0]
        folder = session.folder / 'preview'
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        stamp = f'{session.uploads}_{time.monotonic_ns()}'  # a new name per preview: no stale image in the browser
        frame_png, crop_png = folder / f'frame_{stamp}.png', folder / f'crop_{stamp}.png'
        draw_quad(first, quad).save(frame_png)
        crop_face(first, quad, 1024, 256).save(crop_png)
        missing = list(alignment.missing)
        h, w = first.shape[:2]
        fps = f', {source.fps:.3g} fps' if source.fps else ''
        faceless = (f'**{len(missing)} without a face** (left unedited): '
                    + ', '.join(str(selection.start + i) for i in missing[:20]) + (' ...' if len(missing) > 20 else '')
                    if missing else 'a face in every frame')
        text = (f'**{selection.name}**: {w}×{h}{fps}; editing {selection.describe()}, cap {selection.max_num}. '
                f'Face found in {len(source) - len(missing)} of {len(source)} frames: {faceless}.')
        return Preview(frame_png, crop_png, text, selection, missing)

    # edit -----------------------------------------------------------------------------------------------------------

    def edit(self, key: str, request: EditRequest, start: int | None = 0, end: int | None = None,
             cap: int | None = None, progress: Any = None) -> Run:
        """Encode the selected frames (or reuse the session's cached inversion), render every edit of `request`,
        paste back and write the videos, frames and config of each (see `Editor.write`)."""
        session = self.sessions.get(key)
        self._check(request)
        with EtaLabels(progress):
            try:
                return self.gpu.run(key, self._edit, session, request, start, end, cap)
            finally:
                session.touch()

    def _check(self, request: EditRequest) -> None:
        if request.T not in T_CHOICES:
            raise InputError(f'T must be one of {", ".join(map(str, T_CHOICES))}, got {request.T}')
        if not request.scales:
            raise InputError('choose a scale')
        if request.mode == 'classifier':
            if not request.attributes:
                raise InputError('choose at least one attribute')
            unknown = [a for a in request.attributes if a not in CELEBA_ATTRIBUTES]
            if unknown:
                raise InputError(f'unknown attribute(s): {", ".join(unknown)}')
            n = len(request.attributes) * len(request.scales)
        else:
            if not request.src_txt.strip() or not request.trg_txt.strip():
                raise InputError('write both texts: what the face is (source) and what it should become (target)')
            if not 1 <= request.clip_iters <= 2000:
                raise InputError('CLIP iterations must be between 1 and 2000')
            n = len(request.scales)
        if n > self.max_edits:
            raise InputError(f'{n} edits at once; this server renders at most {self.max_edits} per request')

    def editor(self, session: Session, request: EditRequest | None, selection: Selection):
        """An Editor on the loaded model with the request's T, decoder and blend (None: the preview's alignment
        only), the selected frames and the session's cache (its config.json records the run as the command-line
        editors' do)."""
        run = {} if request is None else {'T': request.T, 'decoder': request.decoder, 'decoder_steps': None,
                                          'blend': request.blend}
        return self.base.with_settings(**run, no_cache=False, cache_dir=str(session.cache_dir),
                                       video_path=str(selection.path), start=selection.start, end=selection.end,
                                       max_num=selection.max_num)

    def _edit(self, session: Session, request: EditRequest, start, end, cap) -> Run:
        from editing.api import scale_name

        selection, _ = self._selection(session, start, end, cap)
        session.runs += 1
        out = session.results_dir() / f'run{session.runs}'  # new file names per run: no stale video in a browser
        editor = self.editor(session, request, selection)
        try:
            video = editor.encode()
            if request.mode == 'classifier':
                directions = {a: editor.classifier_direction(a) for a in request.attributes}
                planned = [(directions[a], s, f'{a}_{scale_name(s)}') for a in request.attributes
                           for s in request.scales]
            else:
                name = slug(request.trg_txt)
                clip_cfg = replace(editor.cfg, attribute=(name,), src_txt=request.src_txt.strip(),
                                   trg_txt=request.trg_txt.strip(), n_iter=request.clip_iters, overwrite=False)
                # found once per input and texts (saved in its results folder), reused for new scales
                direction = editor.clip_direction(video, session.results_dir(), clip_cfg)
                planned = [(direction, s, f'{name}_{scale_name(s)}') for s in request.scales]
            edits = [editor.edit(video, d, s, n) for d, s, n in planned]
            summary = editor.write(video, edits, out, None, {'command': 'app.py', 'input': selection.name})
        finally:
            editor.close()
        results = [Result(r.name, out / r.name, zip_frames(out / r.name / 'frames',
                                                           out / 'downloads' / f'{r.name}_frames.zip'))
                   for r in edits]
        for r in results:  # shown in the page and downloaded: no server paths
            write_json(r.config, hide_paths(json.loads(r.config.read_text())))
        return Run(results, summary, self.report(summary, request, selection))

    @staticmethod
    def report(summary: dict[str, Any], request: EditRequest, selection: Selection) -> str:
        """What the run did, for the page: frames, faceless frames, whether the inversion came from the cache."""
        T = request.T
        render = T  # calls per frame of one render (DDIM; DPM-Solver++ with as many steps as T)
        missing = summary['faces_missing']
        lines = [f'Edited {selection.describe()}'
                 + (f'; {len(missing)} without a face left unedited.' if missing else '.')]
        if summary['cache_hits'].get('invert'):
            lines.append(f'**Inversion reused from the cache**: each edit cost {render} network calls per frame '
                         f'(T = {T}) instead of {T - 1 + render} (2T−1) for a first edit.')
        else:
            lines.append(f'Inversion computed ({T - 1} network calls per frame) and cached: the next edit of these '
                         f'frames at T = {T} costs {render} calls per frame instead of {T - 1 + render}.')
        seconds = ', '.join(f'{k} {v:.1f} s' for k, v in summary['seconds'].items())
        lines.append(f'Time per stage: {seconds}.')
        return '\n\n'.join(lines)

    # sessions -------------------------------------------------------------------------------------------------------

    def stop(self, key: str) -> bool:
        """Stop the session's running job, if any (a queued one is the web server's to drop)."""
        return self.gpu.stop(key) | self.cpu.stop(key)

    def close(self, key: str) -> None:
        """The page was closed: stop its job, give it a moment to end, remove its folder."""
        self.stop(key)
        for _ in range(50):
            if not (self.gpu.busy(key) or self.cpu.busy(key)):
                break
            time.sleep(0.1)
        self.sessions.close(key)

    def shutdown(self) -> None:
        self.sessions.close_all()
        self.gpu.shutdown()
        self.cpu.shutdown()


def _has_frames(path: Path) -> bool:
    from video_io import list_frames

    if path.is_file():
        return True
    try:
        return bool(list_frames(path))
    except (OSError, ValueError):
        return False


def hide_paths(value: Any) -> Any:
    """A JSON value with every absolute path cut to its file name (what the server's folders are is not the
    visitor's business; the names say which checkpoint and input were used)."""
    if isinstance(value, dict):
        return {k: hide_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def config_text(result: Result) -> str:
    try:
        return json.dumps(json.loads(result.config.read_text()), indent=2)
    except (OSError, ValueError):
        return ''


def random_weights(cfg: EditConfig, folder: str | Path) -> EditConfig:
    """cfg with random tiny-sized weights written into `folder` (tests and CI: no download)."""
    import templates
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.get_preset(cfg.template), Path(folder), seed=0)
    return replace(cfg, checkpoint=str(dva), cls_checkpoint=str(cls), random_clip='tiny')
