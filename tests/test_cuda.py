"""The CUDA code paths: fp32 parity on the GPU, bf16 autocast, --batch_size auto, torch.compile, a whole edit.

Skipped without a GPU (CI has none). On a lent GPU machine run them with `bash bench/device_run.sh tests`, which
also carries the parity fixtures (DVA_PARITY_FIXTURES) and aligned sample crops (DVA_ALIGNED_FRAMES) there.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import templates
from bench.common import perturb_zero_init
from cli import autocast
from editing.speed import auto_batch_size, optimize_for_inference
from model.autoencoder import DiffusionVideoAutoencoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
CUDA = torch.device('cuda')


@pytest.fixture
def no_tf32():
    """Plain fp32 kernels, so GPU results can be held to the CPU/fixture tolerance."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny_model() -> DiffusionVideoAutoencoder:
    torch.manual_seed(0)
    return perturb_zero_init(DiffusionVideoAutoencoder(templates.tiny()), seed=0).eval()


def inputs(batch: int, size: int = 32, device: torch.device = CUDA):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    z = torch.randn(batch, 512, generator=g)
    return x.to(device), t.to(device), z.to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_fp32_gpu_unet_equals_cpu_and_bf16_stays_close(no_tf32):
    model = tiny_model()
    x, t, z = inputs(4, device=torch.device('cpu'))
    ref = model(x, t, z)
    gpu = optimize_for_inference(model, CUDA, channels_last=True)
    out = gpu(x.cuda(), t.cuda(), z.cuda())
    assert out.dtype == torch.float32
    assert (out.cpu() - ref).abs().max().item() < 1e-4
    with autocast(CUDA, 'bf16'):
        low = gpu(x.cuda(), t.cuda(), z.cuda())
    assert rel_err(low, ref) < 3e-2


@torch.no_grad()
def test_parity_fixture_noise_prediction_on_gpu(parity, parity_weights, no_tf32):
    from conftest import parity_base_config as base_config
    from model.pretrained import load_dva
    from test_parity import NET_TOL

    ckpt = parity_weights / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt'
    ema, _, _ = load_dva(ckpt, base_config(parity['config']), which='ema')
    ema = optimize_for_inference(ema, CUDA, channels_last=True)
    eps = ema(parity['x_t'].cuda(), parity['t'].cuda(), parity['z_face'].cuda())
    assert (eps.cpu() - parity['eps_ema']).abs().max().item() < NET_TOL
    id_feat = ema.encoder.identity(parity['x0'].cuda())
    assert (id_feat.cpu() - parity['id_feats']).abs().max().item() < NET_TOL


@torch.no_grad()
def test_auto_batch_size_fits_the_free_memory():
    model = tiny_model().to(CUDA)
    batch = auto_batch_size(model, 32, CUDA, 'bf16', max_batch=4096)
    assert 2 <= batch <= 4096
    torch.cuda.reset_peak_memory_stats(CUDA)
    free, _ = torch.cuda.mem_get_info(CUDA)
    base = torch.cuda.memory_allocated(CUDA)
    x, t, z = inputs(batch)
    with autocast(CUDA, 'bf16'):
        model(x, t, z)
    assert torch.cuda.max_memory_allocated(CUDA) - base <= free  # the planned batch really fits
    assert auto_batch_size(model, 32, CUDA, 'bf16', max_batch=3) == 3


@torch.no_grad()
def test_compiled_model_equals_eager_and_compiles_each_shape_once(no_tf32):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_model()
    x, t, z = inputs(4)
    ref = optimize_for_inference(model, CUDA, channels_last=True)(x, t, z)
    compiled = optimize_for_inference(model, CUDA, channels_last=True, compile=True, compile_mode=None)
    assert (compiled(x, t, z) - ref).abs().max().item() < 1e-3
    graphs = counters['stats']['unique_graphs']
    assert graphs >= 1  # the counter this test relies on exists in this torch version
    for _ in range(3):  # the sampling loop: same shapes, new values
        x, t, z = x + 0.1, (t + 7) % 1000, z * 0.9
        compiled(x, t, z)
    assert counters['stats']['unique_graphs'] == graphs


