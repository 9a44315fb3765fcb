"""A content-addressed on-disk cache for the expensive, edit-independent work on a video.

Entries are folders `<root>/<kind>-<key>/` holding `data.pt` (tensors, loadable with weights_only=True) and
`meta.json`. An entry is written to a temporary folder and renamed into place, so a killed run never leaves an
entry that looks complete. Keys hash everything the content depends on: the frame bytes, the frame selection,
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
from pathlib import Path
from typing import Any

import torch

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


class Cache:
    def __init__(self, root: str | os.PathLike | None = DEFAULT_CACHE) -> None:
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / f'{kind}-{key}'

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The stored tensors of an entry, or None when absent (or the cache is disabled, or the entry is unreadable)."""
        if not self.enabled:
            return None
        path = self._dir(kind, key) / 'data.pt'
        if not path.is_file():
            return None
        try:
            # memory-mapped: a long video's x_T is paged in from the file as frames are rendered, not held in RAM
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            return None

    def put(self, kind: str, key: str, data: dict[str, Any], meta: dict[str, Any]) -> Path | None:
        """Store an entry; returns its folder, or None when the cache is disabled or cannot be written (a full disk,
        a read-only folder: the run goes on without caching, with a warning, rather than losing its work)."""
        if not self.enabled:
            return None
        final = self._dir(kind, key)
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f'.{kind}-', dir=self.root))
            torch.save(data, tmp / 'data.pt')
            (tmp / 'meta.json').write_text(json.dumps(meta, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            self.warn(e)
            return None
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def warn(self, error: OSError) -> None:
        warnings.warn(f'cannot write the cache in {self.root} ({error}); going on without it. Free some space, or '
                      'pass --cache_dir DIR (or --no_cache)', stacklevel=3)

    def partial_dir(self, kind: str, key: str) -> Path | None:
        """A folder for the pieces of an unfinished entry (e.g. the batches of an interrupted inversion), or None
        when the cache is disabled. `drop_partial` removes it once the whole entry is stored."""
        return None if not self.enabled else self.root / f'partial-{kind}-{key}'

    def drop_partial(self, kind: str, key: str) -> None:
        path = self.partial_dir(kind, key)
        if path is not None and path.exists():
            shutil.rmtree(path, ignore_errors=True)


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
        print(f'deleted {len(entries)} entries ({total:.1f} MB)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
