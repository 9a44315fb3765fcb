"""Edit a face video with a CLIP text direction found by optimising the identity of its first frame.

    python editing_CLIP.py --video_path sample_video --attribute beards --src_txt face --trg_txt "face with beard" \
        --scale 1.0 --clip_weights pretrained_models/ViT-B-16.pt

The found direction is saved under <out>/directions/ and reused by later runs with the same settings, so a new
--scale costs one DDIM render per frame and no optimisation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from editing.runner import add_edit_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_edit_args(p, 'editing_CLIP')
    g = p.add_argument_group('edit')
    g.add_argument('--attribute', default='beards', help='name of the edit (names the output folder only)')
    g.add_argument('--src_txt', default='face', help='neutral text')
    g.add_argument('--trg_txt', default='face with beard', help='target text')
    g.add_argument('--scale', nargs='+', type=float, default=[1.0], help='multiplier(s) on the found direction')
    g.add_argument('--lr', type=float, default=0.002, help='Adam learning rate on the identity')
    g.add_argument('--clip_loss_w', type=float, default=3.0, help='weight of -log((2 - L_dir) / 2)')
    g.add_argument('--id_loss_w', type=float, default=5.0, help='weight of 1 - cos(z, z0) (released default 5)')
    g.add_argument('--l1_loss_w', type=float, default=5.0, help='weight of the masked L1 between trajectories')
    g.add_argument('--n_train_step', type=int, default=5, help='DDIM steps of the optimisation trajectory')
    g.add_argument('--n_iter', type=int, default=2000, help='optimisation iterations (released: 2000, fixed)')
    g.add_argument('--early_stop', type=int, default=None, metavar='PATIENCE',
                   help='stop when the loss has not improved by --early_stop_tol for this many iterations')
    g.add_argument('--early_stop_tol', type=float, default=1e-4, help='relative improvement that counts')
    g.add_argument('--clip_frame', type=int, default=0, help='index (in the selection) of the frame to optimise on')
    g.add_argument('--clip_weights', default=None, help='OpenAI ViT-B/16 weights (default pretrained_models/ViT-B-16.pt)')
    g.add_argument('--clip_fp16', action='store_true', help='fp16 CLIP weights on CUDA, as released')
    g.add_argument('--direction', default=None, help='apply this saved direction instead of searching')
    g.add_argument('--random_clip', choices=('tiny', 'vit'), default=None, help=argparse.SUPPRESS)  # tests only
    return p.parse_args(argv)


def _clip_model(args, device):
    from editing.clip_edit import load_clip, tiny_clip

    if args.random_clip == 'tiny':
        return tiny_clip(device)[0]
    try:
        return load_clip(args.clip_weights, device, random_init=args.random_clip == 'vit', half=args.clip_fp16)[0]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def find_or_load_direction(args, run, enc) -> tuple[Path, object]:
    from editing.cache import file_stamp
    from editing.clip_edit import CLIPDirectionalLoss, find_clip_direction, load_direction, save_direction
    from editing.pipeline import crops_to_float

    if args.direction:
        try:
            return Path(args.direction), load_direction(args.direction)[0]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    if not 0 <= args.clip_frame < len(enc):
        raise SystemExit(f'--clip_frame {args.clip_frame} is outside the {len(enc)} selected frames')
    settings = {'src_txt': args.src_txt, 'trg_txt': args.trg_txt, 'lr': args.lr, 'clip_w': args.clip_loss_w,
                'id_w': args.id_loss_w, 'l1_w': args.l1_loss_w, 'n_train_step': args.n_train_step,
                'n_iter': args.n_iter, 'early_stop': args.early_stop, 'clip_frame': enc.names[args.clip_frame],
                'checkpoint': file_stamp(run.rt.checkpoint), 'clip': args.random_clip or str(args.clip_weights)}
    name = f'{args.attribute}_{args.lr:.4f}_clip{args.clip_loss_w:g}_id{args.id_loss_w:g}_l1{args.l1_loss_w:g}'
    path = run.out_root / 'directions' / f'{name}.pt'
    if path.is_file() and not args.overwrite:
        found, meta = load_direction(path)
        if meta.get('settings') == settings:
            print(f'reusing the direction in {path} (pass --overwrite to search again)')
            return path, found
        print(f'{path} was found with other settings; searching again')
    clip_loss = CLIPDirectionalLoss(_clip_model(args, run.rt.device)).to(run.rt.device)
    frame = crops_to_float(enc.crops[args.clip_frame:args.clip_frame + 1]).to(run.rt.device)

    def snapshot(it, states):
        from torchvision.utils import save_image

        save_image((states.float().clamp(-1, 1) + 1) / 2, path.parent / f'{name}_it{it:05d}.png', nrow=len(states))

    path.parent.mkdir(parents=True, exist_ok=True)
    with run.timer('clip search'):
        found = find_clip_direction(run.rt.model, frame, clip_loss, args.src_txt, args.trg_txt,
                                    n_train_step=args.n_train_step, n_iter=args.n_iter, lr=args.lr,
                                    clip_w=args.clip_loss_w, id_w=args.id_loss_w, l1_w=args.l1_loss_w,
                                    early_stop_patience=args.early_stop, early_stop_tol=args.early_stop_tol,
                                    precision=args.precision, progress=not args.quiet, snapshot_fn=snapshot)
    save_direction(path, found, {'settings': settings, 'video': str(args.video_path)})
    print(f'direction saved to {path} after {found.n_iter_run} iterations'
          + (' (early stop)' if found.stopped_early else ''))
    return path, found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.n_iter < 1 or args.n_train_step < 2:
        raise SystemExit('--n_iter must be at least 1 and --n_train_step at least 2')
    from editing.clip_edit import apply_clip_direction
    from editing.pipeline import check_T, edit_dir_ready, finish_identity

    check_T(args.n_train_step)
    from editing.runner import encode, finish, start_run

    run = start_run(args, 'editing_CLIP')

    def folder(scale: float) -> Path:
        return run.out_root / f'{args.attribute}_{args.lr:.4f}_id{args.id_loss_w:g}_l1{args.l1_loss_w:g}_scale{scale:g}'

    for s in args.scale:
        edit_dir_ready(folder(s), args.overwrite)
    enc = encode(args, run)
    path, found = find_or_load_direction(args, run, enc)
    edits = [(folder(s).name, finish_identity(apply_clip_direction(enc.avg_id, found.delta, s), enc.avg_id, args.edit_norm),
              {'src_txt': args.src_txt, 'trg_txt': args.trg_txt, 'scale': s, 'direction': str(path)})
             for s in args.scale]
    return finish(args, run, enc, edits)


if __name__ == '__main__':
    main(sys.argv[1:])
