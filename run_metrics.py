"""Evaluation that reproduces the paper's tables: reconstruction (SSIM, MS-SSIM, LPIPS, MSE) and TL-ID / TG-ID.

    python run_metrics.py recon --data datasets/voxceleb1 --T 100 --ssim_border zero --out results/recon
    python run_metrics.py consistency --source editing_classifier/sample_video/crops \\
        --edit editing_classifier/sample_video/Mustache_0.30/blend --out results/consistency

The command line of evaluation.run_recon / run_consistency (the same runs from Python); reporting.py writes report.md,
metrics.csv, frames.csv, plot.png and config.json (last) in --out. Under torchrun, recon spreads whole videos over the
ranks. See docs/reproducing.md.
"""
from __future__ import annotations

import argparse
from typing import Any

import cli
import evaluation as ev


def build_parser() -> argparse.ArgumentParser:
    import templates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser('recon', help='reconstruction metrics (paper: SSIM, MS-SSIM, LPIPS, MSE at T=100)',
                       formatter_class=fmt)
    r.add_argument('--data', default='datasets/voxceleb1', help='dataset root holding {split}/<video>/<aligned frames>')
    r.add_argument('--split', default='test')
    r.add_argument('--num_videos', type=int, default=20, help='videos drawn at random (all if fewer)')
    r.add_argument('--seed', type=int, default=0, help='seed of the video choice (from the sorted video list)')
    r.add_argument('--frames_per_video', type=int, help='at most this many frames per video, evenly spaced (all)')
    r.add_argument('--T', type=int, default=100, help='DDIM steps for inversion and rendering (a valid ddimN count)')
    r.add_argument('--checkpoint', help='DVA checkpoint (default checkpoints/diffusion_video_autoencoder/'
                                        'epoch=51-step=1000000.ckpt, else last.ckpt there)')
    r.add_argument('--batch_size', type=int, default=8, help='frames per network batch')
    cli.add_device_args(r)
    r.add_argument('--ssim_border', choices=('valid', 'zero'), default='valid',
                   help="SSIM map only where the window fits (valid, skimage's) or zero-padded (zero, the released "
                        "evaluation's, about 0.005 higher near 0.92: use it to compare with the paper)")
    r.add_argument('--lpips_dir', default='pretrained_models',
                   help='folder holding alexnet-owt-7be5be79.pth (else the torch hub cache is searched)')
    lp = r.add_mutually_exclusive_group()
    lp.add_argument('--no_lpips', action='store_true', help='skip LPIPS (when the AlexNet weights are absent)')
    lp.add_argument('--random_lpips', action='store_true', help='LPIPS with random weights (tests only)')
    c = sub.add_parser('consistency', help='temporal identity consistency TL-ID / TG-ID of an edit',
                       formatter_class=fmt)
    c.add_argument('--source', required=True, help='aligned source crops, e.g. editing_classifier/<video>/crops')
    c.add_argument('--edit', required=True, help='aligned edited crops with the same file stems, '
                                                 'e.g. editing_classifier/<video>/<edit>/blend')
    c.add_argument('--embedder', choices=('arcface', 'dlib'), default='arcface',
                   help="arcface: the IR-SE50 identity encoder; dlib: dlib's face-recognition ResNet (offline)")
    c.add_argument('--pretrained_dir', default='pretrained_models', help='folder holding model_ir_se50.pth (arcface)')
    w = c.add_mutually_exclusive_group()
    w.add_argument('--checkpoint', help="take ArcFace from this DVA checkpoint's EMA encoder instead")
    w.add_argument('--random_encoder', action='store_true', help='ArcFace with random weights (tests only)')
    c.add_argument('--batch_size', type=int, default=16, help='crops per ArcFace batch')
    c.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (arcface only; dlib runs on the CPU)')
    for q, name in ((r, 'recon'), (c, 'consistency')):
        q.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(templates.PRESETS),
                       help='network preset for checkpoints that carry no config (released ones)')
        q.add_argument('--trust_checkpoint', action='store_true', help='allow full unpickling of the checkpoint')
        q.add_argument('--out', default=f'results/{name}', help='output folder')
        q.add_argument('--overwrite', action='store_true', help='replace an existing report in --out')
        q.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    kw = vars(build_parser().parse_args(argv))
    command = kw.pop('command')
    if command == 'recon':
        no_lpips, random_lpips = kw.pop('no_lpips'), kw.pop('random_lpips')
        kw['lpips'] = 'none' if no_lpips else 'random' if random_lpips else 'pretrained'
    from editing.api import EditError

    try:
        return (ev.run_recon if command == 'recon' else ev.run_consistency)(**kw)
    except (ev.EvaluationError, FileExistsError, EditError) as e:
        raise SystemExit(str(e)) from None


if __name__ == '__main__':
    main()
