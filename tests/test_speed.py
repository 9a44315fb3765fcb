from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import templates
from editing.speed import (
    CPU_BATCH_SIZE,
    auto_batch_size,
    chunked,
    cuda_peak_tflops,
    micro_batch_size,
    optimize_for_inference,
)
from model.unet import UNet

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'bench_{name}', ROOT / 'bench' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def tiny_unet():
    from bench.common import perturb_zero_init

    torch.manual_seed(0)
    cfg = templates.tiny()
    return perturb_zero_init(UNet(cfg.unet, z_dim=cfg.encoder.z_dim)).eval(), cfg


def test_auto_batch_size_on_cpu_is_the_documented_value(tiny_unet):
    model, cfg = tiny_unet
    cpu = torch.device('cpu')
    assert auto_batch_size(model, cfg.unet.image_size, cpu, 'fp32') == CPU_BATCH_SIZE == 4
    assert auto_batch_size(model, cfg.unet.image_size, cpu, 'fp32', max_batch=2) == 2
    assert auto_batch_size(model, cfg.unet.image_size, cpu, 'fp32', max_batch=1) == 1
    with pytest.raises(ValueError):
        auto_batch_size(model, cfg.unet.image_size, cpu, 'fp32', max_batch=0)


def test_peak_tflops_unknown_on_cpu():
    assert cuda_peak_tflops(torch.device('cpu')) is None
    assert cuda_peak_tflops('cpu', 'fp32') is None


def test_perturbed_weights_do_real_work(tiny_unet):
    """The zero-initialised layers are re-initialised, so the benchmark's network is not the identity on its skips."""
    model, cfg = tiny_unet
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        assert not params or any(p.any() for p in params), module
    x = torch.randn(2, 3, cfg.unet.image_size, cfg.unet.image_size)
    with torch.no_grad():
        eps = model(x, torch.tensor([10, 900]), torch.randn(2, cfg.encoder.z_dim))
    assert torch.isfinite(eps).all() and eps.abs().mean() > 1e-2


def test_optimize_for_inference_channels_last_keeps_outputs(tiny_unet):
    model, cfg = tiny_unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, cfg.unet.image_size, cfg.unet.image_size, generator=g)
    t = torch.tensor([3, 700])
    z = torch.randn(2, cfg.encoder.z_dim, generator=g)
    with torch.no_grad():
        ref = model(x, t, z).clone()
        fast = optimize_for_inference(model, torch.device('cpu'), channels_last=True)
        assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = fast(x, t, z)
        out_nhwc = fast(x.contiguous(memory_format=torch.channels_last), t, z)
    assert not fast.training
    assert (out - ref).abs().max() < 1e-5 and (out_nhwc - ref).abs().max() < 1e-5
    model.to(memory_format=torch.contiguous_format)


def test_chunked_forward_equals_batched(tiny_unet):
    model, cfg = tiny_unet
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, cfg.unet.image_size, cfg.unet.image_size, generator=g)
    t = torch.tensor([0, 400, 999])
    z = torch.randn(3, cfg.encoder.z_dim, generator=g)
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return model(*args)

    with torch.no_grad():
        ref = model(x, t, z)
        for chunk, expected in ((1, [1, 1, 1]), (2, [2, 1]), (3, [3]), (None, [3])):
            calls.clear()
            out = chunked(counted, chunk)(x, t, z)
            assert calls == expected
            assert (out - ref).abs().max() < 1e-5
        assert chunked(model, 1)(x, t, None).shape == ref.shape  # None passes through
    with pytest.raises(ValueError):
        chunked(model, 0)


def test_micro_batch_rule():
    assert micro_batch_size('cpu', 256) == 1
    assert micro_batch_size('cpu', 32) is None
    assert micro_batch_size(torch.device('cuda'), 256) is None


def test_bench_unet_writes_json(tmp_path):
    bench_unet = load_script('bench_unet')
    out = tmp_path / 'unet.json'
    result = bench_unet.main(['--template', 'tiny', '--device', 'cpu', '--batch_sizes', '2', '--warmup', '0',
                              '--iters', '1', '--json', str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=str))
    assert {'config', 'machine', 'flops_per_image', 'peak_tflops', 'rows'} <= set(data)
    (row,) = data['rows']
    assert {'batch', 'ms_per_forward', 'forwards_per_s', 'images_per_s', 'peak_mem_mb', 'flops_per_forward',
            'achieved_tflops', 'peak_tflops', 'mfu'} <= set(row)
    assert row['batch'] == 2 and row['flops_per_forward'] == 2 * data['flops_per_image'] > 0
    assert row['ms_per_forward'] > 0 and row['peak_tflops'] is None and row['mfu'] is None
    assert data['config']['template'] == 'tiny' and data['machine']['device'] == 'cpu'


def test_bench_edit_counts_unet_calls_and_writes_json(tmp_path, sample_video_dir):
    """A cold edit costs (T-1) + T UNet calls per frame, a warm one T (issue #6); stages, memory and throughput are
    reported. Counts only: tests never time things."""
    bench_edit = load_script('bench_edit')
    out = tmp_path / 'edit.json'
    result = bench_edit.main(['--template', 'tiny', '--device', 'cpu', '--T', '5', '--max_num', '2', '--no-check_target',
                              '--video_path', str(sample_video_dir), '--work_dir', str(tmp_path / 'work'),
                              '--json', str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=str))
    cold, warm = data['runs']['cold'], data['runs']['warm']
    assert cold['unet_calls_per_frame'] == cold['unet_calls_per_frame_expected'] == 4 + 5
    assert warm['unet_calls_per_frame'] == warm['unet_calls_per_frame_expected'] == 5
    assert {'decode', 'align', 'crop', 'encode', 'invert', 'render', 'paste', 'write'} <= set(cold['seconds'])
    assert 'invert' not in warm['seconds'] and warm['cache_hits'] == {'align': True, 'invert': True}
    assert cold['peak_mem_mb'] > 0 and data['unet_throughput']['flops_per_forward'] > 0
    assert 'cuda_target' not in data and not (tmp_path / 'work').exists()  # the work folder is removed


def test_counted_flops_match_the_convolution_arithmetic():
    """The meta-device count of a one-conv 'network' equals 2 * C_out * C_in * k^2 * H * W."""
    from bench.common import count_flops

    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 16, 16)
    assert count_flops(lambda: conv(x)) == 2 * 8 * 3 * 9 * 16 * 16
