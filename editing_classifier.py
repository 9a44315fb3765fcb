"""Edit a face video along CelebA attribute directions of the linear identity classifier.

    python editing_classifier.py --video_path sample_video --attribute Mustache Eyeglasses --scale 0.2 0.4
    torchrun --nproc_per_node 4 editing_classifier.py --video_path talk.mp4 ...     # frames spread over 4 GPUs

writes one folder per (attribute, scale) under editing_classifier/<video name>/ (see README).
"""
from __future__ import annotations

import sys

from editing import flags

OUT_ROOT = 'editing_classifier'


def main(argv: list[str] | None = None) -> dict:
    cfg, outputs = flags.start(argv, __doc__, OUT_ROOT, 'classifier')
    editor: list = []

    def edit() -> dict:
        from config import CELEBA_ATTRIBUTES
        from editing.api import EditError, scale_name

        unknown = [a for a in cfg.attribute if a not in CELEBA_ATTRIBUTES]
        if unknown:
            raise EditError(f'unknown attribute(s) {unknown}; choose from: {", ".join(CELEBA_ATTRIBUTES)}')
        flags.preflight(cfg, outputs, [('--cls_checkpoint', cfg.cls_checkpoint)])
        pairs = [(a, s, f'{a}_{scale_name(s)}') for a in cfg.attribute for s in cfg.scale]
        ed, ranks = flags.load_editor(cfg, outputs, editor)
        for _, out in outputs:  # before any heavy work
            ed.check_outputs(out, [name for *_, name in pairs])
        directions = {a: ed.classifier_direction(a) for a in cfg.attribute}

        def edit_video(path: str, out) -> dict:
            video = ed.encode(path)
            edits = [ed.edit(video, directions[a], s, name) for a, s, name in pairs]
            return flags.write_results(ed, video, edits, out, 'editing_classifier.py', argv)

        return flags.for_each_video(outputs, edit_video, ranks, outputs[0][1].parent, ed.log)

    return flags.run(edit, editor, outputs)


if __name__ == '__main__':
    main(sys.argv[1:])
