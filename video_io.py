"""Frame and video I/O shared by the editing scripts, the data preparation tool and the metrics.

Everything returns or takes RGB uint8 numpy arrays [H, W, 3]. Frames are streamed (never all held in RAM). PyAV (`av`)
is imported lazily, only when a video file is read or written.

Selection semantics of `FrameSource(path, start, end, max_num)`: `start` and `end` are indices into the full, naturally
sorted frame list (folders) or the decoding order (videos), `end` exclusive (None = to the last frame); `max_num` then
caps the number of frames taken from `start` on. So frames `start .. min(end, start + max_num) - 1` are used, and index
`i` of the source is frame `start + i` of the input.

Colour: every mp4 written here is tagged BT.709 (primaries, transfer, matrix) with limited ("tv") range, and its
pixels are converted from RGB with exactly that matrix and range, so a standard player shows the colours we wrote
(untagged HD streams are played as BT.709, while FFmpeg's default RGB->YUV conversion is BT.601). Decoding honours the
stream's own tags (untagged: BT.601) and uses accurate rounding (swscale's default flags round about one level dark).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from typing_extensions import Self

# swscale flags: chroma averaged over each 2x2 block when encoding; bicubic chroma upsampling with full horizontal
# interpolation when decoding; accurate rounding both ways. Mean error of a crf-0 round trip of real frames: < 1 level.
ENCODE_FLAGS = ('AREA', 'ACCURATE_RND')
DECODE_FLAGS = ('BICUBIC', 'ACCURATE_RND', 'FULL_CHR_H_INT')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
VIDEO_EXTS = ('.mp4', '.mov', '.avi', '.mkv', '.webm')


def natural_key(name: str | Path) -> tuple:
    """Sort key that orders embedded numbers by value: 'f2.png' < 'f10.png'. Case-insensitive, total order.

    A `Path` is keyed by its final component.
    """
    text = name.name if isinstance(name, Path) else str(name)
    parts = re.split(r'(\d+)', text.lower())
    # re.split alternates text / digits, so equal positions always compare str with str and int with int.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)) + (text,)


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """Image files of `folder` in natural order (frame2 < frame10).

    Only regular files whose extension (case-insensitive) is in `IMAGE_EXTS` are listed; other files, hidden files
    (name starting with '.', e.g. macOS '._x.jpg') and sub-folders are ignored.

    Raises:
        FileNotFoundError: `folder` does not exist or is not a folder.
        ValueError: `folder` holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'frame folder not found (or not a folder): {folder}')
    files = [
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith('.') and p.is_file()
    ]
    if not files:
        videos = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS), key=natural_key)
        hint = f'; it holds video files: pass one of them, e.g. {folder / videos[0]}' if videos else ''
        raise ValueError(f'no image file ({", ".join(IMAGE_EXTS)}) in frame folder {folder}{hint}')
    return sorted(files, key=natural_key)


def _select(n: int, start: int, end: int | None, max_num: int | None, what: str) -> range:
    """Indices start .. min(end, start + max_num) - 1 of `n` frames, validated."""
    if start < 0:
        raise ValueError(f'start must be >= 0, got {start}')
    if end is not None and end <= start:
        raise ValueError(f'end ({end}) must be greater than start ({start})')
    if max_num is not None and max_num < 1:
        raise ValueError(f'max_num must be >= 1, got {max_num}')
    stop = n if end is None else min(end, n)
    if max_num is not None:
        stop = min(stop, start + max_num)
    if start >= stop:
        raise ValueError(f'{what} has {n} frames: start={start} selects none')
    return range(start, stop)


def _open_rgb(path: Path) -> np.ndarray:
    """Decode one image file to RGB uint8 [H, W, 3]; ValueError naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'cannot read image {path}: {e}') from e


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3] (ValueError naming the file when it cannot be decoded)."""
    return _open_rgb(Path(path))


