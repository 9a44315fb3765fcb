"""Train the linear 40-attribute classifier on z-normalised identity features of CelebA-HQ (editing_classifier.py).

    python run_cls.py --data datasets/celebahq256.lmdb --stats checkpoints/diffusion_video_autoencoder/latent.pkl

The identity net is frozen, so its features are computed once (both flips) and the head is trained on the cache.
The run folder gets last.ckpt (released layout: conds_mean/conds_std [1,512], classifier.*, ema_classifier.*),
val_accuracy.csv/.json (per attribute) and config.json.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

from config import CELEBA_ATTRIBUTES, apply_overrides, to_dict
from templates import CLS_PRESETS, get_cls_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    images = p.add_mutually_exclusive_group()
    images.add_argument('--data', default='datasets/celebahq256.lmdb', help='CelebA-HQ LMDB (keys 256-%%05d)')
    images.add_argument('--image_folder', help='folder of <idx>.jpg/.png images instead of the LMDB')
    p.add_argument('--anno', default='datasets/celeba_anno/CelebAMask-HQ-attribute-anno.txt')
    p.add_argument('--stats', default='checkpoints/diffusion_video_autoencoder/latent.pkl', help='from run_eval.py')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--pretrained_dir', default='pretrained_models', help='folder holding model_ir_se50.pth')
    weights.add_argument('--checkpoint', help='DVA checkpoint whose EMA identity encoder is used instead')
    weights.add_argument('--random_encoder', action='store_true', help='random identity weights (tests only)')
    p.add_argument('--out', help='run folder (default: checkpoints/<name>)')
    p.add_argument('--overwrite', action='store_true', help='replace the contents of an existing run folder')
    p.add_argument('--template', default='diffusion_video_autoencoder_cls', choices=sorted(CLS_PRESETS))
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    p.add_argument('--max_steps', type=int, help='overrides max_steps')
    p.add_argument('--flip', action=argparse.BooleanOptionalAction, default=True,
                   help='also cache features of flipped images and draw one view per sample (released augmentation)')
    p.add_argument('--feature_batch_size', type=int, default=64)
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    args = p.parse_args(argv)

    import identity
    from cli import prepare_output_dir, resolve_device, software_versions, torch_save, write_json
    from dataset import CelebAHQFolder, CelebAHQLMDB
    from model.pretrained import WeightsError, load_identity_encoder, load_identity_stats

    try:
        cfg = apply_overrides(get_cls_preset(args.template), args.overrides)
        if args.max_steps is not None:
            cfg = replace(cfg, max_steps=args.max_steps)
        stats = load_identity_stats(args.stats)
        net, source, _ = load_identity_encoder(
            checkpoint=args.checkpoint, random=args.random_encoder,
            pretrained_dir=None if args.checkpoint or args.random_encoder else args.pretrained_dir)
        if args.image_folder:
            data = CelebAHQFolder(args.image_folder, args.anno, cfg.image_size, flip=False)
        else:
            data = CelebAHQLMDB(args.data, args.anno, cfg.image_size, flip=False)
    except (KeyError, TypeError, ValueError, FileNotFoundError, WeightsError) as e:
        raise SystemExit(str(e.args[0] if isinstance(e, KeyError) and e.args else e)) from e
    out = prepare_output_dir(args.out or Path('checkpoints') / cfg.name, overwrite=args.overwrite)

    device = resolve_device(args.device)
    precision = {'32': 'fp32', '16-mixed': 'fp16', 'bf16-mixed': 'bf16'}[cfg.precision]
    feats, labels = identity.identity_features(net, data, batch_size=args.feature_batch_size, device=device,
                                               num_workers=cfg.num_workers, flip=args.flip, precision=precision)
    clf, report = identity.train_attribute_classifier(feats, labels, stats, cfg, device=device)
    torch_save({'state_dict': clf.state_dict(), 'global_step': cfg.max_steps, 'cls_config': to_dict(cfg),
                'attributes': list(CELEBA_ATTRIBUTES), 'identity_weights': source}, out / 'last.ckpt')
    rows = [{'attribute': name, 'accuracy': acc, 'ema_accuracy': ema, 'positive_rate': pos} for name, acc, ema, pos in
            zip(CELEBA_ATTRIBUTES, report.get('val_accuracy', []), report.get('val_accuracy_ema', []),
                report.get('val_positive_rate', []))]
    with open(out / 'val_accuracy.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['attribute', 'accuracy', 'ema_accuracy', 'positive_rate'])
        writer.writeheader()
        writer.writerows(rows)
    summary = {k: v for k, v in report.items() if k != 'loss_history'}
    write_json(out / 'val_accuracy.json', {'attributes': rows, **summary})
    for r in rows:
        print(f'{r["attribute"]:20s} acc {r["accuracy"]:.3f}  ema {r["ema_accuracy"]:.3f}')
    if rows:
        print(f'mean validation accuracy {sum(r["accuracy"] for r in rows) / len(rows):.4f} ({len(rows)} attributes)')
    write_json(out / 'config.json', {'cls_config': to_dict(cfg), 'images': args.image_folder or args.data,
                                     'anno': args.anno, 'stats': args.stats, 'identity_weights': source,
                                     'flip': args.flip, 'images_used': len(data), 'software': software_versions()})
    return 0


if __name__ == '__main__':
    sys.exit(main())
