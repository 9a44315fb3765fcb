"""Command-line plumbing shared by editing_classifier.py and editing_CLIP.py: flags, loading, and the encode stage."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cli
import templates
from editing.cache import DEFAULT_CACHE, Cache
from editing.pipeline import (EditResult, EncodedVideo, Runtime, StageTimer, check_T, encode_video, print_summary,
                              render_identity, render_key, to_uint8, write_outputs)

DEFAULT_CKPT_DIR = Path('checkpoints/diffusion_video_autoencoder')


def add_edit_args(parser: argparse.ArgumentParser, out_root: str) -> None:
    """The released flags (same names and meanings) plus ours."""
    g = parser.add_argument_group('input')
    g.add_argument('--video_path', required=True,
                   help='a frame folder (image files, natural sort; other files ignored) or a video file '
                        '(mp4, mov, avi, mkv, webm); nested and absolute paths work')
    g.add_argument('--max_num', type=int, default=None, help='edit at most this many frames (from --start)')
    g.add_argument('--aligned', action='store_true',
                   help='the frames already are aligned square face crops (FFHQ-style): skip face detection; '
                        'the edit replaces the face region of each whole frame')
    g.add_argument('--start', type=int, default=0, help='first frame index (default 0)')
    g.add_argument('--end', type=int, default=None, help='frame index to stop before (default: the last frame)')
    g = parser.add_argument_group('model')
    g.add_argument('--T', type=int, default=100,
                   help='DDIM steps for inversion and rendering (default 100, the setting of the paper\'s tables and '
                        'timings; the released scripts default to 1000). Valid values are the step counts an integer '
                        'stride of 1000 gives (e.g. 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000); others are rejected '
                        'with the nearest valid values')
    g.add_argument('--batch_size', type=_batch_size, default=4,
                   help='frames per network batch, or auto (CUDA: the largest batch that fits free memory; CPU: 4)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=True,
                   help='NHWC memory format for the networks (faster convolutions on CUDA)')
    g.add_argument('--compile', action='store_true', help='torch.compile the UNet (slow first batch, faster after)')
    g.add_argument('--decoder', choices=('ddim', 'dpm++2m'), default='ddim',
                   help='renderer from x_T: ddim (released, T calls) or dpm++2m (DPM-Solver++, --decoder_steps calls)')
    g.add_argument('--decoder_steps', type=int, default=None, help='network calls of the dpm++2m decoder (default T)')
    g.add_argument('--decoder_spacing', choices=('time', 'logsnr'), default='time',
                   help='time points of the dpm++2m decoder among the respaced timesteps')
    g.add_argument('--checkpoint', default=None,
                   help=f'DVA checkpoint (default {DEFAULT_CKPT_DIR}/epoch=51-step=1000000.ckpt, else last.ckpt there)')
    g.add_argument('--template', default='diffusion_video_autoencoder', choices=sorted(templates.PRESETS),
                   help='network preset for checkpoints that carry no config (released ones)')
    g.add_argument('--pretrained_dir', default='pretrained_models',
                   help='folder with shape_predictor_68_face_landmarks.dat (and other released files)')
    g.add_argument('--trust_checkpoint', action='store_true',
                   help='allow full unpickling of checkpoints that a weights-only load refuses')
    cli.add_device_args(parser)
    g = parser.add_argument_group('alignment')
    g.add_argument('--center_sigma', type=float, default=1.0, help='temporal smoothing of the quad centre (frames)')
    g.add_argument('--xy_sigma', type=float, default=3.0, help='temporal smoothing of the quad axes (frames)')
    g = parser.add_argument_group('output')
    g.add_argument('--out', default=None, help=f'output folder (default {out_root}/<video name>)')
    g.add_argument('--overwrite', action='store_true', help='replace existing result folders')
    g.add_argument('--fps', type=float, default=None,
                   help='frame rate of out.mp4 (default: the source rate for videos, 20 for frame folders)')
    g.add_argument('--blend', choices=('hard', 'feather'), default='hard',
                   help='hard: the released binary face mask (paper); feather: a Gaussian-softened mask edge')
    g.add_argument('--feather', type=float, default=3.0, help='feather sigma in crop pixels (with --blend feather)')
    g.add_argument('--save_frames', action=argparse.BooleanOptionalAction, default=True,
                   help='write every edited full-resolution frame as PNG (frames/); --no-save_frames keeps only the '
                        'videos, the crops and the blends (about 2x faster writing at 1080p)')
    g.add_argument('--save_recon', action='store_true',
                   help='also render the unedited reconstruction (one more DDIM pass; shown in side_by_side.mp4)')
    g.add_argument('--edit_norm', choices=('source', 'unit'), default='source',
                   help="'unit': L2-normalise the edited identity as released; 'source' (default): keep the norm of the "
                        'averaged identity, so that scale 0 reproduces the reconstruction exactly')
    g.add_argument('--cache_dir', default=str(DEFAULT_CACHE),
                   help='cache of alignments and inversions, keyed by video content, checkpoint and T '
                        '(default $DVA_CACHE or ~/.cache/dva)')
    g.add_argument('--no_cache', action='store_true', help='neither read nor write the cache')
    g.add_argument('--quiet', action='store_true', help='no progress bars')


def _batch_size(text: str) -> int | str:
    if text == 'auto':
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is neither a positive integer nor auto') from None
    if value < 1:
        raise argparse.ArgumentTypeError('--batch_size must be at least 1')
    return value


def resolve_checkpoint(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    for name in ('epoch=51-step=1000000.ckpt', 'last.ckpt'):
        if (DEFAULT_CKPT_DIR / name).is_file():
            return DEFAULT_CKPT_DIR / name
    return DEFAULT_CKPT_DIR / 'epoch=51-step=1000000.ckpt'  # the loader names it and says how to get it


@dataclass
class EditRun:
    rt: Runtime
    source: Any
    out_root: Path
    fps: float
    timer: StageTimer
    run_config: dict[str, Any]
    cache: Cache


def load_ema_model(args: argparse.Namespace) -> tuple[Path, Any, Any, dict]:
    """The EMA autoencoder of --checkpoint (preset --template for released files), with --T checked against its
    diffusion length; clear SystemExit on a missing or wrong file. Returns (path, model, config, checkpoint meta)."""
    from model.pretrained import WeightsError, load_dva

    ckpt = resolve_checkpoint(args.checkpoint)
    try:
        model, cfg, meta = load_dva(ckpt, templates.get_preset(args.template), which='ema', trust=args.trust_checkpoint)
    except WeightsError as e:
        raise SystemExit(str(e)) from None
    check_T(args.T, cfg.diffusion.num_timesteps)
    return ckpt, model, cfg, meta


def video_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix else p.resolve().name


def start_run(args: argparse.Namespace, out_root_default: str) -> EditRun:
    """Validate everything cheap first (T, files), then load the model and open the frames."""
    from video_io import FrameSource

    check_T(args.T)
    if args.decoder_steps is not None and not 1 <= args.decoder_steps <= args.T:
        raise SystemExit(f'--decoder_steps must be between 1 and --T ({args.T})')
    device = cli.resolve_device(args.device)
    try:
        source = FrameSource(args.video_path, start=args.start, end=args.end, max_num=args.max_num)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'cannot read --video_path: {e}') from None
    if args.aligned:
        from faces import full_frame_quad

        try:  # before the model loads: aligned crops must be square
            full_frame_quad(*source.size)
        except ValueError as e:
            raise SystemExit(f'--video_path {args.video_path}: {e}') from None
    ckpt, model, cfg, _ = load_ema_model(args)
    cli.set_cpu_threads()
    from editing.speed import auto_batch_size, micro_batch_size, optimize_for_inference

    model = model.to(device)
    S = cfg.unet.image_size
    batch_size = auto_batch_size(model, S, device, args.precision) if args.batch_size == 'auto' else args.batch_size
    model = optimize_for_inference(model, device, channels_last=args.channels_last, compile=args.compile)
    rt = Runtime(model, ckpt, device, args.T, batch_size, args.precision, progress=not args.quiet,
                 micro_batch=micro_batch_size(device, S), decoder=args.decoder, decoder_steps=args.decoder_steps,
                 decoder_spacing=args.decoder_spacing)
    out_root = Path(args.out) if args.out else Path(out_root_default) / video_name(args.video_path)
    out_root.mkdir(parents=True, exist_ok=True)
    fps = args.fps or (source.fps if source.is_video and source.fps else 20.0)
    run_config = {'command': cli.command_line(), 'args': vars(args), 'checkpoint': str(ckpt),
                  'dva_config_name': cfg.name, 'device': str(device), 'batch_size': batch_size}
    return EditRun(rt, source, out_root, fps, StageTimer(), run_config, Cache(None if args.no_cache else args.cache_dir))


def encode(args: argparse.Namespace, run: EditRun) -> EncodedVideo:
    from faces import DlibDetector, NoFaceError

    try:
        return encode_video(run.source, run.rt, lambda: DlibDetector(pretrained_dir=args.pretrained_dir), run.cache,
                            args.center_sigma, args.xy_sigma, run.timer, aligned_input=args.aligned)
    except NoFaceError as e:
        raise SystemExit(f'{args.video_path}: {e}. Is there a frontal face in the video?') from None
    except ValueError as e:  # a frame that fails to decode part-way (the header check passed)
        raise SystemExit(f'cannot read --video_path {args.video_path}: {e}') from None


def finish(args: argparse.Namespace, run: EditRun, enc: EncodedVideo, edits: list[tuple[str, Any, dict]]) -> dict:
    """Render every (folder name, edited identity [1,512], settings) edit from the cached x_T, plus the
    reconstruction with --save_recon, then write all outputs in one pass over the frames and print the summary."""
    cache = run.cache
    results, rendered = [], []
    for name, identity, settings in edits:
        with run.timer('render'):
            render = to_uint8(render_identity(run.rt, enc, identity, f'render {name}', cache))
        results.append(EditResult(name, run.out_root / name, render, settings))
        rendered.append(identity)
    recon = None
    if args.save_recon:
        with run.timer('render'):
            recon = to_uint8(render_identity(run.rt, enc, enc.avg_id, 'reconstruction', cache))
        rendered.append(enc.avg_id)
    outputs = write_outputs(run.source, enc, results, run.out_root, run.fps, args.blend, args.feather, recon,
                            args.overwrite, run.timer, not args.quiet, run.run_config, save_frames=args.save_frames)
    for identity in rendered:  # the outputs are written: the saved batches of these renders are not needed again
        cache.drop_partial('render', render_key(run.rt, enc, identity))
    return print_summary(enc, run.timer, outputs, run.out_root)