class FrameSource:
    """Frames of a folder of images or of a video file, streamed as RGB uint8 [H, W, 3] arrays.

    Args:
        path: a folder of images (see `list_frames`) or a video file (mp4/mov/avi/mkv/webm, decoded with PyAV).
        start, end, max_num: frame selection, see the module docstring (`end` exclusive; `max_num` caps the count).
        strict: raise ValueError (instead of warning) when a video decodes fewer frames than its container declares.

    Attributes:
        path: the input path.
        names: one stable name per selected frame: the full file stem for folders ('a.1' for 'a.1.png'), the
            zero-padded input frame index ('%06d') for videos.
        fps: source frame rate (float) for videos, None for folders; `rate` is the exact Fraction (e.g. 30000/1001).
        size: (width, height) of every frame.
        frames_expected: the frame count the video's container declares (None for folders, or when it declares none).
        frames_decoded: frames the opening scan decoded (it stops at the end of the selection; None for folders).
        truncated: the video ended before its declared count (a cut-off download, say): warned about when opened.

    Folder frames must all have one size (checked from the image headers when the source is opened). A video is
    decoded once when opened, to count its frames and check that it decodes; `read(i)` on a video decodes
    sequentially, so iterate rather than index randomly.
    """

    def __init__(
        self, path: str | os.PathLike, start: int = 0, end: int | None = None, max_num: int | None = None,
        strict: bool = False,
    ) -> None:
        self.path = Path(path)
        self.frames_expected: int | None = None
        self.frames_decoded: int | None = None
        self.truncated = False
        if self.path.is_dir():
            self.is_video = False
            self._init_folder(start, end, max_num)
        elif self.path.suffix.lower() in VIDEO_EXTS:
            if not self.path.is_file():
                raise FileNotFoundError(f'video file not found: {self.path}')
            self.is_video = True
            self._init_video(start, end, max_num, strict)
        elif not self.path.exists():
            raise FileNotFoundError(f'frame source not found: {self.path}')
        else:
            raise ValueError(f'{self.path} is neither a frame folder nor a video file ({", ".join(VIDEO_EXTS)})')
        self._decoder: Iterator[np.ndarray] | None = None
        self._next_index = 0

    def _init_folder(self, start: int, end: int | None, max_num: int | None) -> None:
        files = list_frames(self.path)
        sel = _select(len(files), start, end, max_num, f'frame folder {self.path}')
        self.files = [files[i] for i in sel]
        self.names = [p.stem for p in self.files]
        seen: dict[str, Path] = {}
        for p in self.files:
            if p.stem in seen:
                raise ValueError(
                    f'frames {seen[p.stem].name} and {p.name} in {self.path} have the same name {p.stem!r}'
                )
            seen[p.stem] = p
        self.fps: float | None = None
        self.rate: Fraction | None = None
        size = None
        for p in self.files:
            try:
                with Image.open(p) as im:
                    s = im.size
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f'cannot read image {p}: {e}') from e
            if size is None:
                size, first = s, p
            elif s != size:
                raise ValueError(
                    f'frame {p} is {s[0]}x{s[1]} but {first.name} is {size[0]}x{size[1]}: '
                    f'all frames in {self.path} must have the same size'
                )
        self.size: tuple[int, int] = size

    def _init_video(self, start: int, end: int | None, max_num: int | None, strict: bool) -> None:
        limit = None if end is None else end
        if max_num is not None:
            limit = start + max_num if limit is None else min(limit, start + max_num)
        n, rate, size, declared, self._keys = _scan_video(self.path, limit)
        self.frames_expected, self.frames_decoded = declared, n
        self.truncated = declared is not None and n < declared and (limit is None or n < limit)
        if self.truncated:
            msg = (f'{self.path}: the container declares {declared} frames but only {n} decode (a truncated or '
                   f'damaged file?)')
            if strict:
                raise ValueError(msg)
            warnings.warn(f'{msg}; using the {n} that decode', stacklevel=3)
        sel = _select(n, start, end, max_num, f'video {self.path}')
        self._range = sel
        self.names = [f'{i:06d}' for i in sel]
        self.rate = rate
        self.fps = float(self.rate) if self.rate else None
        self.size = size

    def __len__(self) -> int:
        return len(self.names)

    def decode_report(self) -> dict[str, int | bool | None]:
        """{'frames_expected', 'frames_decoded', 'truncated'} of a video (see the attributes), for run summaries."""
        return {'frames_expected': self.frames_expected, 'frames_decoded': self.frames_decoded,
                'truncated': self.truncated}

    def audio(self) -> AudioClip | None:
        """The source's sound under the selected frames (a video file with a readable audio stream), else None.

        The clip starts at the selected first frame's time (the video stream's start time + index / fps) and lasts
        len(self) / fps seconds, so that it stays in sync with an output written at the source frame rate. It is read
        from the file each time it is written (AudioClip.chunks), never held whole: memory does not grow with the
        video's length. Sound that fails to decode part-way is cut there, with a warning."""
        if not self.is_video or not self.fps:
            return None
        import av

        try:
            with av.open(str(self.path)) as container:
                if not container.streams.audio:
                    return None
                video, sound = container.streams.video[0], container.streams.audio[0]
                offset = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
                rate = sound.codec_context.sample_rate
                layout = 'stereo' if sound.codec_context.channels >= 2 else 'mono'
        except av.error.FFmpegError as e:
            warnings.warn(f'the audio of {self.path} cannot be read ({e}): the edited videos will be silent')
            return None
        start = offset + self._range.start / self.fps
        clip = AudioClip(self.path, round(start * rate), round((start + len(self) / self.fps) * rate), rate, layout)
        readable = next(clip.chunks(quiet=True), None) is not None  # a break later on is told when it is written
        if not readable:
            warnings.warn(f'the audio of {self.path} cannot be read: the edited videos will be silent')
        return clip if readable else None

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield every selected frame in order as RGB uint8 [H, W, 3] (streamed)."""
        return self.iter_from(0)

    def iter_from(self, first: int) -> Iterator[np.ndarray]:
        """Yield the selected frames from index `first` on; the earlier ones are not read (folders) or not converted
        to RGB (videos: decoded only), so that a rank working on the end of a video skips its start cheaply."""
        if not self.is_video:
            for p in self.files[first:]:
                yield self._read_file(p)
        else:
            yield from self._decode(first)

    def read(self, i: int) -> np.ndarray:
        """Frame `i` of the selection (0 <= i < len) as RGB uint8 [H, W, 3]."""
        if not 0 <= i < len(self):
            raise IndexError(f'frame index {i} out of range for {len(self)} frames of {self.path}')
        if not self.is_video:
            return self._read_file(self.files[i])
        if self._decoder is None or i < self._next_index:
            self._decoder, self._next_index = self._decode(i), i  # from the key frame before i
        while True:
            frame = next(self._decoder)
            self._next_index += 1
            if self._next_index - 1 == i:
                return frame

    def _read_file(self, p: Path) -> np.ndarray:
        arr = _open_rgb(p)
        if (arr.shape[1], arr.shape[0]) != self.size:
            raise ValueError(
                f'frame {p} decoded as {arr.shape[1]}x{arr.shape[0]}, expected {self.size[0]}x{self.size[1]}'
            )
        return arr

    def _decode(self, first: int = 0, seek: bool = True) -> Iterator[np.ndarray]:
        """Frames first.. of the selection. With `seek`, decoding starts at the last key frame at or before the first
        one wanted (found by the opening scan); the decoder must then give that key frame first, else it starts over
        from the beginning of the file."""
        import av

        target = self._range.start + first
        k = bisect.bisect_right([i for i, _ in self._keys], target) - 1 if seek else -1
        j, key_pts = self._keys[k] if k > 0 else (0, None)
        frames = None
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = 'AUTO'
                if key_pts is not None:
                    try:
                        container.seek(key_pts, stream=stream, backward=True, any_frame=False)
                    except av.error.FFmpegError:  # a container that cannot seek: start over below
                        frames = iter(())
                for frame in container.decode(stream) if frames is None else frames:
                    if key_pts is not None:  # just after a seek
                        if frame.pts is not None and frame.pts < key_pts:
                            continue  # decoded from an earlier key frame, or an open GOP's leading frames
                        if frame.pts != key_pts:
                            break  # not where the scan saw it: start over below
                        key_pts = None
                    if j >= self._range.stop:
                        return
                    if j >= target:
                        arr = frame.to_ndarray(format='rgb24', interpolation=_flags(DECODE_FLAGS))
                        if (arr.shape[1], arr.shape[0]) != self.size:
                            raise ValueError(
                                f'frame {j} of {self.path} is {arr.shape[1]}x{arr.shape[0]}, '
                                f'expected {self.size[0]}x{self.size[1]}'
                            )
                        yield arr
                    j += 1
                if key_pts is None:  # the frames ran out after the key frame (or no seek): done
                    return
        except av.error.FFmpegError as e:
            raise ValueError(f'cannot decode video {self.path}: {e}') from e
        yield from self._decode(first, seek=False)  # the key frame never came: from the start

    def __repr__(self) -> str:
        kind = 'video' if self.is_video else 'folder'
        return (
            f'FrameSource({kind} {str(self.path)!r}, {len(self)} frames, {self.size[0]}x{self.size[1]}, fps={self.fps})'
        )


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden temporary name next to `path` (same folder, so os.replace onto `path` is atomic)."""
    return path.with_name(f'.{path.name}.{uuid.uuid4().hex[:12]}.tmp')


