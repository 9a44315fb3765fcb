"""The CLIP direction search's first step: released (noise-driven) against projected (well-defined), on the fixture
models, from the recorded reference trajectory of fixtures_clip.pt. Feeds docs/clip_search.md.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/clip_first_step.py --n_iter 15 --json clip_first_step.json

For each first step ('released', 'projected') the library loop (`editing.clip_edit.optimise_identity`) runs
n_iter iterations three times, with perturbations that change nothing mathematically: 2 threads (the fixture run's
setting), 1 thread, and the batched DDIM step computed as 5 batch-1 network calls. Everything else (R, M0, f_src,
d_text, z0, weights, settings) is the fixture's. Reported per run: the CLIP loss per iteration, |grad_0|, and delta =
e - z0; then the iteration at which each first step reaches a given CLIP loss, and how far the perturbed runs'
grad_0 and delta are from the 2-thread run's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from editing.clip_edit import CLIPDirectionalLoss, SearchReference, load_clip, optimise_identity
from model.pretrained import load_dva


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(shared: Path, tmp: Path):
    sys.path.insert(0, str(ROOT / 'tests'))
    from test_parity import base_config

    from diffusion import NoiseSchedule

    official, clip_dir = shared / 'fixtures' / 'official', shared / 'fixtures' / 'official_clip'
    fx = torch.load(clip_dir / 'fixtures_clip.pt', weights_only=True)
    _module(official / 'make_weights.py', 'mw').write_weights(tmp, official)
    parity_cfg = torch.load(official / 'fixtures.pt', weights_only=False)['config']
    ema = load_dva(tmp / 'checkpoints' / 'diffusion_video_autoencoder' / 'last.ckpt', base_config(parity_cfg))[0]
    clip_path = _module(clip_dir / 'make_clip.py', 'mc').write_clip(tmp / 'clip')
    clip_loss = CLIPDirectionalLoss(load_clip(clip_path, 'cpu')[0])
    with torch.no_grad():
        lnd0 = ema.encoder.landmarks(fx['x0'][:1])
    ref = SearchReference(z0=fx['z0'], lnd0=lnd0, mask0=fx['M0'], states=fx['R'], f_src=fx['f_src'],
                          direction=fx['d_text'][0], schedule=NoiseSchedule.linear().respace(fx['config']['n_train_step']))
    return fx, ema, clip_loss, ref


def run(fx, ema, clip_loss, ref, first_step: str, perturbation: str, n_iter: int) -> dict:
    cfg = fx['config']
    torch.set_num_threads(1 if perturbation == 'threads1' else 2)

    def net(x, t, z):
        if perturbation == 'batch1':
            return torch.cat([ema(x[i:i + 1], t[i:i + 1], z[i:i + 1]) for i in range(len(x))])
        return ema(x, t, z)

    grads = []
    t0 = time.time()
    e, losses, _ = optimise_identity(
        net, ema.encoder.combine, clip_loss, ref, n_iter=n_iter, lr=cfg['lr'],
        weights=(cfg['clip_loss_w'], cfg['id_loss_w'], cfg['l1_loss_w']), first_step=first_step,
        callback=lambda it, terms: grads.append(terms['grad'][0]))
    return {'first_step': first_step, 'perturbation': perturbation, 'seconds': time.time() - t0,
            'clip': [r['clip'] for r in losses], 'total': [r['total'] for r in losses],
            'grad0': grads[0].tolist(), 'grad_norms': [g.norm().item() for g in grads],
            'delta': (e - ref.z0)[0].tolist()}


def first_reach(curve: list[float], level: float) -> int | None:
    """Number of Adam steps before the first iteration whose CLIP loss is <= level (None if never)."""
    return next((i for i, v in enumerate(curve) if v <= level), None)


def summary(results: list[dict], fx: dict) -> dict:
    by = {(r['first_step'], r['perturbation']): r for r in results}
    out = {}
    for fs in ('released', 'projected'):
        base = by.get((fs, 'threads2'))
        if base is None:
            continue
        b_grad, b_delta = torch.tensor(base['grad0']), torch.tensor(base['delta'])
        out[fs] = {'clip_curve': base['clip'], 'grad_norms': base['grad_norms'], 'perturbations': {}}
        for pert in ('threads1', 'batch1'):
            r = by.get((fs, pert))
            if r is None:
                continue
            g, d = torch.tensor(r['grad0']), torch.tensor(r['delta'])
            out[fs]['perturbations'][pert] = {
                'grad0_rel': ((g - b_grad).norm() / b_grad.norm()).item(),
                'delta_rel': ((d - b_delta).norm() / b_delta.norm()).item(),
                'delta_cos': torch.nn.functional.cosine_similarity(d, b_delta, dim=0).item(),
                'delta_sign_agree': (d.sign() == b_delta.sign()).double().mean().item(),
                'delta_maxabs': (d - b_delta).abs().max().item(),
                'clip_curve': r['clip'],
            }
    if 'released' in out and 'projected' in out:
        rel_curve, proj_curve = out['released']['clip_curve'], out['projected']['clip_curve']
        levels = sorted({round(v, 4) for v in rel_curve[1:]}, reverse=True)
        out['iterations_to_reach'] = [{'clip_loss': lv, 'released': first_reach(rel_curve, lv),
                                       'projected': first_reach(proj_curve, lv)} for lv in levels]
        out['fixture_long_loss_clip'] = fx['long_loss_clip'].tolist()
    return out


def markdown(data: dict) -> str:
    """The tables of docs/clip_search.md from a JSON written by this script."""
    runs, summ = data['runs'], data['summary']
    n = len(runs[0]['clip'])
    its = [i for i in (0, 1, 2, 3, 5, 8, 10, 15, 20, 25, 29, 39, 49) if i < n]
    head = [f"{r['first_step']} {r['perturbation']}" for r in runs]
    lines = ['CLIP loss -log((2 - L_dir) / 2) before the update of each iteration:', '',
             '| iteration | ' + ' | '.join(head) + ' |', '|---' * (len(runs) + 1) + '|']
    lines += [f'| {i} | ' + ' | '.join(f"{r['clip'][i]:.4f}" for r in runs) + ' |' for i in its]
    lines += ['', (f"The release's own 20-iteration run (fixture `long_loss_clip`, 2 threads): "
              f"{min(summ['fixture_long_loss_clip'][1:]):.4f} at best, {summ['fixture_long_loss_clip'][-1]:.4f} at "
              f'iteration 19.'), '']
    base = {r['first_step']: r for r in runs if r['perturbation'] == 'threads2'}
    levels = (0.64, 0.62, 0.60, 0.55, 0.50, 0.45)
    lines += [('Adam steps taken before the CLIP loss first reaches a level (2 threads; "-" = not within '
              f'{n} iterations):'), '', '| CLIP loss <= | ' + ' | '.join(f'{v:.2f}' for v in levels) + ' |',
              '|---' * (len(levels) + 1) + '|']
    for fs in ('released', 'projected'):
        if fs in base:
            reach = [first_reach(base[fs]['clip'], v) for v in levels]
            lines.append(f'| {fs} | ' + ' | '.join('-' if k is None else str(k) for k in reach) + ' |')
    lines += ['', (f'Sensitivity to float noise after {n} iterations, against the 2-thread run of the same first step '
              '(grad_0: relative L2 error of the first gradient; delta = e - z0):'), '',
              '| first step | perturbation | grad_0 rel | delta rel | delta cosine | same sign | max-abs | norm of delta |',
              '|---|---|---|---|---|---|---|---|']
    for fs in ('released', 'projected'):
        if fs not in summ:
            continue
        for pert, v in summ[fs]['perturbations'].items():
            norm = torch.tensor(base[fs]['delta']).norm().item()
            lines.append(f"| {fs} | {pert} | {v['grad0_rel']:.2e} | {v['delta_rel']:.3f} | {v['delta_cos']:.4f} | "
                         f"{100 * v['delta_sign_agree']:.1f}% | {v['delta_maxabs']:.4f} | {norm:.3f} |")
    lines += ['', '|grad| per iteration (2 threads): ' + '; '.join(
        f"{fs}: " + ', '.join(f'{g:.3g}' for g in base[fs]['grad_norms'][:6]) + ', ...' for fs in base)]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shared', type=Path, default=ROOT.parent / 'shared')
    p.add_argument('--n_iter', type=int, default=15)
    p.add_argument('--json', type=Path, default=Path('clip_first_step.json'))
    p.add_argument('--markdown', type=Path, help='print the tables for an existing JSON and exit')
    p.add_argument('--runs', default='projected:threads2,released:threads2,projected:threads1,released:threads1,'
                                      'projected:batch1,released:batch1')
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    with tempfile.TemporaryDirectory() as tmp:
        fx, ema, clip_loss, ref = setup(args.shared, Path(tmp))
    results = []
    for spec in args.runs.split(','):
        first_step, pert = spec.split(':')
        results.append(run(fx, ema, clip_loss, ref, first_step, pert, args.n_iter))
        print(f'{spec}: {results[-1]["seconds"]:.0f} s, clip {results[-1]["clip"]}', flush=True)
        args.json.write_text(json.dumps({'runs': results, 'summary': summary(results, fx)}, indent=1))


if __name__ == '__main__':
    main()
