"""Frame folders, video files and atomic writers (video_io.py)."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from video_io import (
    IMAGE_EXTS,
    FrameSource,
    VideoWriter,
    join_videos,
    list_frames,
    read_image,
    read_video_info,
    save_image_atomic,
    write_video,
)


def _img(path: Path, size: tuple[int, int] = (8, 6), value: int = 0) -> Path:
    """Write a uniform RGB image of `size` (w, h) and grey level `value`."""
    Image.new('RGB', size, (value, value, value)).save(path)
    return path


def _smooth_frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """n smooth RGB uint8 frames [h, w, 3] that differ from each other (codec-friendly)."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        r = 128 + 100 * np.sin(xx / w * 2 * np.pi + i * 0.5)
        g = 128 + 100 * np.cos(yy / h * 2 * np.pi)
        b = np.full_like(r, 20 + 20 * i)
        out.append(np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# list_frames


def test_list_frames_natural_sort_and_filter(tmp_path: Path) -> None:
    for name in ['frame10.png', 'frame2.png', 'frame1.jpg', 'Frame3.JPG', 'frame11.jpeg']:
        _img(tmp_path / name)
    (tmp_path / 'notes.txt').write_text('not a frame')
    (tmp_path / '.hidden.png').write_bytes(b'')
    sub = tmp_path / 'sub.png'  # a folder with an image-like name is ignored too
    sub.mkdir()
    _img(sub / 'frame0.png')
    (tmp_path / 'crops').mkdir()
    _img(tmp_path / 'crops' / 'frame0.png')

    names = [p.name for p in list_frames(tmp_path)]
    assert names == ['frame1.jpg', 'frame2.png', 'Frame3.JPG', 'frame10.png', 'frame11.jpeg']
    assert '.png' in IMAGE_EXTS and '.jpg' in IMAGE_EXTS


def test_list_frames_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='missing'):
        list_frames(tmp_path / 'missing')
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'readme.txt').write_text('x')
    with pytest.raises(ValueError, match='empty'):
        list_frames(empty)
    (empty / 'clip.MP4').write_bytes(b'')
    with pytest.raises(ValueError, match='it holds video files: pass one of them, e.g. .*clip.MP4'):
        list_frames(empty)


# ---------------------------------------------------------------------------------------------------------------------
# FrameSource on folders


def test_folder_source_names_selection_and_reading(tmp_path: Path) -> None:
    for i in range(12):
        _img(tmp_path / f'a.{i}.png', value=10 * i)
    src = FrameSource(tmp_path)
    assert len(src) == 12 and src.fps is None and src.size == (8, 6)
    assert src.names[:3] == ['a.0', 'a.1', 'a.2'] and src.names[-1] == 'a.11'  # full stems, natural order
    frames = list(src)
    assert all(f.shape == (6, 8, 3) and f.dtype == np.uint8 for f in frames)
    assert [int(f[0, 0, 0]) for f in frames] == [10 * i for i in range(12)]

    sel = FrameSource(tmp_path, start=2, end=9, max_num=4)
    assert sel.names == ['a.2', 'a.3', 'a.4', 'a.5']
    assert int(sel.read(3)[0, 0, 0]) == 50
    assert FrameSource(tmp_path, start=5, end=8).names == ['a.5', 'a.6', 'a.7']
    assert FrameSource(tmp_path, start=10, max_num=5).names == ['a.10', 'a.11']
    with pytest.raises(ValueError):
        FrameSource(tmp_path, start=12)
    with pytest.raises(IndexError):
        sel.read(4)


def test_folder_source_unreadable_image(tmp_path: Path) -> None:
    _img(tmp_path / '0.png')
    (tmp_path / '1.png').write_bytes(b'this is not a png')
    with pytest.raises(ValueError, match=r'1\.png'):
        FrameSource(tmp_path)

    # Valid header, broken data: caught when the frame is read, naming the file.
    good = tmp_path / 'trunc'
    good.mkdir()
    _img(good / '0.jpg', size=(64, 48))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(good / '1.jpg')
    (good / '1.jpg').write_bytes((good / '1.jpg').read_bytes()[:-1500])
    src = FrameSource(good)
    assert src.read(0).shape == (48, 64, 3)
    with pytest.raises(ValueError, match=r'1\.jpg'):
        list(src)


