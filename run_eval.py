"""Identity statistics (latent.pkl) over EVERY frame of a split: z_id of each frame with the frozen ArcFace net.

    python run_eval.py --checkpoint checkpoints/diffusion_video_autoencoder/last.ckpt --data datasets/voxceleb1
    python run_eval.py --pretrained_dir pretrained_models --data datasets/voxceleb1 --split test

Output (released format, torch.save despite the name): {'conds' [N,512] float32, 'conds_mean' [512], 'conds_std'
[512] (unbiased)}, plus latent.json next to it (videos, frames, weights, config). Videos and frames are taken in
natural order; frames are loaded like the training set (Resize + CenterCrop to the model's image size, [-1,1]).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from config import apply_overrides, to_dict
from templates import PRESETS, get_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', help='DVA checkpoint (released or ours): its EMA identity encoder is used')
    src.add_argument('--pretrained_dir', help='folder holding model_ir_se50.pth (the only weights the stats need)')
    src.add_argument('--random_encoder', action='store_true', help='random identity weights (tests only)')
    p.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(PRESETS),
                   help='config when the checkpoint carries none (image size, default output name)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    p.add_argument('--data', help='dataset root holding {train,test}/<video>/<frames> (default: data.root)')
    p.add_argument('--split', default='test', choices=('test', 'train'))
    p.add_argument('--out', help='output file (default: checkpoints/<name>/latent.pkl)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    p.add_argument('--max_frames_per_video', type=int, help='at most N frames per video, evenly spaced (default: all)')
    p.add_argument('--batch_size', type=int, help='frames per batch (default: data.eval_batch_size)')
    p.add_argument('--num_workers', type=int, help='data loading processes (default: data.num_workers)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--trust_checkpoint', action='store_true', help='allow full unpickling of the checkpoint')
    args = p.parse_args(argv)

    import identity
    from cli import resolve_device, software_versions, torch_save, write_json
    from dataset import list_videos
    from model.pretrained import WeightsError, load_identity_encoder

    try:
        base = apply_overrides(get_preset(args.template), args.overrides)
        net, source, cfg = load_identity_encoder(base, checkpoint=args.checkpoint, pretrained_dir=args.pretrained_dir,
                                                     random=args.random_encoder, trust=args.trust_checkpoint)
    except (KeyError, TypeError, ValueError, WeightsError) as e:
        raise SystemExit(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from e
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, root=args.data))
    out = Path(args.out or Path('checkpoints') / cfg.name / 'latent.pkl')
    if out.exists() and not args.overwrite:
        raise SystemExit(f'{out} already exists; pass --overwrite to replace it or choose another --out')
    try:
        videos = list_videos(cfg.data.root, args.split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'--data: {e}') from e
    frames = {name: identity.select_frames(paths, args.max_frames_per_video) for name, paths in videos}
    paths = [f for name in frames for f in frames[name]]
    print(f'{len(paths)} frames of {len(frames)} videos in {Path(cfg.data.root) / args.split}; weights: {source}')

    device = resolve_device(args.device)
    dataset = identity.FrameFiles(paths, cfg.unet.image_size)
    conds, _ = identity.identity_features(
        net, dataset, batch_size=args.batch_size or cfg.data.eval_batch_size, device=device,
        num_workers=cfg.data.num_workers if args.num_workers is None else args.num_workers)
    stats = identity.identity_stats(conds)
    torch_save(stats, out)
    write_json(out.with_suffix('.json'), {
        'file': out.name, 'split': args.split, 'data': str(cfg.data.root), 'videos': len(frames),
        'frames': len(paths), 'frames_per_video': {k: len(v) for k, v in frames.items()},
        'max_frames_per_video': args.max_frames_per_video, 'weights': source, 'checkpoint': args.checkpoint,
        'image_size': cfg.unet.image_size, 'dva_config': to_dict(cfg), 'software': software_versions()})
    print(f'wrote {out} (conds {tuple(stats["conds"].shape)}) and {out.with_suffix(".json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
