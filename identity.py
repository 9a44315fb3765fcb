"""Identity features, their statistics and the attribute classifier (run_eval.py, run_cls.py).

    FrameFiles                  image files -> [3,S,S] in [-1,1], transformed like the training set
    identity_features           z_id of a dataset of frames or classifier images, batched, without grad
    identity_stats              {'conds', 'conds_mean', 'conds_std'}: the released latent.pkl layout
    train_attribute_classifier  the linear 40-attribute head on cached z-normalised identity features

The identity network is frozen, so features are computed once and the classifier trains on the cache: exact, and
orders of magnitude faster than re-encoding every image every step.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from config import ClsConfig
from dataset import image_to_tensor, load_rgb
from model.classifier import AttributeClassifier
from model.nn import ema_update


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
        return image_to_tensor(load_rgb(self.paths[i]), self.image_size)


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
    print(f'classifier: {cfg.max_steps} steps, final loss {report["loss_last"]:.4f}')
    return clf, report
