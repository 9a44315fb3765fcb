"""A content-addressed on-disk cache for the expensive, edit-independent work on a video.

Entries are folders `<root>/<kind>-<key>/` of .npy arrays (`Arrays`, read and written chunk by chunk) and
`meta.json`. An entry is filled in `partial-<kind>-<key>/`, which also holds the progress of an interrupted run,
and renamed into place when complete, so a killed run never leaves an entry that looks complete. Keys hash everything the content depends on: the frame bytes, the frame selection,
the alignment settings, the checkpoint and the number of DDIM steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE = Path(os.environ.get('DVA_CACHE', Path.home() / '.cache' / 'dva'))


def hash_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """sha256 over the names and bytes of the given files (the identity of a frame folder or a video file)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b'\0')
        with open(p, 'rb') as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> str:
    """A cheap identity of a large file (checkpoint): resolved path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return f'{p}:{st.st_size}:{st.st_mtime_ns}'


def make_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Arrays:
    """A folder of .npy arrays, filled and read chunk by chunk.

    Each access maps the file, copies the chunk and unmaps it again, so a long video's crops, masks and x_T live on
    disk, never in RAM nor in the process's resident set. Progress marks (`done` / `mark`) make filling resumable:
    a chunk is marked only after its values are flushed to disk.
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = rank  # each process of a distributed run marks its progress in a file of its own

    def _path(self, name: str) -> Path:
        return self.folder / f'{name}.npy'

    def __contains__(self, name: str) -> bool:
        return self._path(name).is_file()

    def create(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        """An array of zeros on disk; kept as it is when one of that shape and dtype exists (resuming)."""
        if name in self:
            with contextlib.suppress(ValueError, OSError):
                a = np.load(self._path(name), mmap_mode='r')
                if a.shape == tuple(shape) and a.dtype == np.dtype(dtype):
                    return
        self.folder.mkdir(parents=True, exist_ok=True)
        a = np.lib.format.open_memmap(self._path(name), mode='w+', dtype=dtype, shape=tuple(shape))
        a.flush()
        del a
        with open(self._path(name), 'r+b') as f:  # reserve the space now: a full disk fails here, not with SIGBUS later
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)

    def put(self, name: str, value: np.ndarray) -> None:
        """A whole (small) array, written atomically."""
        from cli import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(name)) as tmp, open(tmp, 'wb') as f:
            np.save(f, np.ascontiguousarray(value))

    def write(self, name: str, index: slice | np.ndarray, value: np.ndarray) -> None:
        a = np.load(self._path(name), mmap_mode='r+')
        a[index] = value
        a.flush()
        del a

    def read(self, name: str, index: slice | np.ndarray | None = None) -> np.ndarray:
        a = np.load(self._path(name), mmap_mode='r')
        out = np.array(a if index is None else a[index])
        del a
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        a = np.load(self._path(name), mmap_mode='r')
        return a.shape

    def _marks(self, stage: str) -> str:
        return f'{stage}.done' if self.rank == 0 else f'{stage}.r{self.rank}.done'

    def begin(self, stage: str, n: int) -> None:
        """Make this process's progress marks of `stage` (n items, none done) unless they exist."""
        if self._marks(stage) not in self:
            self.create(self._marks(stage), (n,), bool)

    def done(self, stage: str, n: int) -> np.ndarray:
        """bool [n]: which items of `stage` are finished, by any process (all False when nothing was marked yet)."""
        done = np.zeros(n, bool)
        for f in [self._path(f'{stage}.done'), *self.folder.glob(f'{stage}.r*.done.npy')]:
            with contextlib.suppress(OSError, ValueError):
                marks = np.load(f, mmap_mode='r')
                if marks.shape == (n,):
                    done |= marks
                del marks
        return done

    def mark(self, stage: str, index: slice | np.ndarray) -> None:
        self.write(self._marks(stage), index, True)


class Entry:
    """One cache entry: a folder of `Arrays`. Filled in `partial-<kind>-<key>/` (which holds the progress of an
    interrupted run) and renamed to `<kind>-<key>/` by `commit`, so only complete entries look complete."""

    def __init__(self, cache: Cache, kind: str, key: str) -> None:
        self.cache, self.kind, self.key = cache, kind, key
        final = cache.folder / f'{kind}-{key}'
        self.complete = (final / 'meta.json').is_file()
        self.arrays = Arrays(final if self.complete else cache.folder / f'partial-{kind}-{key}', cache.rank)

    @property
    def resumed(self) -> bool:
        return not self.complete and self.arrays.folder.is_dir()

    def commit(self, meta: dict[str, Any]) -> None:
        """Mark complete: meta.json, progress marks dropped, folder renamed (best-effort: a failing rename leaves
        the complete entry in place under its partial name for this run)."""
        from cli import write_json

        folder = self.arrays.folder
        for f in folder.glob('*.done.npy'):
            f.unlink()
        write_json(folder / 'meta.json', meta)
        final = self.cache.folder / f'{self.kind}-{self.key}'
        try:
            if final.exists():
                shutil.rmtree(final)
            os.replace(folder, final)
            self.arrays = Arrays(final, self.cache.rank)
        except OSError as e:
            self.cache.warn(e)
        self.complete = True

    def drop(self) -> None:
        shutil.rmtree(self.arrays.folder, ignore_errors=True)


