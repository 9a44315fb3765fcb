"""Training: the DVA LightningModule, EMA, the sample-grid callback and the run around Trainer.fit.

    DVAModule              LightningModule around a DiffusionVideoAutoencoder (loss, Adam, EMA, checkpoint layout)
    ema_update / make_ema  EMA over the trainable parameters only; the EMA copy shares the frozen encoders
    SampleGrid             Callback: original | reconstruction | render from random x_T, every train.sample_every steps
    ProgressLines          Callback: one plain progress line every train.log_every steps (logs that are not terminals)
    build_trainer          the Lightning Trainer with ModelCheckpoint, SampleGrid and TensorBoard
    quiet_lightning        context that drops the Lightning messages no user can act on
    run_training           everything `run_train.py` does after parsing: run folder, weights, Trainer.fit

Identity statistics and the attribute classifier live in identity.py.

Checkpoints written here keep the RELEASED layout: `state_dict` holds `model.<k>` and `ema_model.<k>` for every key
of the autoencoder (frozen encoders included), so the released loader and `model.pretrained.load_dva` read them;
`dva_config` (the resolved config) and `global_step` travel with them.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from config import DataConfig, DVAConfig, from_dict, to_dict
from dataset import VideoClipDataset, check_positive, collate_clips, flatten_clips
from diffusion import NoiseSchedule, ddim_invert, ddim_sample, dva_loss, sample_timesteps
from model.autoencoder import DiffusionVideoAutoencoder
from model.nn import ema_update
from model.pretrained import (
    config_for_checkpoint,
    load_pretrained_encoders,
    load_strict,
    read_dva_checkpoint,
    split_dva_state,
)

CKPT_GLOB = '*.ckpt'
RUN_ARTIFACTS = ('config.json', 'samples', 'tb')  # what a run of ours writes besides its checkpoints


# --------------------------------------------------------------------------------------------------------------------
# EMA


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


class ProgressLines(Callback):
    """Plain progress for logs: one line `step 100/1000  loss_eps 0.0312  ...  2.41 s/step` every `every` steps and
    at the last step, printed to stdout. For output that is not a terminal, where a tqdm bar writes carriage returns
    and cursor moves into the file. Rank zero only."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._time, self._step = 0.0, 0

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._time, self._step = time.perf_counter(), trainer.global_step
        print(f'training from step {trainer.global_step} to {trainer.max_steps}', flush=True)

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == self._step or (step % self.every and step != trainer.max_steps):
            return
        now = time.perf_counter()
        per_step = (now - self._time) / (step - self._step)
        self._time, self._step = now, step
        losses = '  '.join(f'{k} {float(v):.4g}' for k, v in trainer.callback_metrics.items() if k.startswith('loss'))
        print(f'step {step}/{trainer.max_steps}  {losses}  {per_step:.2f} s/step', flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Data


class ClipDataModule(L.LightningDataModule):
    """Loaders of [B,K,3,S,S] clips: B = clips_per_device, K = data.frames_per_clip, S = image_size.

    Train: ROOT/train, shuffled, drop_last, random flips (data.flip). Val: ROOT/test when it exists, fixed clips
    (seed 0), no flip, in order; otherwise no val loader.
    """

    def __init__(self, data: DataConfig, image_size: int, clips_per_device: int) -> None:
        super().__init__()
        check_positive('clips_per_device', clips_per_device)
        self.data, self.image_size, self.clips_per_device = data, image_size, clips_per_device
        self.train_set: VideoClipDataset | None = None
        self.val_set: VideoClipDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        d = self.data
        if self.train_set is None and stage in (None, 'fit'):
            self.train_set = VideoClipDataset(d.root, 'train', d.frames_per_clip, self.image_size, d.flip)
            if len(self.train_set) < self.clips_per_device:
                raise ValueError(f'{len(self.train_set)} usable training videos in {d.root} is fewer than '
                                 f'clips_per_device={self.clips_per_device}: drop_last would leave no batch')
        if self.val_set is None and (Path(d.root) / 'test').is_dir():
            self.val_set = VideoClipDataset(d.root, 'test', d.frames_per_clip, self.image_size, 'none', seed=0)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.data.num_workers
        return DataLoader(dataset, batch_size=self.clips_per_device, shuffle=train, drop_last=train,
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          collate_fn=collate_clips)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup('fit')
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup('validate')
        return [] if self.val_set is None else self._loader(self.val_set, train=False)


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
            if self.path.is_symlink():  # last.ckpt links to a numbered checkpoint: never write through it
                self.path.unlink()
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
    enable_progress_bar: bool | None = None,
) -> L.Trainer:
    """Lightning Trainer: precision, max_steps and gradient clipping (1.0, after the AMP unscale) from the config;
    ModelCheckpoint writing `step=XXXXXXX.ckpt` every train.ckpt_every steps (all kept) with `last.ckpt` a relative
    symbolic link to the newest one (one copy on disk, ~3 GB at paper size; a plain copy where links are not
    allowed); SampleGrid; TensorBoard logs in RUN/tb. No model summary table (`run_training` prints one line).

    enable_progress_bar: True: Lightning's tqdm bar; False: no progress output; None: the bar when stdout is a
    terminal, else `ProgressLines` every train.log_every steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir, t = Path(run_dir), cfg.train
    ckpt = ModelCheckpoint(dirpath=run_dir, filename='step={step:07d}', auto_insert_metric_name=False,
                           every_n_train_steps=t.ckpt_every, save_top_k=-1, save_last='link',
                           enable_version_counter=False)  # last.ckpt is always the newest, also in a moved run
    grid = SampleGrid(run_dir / 'samples', t.sample_every, t.sample_batch, cfg.diffusion.T_eval, t.seed)
    final = FinalCheckpoint(run_dir / 'last.ckpt')
    logger = TensorBoardLogger(save_dir=run_dir, name='tb', version='', default_hp_metric=False)
    extra: list[Callback] = []
    if enable_progress_bar is None:
        enable_progress_bar = sys.stdout.isatty()
        if not enable_progress_bar:
            extra.append(ProgressLines(t.log_every))
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                     precision=t.precision, max_steps=t.max_steps, gradient_clip_val=t.grad_clip,
                     gradient_clip_algorithm='norm', log_every_n_steps=t.log_every, limit_val_batches=0,
                     num_sanity_val_steps=0, logger=logger, callbacks=[ckpt, grid, final, *extra, *callbacks],
                     default_root_dir=run_dir, enable_progress_bar=enable_progress_bar, enable_model_summary=False,
                     benchmark=True)  # cuDNN autotuning: every training batch has the same shape


# Warnings Lightning gives on every run of ours, none of which calls for an action (regular expressions matched at the
# start of the message, as `warnings.filterwarnings` does).
LIGHTNING_NOISE = (
    r'Checkpoint directory .* exists and is not empty',  # it holds config.json; prepare_run_dir guards checkpoints
    r'Found \d+ module\(s\) in eval mode at the start of training',  # the frozen encoders, on purpose
    r'You passed in a `val_dataloader` but have no `validation_step`',  # the val clips serve run_eval, not fit
    r'`isinstance\(treespec, LeafSpec\)` is deprecated',  # inside Lightning's own code
)
LIGHTNING_LOGGERS = ('lightning.pytorch.utilities.rank_zero', 'lightning.fabric.utilities.rank_zero')


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return 'litlogger' not in record.getMessage()  # "Tip: ... try installing [litlogger] ..." on every Trainer


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, drop the `LIGHTNING_NOISE` warnings and Lightning's LitLogger advert; every other warning and
    log record is kept. Restores the warning filters and the loggers on exit."""
    drop = _DropAdverts()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for pattern in LIGHTNING_NOISE:
            warnings.filterwarnings('ignore', message=pattern)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


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


