"""Typed configuration: one frozen dataclass per concern, all JSON-serialisable.

A `DVAConfig` fully describes a diffusion video autoencoder run (network, encoders, diffusion, data, training).
`ClsConfig` describes the attribute-classifier run. Presets live in `templates.py`; `apply_overrides` applies
`--set key=value` strings with type checking; `to_dict` / `from_dict` round-trip through JSON and are stored with
every checkpoint this project writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
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


@dataclass(frozen=True)
class EditConfig:
    """Every setting of an edit run (both editors' flags, same names). The scripts parse flags into it, the editing
    API (`editing.Editor`) reads it, and every output's config.json stores it (`--config` repeats a run from there).

    Invalid values raise ValueError naming the flag, before any work: non-finite numbers, impossible ranges, T not an
    integer stride of the diffusion length, duplicate edits.
    """

    # input
    video_path: str = ''
    start: int = 0
    end: int | None = None
    max_num: int | None = None
    aligned: bool = False  # the frames already are aligned square face crops: no detection
    max_upsample: int = 2  # dlib retries a faceless frame at upsampling 1..max_upsample before calling it faceless
    detect_side: int = 640  # faces are detected on a copy with this long side (0: the full frame, as released)
    faceless: Literal['keep', 'edit'] = 'keep'  # frames without a face: left unedited, or edited at interpolated quads
    # model and sampling
    checkpoint: str | None = None
    template: str = 'diffusion_video_autoencoder'
    pretrained_dir: str = 'pretrained_models'
    trust_checkpoint: bool = False
    device: str = 'auto'
    precision: Literal['fp32', 'fp16', 'bf16', 'fp64'] = 'fp32'
    T: int = 100
    batch_size: int | Literal['auto'] = 4
    channels_last: bool = True
    compile: bool = False
    decoder: Literal['ddim', 'dpm++2m'] = 'ddim'
    decoder_steps: int | None = None
    decoder_spacing: Literal['time', 'logsnr'] = 'time'
    # alignment
    center_sigma: float = 1.0
    xy_sigma: float = 3.0
    # output
    out: str | None = None
    overwrite: bool = False
    fps: float | None = None
    blend: Literal['hard', 'feather'] = 'hard'
    feather: float = 3.0
    save_frames: bool = True
    save_recon: bool = False
    edit_norm: Literal['source', 'unit'] = 'source'
    cache_dir: str | None = None  # None: $DVA_CACHE or ~/.cache/dva
    no_cache: bool = False
    quiet: bool = False
    # the edit: classifier attributes, or the name of a CLIP edit (attribute[0])
    attribute: tuple[str, ...] = ('Mustache',)
    scale: tuple[float, ...] = (0.3,)
    cls_checkpoint: str = 'checkpoints/diffusion_video_autoencoder_cls/last.ckpt'
    normalize: bool = True
    # CLIP direction search
    src_txt: str = 'face'
    trg_txt: str = 'face with beard'
    lr: float = 0.002
    clip_loss_w: float = 3.0
    id_loss_w: float = 5.0
    l1_loss_w: float = 5.0
    n_train_step: int = 5
    n_iter: int = 2000
    early_stop: int | None = None
    early_stop_tol: float = 1e-4
    first_step: Literal['projected', 'released'] = 'projected'  # released: the noise-driven first Adam step
    clip_frame: int = 0
    clip_weights: str | None = None
    clip_fp16: bool = False
    direction: str | None = None
    random_clip: Literal['tiny', 'vit'] | None = None  # tests only: a random CLIP instead of the weights file

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f'--{f.name} {x} is not a finite number')
        for name, low in (('start', 0), ('end', 1), ('max_num', 1), ('T', 1), ('decoder_steps', 1), ('n_iter', 1),
                          ('n_train_step', 2), ('early_stop', 1), ('clip_frame', 0), ('max_upsample', 0),
                          ('detect_side', 0)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise ValueError(f'--{name} must be at least {low}, got {v}')
        if self.end is not None and self.end <= self.start:
            raise ValueError(f'--end ({self.end}) must be greater than --start ({self.start})')
        if self.batch_size != 'auto' and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f'--batch_size must be a positive integer or auto, got {self.batch_size!r}')
        if self.decoder_steps is not None and self.decoder_steps > self.T:
            raise ValueError(f'--decoder_steps must be between 1 and --T ({self.T})')
        for name in ('center_sigma', 'xy_sigma', 'feather', 'lr', 'early_stop_tol', 'clip_loss_w', 'id_loss_w',
                     'l1_loss_w'):
            if getattr(self, name) < 0:
                raise ValueError(f'--{name} must not be negative')
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f'--fps must be positive, got {self.fps}')
        for name in ('attribute', 'scale'):
            seen = [x for i, x in enumerate(getattr(self, name)) if x in getattr(self, name)[:i]]
            if seen:
                raise ValueError(f'--{name} lists {seen[0]!r} twice')
        if not self.attribute or not self.scale:
            raise ValueError('--attribute and --scale need at least one value each')
        for name in self.attribute:  # it names output folders and direction files: never a path out of --out
            if name in ('', '.', '..') or any(c in name for c in '/\\\0'):
                raise ValueError(f'--attribute {name!r} cannot name a folder: no /, \\ or .. in it')


# --------------------------------------------------------------------------------------------------------------------
# Serialisation and overrides


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for JSON and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int | None, int | Literal['auto']
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(option, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f'{where}: {value!r} fits none of {tp} ({"; ".join(errors)})')
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
