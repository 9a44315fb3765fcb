"""Training and its statistics: the DVA LightningModule, EMA, the sample-grid callback, identity statistics and the
attribute classifier.

    DVAModule              LightningModule around a DiffusionVideoAutoencoder (loss, Adam, EMA, checkpoint layout)
    ema_update / make_ema  EMA over the trainable parameters only; the EMA copy shares the frozen encoders
    SampleGrid             Callback: original | reconstruction | render from random x_T, every train.sample_every steps
    build_trainer          the Lightning Trainer with ModelCheckpoint, SampleGrid and TensorBoard
    run_training           everything `run_train.py` does after parsing: run folder, weights, Trainer.fit
    identity_encoder       the frozen ArcFace net alone, from a DVA checkpoint, a pretrained_models/ folder or random
    identity_features      z_id of a list of frames / of a classifier dataset, batched, without grad
    identity_stats         {'conds', 'conds_mean', 'conds_std'}: the released latent.pkl layout
    train_attribute_classifier  the linear 40-attribute head on cached z-normalised identity features

Checkpoints written here keep the RELEASED layout: `state_dict` holds `model.<k>` and `ema_model.<k>` for every key
of the autoencoder (frozen encoders included), so the released loader and `model.pretrained.load_dva` read them;
`dva_config` (the resolved config) and `global_step` travel with them.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from config import ClsConfig, DVAConfig, from_dict, to_dict
from dataset import ClipDataModule, flatten_clips, image_to_tensor
from diffusion import NoiseSchedule, ddim_invert, ddim_sample, dva_loss, sample_timesteps
from model.autoencoder import DiffusionVideoAutoencoder
from model.classifier import AttributeClassifier
from model.encoders import IdentityEncoder
from model.pretrained import (
    IR_SE50,
    config_for_checkpoint,
    load_identity_weights,
    load_pretrained_encoders,
    load_strict,
    read_dva_checkpoint,
    split_dva_state,
)

CKPT_GLOB = '*.ckpt'
RUN_ARTIFACTS = ('config.json', 'samples', 'tb')  # what a run of ours writes besides its checkpoints


# --------------------------------------------------------------------------------------------------------------------
# EMA


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, names: Sequence[str] | None = None) -> None:
    """ema_p <- decay * ema_p + (1 - decay) * p for the parameters `names` (default: those of `model` needing grad).

    Frozen networks and buffers are not averaged: they never change (the released EMA also averaged them, which
    truncates the integer BatchNorm counters through float).
    """
    params = dict(model.named_parameters())
    ema_params = dict(ema.named_parameters())
    names = [k for k, p in params.items() if p.requires_grad] if names is None else list(names)
    missing = [k for k in names if k not in ema_params]
    if missing:
        raise KeyError(f'EMA model lacks parameters {missing[:5]}: it is not a copy of the model')
    for k in names:
        ema_params[k].lerp_(params[k].detach().to(ema_params[k].dtype), 1.0 - decay)


def make_ema(model: DiffusionVideoAutoencoder) -> DiffusionVideoAutoencoder:
    """A copy of `model` for EMA weights, without grad. Its frozen encoders (idnet, lndnet, bgnet) are the SAME
    modules as the model's, so they cost no memory and are written once in a checkpoint (torch.save keeps shared
    storage); the UNet and the fusion Linear are independent copies."""
    frozen = [getattr(model.encoder, name) for name in model.encoder.FROZEN]
    memo: dict[int, Any] = {id(m): m for m in frozen}
    ema = copy.deepcopy(model, memo)
    return ema.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# The LightningModule


class DVAModule(L.LightningModule):
    """Trains a DiffusionVideoAutoencoder with the DVA loss (Kim et al. 2023, Sec. 3.3).

    A batch is {'img': [B,K,3,S,S] in [-1,1]} (or that tensor): B clips of K frames, flattened to B*K frames.
    `encoders` records where the frozen encoder weights came from (written to checkpoints and config.json).
    """

    def __init__(self, cfg: DVAConfig, encoders: str = 'random') -> None:
        super().__init__()
        self.cfg = cfg
        self.encoders = encoders
        self.save_hyperparameters({'dva_config': to_dict(cfg), 'encoders': encoders})
        self.model = DiffusionVideoAutoencoder(cfg)
        self.ema_model = make_ema(self.model)
        d = cfg.diffusion
        self.schedule = NoiseSchedule.linear(d.num_timesteps, d.beta_start, d.beta_end)
        self.trainable_names = self.model.trainable_state_keys()

    def training_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        x0 = flatten_clips(batch['img'] if isinstance(batch, dict) else batch)  # [B*K,3,S,S], never squeezed
        enc = self.model.encoder
        # 1. The frozen encoders run once per batch, without grad (the released code runs them once per branch).
        with torch.no_grad():
            id_feat = enc.identity(x0)
            lnd_feat = enc.landmarks(x0)
            with torch.autocast(x0.device.type, enabled=False):  # the argmax mask is computed in fp32
                mask = enc.mask(x0.float(), 'train')
        # 2. The fusion Linear is trainable: z_face keeps its graph.
        z_face = enc.combine(id_feat, lnd_feat)
        # 3. One t per frame and two independent noises; both branches share z_face.
        t = sample_timesteps(x0.shape[0], len(self.schedule), x0.device)
        noise_a, noise_b = torch.randn_like(x0), torch.randn_like(x0)
        z_both = torch.cat([z_face, z_face])

        def eps_fn(x_t: Tensor, t_net: Tensor) -> Tensor:
            return self.model(x_t, t_net, z_both)

        d = self.cfg.diffusion
        losses = dva_loss(eps_fn, x0, t, noise_a, noise_b, mask, self.schedule,
                          eps_weight=d.loss_eps_weight, consistency_weight=d.loss_consistency_weight)
        self.log_dict(losses, prog_bar=True, batch_size=x0.shape[0])
        return losses['loss']

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema_update(self.ema_model, self.model, self.cfg.train.ema_decay, self.trainable_names)
        self.log('lr', self.trainer.optimizers[0].param_groups[0]['lr'], batch_size=1)

    def on_train_start(self) -> None:
        # Different noise on every rank, and a fresh stream after a resume (seed, rank, step).
        state = np.random.SeedSequence([self.cfg.train.seed, self.global_rank, self.global_step]).generate_state(1)
        torch.manual_seed(int(state[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.Adam(self.model.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Released layout: `state_dict` = {'model.<k>', 'ema_model.<k>'}; plus the config and the step."""
        state = checkpoint['state_dict']
        stray = [k for k in state if not k.startswith(('model.', 'ema_model.'))]
        if stray:
            raise RuntimeError(f'checkpoint state_dict has keys outside model.*/ema_model.*: {stray[:5]}')
        checkpoint['dva_config'] = to_dict(self.cfg)
        checkpoint['encoders'] = self.encoders
        checkpoint['global_step'] = self.global_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume check: the network in the checkpoint must be this one, and it must carry optimizer state.

        Lightning then restores `state_dict` (model and EMA, strictly), the optimizer and the step.
        """
        if 'dva_config' in checkpoint:
            saved = from_dict(DVAConfig, checkpoint['dva_config'])
            for part in ('unet', 'encoder', 'diffusion.num_timesteps', 'diffusion.beta_start', 'diffusion.beta_end'):
                a, b = saved, self.cfg
                for name in part.split('.'):
                    a, b = getattr(a, name), getattr(b, name)
                if a != b:
                    raise ValueError(f'the checkpoint was trained with a different {part}: {a} != {b}')
        self.encoders = checkpoint.get('encoders', self.encoders)
        if self._trainer is not None and not checkpoint.get('optimizer_states'):
            raise ValueError('this checkpoint has no optimizer state (a released checkpoint or weights only), so it '
                             'cannot be resumed: start a new run from its weights with --init_from')

    def load_weights(self, state: dict[str, Tensor], path: str | os.PathLike) -> None:
        """Weights only (no optimizer, no step) from a released-layout state dict: model.* -> model,
        ema_model.* -> ema_model (each falls back on the other when absent). Strict; raises WeightsError.

        The frozen encoders are shared by both copies, so they end up holding the ema_model.* values (in the released
        files the two copies of the frozen nets are equal)."""
        model_sd, ema_sd = split_dva_state(state, 'model'), split_dva_state(state, 'ema')
        load_strict(self.model, model_sd or ema_sd, path, 'dva')
        load_strict(self.ema_model, ema_sd or model_sd, path, 'dva')


# --------------------------------------------------------------------------------------------------------------------
# Sample grids


@torch.no_grad()
def reconstruct(model: DiffusionVideoAutoencoder, x0: Tensor, schedule: NoiseSchedule, x_T: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """(DDIM invert x0 and render it back, render from `x_T`), both conditioned on z_face(x0).

    x0: [B,3,S,S] in [-1,1]; schedule: the respaced evaluation schedule. Runs in float32. The renders are in [-1,1];
    the second is None when x_T is None.
    """
    z_face = model.encoder(x0)

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t, z_face)

    recon = ddim_sample(eps_fn, ddim_invert(eps_fn, x0, schedule), schedule)
    return recon, None if x_T is None else ddim_sample(eps_fn, x_T, schedule)


class SampleGrid(Callback):
    """Every `every` steps, a PNG grid (and a TensorBoard image) of rows: original | reconstruction (DDIM inversion +
    render at T_eval with the EMA weights) | render from a fixed random x_T. Rank zero only.

    The frames are the first `num` frames of the first training batch seen, kept for the whole run.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int, num: int, steps: int, seed: int = 0) -> None:
        self.out_dir, self.every, self.num, self.steps, self.seed = Path(out_dir), every, num, steps, seed
        self.x0: Tensor | None = None

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.x0 is None:
            clips = batch['img'] if isinstance(batch, dict) else batch
            self.x0 = flatten_clips(clips)[: self.num].detach().float().cpu()
        step = trainer.global_step
        if self.every <= 0 or step % self.every:
            return
        self.write(trainer, pl_module, step)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Path:
        from torchvision.utils import make_grid, save_image

        model: DiffusionVideoAutoencoder = pl_module.ema_model
        x0 = self.x0.to(pl_module.device)
        gen = torch.Generator().manual_seed(self.seed)
        x_T = torch.randn(x0.shape, generator=gen).to(x0.device)
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(x0.device.type, enabled=False):
                recon, rand = reconstruct(model, x0, pl_module.schedule.respace(self.steps), x_T)
        finally:
            model.train(was_training)
        rows = torch.cat([x0, recon, rand]).clamp(-1, 1).add(1).div(2).cpu()
        grid = make_grid(rows, nrow=x0.shape[0], padding=2)
        path = self.out_dir / f'step={step:07d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        logger = trainer.logger
        if logger is not None and hasattr(getattr(logger, 'experiment', None), 'add_image'):
            logger.experiment.add_image('samples/original|recon|random_xT', grid, step)
        return path


