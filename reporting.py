"""The evaluation's outputs: report.md, metrics.csv, frames.csv, plot.png and config.json (written last) in one folder.

Every file is written atomically (cli.atomic_path). `write_recon` / `write_consistency` take what
evaluation.evaluate_recon / consistency_scores return plus a `settings` dict describing the run.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cli

# DVA in the paper: 20 random VoxCeleb1 test videos, T=100; TL-ID / TG-ID of DVA and STIT edits.
PAPER_RECON = {'ssim': 0.922, 'ms_ssim': 0.989, 'lpips': 0.045, 'mse': 0.002}
PAPER_CONSISTENCY = {'DVA': {'tl_id': 0.995, 'tg_id': 0.996}, 'STIT': {'tl_id': 0.997, 'tg_id': 0.961}}
METRIC_LABELS = {'ssim': 'SSIM ↑', 'ms_ssim': 'MS-SSIM ↑', 'lpips': 'LPIPS ↓', 'mse': 'MSE ↓', 'psnr': 'PSNR (dB) ↑'}
OUTPUT_FILES = ('report.md', 'metrics.csv', 'frames.csv', 'plot.png', 'config.json')
SSIM_NOTES = {
    'valid': ("SSIM border 'valid': the map only where the 11-px window fits (skimage's convention). The released "
              "evaluation zero-pads the border (--ssim_border zero), which reads about 0.005 higher near 0.92: use "
              'that to compare with the paper.'),
    'zero': ("SSIM border 'zero': the zero-padded map of the released evaluation (diffae's ssim.py), as in the "
             "paper's table; --ssim_border valid gives skimage's convention (about 0.005 lower near 0.92)."),
}


def check_out(path: str | Path, overwrite: bool) -> Path:
    """Fail fast (before any heavy work) when `path` holds an earlier result and not `overwrite`, or when overwrite
    would delete files that no evaluation wrote. Raises FileExistsError saying which."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f'--out {path} is a file, not a folder')
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            what = 'a report' if (path / 'report.md').exists() else 'files'
            raise FileExistsError(f'{path} already holds {what}; pass --overwrite to replace it or choose another '
                                  '--out')
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OUTPUT_FILES and not p.name.startswith('.'))
        if foreign:
            raise FileExistsError(f'--overwrite would delete {path}, which holds files that run_metrics.py did not '
                                  f'write ({", ".join(foreign[:5])}); choose another --out')
    return path


def prepare_out(path: str | Path, overwrite: bool) -> Path:
    """check_out, then create (or empty, with overwrite) the output folder."""
    return cli.prepare_output_dir(check_out(path, overwrite), overwrite=overwrite, marker='config.json')


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return '—'
    return 'inf' if math.isinf(v) else f'{v:.{digits}f}'


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with cli.atomic_path(path) as tmp, open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([f'{v:.6g}' if isinstance(v, float) else v for v in row] for row in rows)


