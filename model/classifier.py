"""The linear 40-attribute classifier on z-normalised identity features (released `ClsModel` state layout).

State dict: `conds_mean`, `conds_std` [1,id_dim] buffers, `classifier.*` and `ema_classifier.*` Linear(id_dim, 40).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


class AttributeClassifier(nn.Module):
    def __init__(self, id_dim: int = 512, num_classes: int = 40) -> None:
        super().__init__()
        self.register_buffer('conds_mean', torch.zeros(1, id_dim))
        self.register_buffer('conds_std', torch.ones(1, id_dim))
        self.classifier = nn.Linear(id_dim, num_classes)
        self.ema_classifier = copy.deepcopy(self.classifier).requires_grad_(False)

    def normalize(self, id_feat: Tensor) -> Tensor:
        """(id_feat - mean) / std with the identity statistics (latent.pkl / the checkpoint buffers)."""
        return (id_feat - self.conds_mean) / self.conds_std

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.conds_std + self.conds_mean

    def forward(self, id_feat: Tensor, ema: bool = False) -> Tensor:
        """id_feat [B,id_dim] (raw, L2-normalised ArcFace features) -> logits [B,num_classes]."""
        head = self.ema_classifier if ema else self.classifier
        return head(self.normalize(id_feat))

    def edit_identity(self, id_feat: Tensor, attribute: int, scale: float) -> Tensor:
        """The released classifier edit with `--normalize`: move along the (non-EMA) class direction in normalised space.

        z' = L2norm( denorm( norm(id_feat) + scale * sqrt(D) * w / |w| ) ),  w = classifier.weight[attribute].
        id_feat [B,D] -> [B,D] unit norm. With scale 0 this is L2norm(id_feat).
        """
        w = self.classifier.weight[attribute]
        step = scale * math.sqrt(w.numel()) * w / w.norm()
        z = self.denormalize(self.normalize(id_feat) + step)
        return nn.functional.normalize(z, dim=1)

    def edit_identity_raw(self, id_feat: Tensor, attribute: int, scale: float) -> Tensor:
        """The released formula without `--normalize`: L2norm(id_feat + scale * sqrt(D) * w), w not normalised."""
        w = self.classifier.weight[attribute]
        return nn.functional.normalize(id_feat + scale * math.sqrt(w.numel()) * w, dim=1)