# --------------------------------------------------------------------------------------------------------------------
# Trainer and the whole training run


class FinalCheckpoint(Callback):
    """Writes `path` (last.ckpt) when training ends on a step that no checkpoint holds yet (max_steps not a
    multiple of train.ckpt_every), so that a finished run can always be resumed or evaluated from its final state."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.saved_step = Path(path), -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)


def build_trainer(
    cfg: DVAConfig,
    run_dir: str | os.PathLike,
    *,
    accelerator: str = 'auto',
    devices: int | str = 'auto',
    num_nodes: int = 1,
    strategy: str = 'auto',
    callbacks: Sequence[Callback] = (),
    enable_progress_bar: bool = True,
) -> L.Trainer:
    """Lightning Trainer: precision, max_steps and gradient clipping (1.0, after the AMP unscale) from the config;
    ModelCheckpoint writing `last.ckpt` and `step=XXXXXXX.ckpt` every train.ckpt_every steps (all kept); SampleGrid;
    TensorBoard logs in RUN/tb."""
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir, t = Path(run_dir), cfg.train
    ckpt = ModelCheckpoint(dirpath=run_dir, filename='step={step:07d}', auto_insert_metric_name=False,
                           every_n_train_steps=t.ckpt_every, save_top_k=-1, save_last=True,
                           enable_version_counter=False)  # last.ckpt is always the newest, also in a moved run
    grid = SampleGrid(run_dir / 'samples', t.sample_every, t.sample_batch, cfg.diffusion.T_eval, t.seed)
    final = FinalCheckpoint(run_dir / 'last.ckpt')
    logger = TensorBoardLogger(save_dir=run_dir, name='tb', version='', default_hp_metric=False)
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                     precision=t.precision, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
                     gradient_clip_algorithm='norm', log_every_n_steps=t.log_every, limit_val_batches=0,
                     num_sanity_val_steps=0, logger=logger, callbacks=[ckpt, grid, final, *callbacks],
                     default_root_dir=run_dir, enable_progress_bar=enable_progress_bar, benchmark=False)


def is_launcher_process() -> bool:
    """True in the process a user started (global rank 0 of node 0), False in the DDP workers Lightning launches."""
    return rank_zero_only.rank == 0 and int(os.environ.get('NODE_RANK', os.environ.get('GROUP_RANK', '0'))) == 0


def run_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    run_dir = Path(run_dir)
    return sorted(run_dir.glob(CKPT_GLOB)) if run_dir.is_dir() else []


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Refuse to start a fresh run where checkpoints exist (unless `overwrite`, which removes this project's run
    files: *.ckpt, config.json, samples/, tb/; other files, such as a latent.pkl, are kept)."""
    import shutil

    run_dir = Path(run_dir)
    existing = run_checkpoints(run_dir)
    if existing and not resume:
        if not overwrite:
            names = ', '.join(p.name for p in existing[:4]) + (', ...' if len(existing) > 4 else '')
            hint = f'--resume {run_dir / "last.ckpt"} to continue it' if (run_dir / 'last.ckpt').exists() else \
                '--resume CKPT to continue it'
            raise SystemExit(f'run folder {run_dir} already holds checkpoints ({names}); pass {hint}, --overwrite to '
                             f'start over there (its checkpoints, samples and logs are deleted), or another --logdir')
        for p in existing:
            p.unlink()
        for name in RUN_ARTIFACTS:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_run_config(path: str | os.PathLike) -> DVAConfig:
    """The DVAConfig stored in a checkpoint written by run_train.py (for --resume)."""
    if not Path(path).is_file():
        raise SystemExit(f'checkpoint to resume from not found: {path}')
    ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    if 'dva_config' not in ckpt:
        raise SystemExit(f'{path} carries no dva_config, so it was not written by run_train.py (a released '
                         f'checkpoint?): start a new run from its weights with --init_from {path}')
    return from_dict(DVAConfig, ckpt['dva_config'])