def write_text(path: Path, text: str) -> None:
    with cli.atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib Figure (built without pyplot, so the Agg canvas is used and no global backend is touched)."""
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def summary_line(mean: dict[str, float]) -> str:
    return '   '.join(f'{METRIC_LABELS[k].split()[0]} {fmt(v)}' for k, v in mean.items() if k in METRIC_LABELS)


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction


def recon_notes(result: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """What a reader of the report must know: metrics skipped, fewer videos than asked."""
    notes = [] if result['with_ms_ssim'] else [
        f'MS-SSIM skipped: 5 scales with an 11-px window need images of at least 161 px; this model renders '
        f'{s["image_size"]} px.']
    if len(s['videos']) < s['num_videos']:
        notes.append(f'--num_videos {s["num_videos"]} asked, but {Path(s["data"]) / s["split"]} holds only '
                     f'{len(s["videos"])} videos: all were used.')
    return notes


def recon_report(result: dict[str, Any], s: dict[str, Any], notes: Sequence[str]) -> str:
    """report.md of evaluation.evaluate_recon's `result` with the run's settings `s`."""
    names, mean, video_mean = result['names'], result['mean'], result['video_mean']
    rows = ['| metric | this run (mean over frames) | mean over videos | paper, DVA |', '|---|---|---|---|']
    for k in METRIC_LABELS:
        ours = fmt(mean[k]) if k in mean else 'not computed'
        rows.append(f'| {METRIC_LABELS[k]} | {ours} | {fmt(video_mean.get(k))} | {fmt(PAPER_RECON.get(k), 3)} |')
    vids = ['| video | frames | ' + ' | '.join(METRIC_LABELS[k] for k in names) + ' |',
            '|---|---|' + '---|' * len(names)]
    vids += [f'| {r["video"]} | {r["frames"]} | ' + ' | '.join(fmt(r[k]) for k in names) + ' |'
             for r in result['per_video']]
    settings = [
        (f'- checkpoint: `{s["checkpoint"]}` (global_step {s["global_step"]}, config `{s["config"]}`, '
         f'{s["image_size"]}x{s["image_size"]})'),
        (f'- T = {s["T"]} DDIM steps ({s["T"] - 1} network calls to invert + {s["T"]} to render per frame); '
         'identity averaged over each video, landmarks per frame'),
        (f'- data: `{s["data"]}` split `{s["split"]}`: {len(s["videos"])} of {s["videos_available"]} videos '
         f'(seed {s["seed"]}), {s["frames"]} frames'),
        f'- LPIPS: {s["lpips"]}', f'- SSIM border: {s["ssim_border"]}',
        f'- device {s["device"]}, precision {s["precision"]}, batch size {s["batch_size"]}',
    ]
    notes = [*notes, SSIM_NOTES[s['ssim_border']],
             'Paper (DVA): 20 random VoxCeleb1 test videos at T=100; here all metrics compare images in [0,1].']
    return '\n'.join(['# Reconstruction', '', *rows, '', '## Settings', '', *settings, '', '## Notes', '',
                      *[f'- {n}' for n in notes], '', '## Per video', '', *vids, '']) + '\n'


def recon_plot(path: Path, result: dict[str, Any], s: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    per_video = result['per_video']
    shown = [k for k in ('ssim', 'ms_ssim', 'lpips', 'mse') if k in result['names']]
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
    save_figure(fig, path)


def write_recon(out: Path, result: dict[str, Any], settings: dict[str, Any], config: dict[str, Any]) -> None:
    """metrics.csv (per video + two means), frames.csv, plot.png, report.md, then config.json (`config` + results)."""
    names, per_video, per_frame = result['names'], result['per_video'], result['per_frame']
    notes = recon_notes(result, settings)
    write_csv(out / 'metrics.csv', ['video', 'frames', *names],
              [[r['video'], r['frames'], *[r[k] for k in names]] for r in per_video]
              + [['mean (all frames)', len(per_frame), *[result['mean'][k] for k in names]],
                 ['mean (per-video means)', len(per_video), *[result['video_mean'][k] for k in names]]])
    write_csv(out / 'frames.csv', ['video', 'frame', *names],
              [[r['video'], r['frame'], *[r[k] for k in names]] for r in per_frame])
    recon_plot(out / 'plot.png', result, settings)
    write_text(out / 'report.md', recon_report(result, settings, notes))
    cli.write_json(out / 'config.json', {**config, **settings, 'notes': list(notes), 'mean': result['mean'],
                                         'video_mean': result['video_mean'], 'seconds': result['seconds'],
                                         'software': cli.software_versions()})


# ----------------------------------------------------------------------------------------------------------------------
# Temporal identity consistency

CONSISTENCY_SCALARS = ('tl_id', 'tg_id', 'src_adjacent', 'edit_adjacent', 'src_edit_similarity')


def consistency_report(s: dict[str, float], settings: dict[str, Any]) -> str:
    dva, stit = PAPER_CONSISTENCY['DVA'], PAPER_CONSISTENCY['STIT']
    return '\n'.join([
        '# Temporal identity consistency', '', '| metric | this run | paper, DVA | paper, STIT |', '|---|---|---|---|',
        f'| TL-ID (→ 1) | {fmt(s["tl_id"])} | {dva["tl_id"]} | {stit["tl_id"]} |',
        f'| TG-ID (→ 1) | {fmt(s["tg_id"])} | {dva["tg_id"]} | {stit["tg_id"]} |',
        f'| mean adjacent-frame similarity, source | {fmt(s["src_adjacent"])} | — | — |',
        f'| mean adjacent-frame similarity, edit | {fmt(s["edit_adjacent"])} | — | — |',
        f'| mean source-edit similarity per frame | {fmt(s["src_edit_similarity"])} | — | — |',
        '', '## Settings', '',
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


def consistency_plot(path: Path, sc: dict[str, Any], settings: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    n = len(sc['curve_src'])
    fig = Figure(figsize=(8, 6), layout='constrained')
    ax1, ax2 = fig.subplots(2, 1)
    for ax, x, key, label in ((ax1, np.arange(n), 'curve', 'similarity to frame 0'),
                              (ax2, np.arange(n - 1) + 0.5, 'adjacent', 'similarity to next frame')):
        ax.plot(x, sc[f'{key}_src'].numpy(), label='source', color='tab:blue')
        ax.plot(x, sc[f'{key}_edit'].numpy(), label='edit', color='tab:orange')
        ax.set_ylabel(label)
        ax.legend(loc='best')
    ax1.set_title(f'identity over time ({settings["embedder"]}): TL-ID {sc["tl_id"]:.4f}, TG-ID {sc["tg_id"]:.4f}')
    ax2.set_xlabel('frame')
    save_figure(fig, path)


def write_consistency(out: Path, stems: Sequence[str], sc: dict[str, Any], settings: dict[str, Any],
                      config: dict[str, Any]) -> dict[str, float]:
    """frames.csv (per-frame curves + a mean row), metrics.csv, plot.png, report.md, then config.json.
    Returns the scalars."""
    scalars = {k: sc[k] for k in CONSISTENCY_SCALARS}
    rows = []
    for i, stem in enumerate(stems):
        nxt = [float(sc['adjacent_src'][i]), float(sc['adjacent_edit'][i])] if i < len(stems) - 1 else ['', '']
        ratio = nxt[1] / nxt[0] if nxt[0] not in ('', 0.0) else ''
        rows.append([stem, float(sc['curve_src'][i]), float(sc['curve_edit'][i]), *nxt, ratio, float(sc['cross'][i])])
    rows.append(['mean', float(sc['curve_src'].mean()), float(sc['curve_edit'].mean()), sc['src_adjacent'],
                 sc['edit_adjacent'], sc['tl_id'], sc['src_edit_similarity']])
    write_csv(out / 'frames.csv', ['frame', 'src_sim_to_first', 'edit_sim_to_first', 'src_sim_to_next',
                                   'edit_sim_to_next', 'next_ratio', 'src_edit_sim'], rows)
    write_csv(out / 'metrics.csv', ['metric', 'value'], [[k, v] for k, v in scalars.items()])
    consistency_plot(out / 'plot.png', sc, settings)
    write_text(out / 'report.md', consistency_report(scalars, settings))
    cli.write_json(out / 'config.json', {**config, **settings, **scalars, 'software': cli.software_versions()})
    return scalars
