"""Edit a face video along CelebA attribute directions of the linear identity classifier.

    python editing_classifier.py --video_path sample_video --attribute Mustache Eyeglasses --scale 0.2 0.4

writes one folder per (attribute, scale) under editing_classifier/<video name>/ (see README).
"""
from __future__ import annotations

import sys

from editing import flags

OUT_ROOT = 'editing_classifier'


def main(argv: list[str] | None = None) -> dict:
    cfg = flags.to_config(flags.parser(__doc__.splitlines()[0], OUT_ROOT, 'classifier').parse_args(argv))
    out = flags.out_root(cfg, OUT_ROOT)
    editor: list = []

    def edit() -> dict:
        from config import CELEBA_ATTRIBUTES
        from editing.api import Editor, EditError, scale_name

        unknown = [a for a in cfg.attribute if a not in CELEBA_ATTRIBUTES]
        if unknown:
            raise EditError(f'unknown attribute(s) {unknown}; choose from: {", ".join(CELEBA_ATTRIBUTES)}')
        flags.preflight(cfg, out, [('--cls_checkpoint', cfg.cls_checkpoint)])
        pairs = [(a, s, f'{a}_{scale_name(s)}') for a in cfg.attribute for s in cfg.scale]
        editor.append(Editor(cfg))
        ed = editor[0]
        ed.check_outputs(out, [name for *_, name in pairs])  # before any heavy work
        directions = {a: ed.classifier_direction(a) for a in cfg.attribute}
        video = ed.encode()
        edits = [ed.edit(video, directions[a], s, name) for a, s, name in pairs]
        recon = ed.reconstruct(video) if cfg.save_recon else None
        summary = ed.write(video, edits, out, recon, {'command': flags.command('editing_classifier.py', argv)})
        flags.report(summary, out, ed.log)
        return summary

    return flags.run(edit, editor, out)


if __name__ == '__main__':
    main(sys.argv[1:])
