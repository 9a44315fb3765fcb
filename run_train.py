"""Train a diffusion video autoencoder: preset + --set overrides -> training.run_training (Lightning Trainer.fit).

    python run_train.py --template diffusion_video_autoencoder --data datasets/voxceleb1 --devices 4 --strategy ddp
    python run_train.py --resume checkpoints/diffusion_video_autoencoder/last.ckpt          # same run, same step
    python run_train.py --init_from released.ckpt --logdir checkpoints/finetune --set train.lr=3e-5   # weights only
    python run_train.py --template tiny --data DIR --random_encoders --dry-run              # print the config
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from config import apply_overrides, to_dict
from templates import PRESETS, get_preset


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(PRESETS))
    p.add_argument('--data', help='dataset root holding train/<video>/<frames> (default: the preset data.root)')
    p.add_argument('--logdir', help='run folder for checkpoints, samples and logs (default: checkpoints/<name>; '
                                    'with --resume, the checkpoint folder)')
    p.add_argument('--accelerator', default='auto', help='auto, cpu, gpu, ... (Lightning)')
    p.add_argument('--devices', type=_devices, default='auto', help='number of devices, a list such as "0,1", or auto')
    p.add_argument('--num_nodes', type=int, default=1)
    p.add_argument('--strategy', default='auto', help='auto, ddp, ddp_find_unused_parameters_true, ... (Lightning)')
    p.add_argument('--precision', choices=('32', '16-mixed', 'bf16-mixed'), help='overrides train.precision')
    p.add_argument('--max_steps', type=int, help='overrides train.max_steps')
    p.add_argument('--resume', help="continue a run of ours from its checkpoint (weights, EMA, optimizer, step); "
                                    "the config is the checkpoint's, --set may still change training options")
    p.add_argument('--init_from', help='start a new run (step 0) from the weights of any released-layout checkpoint')
    p.add_argument('--pretrained_dir', default='pretrained_models', help='frozen encoder weights for a fresh run')
    p.add_argument('--random_encoders', action='store_true', help='keep the frozen encoders random (tests only)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='config override such as train.lr=3e-5 (repeatable; unknown keys are an error)')
    p.add_argument('--overwrite', action='store_true', help='start over in a run folder that holds checkpoints')
    p.add_argument('--no_progress', action='store_true',
                   help='no progress output (default: a progress bar on a terminal, else a plain line every '
                        'train.log_every steps)')
    p.add_argument('--dry-run', dest='dry_run', action='store_true', help='print the resolved config and exit')
    args = p.parse_args(argv)

    import training  # heavy (torch, lightning): after argument parsing, so --help is instant

    try:
        cfg = training.read_run_config(args.resume) if args.resume else get_preset(args.template)
        cfg = apply_overrides(cfg, args.overrides)
    except (KeyError, TypeError, ValueError) as e:
        p.error(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    if args.data:
        cfg = replace(cfg, data=replace(cfg.data, root=args.data))
    if args.precision or args.max_steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, precision=args.precision or cfg.train.precision,
                                         max_steps=cfg.train.max_steps if args.max_steps is None else args.max_steps))
    run_dir = Path(args.logdir or (Path(args.resume).parent if args.resume else Path('checkpoints') / cfg.name))
    trainer_kwargs = {'accelerator': args.accelerator, 'devices': args.devices, 'num_nodes': args.num_nodes,
                      'strategy': args.strategy, 'enable_progress_bar': False if args.no_progress else None}
    if args.dry_run:
        print(json.dumps({'dva_config': to_dict(cfg), 'run_dir': str(run_dir), 'resume': args.resume,
                          'init_from': args.init_from, 'pretrained_dir': args.pretrained_dir,
                          'random_encoders': args.random_encoders, 'trainer': trainer_kwargs}, indent=2))
        return 0
    from model.pretrained import WeightsError

    command = ' '.join(['run_train.py', *(sys.argv[1:] if argv is None else argv)])
    try:
        training.run_training(cfg, run_dir, resume=args.resume, init_from=args.init_from,
                              pretrained_dir=args.pretrained_dir, random_encoders=args.random_encoders,
                              overwrite=args.overwrite, trainer_kwargs=trainer_kwargs, extra_config={'command': command})
    except WeightsError as e:
        raise SystemExit(str(e)) from e
    return 0


if __name__ == '__main__':
    sys.exit(main())
