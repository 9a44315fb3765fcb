"""Typed configuration: one frozen dataclass per concern, all JSON-serialisable.

A `DVAConfig` fully describes a diffusion video autoencoder run (network, encoders, diffusion, data, training).
`ClsConfig` describes the attribute-classifier run. Presets live in `templates.py`; `apply_overrides` applies
`--set key=value` strings with type checking; `to_dict` / `from_dict` round-trip through JSON and are stored with
every checkpoint this project writes.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Precision = Literal['32', '16-mixed', 'bf16-mixed']
InferencePrecision = Literal['fp32', 'fp16', 'bf16']

# The 40 CelebA attributes, in the order of CelebAMask-HQ-attribute-anno.txt and of the released classifier rows.
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    '5_o_Clock_Shadow', 'Arched_Eyebrows', 'Attractive', 'Bags_Under_Eyes', 'Bald', 'Bangs', 'Big_Lips', 'Big_Nose',
    'Black_Hair', 'Blond_Hair', 'Blurry', 'Brown_Hair', 'Bushy_Eyebrows', 'Chubby', 'Double_Chin', 'Eyeglasses',
    'Goatee', 'Gray_Hair', 'Heavy_Makeup', 'High_Cheekbones', 'Male', 'Mouth_Slightly_Open', 'Mustache',
    'Narrow_Eyes', 'No_Beard', 'Oval_Face', 'Pale_Skin', 'Pointy_Nose', 'Receding_Hairline', 'Rosy_Cheeks',
    'Sideburns', 'Smiling', 'Straight_Hair', 'Wavy_Hair', 'Wearing_Earrings', 'Wearing_Hat', 'Wearing_Lipstick',
    'Wearing_Necklace', 'Wearing_Necktie', 'Young',
)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f'{name}={value!r} is not one of {choices}')


@dataclass(frozen=True)
class UNetConfig:
    """The noise-prediction UNet (released: `BeatGANsAutoencModel` without its encoder)."""

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128  # base width; the sinusoidal time embedding has this many dims too
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2  # per level in the encoder half; the decoder half has one more
    attention_resolutions: tuple[int, ...] = (16,)  # plus one attention block in the middle
    embed_channels: int = 512  # time-embedding width fed to every ResBlock
    dropout: float = 0.1
    max_norm_groups: int = 32  # GroupNorm uses min(max_norm_groups, C) groups
    attention: Literal['sdpa', 'math'] = 'sdpa'  # sdpa = fused scaled_dot_product_attention, math = released einsum

    def __post_init__(self) -> None:
        _check_choice('unet.attention', self.attention, ('sdpa', 'math'))
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f'unet.image_size={self.image_size} is not divisible by 2^{len(self.channel_mult) - 1}')


@dataclass(frozen=True)
class EncoderConfig:
    """The face encoder: frozen ArcFace + landmark net + BiSeNet, and the trainable Linear fusion into z_face."""

    id_dim: int = 512  # ArcFace IR-SE50 output width
    id_num_layers: int = 50
    n_landmarks: int = 51  # points 17..67 of the 68-point layout (jaw dropped), x/y interleaved
    first_landmark: int = 17
    z_dim: int = 512  # width of z_face, the UNet's conditioning input
    parse_size: int = 512  # BiSeNet input resolution
    bg_classes_train: tuple[int, ...] = (0, 16, 18)  # background, cloth, hat
    bg_classes_video: tuple[int, ...] = (0, 16, 18, 7, 8, 14, 17)  # + ears, neck, hair

    @property
    def fusion_in_dim(self) -> int:
        return self.id_dim + 2 * self.n_landmarks


@dataclass(frozen=True)
class DiffusionConfig:
    """Gaussian diffusion with a linear beta schedule, eps prediction, and the DVA training loss."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    T_eval: int = 20  # respaced DDIM steps used for evaluation and sample grids during training
    loss_eps_weight: float = 1.0  # weight of the two L1 noise terms
    loss_consistency_weight: float = 1.0  # weight of the masked L1 between the two x0 estimates