def aligned_frames(dest: Path, n: int = 4) -> Path:
    """Square face crops: DVA_ALIGNED_FRAMES (bench/device_prep.sh makes real ones), else the sample video's centre."""
    src = os.environ.get('DVA_ALIGNED_FRAMES')
    if src:
        return Path(src)
    from conftest import SHARED, centre_crops

    if not any((SHARED / 'sample_video').glob('*.jpeg')):
        pytest.skip('no aligned frames: set DVA_ALIGNED_FRAMES or provide ../shared/sample_video')
    return centre_crops(SHARED / 'sample_video', dest, n, 64)


def test_classifier_edit_on_gpu_bf16_with_auto_batch_matches_cpu(tmp_path):
    """The whole edit on the GPU (bf16, --batch_size auto, channels_last) against the same edit on the CPU in fp32.

    The random tiny network makes DDIM chaotic on single pixels, so the frames are compared on average (a sanity
    bound, not a measured tolerance: no GPU has run this yet); schedule maths in bf16, a wrong batch split or a lost
    conditioning move the mean by tens of grey levels."""
    import editing_classifier
    from bench.bench_edit import write_random_checkpoints

    dva, cls, _ = write_random_checkpoints(templates.tiny(), tmp_path, seed=0)
    video = aligned_frames(tmp_path / 'frames')
    outs = {}
    for device, precision, batch in (('cuda', 'bf16', 'auto'), ('cpu', 'fp32', '2')):
        out = tmp_path / f'out_{device}'
        summary = editing_classifier.main([
            '--video_path', str(video), '--max_num', '4', '--aligned', '--checkpoint', str(dva), '--template', 'tiny',
            '--cls_checkpoint', str(cls), '--T', '10', '--device', device, '--precision', precision,
            '--batch_size', batch, '--attribute', 'Smiling', '--scale', '0.5', '--out', str(out), '--no_cache',
            '--quiet'])
        assert summary['frames'] == 4
        outs[device] = np.stack([np.asarray(Image.open(p)).astype(np.float64)
                                 for p in sorted((out / 'Smiling_0.50' / 'frames').glob('*.png'))])
    assert outs['cuda'].shape == outs['cpu'].shape
    assert np.abs(outs['cuda'] - outs['cpu']).mean() < 8.0


def test_fp16_mixed_training_on_gpu_uses_the_grad_scaler(tmp_path):
    """The paper's training precision ('16-mixed': fp16 autocast + GradScaler, clipping after the unscale)."""
    import training
    from conftest import SHARED
    from test_training import CPU, make_clip_root

    frames = os.environ.get('DVA_ALIGNED_FRAMES')
    src = Path(frames) if frames else SHARED / 'sample_video'
    if not any(src.glob('*.jp*g')):
        pytest.skip('no frames: set DVA_ALIGNED_FRAMES or provide ../shared/sample_video')
    root = make_clip_root(tmp_path / 'clips', src)
    cfg = templates.tiny()
    cfg = replace(cfg, data=replace(cfg.data, root=str(root)),
                  train=replace(cfg.train, max_steps=3, ckpt_every=3, sample_every=3, precision='16-mixed'))
    module = training.run_training(cfg, tmp_path / 'run', random_encoders=True,
                                   trainer_kwargs={**CPU, 'accelerator': 'gpu'})
    trainer = module.trainer
    assert trainer.precision == '16-mixed' and trainer.precision_plugin.scaler is not None
    losses = {k: v for k, v in trainer.callback_metrics.items() if 'loss' in k}
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sd = torch.load(tmp_path / 'run' / 'last.ckpt', map_location='cpu', weights_only=True)['state_dict']
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
    assert (tmp_path / 'run' / 'samples' / 'step=0000003.png').is_file()


@torch.no_grad()
def test_fp64_on_gpu_equals_fp64_on_cpu(no_tf32):
    """--precision fp64 on CUDA: the float64 UNet gives the CPU's noise prediction up to float64 rounding."""
    from editing.core import conditioned_eps

    cfg = templates.tiny()
    model = DiffusionVideoAutoencoder(cfg).eval().double()
    perturb_zero_init(model, seed=0)
    x = torch.randn(2, 3, cfg.unet.image_size, cfg.unet.image_size, dtype=torch.float64)
    t, z = torch.tensor([10, 900]), torch.randn(2, cfg.encoder.z_dim, dtype=torch.float64)
    cpu = conditioned_eps(model, z, 'fp64')(x, t)
    gpu = conditioned_eps(model.to(CUDA), z.to(CUDA), 'fp64')(x.to(CUDA), t.to(CUDA))
    assert gpu.dtype == torch.float64 and (gpu.cpu() - cpu).abs().max().item() < 1e-10
