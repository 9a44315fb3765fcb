"""Which videos a dataset is made of: input discovery, unique output names and the train/test assignment.

    sources, problems = discover_inputs(['raw_videos/', 'extra/clip.mp4'], exclude='datasets/mine')
    names = video_names(sources)                                       # a_clip, b_clip, clip_mp4, ...
    splits = assign_splits(names, 0.1, seed=0, groups=split_groups(sources, r'id\\d+'))   # identities kept apart

Pure standard library + numpy (no torch, no dlib): prepare_data.py's worker processes and tests import it cheaply.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from video_io import IMAGE_EXTS, VIDEO_EXTS, natural_key


def _within(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def discover_inputs(
    inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Video files and frame folders named by `inputs`, in command-line order, natural order inside folders.

    A folder holding image files (`video_io.IMAGE_EXTS`) is one frame folder (its sub-folders are not searched);
    any other folder is searched recursively for video files (`video_io.VIDEO_EXTS`) and frame folders. Hidden
    entries, duplicates and anything inside `exclude` (the output root) are skipped.

    Returns:
        (sources, problems): the paths found, and (input, message) for every input that gives nothing.
    """
    exclude_dir = Path(exclude).resolve() if exclude is not None else None
    sources: list[Path] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []

    found = [0]

    def add(path: Path) -> None:
        found[0] += 1
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            sources.append(path)

    def visit(folder: Path, visited: set[Path]) -> None:
        real = folder.resolve()
        if real in visited or _within(real, exclude_dir):
            return
        visited.add(real)
        try:
            entries = sorted(
                (e for e in folder.iterdir() if not e.name.startswith('.')), key=natural_key
            )
        except OSError as e:
            problems.append((str(folder), f'cannot list folder {folder}: {e}'))
            return
        files = [e for e in entries if e.is_file()]
        if any(e.suffix.lower() in IMAGE_EXTS for e in files):
            add(folder)
        for e in entries:
            if e.is_file() and e.suffix.lower() in VIDEO_EXTS:
                add(e)
            elif e.is_dir() and not any(f.suffix.lower() in IMAGE_EXTS for f in files):
                visit(e, visited)

    for item in inputs:
        path = Path(item)
        before, found[0] = len(problems), 0
        if not path.exists():
            problems.append((str(path), f'input not found: {path}'))
            continue
        if _within(path.resolve(), exclude_dir):
            problems.append((str(path), f'input {path} lies inside the output folder {exclude}'))
            continue
        if path.is_dir():
            visit(path, set())
            if not found[0] and len(problems) == before:
                problems.append((str(path), f'no video file ({", ".join(VIDEO_EXTS)}) or frame folder in {path}'))
        elif path.suffix.lower() in VIDEO_EXTS:
            add(path)
        elif path.suffix.lower() in IMAGE_EXTS:
            problems.append((str(path), f'{path} is a single image: pass the folder holding the frames instead'))
        else:
            problems.append((str(path), f'{path} is neither a video file ({", ".join(VIDEO_EXTS)}) nor a folder'))
    return sources, problems


def _clean_name(name: str) -> str:
    name = name.strip().lstrip('.')
    return name or 'video'


def video_names(sources: Sequence[str | os.PathLike]) -> list[str]:
    """Unique output folder names: the file stem (videos) or the folder name (frame folders).

    A video file whose stem is shared by another source in the same folder (clip.mp4 next to clip.mov or a frame
    folder clip/) is named with its extension (clip_mp4). Names still shared by several sources are lengthened with
    as many parent folders as needed to tell them apart, joined by '_' (a/clip.mp4, b/clip.mp4 -> a_clip, b_clip);
    a clash left after that gets '_2', '_3', ... in input order. Deterministic for a given list of sources.
    """
    paths = [Path(s).absolute() for s in sources]
    is_video = [p.suffix.lower() in VIDEO_EXTS and not p.is_dir() for p in paths]
    stems = [(p.parent, p.stem if v else p.name) for p, v in zip(paths, is_video)]
    shared = {k for k in stems if stems.count(k) > 1}
    comps = []
    for p, v, key in zip(paths, is_video, stems):
        base = p.name.replace('.', '_') if v and key in shared else key[1]
        comps.append([c for c in p.parent.parts if c != p.anchor] + [base])
    depth = [1] * len(comps)
    while True:
        names = [_clean_name('_'.join(c[-d:])) for c, d in zip(comps, depth)]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(names):
            groups[n].append(i)
        clashing = [i for g in groups.values() if len(g) > 1 for i in g]
        grown = False
        for i in clashing:
            if depth[i] < len(comps[i]):
                depth[i] += 1
                grown = True
        if not grown:
            break
    used: set[str] = set()
    out = []
    for n in names:
        candidate, k = n, 1
        while candidate in used:
            k += 1
            candidate = f'{n}_{k}'
        used.add(candidate)
        out.append(candidate)
    return out


def split_groups(sources: Sequence[str | os.PathLike], pattern: str) -> list[str]:
    """The group of each source for `assign_splits`: the first folder or file name in the source's absolute path
    that the regular expression `pattern` matches COMPLETELY (its first capture group, if it has one), e.g. r'id\\d+'
    for VoxCeleb's identity folders (id10001/<youtube id>/00001.mp4; 'vid1' does not match). A source with no such
    name is a group of its own (its path).

    Raises:
        ValueError: `pattern` is not a valid regular expression, or matches no source at all (a typo would
            otherwise silently split by video).
    """
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f'--split_by {pattern!r} is not a valid regular expression: {e}') from None
    groups, matched = [], 0
    for src in sources:
        path = Path(src).absolute()
        m = next((m for m in map(rx.fullmatch, path.parts) if m), None)
        matched += m is not None
        groups.append(f'group:{m.group(1) if rx.groups else m.group(0)}' if m else f'path:{path.as_posix()}')
    if sources and not matched:
        raise ValueError(f'--split_by {pattern!r} matches no folder or file name in the {len(sources)} input paths '
                         f'(e.g. {Path(sources[0]).absolute().as_posix()}); it must match a whole name')
    return groups


def assign_splits(names: Sequence[str], test_fraction: float, seed: int = 0,
                  groups: Sequence[str] | None = None) -> list[str]:
    """'train' or 'test' per video.

    Without `groups` every video is its own group. The round(n * test_fraction) groups (n = number of distinct
    groups) whose SHA-256 of f'{seed}:{group}' is smallest go to test, at least one group staying in train when
    test_fraction < 1; all videos of a group share its split (e.g. one person's videos never straddle train and test).
    Depends only on the names (groups) and the seed, not on their order or on the machine.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f'test_fraction must be in [0, 1], got {test_fraction}')
    keys = list(names) if groups is None else list(groups)
    if len(keys) != len(names):
        raise ValueError(f'{len(groups)} groups for {len(names)} videos')
    unique = sorted(set(keys))
    n = len(unique)
    n_test = int(np.floor(n * test_fraction + 0.5))
    if test_fraction < 1.0:
        n_test = min(n_test, max(n - 1, 0))
    order = sorted(unique, key=lambda k: (hashlib.sha256(f'{seed}:{k}'.encode()).hexdigest(), k))
    test = set(order[:n_test])
    return ['test' if k in test else 'train' for k in keys]
