"""Strict loading of the released weight files (and of the checkpoints this project writes). Never downloads.

| file (default location)                                                | loader                   |
|------------------------------------------------------------------------|--------------------------|
| checkpoints/diffusion_video_autoencoder/{last,epoch=51-step=1000000}.ckpt | load_dva / read_dva_state |
| pretrained_models/model_ir_se50.pth                                    | load_identity_weights    |
| pretrained_models/mobilenet_224_model_best_gdconv_external.pth.tar     | load_landmark_weights    |
| pretrained_models/79999_iter.pth                                       | load_parser_weights      |
| checkpoints/diffusion_video_autoencoder_cls/last.ckpt                  | load_classifier          |
| checkpoints/diffusion_video_autoencoder/latent.pkl                     | load_identity_stats      |

Every failure raises `WeightsError` naming the file, what was expected, the missing and unexpected keys, and how to
obtain the file.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from config import DVAConfig, from_dict

DVA_CKPT = 'checkpoints/diffusion_video_autoencoder/epoch=51-step=1000000.ckpt'
IR_SE50 = 'pretrained_models/model_ir_se50.pth'
MOBILENET = 'pretrained_models/mobilenet_224_model_best_gdconv_external.pth.tar'
BISENET = 'pretrained_models/79999_iter.pth'
CLS_CKPT = 'checkpoints/diffusion_video_autoencoder_cls/last.ckpt'
LATENT = 'checkpoints/diffusion_video_autoencoder/latent.pkl'

HOW_TO_GET = {
    'dva': 'Download it with `bash download_requirements.sh --only dva_ckpt`, or pass a checkpoint written by '
           'run_train.py (its last.ckpt) with --checkpoint',
    'ir_se50': 'It is in the released pretrained_models.zip: `bash download_requirements.sh --only pretrained_models`',
    'mobilenet': 'It is in the released pretrained_models.zip: `bash download_requirements.sh --only pretrained_models`',
    'bisenet': 'It is in the released pretrained_models.zip: `bash download_requirements.sh --only pretrained_models`',
    'classifier': 'Download it with `bash download_requirements.sh --only cls_ckpt`, or train one with run_cls.py',
    'latent': 'Download it with `bash download_requirements.sh --only latent`, or compute it with run_eval.py',
}


class WeightsError(RuntimeError):
    """A weight file is missing, unreadable, of the wrong kind, or its keys do not match the network."""


def read_file(path: str | os.PathLike, kind: str, trust: bool = False) -> Any:
    """torch.load a weight file on CPU with weights_only=True (unless `trust`), with errors that say what to do."""
    path = Path(path)
    how = HOW_TO_GET.get(kind, '')
    if not path.is_file():
        raise WeightsError(f'{kind} weights not found: {path}. {how}'.rstrip())
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' not in str(e):  # not a disallowed class: the bytes are not a torch file at all
            raise WeightsError(f'cannot read {path} as a torch file (not a pickle or zip checkpoint). Is it '
                               f'truncated or of another kind? {how}'.rstrip()) from e
        raise WeightsError(
            f'{path} holds Python objects that a weights-only load refuses ({_unsupported(e)}). If you trust '
            f'the file, pass --trust_checkpoint to load it with full unpickling.') from e
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a torch file
        raise WeightsError(f'cannot read {path} as a torch file ({type(e).__name__}: {e}). Is it truncated? {how}') from e


def _unsupported(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if 'Unsupported global' in line]
    return lines[0] if lines else type(e).__name__


def _key_report(expected: list[str], got: list[str], limit: int = 8) -> str:
    missing = [k for k in expected if k not in set(got)]
    unexpected = [k for k in got if k not in set(expected)]
    parts = []
    for name, keys in (('missing', missing), ('unexpected', unexpected)):
        if keys:
            shown = ', '.join(keys[:limit]) + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')
            parts.append(f'{name} keys: {shown}')
    return '; '.join(parts)


def load_strict(module: nn.Module, state: dict[str, Tensor], path: str | os.PathLike, kind: str) -> None:
    """module.load_state_dict(state, strict=True) with a readable error naming the file and the key differences."""
    expected = list(module.state_dict().keys())
    report = _key_report(expected, list(state.keys()))
    if report:
        raise WeightsError(f'{path} does not match the {kind} network ({type(module).__name__}): {report}. '
                           f'{HOW_TO_GET.get(kind, "")}'.rstrip())
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        msg = '; '.join(line.strip() for line in str(e).splitlines()[1:6])
        raise WeightsError(f'{path} has the {kind} keys but wrong shapes: {msg}. Is this the right file or the right '
                           f'--template? {HOW_TO_GET.get(kind, "")}'.rstrip()) from e


def _state_dict_of(obj: Any, path: Path, kind: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f'{path} is not a state dict (got {type(obj).__name__}); expected the released {kind} file. '
                           f'{HOW_TO_GET.get(kind, "")}'.rstrip())
    return obj


# --------------------------------------------------------------------------------------------------------------------
# Frozen encoders from the separate pretrained files (used to start training from scratch)


def load_identity_weights(idnet: nn.Module, path: str | os.PathLike = IR_SE50) -> None:
    """Plain IR-SE50 backbone state dict into `IdentityEncoder.backbone`."""
    load_strict(idnet.backbone, _state_dict_of(read_file(path, 'ir_se50'), Path(path), 'ir_se50'), path, 'ir_se50')


def load_landmark_weights(lndnet: nn.Module, path: str | os.PathLike = MOBILENET) -> None:
    """{'state_dict': {'module.<key>': ...}} (extra top-level keys ignored) into `LandmarkEncoder.backbone`."""
    sd = _state_dict_of(read_file(path, 'mobilenet'), Path(path), 'mobilenet')
    sd = {k[len('module.'):]: v for k, v in sd.items() if k.startswith('module.')} or sd
    load_strict(lndnet.backbone, sd, path, 'mobilenet')


def load_parser_weights(bgnet: nn.Module, path: str | os.PathLike = BISENET) -> None:
    """Plain BiSeNet (19 classes) state dict into `FaceParser.backbone`."""
    load_strict(bgnet.backbone, _state_dict_of(read_file(path, 'bisenet'), Path(path), 'bisenet'), path, 'bisenet')


def load_pretrained_encoders(encoder: nn.Module, pretrained_dir: str | os.PathLike = 'pretrained_models') -> None:
    """Load the three frozen networks of a FaceEncoder from a `pretrained_models/` folder."""
    d = Path(pretrained_dir)
    load_identity_weights(encoder.idnet, d / Path(IR_SE50).name)
    load_landmark_weights(encoder.lndnet, d / Path(MOBILENET).name)
    load_parser_weights(encoder.bgnet, d / Path(BISENET).name)


# --------------------------------------------------------------------------------------------------------------------
# DVA checkpoints (released Lightning files and ours)


def split_dva_state(state: dict[str, Tensor], which: Literal['ema', 'model']) -> dict[str, Tensor]:
    prefix = 'ema_model.' if which == 'ema' else 'model.'
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_dva_checkpoint(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(Lightning `state_dict` with model.* / ema_model.* keys, the rest of the checkpoint dict)."""
    path = Path(path)
    ckpt = read_file(path, 'dva', trust)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise WeightsError(f'{path} is not a DVA Lightning checkpoint (no "state_dict"); expected the released '
                           f'{Path(DVA_CKPT).name} or a last.ckpt from run_train.py. {HOW_TO_GET["dva"]}')
    state = ckpt['state_dict']
    if not any(k.startswith('ema_model.') for k in state) and not any(k.startswith('model.') for k in state):
        hint = ' It looks like a classifier checkpoint: pass it as --cls_checkpoint.' if 'classifier.weight' in state else ''
        raise WeightsError(f'{path} has no model.* / ema_model.* keys, so it is not a DVA checkpoint.{hint}')
    return state, {k: v for k, v in ckpt.items() if k != 'state_dict'}


