"""Edit a face video along CelebA attribute directions of the linear identity classifier.

    python editing_classifier.py --video_path sample_video --attribute Mustache Eyeglasses --scale 0.2 0.4
    torchrun --nproc_per_node 4 editing_classifier.py --video_path talk.mp4 ...     # frames spread over 4 GPUs

writes one folder per (attribute, scale) under editing_classifier/<video name>/ (see README).
"""
from __future__ import annotations

import sys
from dataclasses import replace

from editing import flags

OUT_ROOT = 'editing_classifier'


def main(argv: list[str] | None = None) -> dict:
    args = flags.parser(__doc__.splitlines()[0], OUT_ROOT, 'classifier').parse_args(argv)
    cfg = flags.to_config(args)
    outputs = flags.outputs_of(args.videos, cfg, OUT_ROOT)
    editor: list = []

    def edit() -> dict:
        from config import CELEBA_ATTRIBUTES
        from editing import distributed
        from editing.api import Editor, EditError, scale_name

        unknown = [a for a in cfg.attribute if a not in CELEBA_ATTRIBUTES]
        if unknown:
            raise EditError(f'unknown attribute(s) {unknown}; choose from: {", ".join(CELEBA_ATTRIBUTES)}')
        flags.preflight(cfg, outputs, [('--cls_checkpoint', cfg.cls_checkpoint)])
        pairs = [(a, s, f'{a}_{scale_name(s)}') for a in cfg.attribute for s in cfg.scale]
        ranks = distributed.from_env(cfg.device)  # several videos: whole videos per rank
        one = len(outputs) == 1
        editor.append(Editor(replace(cfg, device=distributed.rank_device(cfg.device, ranks)),
                             ranks=ranks if one else distributed.Ranks()))
        ed = editor[0]
        for _, out in outputs:  # before any heavy work
            ed.check_outputs(out, [name for *_, name in pairs])
        directions = {a: ed.classifier_direction(a) for a in cfg.attribute}

        def edit_video(path: str, out) -> dict:
            video = ed.encode(path)
            edits = [ed.edit(video, directions[a], s, name) for a, s, name in pairs]
            recon = ed.reconstruct(video) if cfg.save_recon else None
            summary = ed.write(video, edits, out, recon, {'command': flags.command('editing_classifier.py', argv)})
            if ed.ranks.main:
                flags.report(summary, out, ed.log)
            return summary

        return flags.for_each_video(outputs, edit_video, ranks, outputs[0][1].parent, ed.log)

    return flags.run(edit, editor, outputs)


if __name__ == '__main__':
    main(sys.argv[1:])
