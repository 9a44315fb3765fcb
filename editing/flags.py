"""The editors' command line: flags <-> `config.EditConfig`, the checks made before any heavy work, and the way a
run ends (one clear line for a user error or an interruption, never a traceback). Nothing below the scripts sees
argparse. torch is not imported here, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

from config import CELEBA_ATTRIBUTES, EditConfig, from_dict

DEFAULTS = EditConfig()


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


def parser(description: str, out_root: str, kind: str) -> argparse.ArgumentParser:
    """Every flag of one editor (kind 'classifier' or 'clip'); the released flags keep their names and meanings.
    Defaults are EditConfig's (shown once, by the formatter)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--config', default=None, help="repeat a run: an output's config.json (flags given here override; "
                                                  '--overwrite and --trust_checkpoint are never taken from it)')
    g = p.add_argument_group('input')
    g.add_argument('--video_path', nargs='+',
                   help='a frame folder (image files, natural sort; other files ignored) or a video file (mp4, mov, '
                        'avi, mkv, webm); several, or a .txt file listing one per line: each video is edited into '
                        '<out>/<video name>/ (under torchrun, whole videos are spread across the ranks)')
    g.add_argument('--max_num', type=int, help='edit at most this many frames (from --start)')
    g.add_argument('--start', type=int, help='first frame index')
    g.add_argument('--end', type=int, help='frame index to stop before (default: the last frame)')
    g.add_argument('--aligned', action=argparse.BooleanOptionalAction, default=None,
                   help='the frames already are aligned square face crops (FFHQ-style): no face detection; the edit '
                        'replaces the face region of each whole frame')
    g.add_argument('--max_upsample', type=int, help='frames where dlib finds no face are searched again at upsampling '
                                                    '1..N (faces down to ~20 px at 2) before they count as faceless')
    g.add_argument('--detect_side', type=int, help='faces are detected on a copy of each frame with this long side '
                                                   '(landmarks at full resolution); 0: on the full frame, as released')
    g.add_argument('--faceless', choices=('keep', 'edit'),
                   help='frames without a face: keep them unedited, or edit them at quads interpolated from the '
                        'neighbouring frames (they never count in the video identity)')
    g = p.add_argument_group('model')
    g.add_argument('--T', type=int, help="DDIM steps for inversion and rendering (100: the paper's tables; the "
                                         'released scripts default to 1000). Valid: step counts an integer stride of '
                                         '1000 gives (5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)')
    g.add_argument('--batch_size', type=_batch_size,
                   help='frames per network batch, or auto (CUDA: the largest batch that fits free memory; CPU: 4)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='NHWC memory format for the networks (faster convolutions on CUDA)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile the UNet')
    g.add_argument('--decoder', choices=('ddim', 'dpm++2m'),
                   help='renderer from x_T: ddim (released, T calls) or dpm++2m (DPM-Solver++, --decoder_steps calls)')
    g.add_argument('--decoder_steps', type=int, help='network calls of the dpm++2m decoder (default T)')
    g.add_argument('--decoder_spacing', choices=('time', 'logsnr'), help='time points of the dpm++2m decoder')
    g.add_argument('--checkpoint', help='DVA checkpoint (default checkpoints/diffusion_video_autoencoder/'
                                        'epoch=51-step=1000000.ckpt, else last.ckpt there)')
    g.add_argument('--template', help='network preset of checkpoints that carry no config (the released ones): '
                                      'diffusion_video_autoencoder, or tiny for tests')
    g.add_argument('--pretrained_dir', help='folder with shape_predictor_68_face_landmarks.dat (and other released '
                                            'files)')
    g.add_argument('--trust_checkpoint', action='store_true', default=None,
                   help='allow full unpickling of checkpoints that a weights-only load refuses')
    g.add_argument('--device', help='auto (CUDA when available, else CPU), cpu, cuda or cuda:N')
    g.add_argument('--precision', choices=('fp32', 'fp16', 'bf16', 'fp64'),
                   help='fp32; fp16/bf16: autocast of the network on CUDA; fp64: the model and every loop in float64 '
                        '(reproducibility checks, CPU or CUDA)')
    g = p.add_argument_group('alignment')
    g.add_argument('--center_sigma', type=float, help='temporal smoothing of the quad centre (frames)')
    g.add_argument('--xy_sigma', type=float, help='temporal smoothing of the quad axes (frames)')
    g = p.add_argument_group('output')
    g.add_argument('--out', help=f'output folder (default {out_root}/<video name>)')
    g.add_argument('--overwrite', action='store_true', default=None, help='replace existing results')
    g.add_argument('--fps', type=float, help='frame rate of out.mp4 (default: the source rate for videos, 20 for '
                                             'frame folders)')
    g.add_argument('--blend', choices=('hard', 'feather'),
                   help='hard: the released binary face mask (paper); feather: a Gaussian-softened mask edge')
    g.add_argument('--feather', type=float, help='feather sigma in crop pixels (with --blend feather)')
    g.add_argument('--save_frames', action=argparse.BooleanOptionalAction, default=None,
                   help='write every edited full-resolution frame as PNG (frames/)')
    g.add_argument('--save_recon', action=argparse.BooleanOptionalAction, default=None,
                   help='also render the unedited reconstruction (one more DDIM pass; shown in side_by_side.mp4)')
    g.add_argument('--edit_norm', choices=('source', 'unit'),
                   help="'unit': L2-normalise the edited identity as released; 'source': keep the norm of the "
                        'averaged identity, so that scale 0 reproduces the reconstruction exactly')
    g.add_argument('--cache_dir', help='cache of alignments and inversions (default $DVA_CACHE or ~/.cache/dva)')
    g.add_argument('--no_cache', action='store_true', default=None, help='neither read nor write the cache')
    g.add_argument('--quiet', action=argparse.BooleanOptionalAction, default=None, help='no progress bars')
    g = p.add_argument_group('edit')
    if kind == 'classifier':
        g.add_argument('--attribute', nargs='+', help='one or more of: ' + ', '.join(CELEBA_ATTRIBUTES))
        g.add_argument('--scale', nargs='+', type=float, help='signed step(s) in units of sqrt(512) in normalised '
                                                              'identity space; every attribute at every scale')
        g.add_argument('--cls_checkpoint', help='attribute classifier checkpoint (released or from run_cls.py)')
        g.add_argument('--normalize', action=argparse.BooleanOptionalAction, default=None,
                       help='edit in z-normalised identity space as released')
    else:
        g.add_argument('--attribute', nargs=1, help='name of the edit (names the output folders and directions)')
        g.add_argument('--src_txt', help='neutral text')
        g.add_argument('--trg_txt', help='target text')
        g.add_argument('--scale', nargs='+', type=float, help='multiplier(s) on the found direction')
        g.add_argument('--lr', type=float, help='Adam learning rate on the identity')
        g.add_argument('--clip_loss_w', type=float, help='weight of -log((2 - L_dir) / 2)')
        g.add_argument('--id_loss_w', type=float, help='weight of 1 - cos(z, z0)')
        g.add_argument('--l1_loss_w', type=float, help='weight of the masked L1 between trajectories')
        g.add_argument('--n_train_step', type=int, help='DDIM steps of the optimisation trajectory')
        g.add_argument('--n_iter', type=int, help='optimisation iterations (released: 2000, fixed)')
        g.add_argument('--early_stop', type=int, metavar='PATIENCE',
                       help='stop when the loss has not improved by --early_stop_tol for this many iterations')
        g.add_argument('--early_stop_tol', type=float, help='relative improvement that counts')
        g.add_argument('--first_step', choices=('projected', 'released'),
                       help="first step of the search: 'projected' differentiates a well-defined first-order CLIP term "
                            "at iteration 0; 'released' keeps the release's, whose direction is float noise "
                            '(docs/clip_search.md)')
        g.add_argument('--clip_frame', type=int, help='index (in the selection) of the frame to optimise on')
        g.add_argument('--clip_weights', help='OpenAI ViT-B/16 weights (default pretrained_models/ViT-B-16.pt)')
        g.add_argument('--clip_fp16', action=argparse.BooleanOptionalAction, default=None,
                       help='fp16 CLIP weights on CUDA, as released')
        g.add_argument('--direction', help='apply this saved direction instead of searching')
        g.add_argument('--random_clip', choices=('tiny', 'vit'), help=argparse.SUPPRESS)  # tests only
    kind_defaults = {'attribute': ['Mustache'], 'scale': [0.3]} if kind == 'classifier' else \
        {'attribute': ['beards'], 'scale': [1.0], 'id_loss_w': 5.0, 'clip_weights': 'pretrained_models/ViT-B-16.pt'}
    shown = {f.name: getattr(DEFAULTS, f.name) for f in fields(EditConfig)}
    shown.update(kind_defaults)
    for action in p._actions:  # the defaults shown in --help, once; the values themselves come from `to_config`
        value = shown.get(action.dest)
        if action.dest not in shown or action.help is argparse.SUPPRESS or value in (None, '') or \
                '(default' in (action.help or ''):  # no default, or the help already says what it is
            continue
        text = ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value
        action.help = (action.help or '') + f' (default: {text})'
    p.set_defaults(_kind_defaults=kind_defaults)
    return p


def start(argv: list[str] | None, doc: str, default_root: str, kind: str) -> tuple[EditConfig, list[tuple[str, Path]]]:
    """An editor's command line -> (its EditConfig, (video, result folder) per input video)."""
    args = parser(doc.splitlines()[0], default_root, kind).parse_args(argv)
    cfg = to_config(args)
    return cfg, outputs_of(args.videos, cfg, default_root)


def load_editor(cfg: EditConfig, outputs: list, editor_ref: list):
    """(the Editor of this process, the torchrun ranks): on its rank's device; with one video the ranks share its
    frames, with several each rank edits whole videos alone."""
    from editing import distributed
    from editing.api import Editor

    ranks = distributed.from_env(cfg.device)
    editor_ref.append(Editor(replace(cfg, device=distributed.rank_device(cfg.device, ranks)),
                             ranks=ranks if len(outputs) == 1 else distributed.Ranks()))
    return editor_ref[0], ranks


def to_config(args: argparse.Namespace) -> EditConfig:
    """EditConfig from flags: EditConfig defaults < the editor's own defaults < --config file < flags given."""
    data: dict[str, Any] = dict(args._kind_defaults)
    if args.config:
        try:
            stored = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f'--config {args.config}: cannot read it ({e})') from None
        if not isinstance(stored, dict):
            raise SystemExit(f'--config {args.config}: not a config file (a JSON object, e.g. a result\'s config.json)')
        stored = dict(stored.get('config', stored))
        for key in ('overwrite', 'trust_checkpoint'):  # replacing results and unpickling code are decided by this
            stored.pop(key, None)                       # command's flags, never by an old file
        data.update(stored)
    names = {f.name for f in fields(EditConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    videos = data.get('video_path') or ''
    videos = [videos] if isinstance(videos, str) else list(videos)
    if len(videos) == 1 and videos[0].endswith('.txt') and Path(videos[0]).is_file():
        lines = Path(videos[0]).read_text().splitlines()
        videos = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith('#')]
    data['video_path'] = videos[0] if len(videos) == 1 else ''
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    try:
        cfg = from_dict(EditConfig, data)
    except (TypeError, ValueError, KeyError) as e:
        raise SystemExit(str(e).strip('"')) from None
    if not videos:
        raise SystemExit('--video_path is required (a frame folder or a video file)')
    args.videos = videos
    from diffusion import space_timesteps

    for flag, T in (('--T', cfg.T), ('--n_train_step', cfg.n_train_step)):
        try:
            space_timesteps(1000, T)
        except ValueError as e:
            raise SystemExit(f'{flag}: {e}') from None
    return cfg


def video_name(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix else p.resolve().name


def out_root(cfg: EditConfig, default_root: str) -> Path:
    """The result folder of one video: --out, else <default_root>/<video name>."""
    return Path(cfg.out) if cfg.out else Path(default_root) / video_name(cfg.video_path)


def outputs_of(videos: list[str], cfg: EditConfig, default_root: str) -> list[tuple[str, Path]]:
    """(video, its result folder) for each input: one video -> `out_root`; several -> <--out or default_root>/<name>."""
    if len(videos) == 1:
        return [(videos[0], out_root(replace(cfg, video_path=videos[0]), default_root))]
    names = [video_name(v) for v in videos]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f'several input videos are named {twice[0]!r}: their results would mix in one folder; '
                         'rename them or edit them in separate runs')
    return [(v, Path(cfg.out or default_root) / n) for v, n in zip(videos, names)]


def preflight(cfg: EditConfig, outputs: list[tuple[str, Path]], files: list[tuple[str, str | None]]) -> None:
    """Check, before anything heavy, every input and file the run will need and that the output folders can be
    written and hold no other video; SystemExit (or EditError) with one line naming the flag and the fix."""
    import templates
    from editing.api import resolve_checkpoint

    for video, _ in outputs:
        if not Path(video).exists():
            raise SystemExit(f'--video_path {video}: not found')
    if cfg.template not in templates.PRESETS:
        raise SystemExit(f'--template {cfg.template}: unknown; choose one of {", ".join(sorted(templates.PRESETS))}')
    needed = [('--checkpoint', str(resolve_checkpoint(cfg.checkpoint)))] + files
    for flag, path in needed:
        if path is not None and not Path(path).is_file():
            hint = ' (bash download_requirements.sh fetches the released files)' if 'pretrained' in path or \
                'checkpoints' in path else ''
            raise SystemExit(f'{flag} {path}: file not found{hint}')
    if not cfg.aligned:
        try:
            from faces import find_shape_predictor

            find_shape_predictor(cfg.pretrained_dir)
        except FileNotFoundError as e:
            raise SystemExit(f'--pretrained_dir {cfg.pretrained_dir}: {e} (or pass --aligned for aligned crops)'
                             ) from None
    from editing.api import check_one_video

    for video, out in outputs:
        check_out(out)
        check_one_video(out, {'path': video, 'start': cfg.start, 'end': cfg.end, 'max_num': cfg.max_num})


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, a loop of links
        return False


def check_out(out: Path) -> None:
    """SystemExit naming --out unless the output folder can be made and written. Tried for real (a probe folder
    made and removed in the nearest existing folder), since permission bits do not stop root and some folders
    refuse writes whatever they say (read-only mounts, /proc, names too long)."""
    import shutil
    import tempfile

    probe = out
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SystemExit(f'--out {out}: {probe} is a file, not a folder; choose another --out')
    try:
        tmp = Path(tempfile.mkdtemp(prefix='.dva-probe-', dir=probe))
    except OSError as e:
        raise SystemExit(f'--out {out}: cannot write in {probe} ({e.strerror or e}); choose another --out') from None
    try:
        if out != probe:
            (tmp / out.relative_to(probe)).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f'--out {out}: cannot be made ({e.strerror or e}); choose another --out') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(main: Callable[[], dict], editor_ref: list, outputs: list[tuple[str, Path]] = ()) -> dict:
    """Run a script body: a user error ends with its one-line message, Ctrl-C with how to resume, a full disk with
    the stage it stopped, the failure of a rank with the frames it was working on. Output folders that a failed run
    made and left empty are removed."""
    from editing import distributed
    from editing.api import EditError

    def where() -> str:
        status = editor_ref[0].done_frames() if editor_ref else None
        if status and status[0] == 'write':  # the renders are kept; the results are written again from them
            return ' (the results were being written: the rendered frames are kept)'
        return f' ({status[1]} of {status[2]} frames of the {status[0]} stage done)' if status else ''

    fresh = [out for _, out in outputs if not _exists(out)]
    try:
        try:
            return main()
        except BaseException:
            for out in fresh:
                _remove_empty(out)
            raise
    except EditError as e:
        raise SystemExit(str(e)) from None
    except distributed.RankError as e:
        raise SystemExit(f'{e}{where()}') from None
    except KeyboardInterrupt:
        print(f'\ninterrupted: re-run the same command to resume{where()}', file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # a full disk, a folder that went away: what failed, in one line, and how to go on
        status = editor_ref[0].done_frames() if editor_ref else None
        stage = f' in the {status[0]} stage' if status else ''
        raise SystemExit(f'failed{stage}: {e}. Fix that and re-run the same command: it resumes from the finished '
                         'work') from None
    except Exception as e:
        ranks = editor_ref[0].ranks if editor_ref else None
        if ranks is not None and ranks.enabled:  # say which rank and frames failed before the traceback
            print(f'rank {ranks.rank} failed{where()}: {type(e).__name__}: {e}', file=sys.stderr)
        raise
    finally:
        if editor_ref:
            editor_ref[0].close()
        distributed.close()


def _remove_empty(folder: Path) -> None:
    """Remove `folder` and the folders under it that hold no file (best effort: never masks the run's error)."""
    try:
        if not folder.is_dir():
            return
        for sub in sorted((p for p in folder.rglob('*') if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(sub.iterdir()):
                sub.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass


def for_each_video(outputs: list[tuple[str, Path]], edit_video: Callable[[str, Path], dict], ranks,
                   summary_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Edit one video (all ranks share its frames) or many (whole videos spread across the ranks, each edited by
    one rank; a video that fails is reported and the others go on); with many, <summary_dir>/videos_summary.json
    lists every video's result."""
    import cli
    from editing.api import EditError

    if len(outputs) == 1:
        return edit_video(*outputs[0])
    results = []
    for video, out in ranks.items(outputs):
        try:
            results.append({'video': video, 'out': str(out), **edit_video(video, out)})
        except EditError as e:
            log(f'{video}: {e}')
            results.append({'video': video, 'out': str(out), 'error': str(e)})
    results = sorted(sum(ranks.gather(results, 'gathering the video summaries'), []),
                     key=lambda r: [v for v, _ in outputs].index(r['video']))
    summary = {'videos': results, 'failed': [r['video'] for r in results if 'error' in r], 'ranks': ranks.world}
    if ranks.main:
        cli.write_json(summary_dir / 'videos_summary.json', summary)
        log(f'{len(results) - len(summary["failed"])} of {len(results)} videos edited; '
            f'summary: {summary_dir / "videos_summary.json"}')
    if summary['failed']:
        raise EditError(f'{len(summary["failed"])} of {len(results)} videos failed: {", ".join(summary["failed"])}')
    return summary


def write_results(ed, video, edits: list, out: Path, script: str, argv: list[str] | None) -> dict:
    """The end of both editors' run on one video: the reconstruction if asked for (--save_recon), `Editor.write`,
    and the report (rank 0); returns the summary."""
    recon = ed.reconstruct(video) if ed.cfg.save_recon else None
    summary = ed.write(video, edits, out, recon, {'command': command(script, argv)})
    if ed.ranks.main:
        report(summary, out, ed.log)
    return summary


def report(summary: dict, out: Path, log: Callable[[str], None] = print) -> None:
    missing = summary['faces_missing']
    log(f'\nframes: {summary["frames"]}   faces missing: {len(missing)}'
        + (f' ({", ".join(missing[:10])}{" ..." if len(missing) > 10 else ""})' if missing else ''))
    log('cache: ' + ', '.join(f'{k} {"hit" if v else "computed"}' for k, v in summary['cache_hits'].items()))
    log('time per stage: ' + ', '.join(f'{k} {v:.1f}s' for k, v in summary['seconds'].items()))
    for p in summary['outputs']:
        log(f'wrote {p}/out.mp4')
    log(f'summary: {out / "summary.json"}')


def command(script: str, argv: list[str] | None) -> str:
    import shlex

    return shlex.join([script, *(sys.argv[1:] if argv is None else argv)])