def config_for_checkpoint(state: dict[str, Tensor], meta: dict[str, Any], base: DVAConfig) -> DVAConfig:
    """The config stored in our checkpoints, else `base` with the UNet widths read off the weights.

    Released checkpoints carry no usable config; their base width and embedding width are inferred from
    `time_embed.time_embed.0.weight` ([embed, model_channels]); every other size must match `base`, which the
    strict load then checks.
    """
    if 'dva_config' in meta:
        return from_dict(DVAConfig, meta['dva_config'])
    w = state.get('ema_model.time_embed.time_embed.0.weight', state.get('model.time_embed.time_embed.0.weight'))
    if w is None:
        return base
    return replace(base, unet=replace(base.unet, embed_channels=w.shape[0], model_channels=w.shape[1]))


def load_dva(
    path: str | os.PathLike,
    base: DVAConfig,
    which: Literal['ema', 'model'] = 'ema',
    trust: bool = False,
) -> tuple[nn.Module, DVAConfig, dict[str, Any]]:
    """Build a DiffusionVideoAutoencoder from a checkpoint and load `which` weights strictly (frozen encoders included).

    Returns (model in eval mode on CPU, its config, checkpoint metadata such as global_step).
    """
    from model.autoencoder import DiffusionVideoAutoencoder

    state, meta = read_dva_checkpoint(path, trust)
    cfg = config_for_checkpoint(state, meta, base)
    sub = split_dva_state(state, which)
    if not sub:
        raise WeightsError(f'{path} has no {which} weights ({"ema_model" if which == "ema" else "model"}.* keys)')
    model = DiffusionVideoAutoencoder(cfg)
    load_strict(model, sub, path, 'dva')
    return model.eval(), cfg, meta


