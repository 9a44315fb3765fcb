"""What the demo accepts from a user, and where it keeps it.

Uploads are checked before anything is decoded: the size (`check_upload`), the kind (a video file or a zip of
frames), every zip entry (`extract_frames`: image files only, in one folder, no path that leaves it, no links, no
more bytes than the limit) and the frame range against the frame cap (`select_frames`). Every failure is an
`InputError` whose message is one line for the page.

Each browser session gets a folder of its own under the demo's root (`Session`): the upload, its frames, the editing
cache and the results. `Sessions` removes a folder when its session ends or has been idle for the time limit, and
nothing is read or written on behalf of a user outside it.
"""
from __future__ import annotations

import re
import secrets
import shutil
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from video_io import IMAGE_EXTS, VIDEO_EXTS, FrameSource

_UNITS = {'': 1, 'B': 1, 'KB': 1000, 'MB': 1000**2, 'GB': 1000**3, 'KIB': 1024, 'MIB': 1024**2, 'GIB': 1024**3}


class InputError(ValueError):
    """Bad input from a user, with a one-line message for the page."""


def parse_size(text: str | int) -> int:
    """Bytes of '500MB', '2 GB', '64KiB' or a plain number of bytes (decimal units, as browsers show sizes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f'{text!r} is not a size: write e.g. 500MB, 2GB or a number of bytes')
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    """'500 MB', '1.5 MB', '117 kB', '900 bytes' (decimal units, as browsers show sizes)."""
    if n >= 10 * 1000**2:
        return f'{n / 1000**2:.0f} MB'
    if n >= 1000**2:
        return f'{n / 1000**2:.1f} MB'
    return f'{n / 1000:.0f} kB' if n >= 1000 else f'{n} bytes'


def read_logins(path: str | Path) -> list[tuple[str, str]]:
    """The page's logins from a file of `user:password` lines (blank lines and # comments ignored); ValueError
    naming the file and line (never the password) for anything else. Kept out of the command line, where `ps` shows
    it to every user of the machine."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'cannot read the login file {path}: {e}') from None
    logins = []
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith('#'):
            user, sep, password = line.strip().partition(':')
            if not (sep and user and password):
                raise ValueError(f'{path}, line {n}: expected user:password')
            logins.append((user, password))
    if not logins:
        raise ValueError(f'{path} holds no user:password line')
    return logins


