from __future__ import annotations

import json

import pytest

import templates
from config import ClsConfig, DVAConfig, apply_overrides, from_dict, to_dict


def test_presets_round_trip_through_json():
    for name in templates.PRESETS:
        cfg = templates.get_preset(name)
        assert from_dict(DVAConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    for name in templates.CLS_PRESETS:
        cfg = templates.get_cls_preset(name)
        assert from_dict(ClsConfig, to_dict(cfg)) == cfg


def test_released_preset_values():
    cfg = templates.diffusion_video_autoencoder()
    assert cfg.unet.model_channels == 128 and cfg.unet.channel_mult == (1, 1, 2, 2, 4, 4)
    assert cfg.encoder.fusion_in_dim == 614 and cfg.encoder.z_dim == 512
    assert cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999 and cfg.data.frames_per_clip == 4
    # run_eval's preset shares the name, so latent.pkl goes to checkpoints/diffusion_video_autoencoder/ as released
    ev = templates.diffusion_video_autoencoder_eval()
    assert ev.name == cfg.name and ev.unet == cfg.unet and ev.data.eval_batch_size == 64


def test_overrides_are_typed_and_unknown_keys_fail():
    cfg = apply_overrides(templates.tiny(), ['train.lr=3e-5', 'unet.channel_mult=[1,2,2]', 'train.precision=32',
                                            'data.flip=frame', 'name=run1'])
    assert cfg.train.lr == 3e-5 and cfg.unet.channel_mult == (1, 2, 2) and cfg.train.precision == '32'
    assert cfg.data.flip == 'frame' and cfg.name == 'run1'
    with pytest.raises(KeyError, match='unknown config key'):
        apply_overrides(cfg, ['train.lrr=1'])
    with pytest.raises(TypeError):
        apply_overrides(cfg, ['train.max_steps=abc'])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ['data.flip=sometimes'])
    with pytest.raises(ValueError):
        apply_overrides(cfg, ['train.lr'])


def test_unknown_keys_in_stored_config_fail():
    d = to_dict(templates.tiny())
    d['unet']['legacy'] = 1
    with pytest.raises(KeyError, match='unet.legacy'):
        from_dict(DVAConfig, d)
