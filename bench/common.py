"""Helpers shared by the benchmark scripts: random-but-real weights, FLOP counting, memory, machine facts, tables."""
from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALLOCATOR_VARS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
RECOMMENDED_ALLOCATOR = 'MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296'


def perturb_zero_init(model: nn.Module, scale: float = 1.0, seed: int = 0) -> nn.Module:
    """Re-initialise every layer whose parameters are all zero (the UNet's zero-initialised output convolutions) with
    PyTorch's default init times `scale`, so that every layer does real, non-trivial work. In place; returns model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if params and hasattr(module, 'reset_parameters') and not any(p.any() for p in params):
                module.reset_parameters()
                for p in params:
                    p.mul_(scale)
    return model


def count_flops(forward: Callable[[], Any]) -> int:
    """FLOPs of one call (torch.utils.flop_counter: 2 per multiply-add, convolutions and matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return int(counter.get_total_flops())


def unet_flops_per_image(unet_cfg: Any, z_dim: int) -> int:
    """FLOPs of one UNet forward at batch 1, counted on the meta device (shapes only, no compute, any machine).

    Attention counts its two matmuls (q.k and weights.v) for both implementations."""
    from model.unet import UNet

    with torch.device('meta'):
        model = UNet(unet_cfg, z_dim).eval()
        x = torch.empty(1, unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size)
        t = torch.zeros(1, dtype=torch.long)
        z = torch.empty(1, z_dim)
    return count_flops(lambda: model(x, t, z))


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != 'darwin' else kib / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def setup_device(name: str, threads: int | None = None) -> torch.device:
    """The benchmark's device (`cli.resolve_device`) with CPU threads set (`threads`, else `cli.set_cpu_threads`);
    on CPU a note when the allocator setting every figure in bench/README.md used is missing."""
    import cli

    device = cli.resolve_device(name)
    if threads:
        torch.set_num_threads(threads)
    else:
        cli.set_cpu_threads()
    if device.type == 'cpu':
        warn_allocator()
    return device


@torch.no_grad()
def forward_seconds(forward: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[list[float], Any]:
    """Wall seconds of `iters` (at least 1) calls of forward() after `warmup` untimed ones, each fenced by a device
    synchronisation; returns (times, the last output)."""
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(max(1, iters)):
        synchronize(device)
        start = time.perf_counter()
        out = forward()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        'device': str(device),
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'allocator_env': {k: os.environ.get(k) for k in ALLOCATOR_VARS},
    }
    if hasattr(os, 'getloadavg'):
        info['load_avg_1m'] = round(os.getloadavg()[0], 2)
    if device.type == 'cuda':
        info['device_name'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    else:
        info['device_name'] = cpu_name()
    return info


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def warn_allocator() -> None:
    if any(os.environ.get(k) is None for k in ALLOCATOR_VARS):
        print(f'note: run CPU benchmarks with {RECOMMENDED_ALLOCATOR} (glibc keeps large buffers instead of unmapping '
              'them after every layer); figures without it are slower and not comparable with bench/README.md',
              file=sys.stderr)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(['-' if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)
