"""Throughput of one UNet forward (the unit of every DDIM step) per batch size, with counted FLOPs and memory.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/bench_unet.py --template tiny --batch_sizes 1,2,4,8 --json bench_unet.json

Random weights (the zero-initialised output layers re-initialised, so every layer does real work), no_grad, eval mode,
the pipeline's autocast (`cli.autocast`: fp16/bf16 on CUDA only, CPU always runs fp32). Each batch size gets
`--warmup` untimed forwards, then `--iters` timed ones (torch.cuda.synchronize around them on CUDA); the table shows
the median. FLOPs are counted with torch.utils.flop_counter on the meta device (2 per multiply-add).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    format_table,
    machine_info,
    forward_seconds,
    maxrss_mb,
    perturb_zero_init,
    setup_device,
    unet_flops_per_image,
)

COLUMNS = [
    ('batch', 'batch', 'd'),
    ('ms_per_forward', 'ms/forward', '.1f'),
    ('forwards_per_s', 'forwards/s', '.3f'),
    ('images_per_s', 'images/s', '.3f'),
    ('ms_per_image', 'ms/image', '.1f'),
    ('peak_mem_mb', 'peak MB', '.0f'),
    ('gflops_per_forward', 'GFLOP/fwd', '.1f'),
    ('achieved_tflops', 'TFLOP/s', '.4f'),
    ('mfu', 'of peak', '.3f'),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import templates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--template', default='tiny', choices=sorted(templates.PRESETS), help='network preset')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'),
                   help='autocast precision of the forward (CUDA only; CPU runs fp32 as the pipeline does)')
    p.add_argument('--batch_sizes', default='1,2,4,8,16', help='comma-separated batch sizes, run in increasing order')
    p.add_argument('--channels_last', action='store_true', help='NHWC weights (editing.speed.optimize_for_inference)')
    p.add_argument('--compile', action='store_true', help='torch.compile the UNet (first call per shape compiles)')
    p.add_argument('--compile_mode', default='max-autotune-no-cudagraphs',
                   help="torch.compile mode; 'default' for PyTorch's default")
    p.add_argument('--attention', choices=('sdpa', 'math'), default=None,
                   help="attention implementation (default: the template's, sdpa)")
    p.add_argument('--warmup', type=int, default=2, help='untimed forwards per batch size')
    p.add_argument('--iters', type=int, default=5, help='timed forwards per batch size')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: every core)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and with --json writes) {'config', 'machine', 'flops_per_image', 'rows'}."""
    args = parse_args(argv)
    import cli
    import templates
    from editing.speed import cuda_peak_tflops, optimize_for_inference
    from model.unet import UNet

    device = setup_device(args.device, args.threads)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(',') if b.strip()})
    if not batch_sizes or batch_sizes[0] < 1:
        raise SystemExit('--batch_sizes must list positive integers')
    precision = args.precision if device.type == 'cuda' else 'fp32'
    if precision != args.precision:
        print(f'note: --precision {args.precision} ignored on {device.type}: the pipeline runs fp32 there',
              file=sys.stderr)

    cfg = templates.get_preset(args.template)
    unet_cfg = replace(cfg.unet, attention=args.attention or cfg.unet.attention)
    z_dim = cfg.encoder.z_dim
    flops_per_image = unet_flops_per_image(unet_cfg, z_dim)

    torch.manual_seed(args.seed)
    model = perturb_zero_init(UNet(unet_cfg, z_dim), seed=args.seed).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rss_base = maxrss_mb()
    model = optimize_for_inference(model, device, channels_last=args.channels_last, compile=args.compile,
                                   compile_mode=None if args.compile_mode == 'default' else args.compile_mode)
    peak = cuda_peak_tflops(device, precision)  # type: ignore[arg-type]

    rows = []
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(args.seed + batch)
        size = unet_cfg.image_size
        x = torch.randn(batch, unet_cfg.in_channels, size, size, generator=g).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=g).to(device)
        z = torch.randn(batch, z_dim, generator=g).to(device)

        def forward(x: torch.Tensor = x, t: torch.Tensor = t, z: torch.Tensor = z) -> torch.Tensor:
            with cli.autocast(device, precision):
                return model(x, t, z)

        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            mem_base = torch.cuda.memory_allocated(device)
        times, out = forward_seconds(forward, device, args.warmup, args.iters)
        if not torch.isfinite(out).all():
            raise RuntimeError('the random network produced non-finite outputs; timings would not be representative')
        sec = statistics.median(times)
        if device.type == 'cuda':
            peak_mem = (torch.cuda.max_memory_allocated(device) - mem_base) / 2**20
        else:
            peak_mem = maxrss_mb() - rss_base  # growth of the process high-water mark (batches run in increasing order)
        flops = flops_per_image * batch
        achieved = flops / sec / 1e12
        rows.append({
            'batch': batch,
            'ms_per_forward': sec * 1e3,
            'ms_per_forward_min': min(times) * 1e3,
            'forwards_per_s': 1 / sec,
            'images_per_s': batch / sec,
            'ms_per_image': sec * 1e3 / batch,
            'peak_mem_mb': peak_mem,
            'flops_per_forward': flops,
            'gflops_per_forward': flops / 1e9,
            'achieved_tflops': achieved,
            'peak_tflops': peak,
            'mfu': achieved / peak if peak else None,
            'iters': len(times),
        })
        print(f'batch {batch}: {sec * 1e3:.1f} ms/forward', file=sys.stderr, flush=True)

    result = {
        'config': {
            'template': args.template, 'image_size': unet_cfg.image_size, 'attention': unet_cfg.attention,
            'precision': precision, 'precision_requested': args.precision, 'channels_last': args.channels_last,
            'compile': args.compile, 'compile_mode': args.compile_mode if args.compile else None,
            'warmup': args.warmup, 'iters': args.iters, 'params': n_params,
        },
        'machine': machine_info(device),
        'peak_tflops': peak,
        'flops_per_image': flops_per_image,
        'memory_measure': 'cuda max_memory_allocated above the weights' if device.type == 'cuda'
        else 'growth of ru_maxrss (process high-water mark) since the model was built',
        'rows': rows,
    }
    print(f"{args.template} UNet ({n_params / 1e6:.1f}M params, {unet_cfg.image_size}px, attention "
          f"{unet_cfg.attention}) on {result['machine']['device_name']} [{device}], {precision}, channels_last="
          f"{args.channels_last}, compile={args.compile}: {flops_per_image / 1e12:.4f} TFLOP per image"
          + (f', device peak {peak:g} TFLOP/s' if peak else ''))
    print(format_table(rows, COLUMNS))
    if args.json:
        cli.write_json(args.json, result)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
