"""Evaluation that reproduces the paper's tables: reconstruction (SSIM, MS-SSIM, LPIPS, MSE) and TL-ID / TG-ID.

    python run_metrics.py recon --data datasets/voxceleb1 --T 100 --ssim_border zero --out results/recon
    python run_metrics.py consistency --source editing_classifier/sample_video/crops \\
        --edit editing_classifier/sample_video/Mustache_0.30/blend --out results/consistency

The work is done by evaluation.py (see its docstring) and the files are written by reporting.py: report.md,
metrics.csv, frames.csv, plot.png and config.json (last) in --out. See docs/reproducing.md.
"""
from __future__ import annotations

import argparse
from typing import Any

import cli
import evaluation as ev
import reporting


def run_recon(args: argparse.Namespace) -> dict[str, Any]:
    """Under torchrun, whole videos are spread across the ranks and rank 0 writes the report."""
    from editing import distributed
    from editing.api import check_T

    check_T(args.T)
    available, frames = ev.select_videos(args.data, args.split, args.num_videos, args.seed, args.frames_per_video)
    reporting.check_out(args.out, args.overwrite)
    lpips, lpips_source = ev.load_lpips('none' if args.no_lpips else 'random' if args.random_lpips else 'pretrained',
                                        args.lpips_dir)
    editor, ranks, cfg, meta = ev.recon_editor(args.checkpoint, args.template, args.T, args.batch_size, args.device,
                                               args.precision, args.quiet, args.trust_checkpoint)
    out, ckpt = reporting.prepare_out(args.out, args.overwrite) if ranks.main else args.out, editor.checkpoint
    device, S = editor.device, cfg.unet.image_size
    print(f'{len(frames)} of {available} videos (seed {args.seed}), {sum(map(len, frames.values()))} frames, '
          f'T={args.T}, {S}x{S}, device {device}; checkpoint {ckpt}')
    if lpips is not None:
        lpips.to(device)
    try:
        result = ev.evaluate_recon(editor, frames, lpips, args.ssim_border, progress=not args.quiet, ranks=ranks)
    finally:
        editor.close()
    if not ranks.main:
        distributed.close()
        return result
    settings = {'checkpoint': str(ckpt), 'global_step': meta.get('global_step'), 'config': cfg.name, 'image_size': S,
                'T': args.T, 'network_calls_per_frame': 2 * args.T - 1, 'data': str(args.data), 'split': args.split,
                'seed': args.seed, 'num_videos': args.num_videos, 'videos': list(frames), 'videos_available': available,
                'frames_per_video': {v: len(f) for v, f in frames.items()}, 'frames': len(result['per_frame']),
                'lpips': lpips_source, 'ssim_border': args.ssim_border, 'device': str(device),
                'precision': args.precision, 'batch_size': args.batch_size, 'ranks': ranks.world}
    distributed.close()
    reporting.write_recon(out, result, settings, {'subcommand': 'recon', 'command': cli.command_line(),
                                                  'args': vars(args)})
    print(reporting.summary_line(result['mean']) + f'\nwrote {out}/report.md')
    return {**result, 'out': out, 'settings': settings}


def run_consistency(args: argparse.Namespace) -> dict[str, Any]:
    if args.embedder == 'dlib' and (args.checkpoint or args.random_encoder):
        raise SystemExit('--checkpoint and --random_encoder choose ArcFace weights; not for --embedder dlib')
    pairs = ev.match_frames(args.source, args.edit)
    reporting.check_out(args.out, args.overwrite)
    device = cli.resolve_device(args.device) if args.embedder == 'arcface' else 'cpu'
    embedder, source, device = ev.make_embedder(args.embedder, device, args.batch_size, args.template, args.checkpoint,
                                                args.pretrained_dir, args.random_encoder, args.trust_checkpoint)
    out = reporting.prepare_out(args.out, args.overwrite)
    cli.set_cpu_threads()
    print(f'{len(pairs)} frames; embedder: {source}')
    src, edit = ([p[k] for p in pairs] for k in (1, 2))
    sc = ev.consistency_scores(ev.embed_files(embedder, src, progress=not args.quiet, desc='embed source'),
                               ev.embed_files(embedder, edit, progress=not args.quiet, desc='embed edit'))
    settings = {'source': str(args.source), 'edit': str(args.edit), 'frames': len(pairs), 'embedder': args.embedder,
                'embedder_weights': source, 'device': str(device)}
    scalars = reporting.write_consistency(out, [p[0] for p in pairs], sc, settings, {
        'subcommand': 'consistency', 'command': cli.command_line(), 'args': vars(args)})
    print(f'TL-ID {sc["tl_id"]:.4f}   TG-ID {sc["tg_id"]:.4f}   ({len(pairs)} frames)\nwrote {out}/report.md')
    return {**scalars, 'out': out, 'settings': settings}


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
    args = build_parser().parse_args(argv)
    for flag in ('batch_size', 'num_videos', 'frames_per_video'):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SystemExit(f'--{flag} must be at least 1, got {value}')
    from editing.api import EditError

    try:
        return run_recon(args) if args.command == 'recon' else run_consistency(args)
    except (ev.EvaluationError, FileExistsError, EditError) as e:
        raise SystemExit(str(e)) from None


if __name__ == '__main__':
    main()
