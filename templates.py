"""Named presets, one per paper configuration, built without mutation.

    diffusion_video_autoencoder()       the released model (VoxCeleb1 256x256, 4 GPUs x 4 frames, 1M steps)
    diffusion_video_autoencoder_eval()  the same network for identity statistics (run_eval.py)
    tiny()                              a baby model that runs on CPU in seconds (tests, smoke runs)
    attr_classifier_celebahq()          the released 40-attribute classifier (run_cls.py)
    tiny_cls()                          its CPU-sized variant
"""
from __future__ import annotations

from dataclasses import replace

from config import ClsConfig, DataConfig, DiffusionConfig, DVAConfig, TrainConfig, UNetConfig


def diffusion_video_autoencoder() -> DVAConfig:
    return DVAConfig()


def diffusion_video_autoencoder_eval() -> DVAConfig:
    """The released run_eval.py preset: the training network AND name, so that its latent.pkl lands in
    checkpoints/diffusion_video_autoencoder/ where run_cls.py and the editing scripts look; 64 frames per batch."""
    cfg = diffusion_video_autoencoder()
    return replace(cfg, data=replace(cfg.data, eval_batch_size=64))


def tiny() -> DVAConfig:
    """32x32 UNet with widths (16, 32), 8 norm groups and 10 evaluation steps. Encoders keep their real layouts."""
    return DVAConfig(
        name='tiny',
        unet=UNetConfig(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(16,), embed_channels=64, dropout=0.0, max_norm_groups=8),
        diffusion=DiffusionConfig(T_eval=10),
        data=DataConfig(frames_per_clip=2, num_workers=0, eval_batch_size=8),
        train=TrainConfig(precision='32', max_steps=20, log_every=1, sample_every=10, ckpt_every=10,
                          sample_batch=2),
    )


def attr_classifier_celebahq() -> ClsConfig:
    return ClsConfig()


def tiny_cls() -> ClsConfig:
    return ClsConfig(name='tiny_cls', batch_size=8, max_steps=200, precision='32', num_workers=0, image_size=64)


PRESETS = {
    'diffusion_video_autoencoder': diffusion_video_autoencoder,
    'diffusion_video_autoencoder_eval': diffusion_video_autoencoder_eval,
    'tiny': tiny,
}
CLS_PRESETS = {
    'diffusion_video_autoencoder_cls': attr_classifier_celebahq,
    'tiny_cls': tiny_cls,
}


def get_preset(name: str) -> DVAConfig:
    if name not in PRESETS:
        raise KeyError(f'unknown template {name!r}; choose one of {sorted(PRESETS)}')
    return PRESETS[name]()


def get_cls_preset(name: str) -> ClsConfig:
    if name not in CLS_PRESETS:
        raise KeyError(f'unknown classifier template {name!r}; choose one of {sorted(CLS_PRESETS)}')
    return CLS_PRESETS[name]()
