"""Edit a face video along CelebA attribute directions of the linear identity classifier.

    python editing_classifier.py --video_path sample_video --attribute Mustache Eyeglasses --scale 0.2 0.4

writes one folder per (attribute, scale) under editing_classifier/<video name>/ (see README).
"""
from __future__ import annotations

import argparse
import sys

from config import CELEBA_ATTRIBUTES

OUT_ROOT = 'editing_classifier'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from editing.runner import add_edit_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_edit_args(p, OUT_ROOT)
    g = p.add_argument_group('edit')
    g.add_argument('--attribute', nargs='+', default=['Mustache'], help='one or more of: ' + ', '.join(CELEBA_ATTRIBUTES))
    g.add_argument('--scale', nargs='+', type=float, default=[0.3],
                   help='signed step(s) in units of sqrt(512) in normalised identity space; every attribute is '
                        'rendered at every scale')
    g.add_argument('--cls_checkpoint', default='checkpoints/diffusion_video_autoencoder_cls/last.ckpt',
                   help='attribute classifier checkpoint (released or from run_cls.py)')
    g.add_argument('--normalize', action=argparse.BooleanOptionalAction, default=True,
                   help='edit in z-normalised identity space as released (--no-normalize: raw space, unreachable in '
                        'the released script)')
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    unknown = [a for a in args.attribute if a not in CELEBA_ATTRIBUTES]
    if unknown:
        raise SystemExit(f'unknown attribute(s) {unknown}; choose from: {", ".join(CELEBA_ATTRIBUTES)}')
    from editing.pipeline import check_T, edit_dir_ready, finish_identity
    from editing.runner import encode, finish, start_run
    from model.pretrained import WeightsError, load_classifier

    check_T(args.T)  # cheap checks first

    try:
        clf, _ = load_classifier(args.cls_checkpoint, trust=args.trust_checkpoint)
    except WeightsError as e:
        raise SystemExit(str(e)) from None
    pairs = [(a, s) for a in args.attribute for s in args.scale]
    run = start_run(args, OUT_ROOT)
    for a, s in pairs:  # fail before any heavy work when a result exists
        edit_dir_ready(run.out_root / f'{a}_{s:.2f}', args.overwrite)
    enc = encode(args, run)
    edits = []
    for a, s in pairs:
        idx = CELEBA_ATTRIBUTES.index(a)
        edited = clf.edit_identity(enc.avg_id, idx, s) if args.normalize else clf.edit_identity_raw(enc.avg_id, idx, s)
        edits.append((f'{a}_{s:.2f}', finish_identity(edited, enc.avg_id, args.edit_norm),
                      {'attribute': a, 'scale': s, 'cls_checkpoint': args.cls_checkpoint}))
    return finish(args, run, enc, edits)


if __name__ == '__main__':
    main(sys.argv[1:])
