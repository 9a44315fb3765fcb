"""Peak memory of carrying a source's sound into an edited video, against the sound's length.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/bench_audio_memory.py --minutes 1 10

Per length: a video of that many minutes (16x16 px at 25 fps, a stereo 48 kHz AAC tone) is made, then a fresh process
takes `FrameSource.audio()` and writes it beside a video (`VideoWriter`, as `Editor.write` does for every result);
printed: that process's peak resident set size (ru_maxrss) and wall seconds. The sound is streamed from the file
(`AudioClip.chunks`), so the figure should not grow with the minutes.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from video_io import FrameSource, VideoWriter
src = FrameSource(sys.argv[2])
start = time.perf_counter()
with VideoWriter(sys.argv[3], src.rate, audio=src.audio()) as writer:
    writer.write(np.zeros((16, 16, 3), np.uint8))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - start)
"""


def long_video(path: Path, minutes: float, fps: int = 25, rate: int = 48000) -> Path:
    import av
    import numpy as np

    with av.open(str(path), 'w') as out:
        video, sound = out.add_stream('libx264', rate=fps), out.add_stream('aac', rate=rate, layout='stereo')
        video.width = video.height = 16
        video.pix_fmt, video.options = 'yuv420p', {'preset': 'ultrafast'}
        for i in range(round(fps * 60 * minutes)):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i % 255, np.uint8), format='rgb24')
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in video.encode(frame.reformat(format='yuv420p')):
                out.mux(packet)
        total = round(rate * 60 * minutes)
        for k in range(0, total, 1 << 14):
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(k, min(total, k + (1 << 14))) / rate)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format='fltp', layout='stereo')
            frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
            for packet in sound.encode(frame):
                out.mux(packet)
        for stream in (video, sound):
            for packet in stream.encode():
                out.mux(packet)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--minutes', type=float, nargs='+', default=[1, 10])
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix='dva_bench_audio_') as tmp:
        for minutes in args.minutes:
            video = long_video(Path(tmp) / f'{minutes}min.mp4', minutes)
            run = subprocess.run([sys.executable, '-c', MEASURE, str(ROOT), str(video), str(Path(tmp) / 'out.mp4')],
                                 check=True, capture_output=True, text=True)
            rss, wall = map(float, run.stdout.split())
            rows.append({'minutes': minutes, 'peak_rss_mb': round(rss), 'wall_s': round(wall, 1)})
            print(f'{minutes:g} min of sound: peak RSS {rss:.0f} MB, {wall:.1f} s', flush=True)
    return rows


if __name__ == '__main__':
    main()