class Cache:
    """Entries keyed by content (`make_key`) under `root`. Without a root (`--no_cache`), or when the root cannot be
    written (full disk, read-only mount: a warning, and the run goes on), entries live in a scratch folder that
    `close` removes: the streamed pipeline always works from disk, so memory never grows with video length."""

    def __init__(self, root: str | os.PathLike | None = DEFAULT_CACHE, rank: int = 0) -> None:
        self.root = Path(root) if root is not None else None
        self.rank = rank
        self._scratch: Path | None = None
        if self.root is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = Path(tempfile.mkdtemp(prefix='.probe-', dir=self.root))
                probe.rmdir()
            except OSError as e:
                self.warn(e)
                self.root = None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @property
    def folder(self) -> Path:
        if self.root is not None:
            return self.root
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix='dva-scratch-'))
        return self._scratch

    def entry(self, kind: str, key: str) -> Entry:
        return Entry(self, kind, key)

    @contextlib.contextmanager
    def filling(self, kind: str, key: str, log: Callable[[str], None] = print) -> Iterator[None]:
        """Held while one run fills entry kind/key: another process or thread filling the same entry (a second run
        on the same video) waits here, then finds it complete. An flock on <folder>/.locks/<kind>-<key>.lock, so a
        run that dies lets go at once; where there is no flock (not POSIX, some network mounts) runs go unguarded."""
        try:
            import fcntl

            path = self.folder / '.locks' / f'{kind}-{key}.lock'
            path.parent.mkdir(exist_ok=True)
            handle = open(path, 'a')  # noqa: SIM115 - held across the yield
        except (ImportError, OSError):
            yield
            return
        with handle:  # closing it lets go of the lock
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f'waiting for another run that is computing the same {kind} (cache entry {kind}-{key[:12]})')
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # no flock on this filesystem
                pass
            yield

    def warn(self, error: OSError) -> None:
        warnings.warn(f'cannot write the cache in {self.root} ({error}); going on without it. Free some space, or '
                      'pass --cache_dir DIR (or --no_cache)', stacklevel=3)
        self.root = None

    def close(self) -> None:
        """Remove the scratch folder (entries of a run without a cache)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


# --------------------------------------------------------------------------------------------------------------------
# python -m editing.cache [--cache_dir DIR] [--clear [--older_than DAYS] [--partial]]


def cache_entries(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry folder under `root` (complete or partial), newest first: name, kind, bytes, age in days, meta."""
    import time

    root = Path(root)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.name.startswith('.'):
            continue
        files = [f for f in d.rglob('*') if f.is_file()]
        mtime = max((f.stat().st_mtime for f in files), default=d.stat().st_mtime)
        meta = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((d / 'meta.json').read_text())
        out.append({'path': d, 'kind': d.name.rsplit('-', 1)[0], 'bytes': sum(f.stat().st_size for f in files),
                    'age_days': (time.time() - mtime) / 86400, 'meta': meta})
    return sorted(out, key=lambda e: e['age_days'])


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog='python -m editing.cache',
                                description='List or clear the editing cache (alignments, inversions, unfinished '
                                            'work of interrupted edits).')
    p.add_argument('--cache_dir', default=str(DEFAULT_CACHE), help=f'the cache folder (default {DEFAULT_CACHE})')
    p.add_argument('--clear', action='store_true', help='delete the selected entries (default: only list them)')
    p.add_argument('--older_than', type=float, default=0.0, metavar='DAYS', help='select entries unused this long')
    p.add_argument('--partial', action='store_true', help='select only the unfinished work of interrupted edits')
    args = p.parse_args(argv)
    entries = [e for e in cache_entries(args.cache_dir) if e['age_days'] >= args.older_than
               and (not args.partial or e['kind'].startswith('partial'))]
    for e in entries:
        source = e['meta'].get('source', '')
        print(f'{e["bytes"] / 2**20:9.1f} MB  {e["age_days"]:6.1f} d  {e["kind"]:<16} {source}  ({e["path"].name})')
    total = sum(e['bytes'] for e in entries) / 2**20
    print(f'{len(entries)} entries, {total:.1f} MB in {args.cache_dir}')
    if args.clear:
        for e in entries:
            shutil.rmtree(e['path'], ignore_errors=True)
            name = e['path'].name.removeprefix('partial-')  # and the lock of the entry (`Cache.filling`)
            (Path(args.cache_dir) / '.locks' / f'{name}.lock').unlink(missing_ok=True)
        print(f'deleted {len(entries)} entries ({total:.1f} MB)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
