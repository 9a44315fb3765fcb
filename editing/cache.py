"""A content-addressed on-disk cache for the expensive, edit-independent work on a video.

Entries are folders `<root>/<kind>-<key>/` holding `data.pt` (tensors, loadable with weights_only=True) and
`meta.json`. An entry is written to a temporary folder and renamed into place, so a killed run never leaves an
entry that looks complete. Keys hash everything the content depends on: the frame bytes, the frame selection,
the alignment settings, the checkpoint and the number of DDIM steps.
"""
from __future__ import annotations

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
            return torch.load(path, map_location='cpu', weights_only=True)
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