def run_training(
    cfg: DVAConfig,
    run_dir: str | os.PathLike,
    *,
    resume: str | os.PathLike | None = None,
    init_from: str | os.PathLike | None = None,
    pretrained_dir: str | os.PathLike = 'pretrained_models',
    random_encoders: bool = False,
    overwrite: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    extra_config: dict[str, Any] | None = None,
) -> DVAModule:
    """Train (or resume) a DVA in `run_dir`; returns the trained module.

    Weights, in order of precedence: `resume` (our checkpoint: weights, EMA, optimizer and step, through
    Trainer.fit(ckpt_path)); `init_from` (any released-layout checkpoint: weights and EMA only, step 0); else a fresh
    UNet with the frozen encoders from `pretrained_dir` (or random with `random_encoders`). `run_dir/config.json`
    records the resolved config, the weight sources and the Trainer options.
    """
    from cli import software_versions, write_json

    if resume and init_from:
        raise SystemExit('--resume and --init_from exclude each other: resume continues a run, init_from starts one')
    run_dir = Path(run_dir)
    if is_launcher_process():
        prepare_run_dir(run_dir, resume=bool(resume), overwrite=overwrite)
    data = ClipDataModule(cfg.data, cfg.unet.image_size, cfg.train.clips_per_device)
    try:
        data.setup('fit')  # a missing or empty data folder fails here, before any network is built
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'training data ({cfg.data.root}): {e}') from e

    init_state = None
    if resume:
        encoders = f'checkpoint:{resume}'
    elif init_from:
        init_state, meta = read_dva_checkpoint(init_from)
        net = config_for_checkpoint(init_state, meta, cfg)
        cfg = replace(cfg, unet=net.unet, encoder=net.encoder)
        encoders = f'checkpoint:{init_from}'
    else:
        encoders = 'random' if random_encoders else f'pretrained:{pretrained_dir}'
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = DVAModule(cfg, encoders=encoders)
    if init_state is not None:
        module.load_weights(init_state, init_from)
    elif not resume and not random_encoders:
        load_pretrained_encoders(module.model.encoder, pretrained_dir)

    trainer = build_trainer(cfg, run_dir, callbacks=callbacks, **(trainer_kwargs or {}))
    if trainer.is_global_zero:
        write_json(run_dir / 'config.json', {
            'dva_config': to_dict(cfg), 'encoders': encoders, 'resume': str(resume) if resume else None,
            'init_from': str(init_from) if init_from else None, 'trainer': dict(trainer_kwargs or {}),
            'world_size': trainer.world_size, **(extra_config or {}), 'software': software_versions()})
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    return module


