"""A whole DVA edit on one page, through the Python API (the scripts do the same with more flags):

    python example_edit.py                      # after `bash download_requirements.sh`

1. load the EMA model, its encoders and the sampler once; 2. encode the video: aligned crops, per-frame identity
and landmarks (the motion code), face masks and the DDIM inversion x_T of every frame, cached on disk; 3. move the
video identity along a classifier direction and re-render every frame from its own x_T; 4. blend inside the face
mask, paste back, write frames and videos.
"""
from __future__ import annotations

from dataclasses import replace

from config import EditConfig
from editing.api import Editor


def main(video: str = 'sample_video', checkpoint: str | None = None,
         cls_checkpoint: str = 'checkpoints/diffusion_video_autoencoder_cls/last.ckpt', out: str = 'example_out',
         attribute: str = 'Mustache', scales: tuple[float, ...] = (0.2, 0.4), **settings) -> dict:
    # 1. Load once: checkpoint, device ('auto': CUDA when available), precision, DDIM steps, cache folder.
    cfg = EditConfig(video_path=video, checkpoint=checkpoint, cls_checkpoint=cls_checkpoint, T=100)
    editor = Editor(replace(cfg, **settings))  # settings: any other EditConfig field, e.g. device='cpu'

    # 2. Encode: the video's latents, computed once per (video, checkpoint, T) and reused from the cache afterwards.
    video = editor.encode()
    print(f'{len(video)} frames; identity {tuple(video.identity.shape)} (averaged over the frames with a face), '
          f'landmarks {tuple(video.landmarks.shape)}, x_T {tuple(video.x_T.shape)}; frames without a face: '
          f'{video.missing}')

    # 3. Edit: the classifier direction of a CelebA attribute, rendered at each scale (T network calls per frame).
    direction = editor.classifier_direction(attribute)
    edits = [editor.edit(video, direction, s) for s in scales]

    # 4. Write: blend in the face mask, paste back into the full frames, frames/*.png + out.mp4 + side_by_side.mp4.
    summary = editor.write(video, edits, out)
    for path in summary['outputs']:
        print('wrote', path)
    editor.close()
    return summary


if __name__ == '__main__':
    main()