def _as_rate(fps: float | Fraction) -> Fraction:
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100_000)
    if rate <= 0:
        raise ValueError(f'fps must be positive, got {fps}')
    return rate


def _as_uint8_rgb(frame: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert('RGB'))
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f'expected an RGB uint8 array [H, W, 3], got {arr.dtype} {arr.shape}')
    return arr


@dataclass(frozen=True)
class AudioClip:
    """The sound of `path` between two sample indices [first, last) at `rate` Hz ('mono' or 'stereo'), decoded (and
    resampled to float32 planar) each time `chunks` runs."""

    path: Path
    first: int
    last: int
    rate: int
    layout: str

    @property
    def duration(self) -> float:
        """Seconds the clip spans (less comes out if the sound ends or breaks before `last`)."""
        return (self.last - self.first) / self.rate

    @property
    def samples(self) -> np.ndarray:
        """All of it at once, [channels, n] float32 (tests and short clips; writers use `chunks`)."""
        return np.concatenate(list(self.chunks()), axis=1)

    def chunks(self, quiet: bool = False) -> Iterator[np.ndarray]:
        """The samples [channels, k] float32, in decoder-sized pieces (a warning when the sound breaks off, unless
        `quiet`)."""
        import av

        position, got = None, 0  # position: sample index of the next resampled sample
        try:
            with av.open(str(self.path)) as container:
                resampler = av.AudioResampler(format='fltp', layout=self.layout, rate=self.rate)
                for frame in container.decode(container.streams.audio[0]):
                    for out in resampler.resample(frame):
                        if position is None:
                            position = round(out.time * self.rate) if out.time is not None else 0
                        arr, begin = out.to_ndarray(), position
                        position += arr.shape[1]
                        lo, hi = max(self.first - begin, 0), min(self.last - begin, arr.shape[1])
                        if hi > lo:
                            got += hi - lo
                            yield np.ascontiguousarray(arr[:, lo:hi], dtype=np.float32)
                    if position is not None and position >= self.last:
                        break
        except av.error.FFmpegError as e:
            if not quiet:
                warnings.warn(f'the audio of {self.path} stops at {got / self.rate:.2f} s of the selected frames: {e}')