# --------------------------------------------------------------------------------------------------------------------
# Identity features and statistics (run_eval.py, run_cls.py)


def identity_encoder(
    base: DVAConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained_dir: str | os.PathLike | None = None,
    random: bool = False,
    trust: bool = False,
) -> tuple[IdentityEncoder, str, DVAConfig]:
    """The frozen ArcFace IR-SE50 alone, in eval mode without grad, from exactly one of: a DVA checkpoint (its EMA
    copy; the UNet is never built), `pretrained_dir/model_ir_se50.pth`, or random weights (tests).

    Returns (net, a description of the weight source, the config: the checkpoint's own when it carries one, else
    `base`, default the released DVAConfig).
    """
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


def _progress(iterable: Any, desc: str, total: int | None = None, enable: bool = True) -> Any:
    if not enable:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit='batch')


class FrameFiles(Dataset):
    """Image files -> float32 [3,S,S] in [-1,1], transformed like the training set (Resize(S), CenterCrop(S)),
    never flipped. A file that cannot be decoded raises ValueError naming it."""

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: int) -> None:
        self.paths, self.image_size = [Path(p) for p in paths], image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert('RGB')
        except Exception as e:  # PIL raises many types for a broken file
            raise ValueError(f'cannot decode image {path}: {type(e).__name__}: {e}') from e
        return image_to_tensor(img, self.image_size)


