"""A CLIP text direction for an encoded video: loaded from a file, reused from an earlier run with the same settings,
or searched on one frame with the released objective (`editing.clip_edit.find_clip_direction`) and saved.

Direction files are named by everything that determines them (`<attribute>_<key>.pt`, key = hash of the texts, the
loss weights, lr, steps, frame, checkpoint and CLIP weights), so a run with other settings never overwrites the
direction an earlier result points to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config import EditConfig
from editing.cache import file_stamp, make_key


def settings_of(editor, names: list[str], cfg: EditConfig, video: str) -> dict[str, Any]:
    """Everything that determines a direction: texts, loss weights, lr, steps, the video (`video`: its content key)
    and frame, checkpoint and CLIP weights."""
    ckpt = editor.checkpoint
    return {'video': video, 'src_txt': cfg.src_txt, 'trg_txt': cfg.trg_txt, 'lr': cfg.lr, 'clip_w': cfg.clip_loss_w,
            'id_w': cfg.id_loss_w, 'l1_w': cfg.l1_loss_w, 'n_train_step': cfg.n_train_step, 'n_iter': cfg.n_iter,
            'early_stop': cfg.early_stop, 'first_step': cfg.first_step,
            'clip_frame': names[cfg.clip_frame] if cfg.clip_frame < len(names) else cfg.clip_frame,
            'precision': editor.cfg.precision, 'checkpoint': file_stamp(ckpt) if ckpt.is_file() else str(ckpt),
            'clip': cfg.random_clip or str(cfg.clip_weights)}


def direction_path(out_dir: Path, cfg: EditConfig, settings: dict[str, Any]) -> Path:
    return out_dir / 'directions' / f'{cfg.attribute[0]}_{make_key(**settings)[:12]}.pt'


def clip_model(cfg: EditConfig, device: torch.device):
    """The CLIP image/text model: cfg.clip_weights (OpenAI ViT-B/16 file), or a random one for tests."""
    from editing.api import EditError
    from editing.clip_edit import load_clip, tiny_clip

    if cfg.random_clip == 'tiny':
        return tiny_clip(device)[0]
    try:
        return load_clip(cfg.clip_weights, device, random_init=cfg.random_clip == 'vit', half=cfg.clip_fp16)[0]
    except (FileNotFoundError, ValueError) as e:
        raise EditError(str(e)) from None


def direction(editor, video, cfg: EditConfig, out_dir: Path | None):
    """A `Direction` (see `Editor.clip_direction`). With several ranks, rank 0 finds it and shares it."""
    from editing.api import Direction
    from editing.clip_edit import apply_clip_direction

    found = _find(editor, video, cfg, out_dir) if editor.ranks.main else None
    delta, path, settings = editor.ranks.broadcast(found, 'sharing the CLIP direction')
    return Direction(cfg.attribute[0], lambda identity, scale: apply_clip_direction(identity, delta, scale),
                     {'src_txt': settings.get('src_txt'), 'trg_txt': settings.get('trg_txt'),
                      'direction': str(path) if path else None})


def _find(editor, video, cfg: EditConfig, out_dir: Path | None):
    """(delta [1,512], the direction file or None, its settings)."""
    from editing.api import EditError
    from editing.clip_edit import CLIPDirectionalLoss, find_clip_direction, load_direction, save_direction
    from editing.core import crops_to_float

    if cfg.direction:
        try:
            found, meta = load_direction(cfg.direction)
        except (FileNotFoundError, ValueError) as e:
            raise EditError(str(e)) from None
        return found.delta, Path(cfg.direction), meta.get('settings', {})
    if not 0 <= cfg.clip_frame < len(video):
        raise EditError(f'--clip_frame {cfg.clip_frame} is outside the {len(video)} selected frames')
    settings = settings_of(editor, video.names, cfg, video.content)
    path = direction_path(out_dir, cfg, settings) if out_dir is not None else None
    if path is not None and path.is_file() and not cfg.overwrite:
        found, meta = load_direction(path)
        if meta.get('settings') == settings:
            editor.log(f'reusing the direction in {path} (pass --overwrite to search again)')
            return found.delta, path, settings
    clip_loss = CLIPDirectionalLoss(clip_model(cfg, editor.device)).to(editor.device)
    i = cfg.clip_frame
    frame = crops_to_float(torch.from_numpy(video.align_arrays.read('crops', slice(i, i + 1)))).to(editor.device)

    def snapshot(it, states):
        from torchvision.utils import save_image

        save_image((states.float().clamp(-1, 1) + 1) / 2, path.with_name(f'{path.stem}_it{it:05d}.png'),
                   nrow=len(states))

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    model = editor.model if hasattr(editor.model, 'encoder') else editor.model._orig_mod
    with editor.timer('clip search'):
        found = find_clip_direction(model, frame.to(editor.sampler.dtype), clip_loss,
                                    cfg.src_txt, cfg.trg_txt, n_train_step=cfg.n_train_step, n_iter=cfg.n_iter,
                                    lr=cfg.lr, clip_w=cfg.clip_loss_w, id_w=cfg.id_loss_w, l1_w=cfg.l1_loss_w,
                                    early_stop_patience=cfg.early_stop, early_stop_tol=cfg.early_stop_tol,
                                    precision=editor.cfg.precision, first_step=cfg.first_step,
                                    progress=editor.progress, snapshot_fn=snapshot if path else None)
    if path is not None:
        save_direction(path, found, {'settings': settings, 'video': str(cfg.video_path)})
        editor.log(f'direction saved to {path} after {found.n_iter_run} iterations'
                   + (' (early stop)' if found.stopped_early else ''))
    return found.delta, path, settings