def check_upload(path: str | Path, max_bytes: int, name: str | None = None) -> str:
    """'video' or 'zip' for an uploaded file within the size limit; InputError otherwise (empty, too large, or
    neither a video file nor a zip). `name` is the file's name as the user sent it (messages never show server
    paths)."""
    path = Path(path)
    name = name or path.name
    size = path.stat().st_size
    if size == 0:
        raise InputError(f'{name} is empty')
    if size > max_bytes:
        raise InputError(f'{name} is {format_size(size)}, over the upload limit of {format_size(max_bytes)}')
    if zipfile.is_zipfile(path):
        return 'zip'
    if path.suffix.lower() in VIDEO_EXTS:
        return 'video'
    raise InputError(f'{name} is not a video file ({", ".join(VIDEO_EXTS)}) nor a zip of frames')


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The path parts of a zip entry; InputError for a path that could leave the extraction folder or a link."""
    raw = info.filename.replace('\\', '/')
    parts = PurePosixPath(raw).parts
    if raw.startswith('/') or '..' in parts or (parts and re.match(r'^[A-Za-z]:', parts[0])):
        raise InputError(f'the zip entry {info.filename!r} points outside the zip\'s folder: refused')
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InputError(f'the zip entry {info.filename!r} is a link: refused')
    return parts


def _ignored(parts: tuple[str, ...]) -> bool:
    """Entries skipped silently: macOS metadata and hidden files (as `video_io.list_frames` skips them)."""
    return '__MACOSX' in parts or any(p.startswith('.') for p in parts)


def extract_frames(path: str | Path, dest: str | Path, max_bytes: int, max_files: int = 100_000,
                   name: str | None = None) -> Path:
    """Extract a zip of frames into the flat folder `dest` and return it.

    Refused (InputError, nothing left in `dest`): a corrupt or encrypted zip; an entry whose path leaves the zip's
    folder (absolute, '..', a drive letter) or that is a link; any file that is not an image (IMAGE_EXTS; hidden
    files and __MACOSX/ are skipped); images in more than one folder; more than `max_files` images or more than
    `max_bytes` once extracted (by the entries' stated sizes, which zipfile enforces: a zip whose headers understate
    them fails its checksum and is refused as unreadable).
    """
    name = name or Path(path).name
    dest = Path(dest)
    try:
        with zipfile.ZipFile(path) as zf:
            images: list[tuple[zipfile.ZipInfo, str]] = []
            for info in zf.infolist():
                parts = _entry_parts(info)
                if info.is_dir() or not parts or _ignored(parts):
                    continue
                if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_EXTS:
                    raise InputError(f'{name} holds {info.filename!r}, which is not an image '
                                     f'({", ".join(IMAGE_EXTS)}): a zip of frames holds only images')
                images.append((info, '/'.join(parts[:-1])))
            if not images:
                raise InputError(f'{name} holds no image file ({", ".join(IMAGE_EXTS)})')
            folders = sorted({folder for _, folder in images})
            if len(folders) > 1:
                raise InputError(f'{name} has frames in {len(folders)} folders ({", ".join(f or "/" for f in folders[:3])}'
                                 f'{" ..." if len(folders) > 3 else ""}): put the frames of one video in one folder')
            if len(images) > max_files:
                raise InputError(f'{name} holds {len(images)} images, more than {max_files}')
            total = sum(info.file_size for info, _ in images)
            if total > max_bytes:
                raise InputError(f'{name} holds {format_size(total)} of images, over the limit of '
                                 f'{format_size(max_bytes)}')
            dest.mkdir(parents=True, exist_ok=False)
            for info, _ in images:  # zipfile stops at each entry's stated size (a larger stream fails its CRC)
                target = dest / PurePosixPath(info.filename.replace('\\', '/')).name
                with zf.open(info) as src, open(target, 'wb') as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except InputError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise InputError(f'{name} is not a readable zip ({e})') from None
    return dest


# --------------------------------------------------------------------------------------------------------------------
# Frame range


@dataclass
class Selection:
    """The frames of an input to edit: FrameSource(path, start, end, max_num) and how many the input has."""

    path: Path
    name: str
    start: int
    end: int | None
    max_num: int
    frames: int
    total: int | None  # frames of the whole input (None: a video whose header does not say)

    def describe(self) -> str:
        last = self.start + self.frames - 1
        of = f' of {self.total}' if self.total else ''
        return f'frames {self.start}–{last}{of} ({self.frames} frame{"s" if self.frames != 1 else ""})'


def count_frames(path: Path) -> int | None:
    """Frames of a frame folder, or of a video as its header states them (no decoding; None when unknown)."""
    if path.is_dir():
        from video_io import list_frames

        return len(list_frames(path))
    import av

    try:
        with av.open(str(path)) as container:
            n = container.streams.video[0].frames if container.streams.video else 0
    except (av.error.FFmpegError, IndexError):
        return None
    return int(n) or None


def select_frames(path: str | Path, start: int | None, end: int | None, cap: int | None, max_frames: int,
                  name: str | None = None) -> tuple[Selection, FrameSource]:
    """The frames start..end (end exclusive; None or 0: to the last frame) of a video file or frame folder, at most
    `cap` of them (None: max_frames; never above max_frames).

    Without an end the selection is the first `cap` frames from `start`; an end that asks for more frames than the
    cap is refused, naming the largest end allowed. A file that does not decode is refused too."""
    path = Path(path)
    name = name or path.name
    start = int(start or 0)
    end = int(end) if end else None
    cap = max_frames if cap is None else int(cap)
    if start < 0:
        raise InputError(f'the start frame must be 0 or more, got {start}')
    if not 1 <= cap <= max_frames:
        raise InputError(f'the frame cap must be between 1 and {max_frames} (this server\'s limit), got {cap}')
    if end is not None:
        if end <= start:
            raise InputError(f'the end frame ({end}) must be greater than the start frame ({start})')
        if end - start > cap:
            raise InputError(f'frames {start}–{end - 1} are {end - start} frames, more than the cap of {cap}: choose '
                             f'an end frame of at most {start + cap}')
    try:
        source = FrameSource(path, start=start, end=end, max_num=cap)
    except (OSError, ValueError) as e:
        message = str(e).replace(str(path), name)
        if 'selects none' in message:
            raise InputError(f'{name} has fewer than {start + 1} frames: choose an earlier start frame') from None
        raise InputError(f'cannot read {name}: {message}') from None
    total = count_frames(path)
    if total is not None and total < start + len(source):
        total = None  # a header that undercounts
    return Selection(path, name, start, end, cap, len(source), total), source


# --------------------------------------------------------------------------------------------------------------------
# Sessions


@dataclass
class Session:
    """One browser session's folder: uploads/ (the current input), cache/ (alignments and inversions),
    results/ (one folder per input, one per edit run in it); `input` is the current input (path and name)."""

    key: str
    folder: Path
    last_used: float = field(default_factory=time.monotonic)
    input: tuple[Path, str] | None = None
    uploads: int = 0
    runs: int = 0

    @property
    def cache_dir(self) -> Path:
        return self.folder / 'cache'

    def results_dir(self) -> Path:
        return self.folder / 'results' / f'input{self.uploads}'

    def new_upload(self) -> Path:
        """A fresh folder for the next input; the previous input's files go (its results stay until the end)."""
        shutil.rmtree(self.folder / 'uploads', ignore_errors=True)
        self.uploads += 1
        self.input = None
        folder = self.folder / 'uploads' / f'input{self.uploads}'
        folder.mkdir(parents=True)
        return folder

    def touch(self) -> None:
        self.last_used = time.monotonic()


