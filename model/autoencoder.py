"""The diffusion video autoencoder: the UNet plus the face encoder that produces its z_face conditioning.

State-dict layout equals the released `BeatGANsAutoencModel`: UNet keys at the top level, and
`encoder.{idnet,lndnet,bgnet}.backbone.*` (frozen) and `encoder.linear.*` (trainable fusion).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from config import DVAConfig, EncoderConfig
from model.encoders import IdentityEncoder, LandmarkEncoder
from model.face_parsing import FaceParser
from model.unet import UNet


class FaceEncoder(nn.Module):
    """z_face = Linear([id_feat ; lnd_feat]) with id_feat from ArcFace IR-SE50 and lnd_feat from MobileNetV2-GDConv.

    The three pretrained networks are frozen: their parameters never require grad and `train()` keeps them in eval
    mode, so dropout/BatchNorm behave as in inference whatever mode the autoencoder is in.
    """

    FROZEN = ('idnet', 'lndnet', 'bgnet')

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.idnet = IdentityEncoder(cfg.id_num_layers)
        self.lndnet = LandmarkEncoder(cfg.n_landmarks, cfg.first_landmark)
        self.bgnet = FaceParser(parse_size=cfg.parse_size)
        self.linear = nn.Linear(cfg.fusion_in_dim, cfg.z_dim)
        for name in self.FROZEN:
            getattr(self, name).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FaceEncoder:
        super().train(mode)
        for name in self.FROZEN:
            getattr(self, name).eval()
        return self

    def identity(self, img: Tensor) -> Tensor:
        """img [B,3,H,W] in [-1,1] -> id_feat [B,id_dim], L2-normalised."""
        return self.idnet(img)

    def landmarks(self, img: Tensor) -> Tensor:
        """img [B,3,H,W] in [-1,1] -> lnd_feat [B,2*n_landmarks] in [0,1], x/y interleaved."""
        return self.lndnet(img)

    def combine(self, id_feat: Tensor, lnd_feat: Tensor) -> Tensor:
        """[B,id_dim] (or [1,id_dim], broadcast) and [B,2K] -> z_face [B,z_dim]."""
        if id_feat.shape[0] == 1 and lnd_feat.shape[0] > 1:
            id_feat = id_feat.expand(lnd_feat.shape[0], -1)
        return self.linear(torch.cat([id_feat, lnd_feat.to(id_feat.dtype)], dim=1))

    def forward(self, img: Tensor, id_feat: Tensor | None = None) -> Tensor:
        """z_face of img; with `id_feat` given, that identity is used with img's own landmarks."""
        return self.combine(self.identity(img) if id_feat is None else id_feat, self.landmarks(img))

    def mask(self, img: Tensor, kind: Literal['train', 'video'] = 'train') -> Tensor:
        """Binary face mask [B,1,H,W] (1 = face) with the training or the video background-class set."""
        bg = self.cfg.bg_classes_train if kind == 'train' else self.cfg.bg_classes_video
        return self.bgnet.mask(img, bg)


class DiffusionVideoAutoencoder(UNet):
    """UNet(x_t, t, z_face) -> eps, with `self.encoder` (FaceEncoder) computing z_face from a frame."""

    def __init__(self, cfg: DVAConfig) -> None:
        super().__init__(cfg.unet, z_dim=cfg.encoder.z_dim)
        self.cfg = cfg
        self.encoder = FaceEncoder(cfg.encoder)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """UNet + fusion Linear (the released optimiser's parameter set)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_keys(self) -> list[str]:
        return [k for k, p in self.named_parameters() if p.requires_grad]