class VideoWriter:
    """H.264 mp4 writer (libx264, yuv420p, tagged BT.709 limited range) that appears atomically at `path` when closed.

    Frames go to a temporary file in the same folder, which `close()` renames onto `path` (os.replace); on an error
    inside a `with` block the temporary file is removed and `path` is left untouched. Odd frame sizes are padded to
    even (the last row/column repeated), so the stored size is rounded up to even.

    Args:
        path: output .mp4 path; its folder is created if needed.
        fps: frame rate, e.g. 25 or Fraction(30000, 1001) (a float is turned into the nearest small fraction).
        crf: x264 constant rate factor (0 lossless .. 51; 18 is visually lossless).
        preset: x264 speed preset. 'veryfast' (default) encodes 1080p 2.1x faster than x264's 'medium' on 2 cores
            (42 vs 89 ms/frame) for -0.2 dB PSNR at crf 18 (42.9 vs 43.1 dB) and a file no larger.
        audio: sound to add, encoded as AAC at its own rate, e.g. `FrameSource.audio()`.
    """

    def __init__(self, path: str | os.PathLike, fps: float | Fraction, crf: int = 18,
                 audio: AudioClip | None = None, preset: str = 'veryfast') -> None:
        self.path = Path(path)
        self.rate = _as_rate(fps)
        self.crf, self.preset = crf, preset
        self.audio = audio
        self._astream = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_sibling(self.path)
        self._container = None
        self._stream = None
        self._size: tuple[int, int] | None = None
        self.n_frames = 0

    def write(self, frame: np.ndarray | Image.Image) -> None:
        """Append one RGB uint8 frame [H, W, 3] (or PIL image); every frame must have the size of the first."""
        import av

        arr = _as_uint8_rgb(frame)
        h, w = arr.shape[:2]
        if self._container is None:
            self._size = (w, h)
            self._container = av.open(str(self._tmp), mode='w', format='mp4')
            self._stream = self._container.add_stream('libx264', rate=self.rate)
            self._stream.width, self._stream.height = w + w % 2, h + h % 2
            self._stream.pix_fmt = 'yuv420p'
            self._stream.codec_context.time_base = 1 / self.rate
            self._stream.options = {'crf': str(self.crf), 'preset': self.preset}
            from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc

            cc = self._stream.codec_context  # the tags that say how the pixels below were converted
            cc.color_primaries, cc.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
            cc.colorspace, cc.color_range = 1, ColorRange.MPEG  # AVCOL_SPC_BT709; limited ('tv') range
            if self.audio is not None:
                self._astream = self._container.add_stream('aac', rate=self.audio.rate, layout=self.audio.layout)
        elif (w, h) != self._size:
            raise ValueError(f'frame {self.n_frames} is {w}x{h}, but the video is {self._size[0]}x{self._size[1]}')
        if w % 2 or h % 2:
            arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode='edge')
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format='rgb24').reformat(
            format='yuv420p', dst_colorspace='ITU709', dst_color_range='MPEG', interpolation=_flags(ENCODE_FLAGS))
        vf.pts = self.n_frames
        vf.time_base = 1 / self.rate
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.n_frames += 1

    def close(self) -> Path:
        """Flush the encoder and move the finished file onto `path`; returns `path`."""
        if self._container is None:
            self.abort()
            raise ValueError(f'no frame written to {self.path}')
        for packet in self._stream.encode():
            self._container.mux(packet)
        if self._astream is not None:
            _encode_audio(self._container, self._astream, self.audio)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial output (the temporary file); `path` is not touched."""
        if self._container is not None:
            with contextlib.suppress(Exception):  # already failing; the temp file goes anyway
                self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _encode_audio(container: Any, stream: Any, clip: AudioClip) -> None:
    """Encode the clip into `stream` as it is decoded (the encoder cuts it into AAC frames of its own size)."""
    import av

    k = 0
    for chunk in clip.chunks():
        piece = av.AudioFrame.from_ndarray(chunk, format='fltp', layout=clip.layout)
        piece.sample_rate, piece.pts, piece.time_base = clip.rate, k, Fraction(1, clip.rate)
        k += chunk.shape[1]
        for packet in stream.encode(piece):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def join_videos(segments: Sequence[str | os.PathLike], path: str | os.PathLike, audio: AudioClip | None = None
                ) -> Path:
    """One mp4 at `path` (atomically) from consecutive segments written by `VideoWriter` with the same size and fps,
    without re-encoding: the H.264 packets are copied and their timestamps shifted (every segment starts with a
    keyframe, and the colour tags come with the stream). `audio` is encoded as by VideoWriter. The ranks of a
    distributed edit each encode their share of the frames as one segment."""
    import av

    def first_dts(segment: str | os.PathLike) -> int:
        with av.open(str(segment)) as inp:
            return next(p.dts for p in inp.demux(inp.streams.video[0]) if p.dts is not None)

    # x264's decode delay (B-frames) is negative dts at a segment's start, and a short segment may have less of it
    # than the next: decode times are renumbered from the largest delay on, one frame apart, which keeps them
    # increasing and never after a frame's presentation time.
    dts = min(0, *map(first_dts, segments))
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        with av.open(str(tmp), mode='w', format='mp4') as out:
            with av.open(str(segments[0])) as first:
                stream = out.add_stream_from_template(first.streams.video[0])
                settings = (first.streams.video[0].time_base, first.streams.video[0].codec_context.extradata)
            sound = out.add_stream('aac', rate=audio.rate, layout=audio.layout) if audio is not None else None
            offset = 0
            for segment in segments:
                with av.open(str(segment)) as inp:
                    src = inp.streams.video[0]
                    if (src.time_base, src.codec_context.extradata) != settings:  # (packets keep their time base)
                        raise ValueError(f'{segment} was encoded with other settings than {segments[0]} (time base '
                                         'or H.264 parameter sets): write every segment with one VideoWriter setting')
                    end = offset
                    for packet in inp.demux(src):
                        if packet.dts is None:  # the demuxer's empty flush packet
                            continue
                        packet.pts, packet.dts = packet.pts + offset, dts
                        dts += packet.duration
                        end = max(end, packet.pts + packet.duration)
                        packet.stream = stream
                        out.mux(packet)
                    offset = end
            if sound is not None:
                _encode_audio(out, sound, audio)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_video(
    path: str | os.PathLike, frames: Iterable[np.ndarray | Image.Image], fps: float | Fraction, crf: int = 18,
    audio: AudioClip | None = None,
) -> Path:
    """Write RGB uint8 frames [H, W, 3] as an H.264 mp4 at `fps` (atomically, see `VideoWriter`); returns `path`."""
    with VideoWriter(path, fps, crf=crf, audio=audio) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)


def _flags(names: tuple[str, ...]) -> int:
    from av.video.reformatter import Interpolation

    out = 0
    for name in names:
        out |= Interpolation[name]
    return out


def _scan_video(path: Path, limit: int | None = None) -> tuple[int, Fraction | None, tuple[int, int], int | None,
                                                                list[tuple[int, int]]]:
    """Decode a video file (up to `limit` frames) -> (frames decoded, frame rate or None, (width, height), frame count
    the container declares or None, (frame index, pts) of every key frame: where decoding can start).

    Raises ValueError naming the file when it has no video stream or no frame decodes."""
    import av

    n, rate, size, declared, keys = 0, None, None, None, []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f'no video stream in {path}')
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            declared = stream.frames or None  # 0: the container does not say
            for frame in container.decode(stream):
                size = size or (frame.width, frame.height)
                if frame.key_frame and frame.pts is not None and (not keys or frame.pts > keys[-1][1]):
                    keys.append((n, frame.pts))
                n += 1
                if limit is not None and n >= limit:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f'cannot decode video {path}: {e}') from e
    if size is None:
        raise ValueError(f'cannot decode video {path}: no frame decoded')
    return n, Fraction(rate) if rate else None, size, declared, keys


def read_video_info(path: str | os.PathLike) -> tuple[int, float, tuple[int, int]]:
    """(number of decoded frames, frame rate, (width, height)) of a video file, counted by decoding it."""
    n, rate, size, _, _ = _scan_video(Path(path))
    return n, float(rate) if rate else float('nan'), size


def save_image_atomic(path: str | os.PathLike, image: np.ndarray | Image.Image, format: str | None = None,
                      png_compress_level: int = 1) -> Path:
    """Save `image` (uint8 array [H, W], [H, W, 3] or [H, W, 4], or a PIL image) atomically.

    The image is written to a temporary file in the same folder and renamed onto `path`, so readers never see a
    partial file. The format follows the extension of `path`, PNG when it has none (or pass `format`). PNGs use zlib
    level 1 by default (lossless like any level; on a 1080p frame 2.4x faster than Pillow's default 6 for 27 % more
    bytes: 146 vs 345 ms, 1.16 vs 0.91 MB).
    """
    path = Path(path)
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f'expected a uint8 image array, got {arr.dtype}')
        image = Image.fromarray(arr)
    if format is None:
        format = Image.registered_extensions().get(path.suffix.lower(), 'PNG')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, 'xb') as f:
            image.save(f, format=format, **({'compress_level': png_compress_level} if format == 'PNG' else {}))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