@torch.no_grad()
def identity_features(
    idnet: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    flip: bool = False,
    precision: str = 'fp32',
    progress: bool = True,
    desc: str = 'identity features',
) -> tuple[Tensor, Tensor | None]:
    """z_id of every item of `dataset` in order: ([N,D] float32 on CPU, or [N,2,D] with `flip`: unflipped and
    horizontally flipped), plus the stacked labels [N,C] when the items are dicts with 'labels' (else None).

    Items are [3,S,S] tensors in [-1,1] or dicts {'img', 'labels'}. `device` defaults to the net's device;
    `precision` is cli.autocast's (fp32|fp16|bf16).
    """
    from cli import autocast

    device = next(idnet.parameters()).device if device is None else torch.device(device)
    idnet = idnet.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for batch in _progress(loader, desc, len(loader), progress):
        img = batch['img'] if isinstance(batch, dict) else batch
        if isinstance(batch, dict) and 'labels' in batch:
            labels.append(batch['labels'].float())
        img = img.to(device)
        with autocast(device, precision):
            f = idnet(torch.cat([img, img.flip(-1)]) if flip else img).float()
        feats.append(torch.stack(f.chunk(2), dim=1).cpu() if flip else f.cpu())
    if not feats:
        raise ValueError('no images to encode')
    return torch.cat(feats), torch.cat(labels) if labels else None


def identity_stats(conds: Tensor) -> dict[str, Tensor]:
    """The released latent.pkl layout: {'conds' [N,D] float32, 'conds_mean' [D], 'conds_std' [D] (unbiased)}."""
    if conds.ndim != 2 or conds.shape[0] < 2:
        raise ValueError(f'identity statistics need at least 2 feature vectors, got shape {tuple(conds.shape)}')
    conds = conds.float().cpu().contiguous()
    return {'conds': conds, 'conds_mean': conds.mean(0), 'conds_std': conds.std(0, unbiased=True)}


def select_frames(frames: Sequence[Path], max_frames: int | None) -> list[Path]:
    """All frames, or `max_frames` of them evenly spaced over the video (first and last included), in order."""
    frames = list(frames)
    if max_frames is None or len(frames) <= max_frames:
        return frames
    if max_frames < 1:
        raise ValueError(f'max_frames must be positive, got {max_frames}')
    keep = np.unique(np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(int))
    return [frames[i] for i in keep]


