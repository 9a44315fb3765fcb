"""DPM-Solver++(2M) against DDIM as the decoder (render) of the editing pipeline: accuracy and time per network call.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/bench_decoder.py --problem gaussian tiny --T 100 --steps 5,10,20,50,100 --json bench_decoder.json

The pipeline inverts every frame with DDIM on the `--T` grid (x_T at t = the grid's last timestep, e.g. 990 for T=100)
and renders each edit from that x_T. Two measurements per problem and step count:

- ODE error: from x_T, the render against the exact solution of the probability-flow ODE, so the error is the
  solver's alone. 'gaussian': data N(mu, s^2 I), whose eps and ODE solution are closed-form. 'tiny': the tiny preset
  UNet with random weights (an arbitrary but smooth eps field; the reference is DDIM over EVERY timestep from x_T
  down to 0, i.e. up to ~1000 calls).
- reconstruction: DDIM-invert data x0 on the --T grid, render back, PSNR against x0 (what the edit at scale 0 shows).
  DDIM at the full --T grid is the inversion's own discretisation run backwards; other decoders are not.

PSNR uses the [-1,1] range (peak-to-peak 2). Methods: 'ddim' (ddim_sample on the solver's grid), 'dpm++2m' (time-uniform
grid) and 'dpm++2m-logsnr' (grid uniform in log-SNR), all with `steps` network calls. Times are wall seconds per render.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table, machine_info, perturb_zero_init, setup_device

METHODS = ('ddim', 'dpm++2m', 'dpm++2m-logsnr')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--problem', nargs='+', choices=('gaussian', 'tiny'), default=['gaussian'],
                   help='gaussian: seconds; tiny: ~1000 reference UNet calls (13 min on 2 busy CPU cores)')
    p.add_argument('--T', type=int, default=100, help='the inversion grid (--T of the editing scripts)')
    p.add_argument('--steps', default='5,10,20,50,100', help='decoder network calls to compare (each <= T)')
    p.add_argument('--batch', type=int, default=2, help='images per problem')
    p.add_argument('--mu', type=float, default=0.3, help='gaussian: data mean')
    p.add_argument('--s', type=float, default=0.5, help='gaussian: data standard deviation')
    p.add_argument('--device', default='cpu')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None)
    return p.parse_args(argv)


def psnr(x: Tensor, ref: Tensor) -> float:
    mse = (x.double() - ref.double()).pow(2).mean().item()
    return float('inf') if mse == 0 else 10 * math.log10(4.0 / mse)


def rmse(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()


def decoders(schedule: Any) -> dict[str, Callable[[Callable, Tensor, int, bool], Tensor]]:
    from diffusion import NoiseSchedule, ddim_sample
    from diffusion.dpm_solver import dpm_solver_sample, solver_indices

    def ddim(eps_fn, x_T, steps, clip):
        keep = sorted(solver_indices(schedule, steps))
        return ddim_sample(eps_fn, x_T, NoiseSchedule(schedule.alpha_bar[keep], schedule.timesteps[keep]), clip=clip)

    return {
        'ddim': ddim,
        'dpm++2m': lambda eps_fn, x_T, steps, clip: dpm_solver_sample(eps_fn, x_T, schedule, steps, clip=clip),
        'dpm++2m-logsnr': lambda eps_fn, x_T, steps, clip: dpm_solver_sample(eps_fn, x_T, schedule, steps, clip=clip,
                                                                             spacing='logsnr'),
    }


def make_problem(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """eps_fn, data x0 [B,C,H,W] in [-1,1], a start x_T at the grid's top, and the ODE solution from that x_T."""
    from diffusion import NoiseSchedule, ddim_sample

    full = NoiseSchedule.linear()
    schedule = full.respace(args.T)
    top = int(schedule.timesteps[-1])
    a_top = float(full.alpha_bar[top])
    g = torch.Generator().manual_seed(args.seed)
    if name == 'gaussian':
        mu, s = args.mu, args.s

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            a = full.at(t, x_t)
            return ((1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s * s + 1 - a)).to(x_t.dtype)

        shape = (args.batch, 3, 32, 32)
        x0 = (mu + s * torch.randn(shape, generator=g)).clamp(-1, 1).to(device)
        x_T = (a_top**0.5 * mu + (a_top * s * s + 1 - a_top) ** 0.5 * torch.randn(shape, generator=g)).to(device)
        start = time.perf_counter()
        reference = mu + s / (a_top * s * s + 1 - a_top) ** 0.5 * (x_T - a_top**0.5 * mu)
        ref_calls, clip = 0, False
    else:
        import templates
        from model.unet import UNet

        cfg = templates.tiny()
        torch.manual_seed(args.seed)
        model = perturb_zero_init(UNet(cfg.unet, cfg.encoder.z_dim), seed=args.seed).eval().to(device)
        z = torch.randn(args.batch, cfg.encoder.z_dim, generator=g).to(device)

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return model(x_t, t, z)

        size = cfg.unet.image_size
        low = torch.rand(args.batch, 3, size // 8, size // 8, generator=g) * 1.6 - 0.8
        x0 = torch.nn.functional.interpolate(low, size=(size, size), mode='bicubic', align_corners=False)
        x0 = x0.clamp(-1, 1).to(device)
        x_T = torch.randn(args.batch, 3, size, size, generator=g).to(device)
        fine = NoiseSchedule(full.alpha_bar[: top + 1], full.timesteps[: top + 1])
        start = time.perf_counter()
        reference = ddim_sample(eps_fn, x_T, fine)
        ref_calls, clip = top + 1, True
    return {'eps_fn': eps_fn, 'x0': x0, 'x_T': x_T, 'reference': reference, 'schedule': schedule, 'clip': clip,
            'ref_calls': ref_calls, 'ref_seconds': time.perf_counter() - start, 'top_t': top}


def run_problem(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from diffusion import ddim_invert

    prob = make_problem(name, args, device)
    eps_fn, schedule, clip = prob['eps_fn'], prob['schedule'], prob['clip']
    x_T_data = ddim_invert(eps_fn, prob['x0'], schedule, clip=clip)
    rows = []
    for steps in sorted({min(int(s), args.T) for s in args.steps.split(',') if s.strip()}):
        for method, decode in decoders(schedule).items():
            start = time.perf_counter()
            out = decode(eps_fn, prob['x_T'], steps, clip)
            seconds = time.perf_counter() - start
            recon = decode(eps_fn, x_T_data, steps, clip)
            rows.append({'problem': name, 'T': args.T, 'steps': steps, 'method': method,
                         'rmse_vs_ode': rmse(out, prob['reference']), 'psnr_vs_ode': psnr(out, prob['reference']),
                         'recon_psnr': psnr(recon, prob['x0']), 'seconds': seconds})
        print(f'{name}: {steps} steps done', file=sys.stderr, flush=True)
    for r in rows:
        r['reference'] = ('closed form' if name == 'gaussian'
                          else f'DDIM, {prob["ref_calls"]} calls from t={prob["top_t"]}')
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import cli

    device = setup_device(args.device)
    with torch.no_grad():
        rows = [r for name in args.problem for r in run_problem(name, args, device)]
    cols = [('problem', 'problem', 's'), ('steps', 'calls', 'd'), ('method', 'decoder', 's'),
            ('rmse_vs_ode', 'RMSE vs ODE', '.2e'), ('psnr_vs_ode', 'PSNR vs ODE', '.1f'),
            ('recon_psnr', 'recon PSNR', '.1f'), ('seconds', 'seconds', '.3f')]
    print(f'decoders from x_T at the top of the T={args.T} grid (PSNR in dB, range [-1,1])')
    print(format_table(rows, cols))
    result = {'config': vars(args), 'machine': machine_info(device), 'rows': rows}
    if args.json:
        cli.write_json(args.json, result)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