# --------------------------------------------------------------------------------------------------------------------
# Attribute classifier and identity statistics


def load_classifier(path: str | os.PathLike = CLS_CKPT, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The released (or our) classifier checkpoint -> (AttributeClassifier in eval mode, metadata)."""
    from model.classifier import AttributeClassifier

    path = Path(path)
    ckpt = read_file(path, 'classifier', trust)
    state = _state_dict_of(ckpt, path, 'classifier')
    if any(k.startswith(('model.', 'ema_model.')) for k in state) and 'classifier.weight' not in state:
        raise WeightsError(f'{path} is a DVA checkpoint, not a classifier checkpoint: pass it as --checkpoint and give '
                           f'the classifier with --cls_checkpoint. {HOW_TO_GET["classifier"]}')
    if 'classifier.weight' not in state:
        raise WeightsError(f'{path} has no classifier.weight: not an attribute-classifier checkpoint. '
                           f'{HOW_TO_GET["classifier"]}')
    num_classes, id_dim = state['classifier.weight'].shape
    clf = AttributeClassifier(id_dim, num_classes)
    load_strict(clf, state, path, 'classifier')
    meta = {k: v for k, v in ckpt.items() if k != 'state_dict'} if isinstance(ckpt, dict) else {}
    return clf.eval(), meta


def load_identity_stats(path: str | os.PathLike = LATENT) -> dict[str, Tensor]:
    """latent.pkl: {'conds': [N,512], 'conds_mean': [512], 'conds_std': [512]} (a torch zip file despite the name)."""
    path = Path(path)
    obj = read_file(path, 'latent')
    if not isinstance(obj, dict) or not {'conds_mean', 'conds_std'} <= set(obj):
        raise WeightsError(f'{path} is not an identity-statistics file: expected keys conds, conds_mean, conds_std. '
                           f'{HOW_TO_GET["latent"]}')
    return obj


def load_identity_encoder(
    base: DVAConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained_dir: str | os.PathLike | None = None,
    random: bool = False,
    trust: bool = False,
) -> tuple[nn.Module, str, DVAConfig]:
    """The frozen ArcFace IR-SE50 alone, in eval mode without grad, from exactly one of: a DVA checkpoint (its EMA
    copy; the UNet is never built), `pretrained_dir/model_ir_se50.pth`, or random weights (tests).

    Returns (net, a description of the weight source, the config: the checkpoint's own when it carries one, else
    `base`, default the released DVAConfig).
    """
    from model.encoders import IdentityEncoder

    if sum([checkpoint is not None, pretrained_dir is not None, random]) != 1:
        raise ValueError('give exactly one of checkpoint, pretrained_dir, random')
    cfg = base or DVAConfig()
    if checkpoint is not None:
        state, meta = read_dva_checkpoint(checkpoint, trust)
        cfg = config_for_checkpoint(state, meta, cfg)
        net = IdentityEncoder(cfg.encoder.id_num_layers)
        weights = split_dva_state(state, 'ema') or split_dva_state(state, 'model')
        prefix = 'encoder.idnet.'
        load_strict(net, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, checkpoint, 'dva')
        source = f'checkpoint:{checkpoint} (EMA identity encoder)'
    elif pretrained_dir is not None:
        net = IdentityEncoder(cfg.encoder.id_num_layers)
        path = Path(pretrained_dir) / Path(IR_SE50).name
        load_identity_weights(net, path)
        source = f'pretrained:{path}'
    else:
        net = IdentityEncoder(cfg.encoder.id_num_layers)
        source = 'random'
    return net.eval().requires_grad_(False), source, cfg