def test_folder_source_mixed_sizes(tmp_path: Path) -> None:
    _img(tmp_path / 'f1.png', size=(8, 6))
    _img(tmp_path / 'f2.png', size=(8, 6))
    _img(tmp_path / 'f3.png', size=(10, 6))
    _img(tmp_path / 'f4.png', size=(12, 6))
    with pytest.raises(ValueError, match=r'f3\.png.*10x6.*8x6'):
        FrameSource(tmp_path)
    assert len(FrameSource(tmp_path, end=2)) == 2  # only the selected frames must agree


def test_folder_source_duplicate_stems(tmp_path: Path) -> None:
    _img(tmp_path / 'x.png')
    _img(tmp_path / 'x.jpg')
    with pytest.raises(ValueError, match='same name'):
        FrameSource(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# FrameSource on video files


def test_video_source(test_videos_dir: Path) -> None:
    path = test_videos_dir / 'sample_24f_540p.mp4'
    src = FrameSource(path)
    assert len(src) == 24 and src.fps == pytest.approx(25.0) and src.size == (960, 540)
    assert src.names[0] == '000000' and src.names[-1] == '000023'
    frames = list(src)
    assert len(frames) == 24 and all(f.shape == (540, 960, 3) and f.dtype == np.uint8 for f in frames)

    sel = FrameSource(path, start=5, end=20, max_num=4)
    assert sel.names == ['000005', '000006', '000007', '000008'] and sel.fps == pytest.approx(25.0)
    got = list(sel)
    assert len(got) == 4 and all(np.array_equal(g, frames[5 + i]) for i, g in enumerate(got))
    assert np.array_equal(sel.read(2), frames[7]) and np.array_equal(sel.read(0), frames[5])  # backwards re-decodes
    assert len(FrameSource(path, start=20)) == 4
    assert len(FrameSource(path, end=10)) == 10
    with pytest.raises(ValueError):
        FrameSource(path, start=30)


def test_video_source_ntsc_rate(test_videos_dir: Path) -> None:
    src = FrameSource(test_videos_dir / 'carphone.mp4', max_num=3)
    assert src.rate == Fraction(30000, 1001) and src.size == (176, 144) and len(src) == 3


def test_video_source_undecodable(tmp_path: Path) -> None:
    bad = tmp_path / 'broken.mp4'
    bad.write_bytes(b'\x00' * 1000)
    with pytest.raises(ValueError, match=r'broken\.mp4'):
        FrameSource(bad)
    with pytest.raises(FileNotFoundError):
        FrameSource(tmp_path / 'nope.mp4')


# ---------------------------------------------------------------------------------------------------------------------
# Writers


@pytest.mark.parametrize(
    ('fps', 'expected'),
    [(25, 25.0), (Fraction(30000, 1001), 30000 / 1001), (30000 / 1001, 30000 / 1001)],
)
def test_write_video_roundtrip(tmp_path: Path, fps: float | Fraction, expected: float) -> None:
    frames = _smooth_frames(7, 64, 48)
    out = write_video(tmp_path / 'sub' / 'v.mp4', frames, fps)
    n, got_fps, size = read_video_info(out)
    assert n == 7 and size == (64, 48) and got_fps == pytest.approx(expected, abs=1e-6)
    back = list(FrameSource(out))
    err = [np.abs(b.astype(int) - f.astype(int)).mean() for b, f in zip(back, frames)]
    assert max(err) < 4.0  # right frames, right order, right colours (yuv420p + crf 18)
    assert sorted(p.name for p in out.parent.iterdir()) == ['v.mp4']  # no temporary left behind


def test_write_video_odd_size(tmp_path: Path) -> None:
    frames = _smooth_frames(3, 51, 37)
    n, _, size = read_video_info(write_video(tmp_path / 'odd.mp4', frames, 10))
    assert n == 3 and size == (52, 38)  # padded to even
    first = FrameSource(tmp_path / 'odd.mp4').read(0)
    assert np.abs(first[:37, :51].astype(int) - frames[0]).mean() < 4.0


def test_video_writer_failure_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / 'v.mp4'
    write_video(target, _smooth_frames(2, 32, 32), 25)
    before = target.read_bytes()
    with pytest.raises(ValueError, match='32x32'), VideoWriter(target, 25) as w:
        w.write(_smooth_frames(1, 32, 32)[0])
        w.write(_smooth_frames(1, 16, 16)[0])
    assert target.read_bytes() == before  # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ['v.mp4']
    with pytest.raises(ValueError, match='no frame'):
        write_video(tmp_path / 'empty.mp4', [], 25)
    assert not (tmp_path / 'empty.mp4').exists()


def test_save_image_atomic(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    p = save_image_atomic(tmp_path / 'out' / 'a.png', arr)
    assert np.array_equal(read_image(p), arr)
    q = save_image_atomic(tmp_path / 'out' / 'noext', Image.fromarray(arr))
    with Image.open(q) as im:
        assert im.format == 'PNG'
    save_image_atomic(tmp_path / 'out' / 'a.png', arr[::-1])  # overwrite in place
    assert np.array_equal(read_image(p), arr[::-1])
    assert sorted(x.name for x in (tmp_path / 'out').iterdir()) == ['a.png', 'noext']
    with pytest.raises(ValueError):
        save_image_atomic(tmp_path / 'b.png', arr.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Sound


def video_with_sound(frames_dir: Path, path: Path, n: int = 10, fps: int = 25, switch: float = 0.12,
                     size: tuple[int, int] = (320, 180)) -> Path:
    """An mp4 of `n` real frames (resized) at `fps` with a 48 kHz stereo AAC track: a 200 Hz tone before `switch`
    seconds and a 1000 Hz tone after it, so that a cut can be checked by its frequency."""
    import av

    rate = 48000
    with av.open(str(path), 'w', format='mp4') as out:
        video = out.add_stream('libx264', rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], 'yuv420p'
        sound = out.add_stream('aac', rate=rate, layout='stereo')
        for i, p in enumerate(sorted(frames_dir.glob('*.jpeg'))[:n]):
            img = np.asarray(Image.open(p).convert('RGB').resize(size, Image.BILINEAR))
            frame = av.VideoFrame.from_ndarray(img, format='rgb24').reformat(format='yuv420p')
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in video.encode(frame):
                out.mux(packet)
        t = np.arange(round(rate * n / fps)) / rate
        tone = np.where(t < switch, np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
        for k in range(0, len(t), 1024):
            chunk = 0.3 * np.stack([tone[k:k + 1024]] * 2)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format='fltp', layout='stereo')
            frame.sample_rate, frame.pts, frame.time_base = rate, k, Fraction(1, rate)
            for packet in sound.encode(frame):
                out.mux(packet)
        for stream in (video, sound):
            for packet in stream.encode():
                out.mux(packet)
    return path


def decoded_sound(path: Path) -> tuple[np.ndarray, int] | None:
    """(mono samples, sample rate) of the first audio stream of `path`, or None when it has none."""
    import av

    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        stream = c.streams.audio[0]
        samples = [f.to_ndarray().reshape(f.layout.nb_channels if f.format.is_planar else 1, -1)[0]
                   for f in c.decode(stream)]
        return np.concatenate(samples), stream.codec_context.sample_rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_sound_follows_the_selected_frames(sample_video_dir: Path, test_videos_dir: Path, tmp_path: Path) -> None:
    video = video_with_sound(sample_video_dir, tmp_path / 'talk.mp4')
    src = FrameSource(video, start=3, max_num=5)  # frames 3..7: 0.12 s to 0.32 s, all after the tone switch
    clip = src.audio()  # decoded once: 0.2 s from 0.12 s, the 1000 Hz part only
    assert clip is not None and clip.rate == 48000 and clip.layout == 'stereo'
    assert clip.samples.shape == (2, round(0.2 * 48000)) and clip.duration == pytest.approx(0.2, abs=1e-6)
    assert dominant_hz(clip.samples[0], clip.rate) == pytest.approx(1000, abs=30)
    # streamed: the clip holds no samples, they come in decoder-sized pieces each time it is written
    assert not any(isinstance(v, np.ndarray) for v in vars(clip).values())
    assert max(c.shape[1] for c in clip.chunks()) <= 2048 and len(list(clip.chunks())) > 4
    out = write_video(tmp_path / 'out.mp4', list(src), src.rate, audio=clip)
    samples, rate = decoded_sound(out)
    assert rate == 48000 and 0.2 * rate <= len(samples) <= 0.2 * rate + 2048  # AAC pads to whole 1024-sample frames
    assert dominant_hz(samples[: int(0.2 * rate)], rate) == pytest.approx(1000, abs=30)
    whole = FrameSource(video)
    assert dominant_hz(decoded_sound(write_video(tmp_path / 'all.mp4', list(whole), whole.rate,
                                                 audio=whole.audio()))[0][:4800], 48000) == pytest.approx(200, abs=30)
    # no sound to carry: a silent video, a frame folder
    assert FrameSource(test_videos_dir / 'carphone.mp4', max_num=2).audio() is None
    assert FrameSource(sample_video_dir, max_num=2).audio() is None
    assert decoded_sound(write_video(tmp_path / 'silent.mp4', list(src), src.rate)) is None


# ---------------------------------------------------------------------------------------------------------------------
# Colour: tags that match the conversion, checked with an independent decoder (the ffmpeg program)


def _ffmpeg() -> str:
    """The ffmpeg program: Debian's (apt-get install ffmpeg), else imageio-ffmpeg's (requirements-dev.txt)."""
    import os
    import shutil

    exe = shutil.which('ffmpeg')
    if exe is None:
        try:
            import imageio_ffmpeg

            exe = imageio_ffmpeg.get_ffmpeg_exe()
        except (ImportError, RuntimeError):
            if os.environ.get('CI', '').lower() == 'true':
                pytest.fail('the colour test needs an ffmpeg program: pip install imageio-ffmpeg')
            pytest.skip('no ffmpeg program (pip install imageio-ffmpeg)')
    return exe


def _ffmpeg_decode(path: Path, size: tuple[int, int], *vf: str) -> np.ndarray:
    """Decode with the ffmpeg program (its own build of libavcodec/swscale, which reads the stream's colour tags)
    to RGB uint8 [N, H, W, 3]; `vf` adds a filter (e.g. forcing a matrix)."""
    import subprocess

    cmd = [_ffmpeg(), '-v', 'error', '-i', str(path), *(('-vf', *vf) if vf else ()), '-f', 'rawvideo',
           '-pix_fmt', 'rgb24', '-sws_flags', 'bicubic+accurate_rnd+full_chroma_int', '-']
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size[1], size[0], 3)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


SKIN, COLOURS = (224, 172, 140), [(224, 172, 140), (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128),
                                  (16, 16, 16), (250, 250, 250), (90, 60, 200)]


def test_written_colours_play_back_unchanged(tmp_path: Path) -> None:
    import av

    frames = [np.full((64, 96, 3), c, np.uint8) for c in COLOURS]
    out = write_video(tmp_path / 'solid.mp4', frames, 25, crf=0)
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        tags = (str(cc.color_primaries), str(cc.color_trc), str(cc.colorspace), str(cc.color_range))
    assert tags == ('1', '1', '1', '1')  # BT.709 primaries, transfer, matrix; limited range
    theirs = _ffmpeg_decode(out, (96, 64)).reshape(len(COLOURS), -1, 3).mean(1)
    ours = np.stack(list(FrameSource(out))).reshape(len(COLOURS), -1, 3).mean(1)
    for got in (theirs, ours):  # 8-bit limited-range YUV cannot hold every RGB: saturated ones may be 1 level off
        assert (np.abs(got - np.array(COLOURS)).mean(0) < 1.0).all(), got  # mean error per channel
        assert np.abs(got[0] - np.array(SKIN)).max() < 0.5, got[0]  # skin exact
    # The tags matter: a player that took these BT.709 pixels for BT.601 would show skin off by about 5 levels.
    as_601 = _ffmpeg_decode(out, (96, 64), 'scale=in_color_matrix=bt601').reshape(len(COLOURS), -1, 3).mean(1)
    assert np.abs(as_601[0] - np.array(SKIN)).max() > 3


def test_real_frames_lossless_round_trip(sample_video_dir: Path, test_videos_dir: Path, tmp_path: Path) -> None:
    hd = [read_image(p) for p in sorted(sample_video_dir.glob('*.jpeg'))[:2]]  # 1920x1080
    sd = list(FrameSource(test_videos_dir / 'sample_24f_540p.mp4', max_num=3))  # 960x540
    for name, frames in (('hd', hd), ('sd', sd)):
        out = write_video(tmp_path / f'{name}.mp4', frames, 25, crf=0)
        ref = np.stack(frames)
        theirs, ours = _ffmpeg_decode(out, ref.shape[2:0:-1]), np.stack(list(FrameSource(out)))
        for got in (theirs, ours):
            assert got.shape == ref.shape
            assert _psnr(got, ref) > 48, (name, _psnr(got, ref))
            assert np.abs(got.astype(float).mean((0, 1, 2)) - ref.mean((0, 1, 2))).max() < 1.0  # no colour shift


def test_sound_that_breaks_off_is_cut_there_with_a_warning(sample_video_dir: Path, tmp_path: Path) -> None:
    """Audio packets overwritten with noise: the clip ends at the first one that fails to decode (a warning saying
    where, the video is written), and sound that fails from the start gives a silent video and a warning."""
    import av

    video = video_with_sound(sample_video_dir, tmp_path / 'talk.mp4')  # 0.4 s of sound
    with av.open(str(video)) as c:
        packets = [(k.pos, k.size) for k in c.demux(c.streams.audio[0]) if k.size]
    for name, first_bad in (('late', 8), ('early', 0)):
        data = bytearray(video.read_bytes())
        for pos, size in packets[first_bad:]:
            data[pos:pos + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / f'{name}.mp4').write_bytes(data)
    src = FrameSource(tmp_path / 'late.mp4')
    clip = src.audio()
    with pytest.warns(UserWarning, match=r'late.mp4 stops at 0\.1\d s of the selected frames'):
        out = write_video(tmp_path / 'out.mp4', list(src), src.rate, audio=clip)
    samples, rate = decoded_sound(out)
    assert 0.1 * rate < len(samples) < 0.2 * rate + 2048 and read_video_info(out)[0] == len(src)
    with pytest.warns(UserWarning, match='early.mp4 cannot be read: the edited videos will be silent'):
        assert FrameSource(tmp_path / 'early.mp4').audio() is None


def _keyed_video(frames: list[np.ndarray], path: Path, options: dict[str, str]) -> Path:
    import av

    with av.open(str(path), 'w') as out:
        stream = out.add_stream('libx264', rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = 160, 96, 'yuv420p', options
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format='rgb24').reformat(format='yuv420p')
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize('gop', ['closed', 'open'])
def test_a_video_is_entered_at_the_key_frame_before_the_first_frame_wanted(gop: str, sample_video_dir: Path,
                                                                            tmp_path: Path) -> None:
    """iter_from / read start decoding at the last key frame at or before the frame asked for (the opening scan lists
    them): every start gives exactly the frames of a decode from the beginning, for closed GOPs and for open ones
    (whose leading B-frames need the GOP before), and the data before that key frame is never read."""
    import av

    frames = [np.asarray(Image.open(p).convert('RGB').resize((160, 96)))
              for p in sorted(sample_video_dir.glob('*.jpeg'))[:23]]
    options = {'g': '6', 'bf': '2', **({'x264-params': 'open-gop=1'} if gop == 'open' else {})}
    path = _keyed_video(frames, tmp_path / f'{gop}.mp4', options)
    src = FrameSource(path)
    assert [i for i, _ in src._keys] == [0, 6, 12, 18]
    whole = list(src)
    for k in range(len(whole)):
        got = list(src.iter_from(k))
        assert len(got) == len(whole) - k and all(np.array_equal(a, b) for a, b in zip(got, whole[k:])), k
    for i in (20, 3, 15, 16, 0):  # backwards too
        assert np.array_equal(src.read(i), whole[i]), i
    keys, src._keys = src._keys, [(0, 0), (6, src._keys[1][1] - 1)]  # a key frame not where the decoder finds one
    got = list(src.iter_from(9))  # it starts over from the beginning
    assert len(got) == 14 and all(np.array_equal(a, b) for a, b in zip(got, whole[9:]))
    src._keys = [(0, 0), (6, 10**9)]  # one the decoder never reaches
    got = list(src.iter_from(9))
    assert len(got) == 14 and all(np.array_equal(a, b) for a, b in zip(got, whole[9:]))
    src._keys = keys
    # spoil every packet stored before the third key frame: from there on nothing changes, from 0 it cannot decode
    with av.open(str(path)) as c:
        packets = [(k.pos, k.size, k.pts) for k in c.demux(c.streams.video[0]) if k.size]
    key = next(pos for pos, _, pts in packets if pts == src._keys[2][1])
    data = bytearray(path.read_bytes())
    for pos, size, _ in packets:
        if pos < key:
            data[pos + 4:pos + size] = bytes(size - 4)
    path.write_bytes(data)
    got = list(src.iter_from(12))
    assert len(got) == 11 and all(np.array_equal(a, b) for a, b in zip(got, whole[12:]))
    with pytest.raises(ValueError, match='cannot decode video'):
        list(src.iter_from(0))


def test_joined_segments_are_the_segments_frames_with_sound(sample_video_dir: Path, tmp_path: Path) -> None:
    """join_videos (the distributed edit's videos): the packets of consecutive segments copied into one mp4, so an
    independent decoder (the ffmpeg program) and ours get exactly the segments' frames, in order, evenly timed, with
    the colour tags and the sound of the whole clip."""
    import av

    frames = [np.asarray(Image.open(p).convert('RGB').resize((320, 180))) for p in
              sorted(sample_video_dir.glob('*.jpeg'))[:11]]
    cuts = [0, 4, 5, 11]  # segments of 4, 1 and 6 frames (x264 puts B-frames in the longer ones)
    parts = [write_video(tmp_path / f'part{k}.mp4', frames[a:b], 25) for k, (a, b) in enumerate(itertools.pairwise(cuts))]
    clip = FrameSource(video_with_sound(sample_video_dir, tmp_path / 'talk.mp4')).audio()  # 0.4 s: 200 then 1000 Hz
    out = join_videos(parts, tmp_path / 'joined.mp4', clip)
    want = np.concatenate([np.stack(list(FrameSource(p))) for p in parts])
    assert np.array_equal(np.stack(list(FrameSource(out))), want)
    assert np.array_equal(_ffmpeg_decode(out, (320, 180)), np.concatenate([_ffmpeg_decode(p, (320, 180))
                                                                           for p in parts]))
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        cc = v.codec_context
        assert (str(cc.color_primaries), str(cc.color_trc), str(cc.colorspace), str(cc.color_range)) == ('1',) * 4
        times = [f.time for f in c.decode(v)]
    assert np.allclose(np.diff(times), 1 / 25) and times[0] == 0
    samples, rate = decoded_sound(out)
    assert dominant_hz(samples[:4800], rate) == pytest.approx(200, abs=30)
    assert dominant_hz(samples[int(0.2 * rate):int(0.4 * rate)], rate) == pytest.approx(1000, abs=30)
    lossless = write_video(tmp_path / 'lossless.mp4', frames[:2], 25, crf=0)  # other H.264 parameter sets
    with pytest.raises(ValueError, match='lossless.mp4 was encoded with other settings'):
        join_videos([parts[0], lossless], tmp_path / 'mixed.mp4')
    assert not (tmp_path / 'mixed.mp4').exists() and not list(tmp_path.glob('.*'))  # no temporary file left


# ---------------------------------------------------------------------------------------------------------------------
# A video that ends before its declared frame count


def truncated_copy(src: Path, dest: Path, keep_packets: int) -> Path:
    """A faststart copy of `src` (index before the data) cut right after its first `keep_packets` packets: the
    container still declares every frame, but only the first few decode (like an interrupted download)."""
    import av

    full = dest.with_name('faststart.mp4')
    with av.open(str(src)) as i, av.open(str(full), 'w', format='mp4', options={'movflags': 'faststart'}) as o:
        stream = o.add_stream_from_template(i.streams.video[0])
        for packet in i.demux(i.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                o.mux(packet)
    with av.open(str(full)) as c:
        ends = [p.pos + p.size for p in c.demux(video=0) if p.size]
    dest.write_bytes(full.read_bytes()[: ends[keep_packets - 1]])
    return dest


def test_truncated_video_is_reported(test_videos_dir: Path, sample_video_dir: Path, tmp_path: Path) -> None:
    cut = truncated_copy(test_videos_dir / 'sample_24f_540p.mp4', tmp_path / 'cut.mp4', 6)
    with pytest.warns(UserWarning, match=r'declares 24 frames but only 6 decode'):
        src = FrameSource(cut)
    assert len(src) == 6 and len(list(src)) == 6
    assert src.decode_report() == {'frames_expected': 24, 'frames_decoded': 6, 'truncated': True}
    with pytest.raises(ValueError, match='declares 24 frames but only 6'):
        FrameSource(cut, strict=True)
    assert len(FrameSource(cut, max_num=4, strict=True)) == 4  # the selection ends before the cut: nothing lost
    whole = FrameSource(test_videos_dir / 'sample_24f_540p.mp4', strict=True)
    assert whole.decode_report() == {'frames_expected': 24, 'frames_decoded': 24, 'truncated': False}
    assert FrameSource(sample_video_dir, max_num=2).decode_report()['frames_expected'] is None  # a folder: nothing
