"""Edit a face video with a CLIP text direction found by optimising the identity of one of its frames.

    python editing_CLIP.py --video_path sample_video --attribute beards --src_txt face --trg_txt "face with beard" \
        --scale 1.0 --clip_weights pretrained_models/ViT-B-16.pt

The found direction is saved under <out>/directions/ (named by every setting that determines it) and reused by later
runs with the same settings, so a new --scale costs one DDIM render per frame and no optimisation.
"""
from __future__ import annotations

import sys

from editing import flags

OUT_ROOT = 'editing_CLIP'


def main(argv: list[str] | None = None) -> dict:
    cfg = flags.to_config(flags.parser(__doc__.splitlines()[0], OUT_ROOT, 'clip').parse_args(argv))
    out = flags.out_root(cfg, OUT_ROOT)
    editor: list = []

    def edit() -> dict:
        from editing import clip_search
        from editing.api import Editor, scale_name

        weights = None if cfg.direction or cfg.random_clip else cfg.clip_weights
        flags.preflight(cfg, out, [('--clip_weights', weights), ('--direction', cfg.direction)])
        editor.append(Editor(cfg))
        ed = editor[0]
        _, source = ed.open()
        settings = clip_search.settings_of(ed, list(source.names), cfg)
        tag = clip_search.direction_path(out, cfg, settings).stem if not cfg.direction else \
            f'{cfg.attribute[0]}_{clip_search.Path(cfg.direction).stem}'
        names = [f'{tag}_scale{scale_name(s)}' for s in cfg.scale]
        ed.check_outputs(out, names)  # before any heavy work
        check_search(cfg, ed, len(source), weights)
        video = ed.encode()
        ed.stage = None  # the search is not counted in frames: an interruption there says no frame count
        direction = ed.clip_direction(video, out)
        edits = [ed.edit(video, direction, s, name) for s, name in zip(cfg.scale, names)]
        recon = ed.reconstruct(video) if cfg.save_recon else None
        summary = ed.write(video, edits, out, recon, {'command': flags.command('editing_CLIP.py', argv)})
        flags.report(summary, out, ed.log)
        return summary

    return flags.run(edit, editor, out)


def check_search(cfg, ed, n_frames: int, weights: str | None) -> None:
    """What the direction search or load would fail on after the inversion, checked before it (EditError)."""
    import zipfile

    from editing.api import EditError

    if cfg.direction:
        from editing.clip_edit import load_direction

        try:
            load_direction(cfg.direction)
        except Exception as e:  # noqa: BLE001 - any unreadable file: name it, before the work
            raise EditError(f'--direction {cfg.direction}: not a readable direction file '
                            f'({(str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]})') from None
        return
    if cfg.clip_frame >= n_frames:
        raise EditError(f'--clip_frame {cfg.clip_frame} is outside the {n_frames} selected frames')
    if cfg.clip_fp16 and ed.device.type != 'cuda':
        raise EditError(f'--clip_fp16 needs a CUDA device (this run uses {ed.device}): drop it')
    if weights and not zipfile.is_zipfile(weights):
        raise EditError(f'--clip_weights {weights}: not a complete weights archive (an interrupted download?)')


if __name__ == '__main__':
    main(sys.argv[1:])
