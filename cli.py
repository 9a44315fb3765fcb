"""Helpers shared by the entry scripts: common flags, device and precision, run folders, atomic writes."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: `--help` and torch-free callers (prepare_data workers) stay fast
    import torch

PRECISIONS = ('fp32', 'fp16', 'bf16', 'fp64')


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default='auto',
                        help='auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)')
    parser.add_argument('--precision', default='fp32', choices=PRECISIONS,
                        help='inference precision of the network call: fp32, or fp16/bf16 autocast on CUDA only; the '
                             'diffusion maths always runs in fp32/fp64 (default: fp32)')


def resolve_device(spec: str = 'auto') -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, with a clear error when CUDA is asked for but absent."""
    import torch

    spec = (spec or 'auto').lower()
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise SystemExit(f'--device {spec!r} is not a device: use auto, cpu, cuda or cuda:N') from e
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit(f'--device {spec}: CUDA is not available on this machine (use --device cpu or auto)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f'--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible')
    elif device.type != 'cpu':
        raise SystemExit(f'--device {spec}: only cpu and cuda devices are supported')
    return device


def autocast(device: torch.device, precision: str = 'fp32') -> contextlib.AbstractContextManager:
    """Autocast for the network call only: fp16/bf16 on CUDA, a no-op for fp32 and on CPU."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is not one of {PRECISIONS}')
    if precision in ('fp32', 'fp64') or device.type != 'cuda':
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype=torch.float16 if precision == 'fp16' else torch.bfloat16)


def set_cpu_threads(num: int | None = None) -> None:
    """Use every physical core for intra-op work unless OMP_NUM_THREADS is set by the user."""
    import torch

    if 'OMP_NUM_THREADS' not in os.environ:
        torch.set_num_threads(num or os.cpu_count() or 1)


def software_versions() -> dict[str, str]:
    """Versions of Python, the platform and the project's libraries that are installed (for config snapshots).
    Read from the package metadata, so nothing is imported: torch-free callers stay torch-free."""
    from importlib import metadata

    out = {'python': platform.python_version(), 'platform': platform.platform()}
    for dist in ('torch', 'torchvision', 'numpy', 'scipy', 'pillow', 'lightning', 'av', 'dlib', 'dlib-bin',
                 'open_clip_torch', 'pytorch-msssim'):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available():
        out['cuda'] = str(torch.version.cuda)
        out['gpu'] = torch.cuda.get_device_name()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes and output folders


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + '\n')
    return Path(path)


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, marker: str = 'config.json') -> Path:
    """Create an output folder; refuse to reuse a folder that already holds a result unless `overwrite`.

    A folder holding `marker` (written last by a finished run) is a result. With overwrite, the folder is emptied
    first, so a stale file of an earlier run can never be mistaken for part of the new result.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            what = 'a finished result' if (path / marker).exists() else 'files of an earlier (unfinished?) run'
            raise SystemExit(f'{path} already holds {what}; pass --overwrite to replace it or choose another --out')
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line() -> str:
    return ' '.join([Path(sys.argv[0]).name] + sys.argv[1:])