# --------------------------------------------------------------------------------------------------------------------
# Attribute classifier (run_cls.py)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random (train, val) split of range(n); val has round(n * val_fraction) items, at least 1 when
    val_fraction > 0, and train at least 1."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
    n_val = min(max(1, round(n * val_fraction)), n - 1) if val_fraction > 0 else 0
    if n < 2 and n_val:
        raise ValueError(f'{n} image(s) cannot be split into training and validation sets')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@torch.no_grad()
def attribute_accuracy(clf: AttributeClassifier, feats: Tensor, labels: Tensor, ema: bool = False) -> Tensor:
    """Per-attribute accuracy [C] of (logit > 0) against {0,1} labels; feats [N,D] raw z_id, labels [N,C]."""
    return ((clf(feats, ema=ema) > 0).float() == labels).float().mean(0)


def train_attribute_classifier(
    feats: Tensor,
    labels: Tensor,
    stats: dict[str, Tensor],
    cfg: ClsConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    log_every: int = 100,
) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Fit the linear head on cached identity features (the identity net is frozen, so this equals training through
    it): BCE-with-logits over the attributes, Adam, an EMA copy updated every step.

    feats: [N,D] or [N,F,D] (F views per image, e.g. unflipped and flipped; each step draws one view per sample,
    validation uses view 0) raw L2-normalised z_id; labels [N,C] in {0,1}; stats: latent.pkl with conds_mean/std [D].
    Returns (classifier in eval mode on the device of feats, report with the loss history and per-attribute validation accuracy of
    the classifier (used by editing) and of its EMA copy). Trains on `device` (default: that of feats).
    """
    if feats.ndim == 2:
        feats = feats[:, None]
    n, views, dim = feats.shape
    if labels.shape != (n, cfg.num_classes):
        raise ValueError(f'labels have shape {tuple(labels.shape)}, expected ({n}, {cfg.num_classes})')
    if dim != cfg.id_dim:
        raise ValueError(f'features have {dim} dims, the classifier expects id_dim={cfg.id_dim}')
    device = feats.device if device is None else torch.device(device)
    train_idx, val_idx = split_indices(n, cfg.val_fraction, cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        clf = AttributeClassifier(cfg.id_dim, cfg.num_classes)  # the EMA copy starts equal to the classifier
    clf.conds_mean.copy_(stats['conds_mean'].reshape(1, -1))
    clf.conds_std.copy_(stats['conds_std'].reshape(1, -1))
    clf = clf.to(device).train()
    opt = torch.optim.Adam(clf.classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = feats[train_idx].to(device), labels[train_idx].float().to(device)
    batch = min(cfg.batch_size, len(train_idx))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos, history = torch.randperm(len(train_idx), generator=gen), 0, []
    bar = _progress(range(cfg.max_steps), 'classifier', cfg.max_steps, progress)
    for step in bar:
        if pos + batch > len(order):  # a new epoch, drop_last
            order, pos = torch.randperm(len(train_idx), generator=gen), 0
        idx = order[pos:pos + batch].to(device)
        pos += batch
        view = torch.randint(views, (len(idx),), generator=gen).to(device)
        logits = clf(x_train[idx, view])
        loss = F.binary_cross_entropy_with_logits(logits, y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(clf.ema_classifier, clf.classifier, cfg.ema_decay)
        history.append(loss.item())
        if progress and (step + 1) % log_every == 0 and hasattr(bar, 'set_postfix'):
            bar.set_postfix(loss=f'{np.mean(history[-log_every:]):.4f}')
    clf = clf.to(feats.device).eval()
    report: dict[str, Any] = {'steps': cfg.max_steps, 'train_size': len(train_idx), 'val_size': len(val_idx),
                              'loss_first': history[0] if history else math.nan,
                              'loss_last': history[-1] if history else math.nan, 'loss_history': history}
    if len(val_idx):
        x_val, y_val = feats[val_idx, 0], labels[val_idx].float()
        report['val_accuracy'] = attribute_accuracy(clf, x_val, y_val).tolist()
        report['val_accuracy_ema'] = attribute_accuracy(clf, x_val, y_val, ema=True).tolist()
        report['val_positive_rate'] = y_val.mean(0).tolist()
    report['train_accuracy'] = attribute_accuracy(clf, feats[train_idx, 0], labels[train_idx].float()).tolist()
    rank_zero_info(f'classifier: {cfg.max_steps} steps, final loss {report["loss_last"]:.4f}')
    return clf, report
