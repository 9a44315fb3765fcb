"""Small faces end to end: editing carphone.mp4 (176x144, faces of about 50 px, below dlib's 80 px detection window)
with the classifier script, the tiny preset and random weights. Detection needs the upsampling retry of
`faces.DlibDetector` (tests/test_faces.py shows that it finds no face at upsampling 0)."""
from __future__ import annotations

import numpy as np
import pytest

import editing_classifier
import templates
from video_io import read_video_info

N_FRAMES = 4


def test_classifier_edit_of_a_small_face_video(test_videos_dir, tmp_path):
    pytest.importorskip('dlib')
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.tiny(), tmp_path / 'weights', seed=0)
    out, cache = tmp_path / 'out', tmp_path / 'cache'
    summary = editing_classifier.main([
        '--video_path', str(test_videos_dir / 'carphone.mp4'), '--cls_checkpoint', str(cls), '--checkpoint', str(dva),
        '--template', 'tiny', '--T', '5', '--device', 'cpu', '--max_num', str(N_FRAMES), '--attribute', 'Smiling',
        '--scale', '0.5', '--out', str(out), '--cache_dir', str(cache), '--quiet'])
    assert summary['frames'] == N_FRAMES
    n, fps, size = read_video_info(out / 'Smiling_0.50' / 'out.mp4')
    assert (n, round(fps), size) == (N_FRAMES, 30, (176, 144))

    aligned = next(cache.glob('align-*'))
    assert np.load(aligned / 'missing.npy').tolist() == []  # every frame's face was detected, none interpolated
    quads = np.load(aligned / 'quads.npy')
    side = np.linalg.norm(quads[:, 3] - quads[:, 0], axis=1)
    assert ((quads.mean(axis=1) > 0) & (quads.mean(axis=1) < [176, 144])).all() and ((side > 40) & (side < 150)).all()