class Sessions:
    """The sessions of a demo, each with its folder under `root`, removed on `close` (the page was closed) or after
    `ttl` seconds without a request (`sweep`, also run by a background thread every `ttl / 10` seconds).

    `on_close(key)` runs before a folder is removed (to stop the session's job); `busy(key)` tells whether a
    session's job is running (a busy session is never swept)."""

    def __init__(self, root: str | Path, ttl: float, on_close: Callable[[str], None] | None = None,
                 busy: Callable[[str], bool] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self.on_close = on_close or (lambda key: None)
        self.busy = busy or (lambda key: False)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def get(self, key: str) -> Session:
        """The session of `key` (a browser session id), created on first use; marks it used."""
        self.sweep()
        with self._lock:
            session = self._sessions.get(key)
            if session is None or not session.folder.is_dir():
                folder = self.root / f's{secrets.token_hex(12)}'  # never derived from what the browser sends
                folder.mkdir()
                session = self._sessions[key] = Session(key, folder)
            session.touch()
            return session

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def close(self, key: str) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            self.on_close(key)
            shutil.rmtree(session.folder, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Close the sessions idle for more than ttl seconds (not while their job runs); returns their keys."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, s in self._sessions.items() if now - s.last_used > self.ttl and not self.busy(k)]
        for key in stale:
            self.close(key)
        return stale

    def start_sweeper(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(max(self.ttl / 10, 1.0)):
                self.sweep()

        thread = threading.Thread(target=loop, name='dva-demo-sweeper', daemon=True)
        thread.start()
        return thread

    def close_all(self) -> None:
        self._stop.set()
        for key in list(self._sessions):
            self.close(key)
