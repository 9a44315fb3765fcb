"""Peak memory of a whole edit against video length: the same real clip repeated to 100 and to 1,000 frames.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/bench_memory.py --video_path ../shared/sample_video --lengths 100 1000

Each length runs `editing_classifier.py` (tiny preset, random weights, CPU, T=5, cold cache) in a fresh process and
prints that process's peak resident set size (ru_maxrss). The frames are links to the clip's files (the clip repeated),
so the 1080p frames are real and no disk is spent on copies. Target: RSS(1000) <= 1.25 x RSS(100).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repeated_clip(src: Path, dest: Path, n: int) -> Path:
    """dest/<i>.jpeg -> the clip's frames in a loop, n in all."""
    from video_io import list_frames

    frames = list_frames(src)
    dest.mkdir(parents=True)
    for i in range(n):
        f = frames[i % len(frames)]
        (dest / f'{i:06d}{f.suffix}').symlink_to(f.resolve())
    return dest


def child(argv: list[str]) -> None:
    """Runs in the measured process: the edit, then its own peak RSS on stdout."""
    sys.path.insert(0, str(ROOT))
    import editing_classifier

    start = time.perf_counter()
    summary = editing_classifier.main(argv)
    print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      'wall_s': time.perf_counter() - start, 'frames': summary['frames'],
                      'seconds': summary['seconds']}))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--video_path', default=str(ROOT.parent / 'shared' / 'sample_video'), help='a frame folder')
    p.add_argument('--lengths', type=int, nargs='+', default=[100, 1000])
    p.add_argument('--T', type=int, default=5)
    p.add_argument('--json', help='write the figures here too')
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import templates
    from bench.bench_edit import write_random_checkpoints

    work = Path(tempfile.mkdtemp(prefix='dva_bench_memory_'))
    try:
        dva, cls, _ = write_random_checkpoints(templates.tiny(), work / 'weights', seed=0)
        rows = []
        for n in args.lengths:
            clip = repeated_clip(Path(args.video_path), work / f'clip{n}', n)
            edit = ['--video_path', str(clip), '--checkpoint', str(dva), '--cls_checkpoint', str(cls), '--template',
                    'tiny', '--T', str(args.T), '--device', 'cpu', '--cache_dir', str(work / f'cache{n}'), '--out',
                    str(work / f'out{n}'), '--attribute', 'Mustache', '--scale', '0.3', '--quiet']
            run = subprocess.run([sys.executable, __file__, '--child', json.dumps(edit)], capture_output=True,
                                 text=True, check=True)
            row = {'frames': n, **json.loads(run.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f'{n:6d} frames: peak RSS {row["peak_rss_mb"]:7.0f} MB   wall {row["wall_s"]:6.0f} s', flush=True)
        if len(rows) >= 2:
            print(f'RSS({rows[-1]["frames"]}) / RSS({rows[0]["frames"]}) = '
                  f'{rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]:.3f} (target <= 1.25)')
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--child':
        child(json.loads(sys.argv[2]))
    else:
        main()