@dataclass(frozen=True)
class DataConfig:
    """Training data: ROOT/{train,test}/<video>/<frames>."""

    root: str = 'datasets/voxceleb1'
    frames_per_clip: int = 4  # K frames sampled without replacement from one video
    flip: Literal['clip', 'frame', 'none'] = 'clip'  # one flip per clip; 'frame' = released (independent flips)
    num_workers: int = 4
    eval_batch_size: int = 64  # frames per encoder batch in run_eval.py

    def __post_init__(self) -> None:
        _check_choice('data.flip', self.flip, ('clip', 'frame', 'none'))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and logging. Global batch = clips_per_device * frames_per_clip * devices * num_nodes."""

    clips_per_device: int = 1  # released: one video of 4 frames per GPU, 4 GPUs -> 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: Precision = '16-mixed'
    max_steps: int = 1_000_000
    seed: int = 0
    log_every: int = 50
    sample_every: int = 2500  # steps between sample grids (released: every 40k samples = 2.5k steps)
    ckpt_every: int = 62_500  # steps between numbered checkpoints (last.ckpt is refreshed at the same time)
    sample_batch: int = 4  # frames shown in each sample grid

    def __post_init__(self) -> None:
        _check_choice('train.precision', self.precision, ('32', '16-mixed', 'bf16-mixed'))


@dataclass(frozen=True)
class DVAConfig:
    name: str = 'diffusion_video_autoencoder'
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class ClsConfig:
    """The linear 40-attribute classifier on z-normalised identity features (released `ClsModel`)."""

    name: str = 'diffusion_video_autoencoder_cls'
    id_dim: int = 512
    num_classes: int = len(CELEBA_ATTRIBUTES)
    image_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    batch_size: int = 32
    max_steps: int = 9375  # 300k samples / 32
    val_fraction: float = 0.05
    precision: Precision = '16-mixed'
    seed: int = 0
    num_workers: int = 4

    def __post_init__(self) -> None:
        _check_choice('precision', self.precision, ('32', '16-mixed', 'bf16-mixed'))


# --------------------------------------------------------------------------------------------------------------------
# Serialisation and overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for JSON and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f'{where}: expected a mapping, got {value!r}')
        return from_dict(tp, value, _where=where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(item, v, where) for v in value)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f'{where}={value!r} is not one of {typing.get_args(tp)}')
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f'{where}: expected {tp.__name__}, got {value!r}')
    return value


def from_dict(cls: type, data: dict[str, Any], _where: str = '') -> Any:
    """Inverse of `to_dict`. Unknown keys are an error (a config from a newer version must not load silently)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f'unknown config keys {[_where + "." + k if _where else k for k in unknown]} for {cls.__name__}')
    kwargs = {k: _coerce(hints[k], v, f'{_where}.{k}' if _where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _all_keys(cfg: Any, prefix: str = '') -> list[str]:
    out = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += _all_keys(v, f'{prefix}{f.name}.')
        else:
            out.append(prefix + f.name)
    return out


def apply_overrides(cfg: Any, overrides: list[str] | None) -> Any:
    """Apply `key=value` strings such as `train.lr=3e-5` or `unet.channel_mult=[1,2]`; returns a new config.

    Values are parsed as JSON when possible (numbers, lists, booleans), else taken as strings, then type-checked
    against the field. An unknown key raises `KeyError` listing the valid keys.
    """
    data = to_dict(cfg)
    valid = _all_keys(cfg)
    for item in overrides or []:
        if '=' not in item:
            raise ValueError(f'override {item!r} must look like key=value')
        key, text = item.split('=', 1)
        key = key.strip()
        if key not in valid:
            raise KeyError(f'unknown config key {key!r}; valid keys: {", ".join(valid)}')
        node = data
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        value = _parse_value(text)
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = text  # e.g. --set train.precision=32 stays the string '32'
        node[leaf] = value
    return from_dict(type(cfg), data)


def config_from_checkpoint_dict(data: dict[str, Any]) -> DVAConfig:
    return from_dict(DVAConfig, data)
