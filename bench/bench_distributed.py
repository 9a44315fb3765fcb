"""Frames per second of a whole cold edit with 1 and with N torchrun ranks (CPU here; one GPU per rank on CUDA).

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/bench_distributed.py --video_path ../shared/sample_video --max_num 16 --ranks 1 2

Each run is `torchrun --nproc_per_node R editing_classifier.py` on the same frames (tiny preset, random weights, cold
cache, --T as given, OMP_NUM_THREADS = cores / R so that the CPU runs compare like with like). Printed per run: wall
seconds, frames per second, and the speed-up over one rank.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--video_path', default=str(ROOT.parent / 'shared' / 'sample_video'))
    p.add_argument('--max_num', type=int, default=16)
    p.add_argument('--T', type=int, default=20)
    p.add_argument('--template', default='tiny')
    p.add_argument('--device', default='cpu')
    p.add_argument('--ranks', type=int, nargs='+', default=[1, 2])
    p.add_argument('--json', help='write the figures here too')
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import templates
    from bench.bench_edit import write_random_checkpoints

    work = Path(tempfile.mkdtemp(prefix='dva_bench_dist_'))
    rows = []
    try:
        dva, cls, _ = write_random_checkpoints(templates.get_preset(args.template), work / 'weights', seed=0)
        for r in args.ranks:
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            env = {**os.environ, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // r))}
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(r), '--master_addr',
                   '127.0.0.1', '--master_port', str(port), str(ROOT / 'editing_classifier.py'),
                   '--video_path', args.video_path, '--max_num', str(args.max_num), '--checkpoint', str(dva),
                   '--cls_checkpoint', str(cls), '--template', args.template, '--T', str(args.T), '--device',
                   args.device, '--cache_dir', str(work / f'cache{r}'), '--out', str(work / f'out{r}'),
                   '--attribute', 'Mustache', '--scale', '0.3', '--quiet', '--no-save_frames']
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - start
            summary = json.loads((work / f'out{r}' / 'summary.json').read_text())
            row = {'ranks': r, 'frames': summary['frames'], 'wall_s': round(wall, 1),
                   'frames_per_s': round(summary['frames'] / wall, 3), 'stage_seconds_rank0': summary['seconds']}
            row['speedup'] = round(rows[0]['wall_s'] / wall, 2) if rows else 1.0
            rows.append(row)
            print(f'{r} rank(s): {wall:7.1f} s  {row["frames_per_s"]:.3f} frames/s  speed-up {row["speedup"]}x  '
                  f'(rank 0 stages: {", ".join(f"{k} {v:.1f}s" for k, v in summary["seconds"].items())})',
                  flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