def new_dirs(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first (what `mkdir(parents=True)` creates)."""
    path, out = Path(path).absolute(), []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_new_run_dir(created: list[Path]) -> None:
    """Undo `prepare_run_dir` for a run that failed before its first training step: remove the run folder (`created`
    [0], with what the run wrote there: config.json, tb/) and the then empty parents it created. Folders that existed
    before the run are never in `created`, so never touched."""
    if not created or not created[0].is_dir():
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty: something else lives there now
            break


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

    A run that fails before its first training step (bad data, missing weights, an error in the first step) removes
    the run folder again when it created it; a folder that existed before is left as it is. Lightning's messages that
    call for no action are dropped (`quiet_lightning`).
    """
    from cli import software_versions, write_json

    if resume and init_from:
        raise SystemExit('--resume and --init_from exclude each other: resume continues a run, init_from starts one')
    run_dir = Path(run_dir)
    created = new_dirs(run_dir) if is_launcher_process() else []
    module: DVAModule | None = None
    try:
        with quiet_lightning():
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
                trainable = sum(p.numel() for p in module.model.trainable_parameters())
                frozen = sum(p.numel() for name in module.model.encoder.FROZEN
                             for p in getattr(module.model.encoder, name).parameters())
                print(f'{cfg.name}: {trainable / 1e6:.2f} M trainable parameters (UNet, fusion layer; plus their EMA '
                      f'copy), {frozen / 1e6:.1f} M frozen ({", ".join(module.model.encoder.FROZEN)}); run folder '
                      f'{run_dir}', flush=True)
                write_json(run_dir / 'config.json', {
                    'dva_config': to_dict(cfg), 'encoders': encoders, 'resume': str(resume) if resume else None,
                    'init_from': str(init_from) if init_from else None, 'trainer': dict(trainer_kwargs or {}),
                    'world_size': trainer.world_size, **(extra_config or {}), 'software': software_versions()})
            trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    except BaseException:
        if created and (module is None or module.global_step == 0) and not run_checkpoints(run_dir):
            remove_new_run_dir(created)
        raise
    return module
