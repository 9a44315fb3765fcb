"""Shared test fixtures.

Tests that need `../shared` (parity fixtures, sample frames, test videos) skip when it is absent, except under
`CI=true`, where a missing folder is a failure: CI must never silently skip them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get('DVA_SHARED', ROOT.parent / 'shared'))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(f'{what} not found at {path}: CI must run this test (set the path or provide ../shared)')
        pytest.skip(f'{what} not found at {path}')
    return path


@pytest.fixture(scope='session')
def parity_dir() -> Path:
    """Folder of the parity fixtures (`DVA_PARITY_FIXTURES`, default ../shared/fixtures/official)."""
    return _require(Path(os.environ.get('DVA_PARITY_FIXTURES', SHARED / 'fixtures' / 'official')), 'parity fixtures')


@pytest.fixture(scope='session')
def parity(parity_dir: Path) -> dict:
    import torch

    return torch.load(parity_dir / 'fixtures.pt', weights_only=False)


@pytest.fixture(scope='session')
def parity_weights(parity_dir: Path, tmp_path_factory) -> Path:
    """The fixture weights written in the released file formats by the fixture folder's own make_weights.py.

    Layout under the returned root: pretrained_models/{model_ir_se50.pth, mobilenet_...pth.tar, 79999_iter.pth},
    checkpoints/diffusion_video_autoencoder/last.ckpt.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location('dva_make_weights', parity_dir / 'make_weights.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp('parity_weights')
    mod.write_weights(out, parity_dir)
    return out


@pytest.fixture(scope='session')
def sample_video_dir() -> Path:
    """100 real 1920x1080 JPEG frames of a talking face (read-only; never copy into the repo)."""
    return _require(SHARED / 'sample_video', 'sample video frames')


@pytest.fixture(scope='session')
def test_videos_dir() -> Path:
    """sample_24f_540p.mp4 (24 frames, 25 fps, 960x540) and carphone.mp4 (176x144, 120 frames, 29.97 fps)."""
    return _require(SHARED / 'test_videos', 'test videos')


def centre_crops(frames_dir: Path, dest: Path, n: int, size: int) -> Path:
    """The central squares of the first n sample frames (where the face is), resized to `size`, as dest/<stem>.png:
    stand-ins for aligned face crops."""
    from PIL import Image

    dest.mkdir(parents=True)
    for p in sorted(frames_dir.glob('*.jpeg'))[:n]:
        with Image.open(p) as im:
            img = im.convert('RGB')
        left = (img.width - img.height) // 2
        img.crop((left, 0, left + img.height, img.height)).resize((size, size), Image.LANCZOS).save(dest / f'{p.stem}.png')
    return dest


def parity_base_config(fx_cfg: dict):
    """The DVA config of a parity fixture set (sizes from its config; base channels come from the checkpoint)."""
    from dataclasses import replace

    import templates

    cfg = templates.diffusion_video_autoencoder()
    unet = replace(cfg.unet, image_size=fx_cfg['img_size'], channel_mult=tuple(fx_cfg['net_ch_mult']),
                   attention_resolutions=tuple(fx_cfg['net_attn']), embed_channels=fx_cfg['embed_channels'],
                   num_res_blocks=fx_cfg['num_res_blocks'], dropout=fx_cfg['dropout'])
    return replace(cfg, unet=unet)
