"""Edit a face video with a CLIP text direction found by optimising the identity of one of its frames.

    python editing_CLIP.py --video_path sample_video --attribute beards --src_txt face --trg_txt "face with beard" \
        --scale 1.0 --clip_weights pretrained_models/ViT-B-16.pt

The found direction is saved under <out>/directions/ (named by every setting that determines it) and reused by later
runs with the same settings, so a new --scale costs one DDIM render per frame and no optimisation. Under torchrun the
direction is searched once (rank 0) and shared.
"""
from __future__ import annotations

import sys
from pathlib import Path

from editing import flags

OUT_ROOT = 'editing_CLIP'


def main(argv: list[str] | None = None) -> dict:
    cfg, outputs = flags.start(argv, __doc__, OUT_ROOT, 'clip')
    editor: list = []

    def edit() -> dict:
        from editing import clip_search
        from editing.api import fingerprint, scale_name

        weights = None if cfg.direction or cfg.random_clip else cfg.clip_weights
        flags.preflight(cfg, outputs, [('--clip_weights', weights), ('--direction', cfg.direction)])
        ed, ranks = flags.load_editor(cfg, outputs, editor)

        def names(source, out) -> list[str]:
            if cfg.direction:
                tag = f'{cfg.attribute[0]}_{Path(cfg.direction).stem}'
            else:
                settings = clip_search.settings_of(ed, list(source.names), cfg, fingerprint(source))
                tag = clip_search.direction_path(out, cfg, settings).stem
            return [f'{tag}_scale{scale_name(s)}' for s in cfg.scale]

        folders = {}
        for path, out in outputs:  # before any heavy work; each source opened and hashed once here
            source = ed.open(path)[1]
            folders[path] = names(source, out)
            ed.check_outputs(out, folders[path])
            check_search(cfg, ed, len(source), weights)

        def edit_video(path: str, out) -> dict:
            video = ed.encode(path)
            ed.stage = None  # the search is not counted in frames: an interruption there says no frame count
            direction = ed.clip_direction(video, out)
            edits = [ed.edit(video, direction, s, name) for s, name in zip(cfg.scale, folders[path])]
            return flags.write_results(ed, video, edits, out, 'editing_CLIP.py', argv)

        return flags.for_each_video(outputs, edit_video, ranks, outputs[0][1].parent, ed.log)

    return flags.run(edit, editor, outputs)


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
