"""BiSeNet face parsing (19 CelebAMask-HQ classes) and the binary face mask used by the DVA loss and by editing.

Pure architecture with random init: the ImageNet ResNet-18 the released code downloads on every construction is
always overwritten by `79999_iter.pth`, so nothing is downloaded here. State-dict keys equal that file, which loads
strictly into `FaceParser.backbone` (see `model/pretrained.py`).

Classes: 0 background, 1 skin, 2 l_brow, 3 r_brow, 4 l_eye, 5 r_eye, 6 eye_g, 7 l_ear, 8 r_ear, 9 ear_r, 10 nose,
11 mouth, 12 u_lip, 13 l_lip, 14 neck, 15 neck_l, 16 cloth, 17 hair, 18 hat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.encoders import imagenet_normalize


class ConvBNReLU(nn.Module):
    """Bias-free conv -> BN -> ReLU; keys `conv`, `bn`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x)))))); 1x1 conv + BN shortcut on a change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet18Features(nn.Module):
    """ResNet-18 trunk without pooling head: [B,3,H,W] -> (feat8, feat16, feat32) at strides 8, 16, 32.

    Widths 128, 256, 512.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._stage(64, 64, 1)
        self.layer2 = self._stage(64, 128, 2)
        self.layer3 = self._stage(128, 256, 2)
        self.layer4 = self._stage(256, 512, 2)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """feat = ConvBNReLU(x); feat * sigmoid(BN(conv1x1(global_avg(feat)))); keys `conv`, `conv_atten`, `bn_atten`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * atten


class ContextPath(nn.Module):
    """ResNet-18 with attention refinement and a global-context branch.

    Returns (feat8 [B,128,H/8], cp8 [B,128,H/8], cp16 [B,128,H/16]); upsampling between levels is nearest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        # 1. global context: the pooled 1x1 feature, broadcast over the stride-32 grid (= nearest upsampling).
        context = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        cp32 = self.arm32(feat32) + context
        # 2. stride 32 -> 16 -> 8, each level refined and summed with the upsampled coarser one.
        cp16 = self.conv_head32(F.interpolate(cp32, size=feat16.shape[-2:], mode='nearest'))
        cp16_sum = self.arm16(feat16) + cp16
        cp8 = self.conv_head16(F.interpolate(cp16_sum, size=feat8.shape[-2:], mode='nearest'))
        return feat8, cp8, cp16


class FeatureFusion(nn.Module):
    """feat = ConvBNReLU1x1(cat[a, b]); feat * (1 + sigmoid(conv2(relu(conv1(global_avg(feat))))))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, 1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([a, b], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * atten + feat


class SegHead(nn.Module):
    """ConvBNReLU 3x3 -> bias-free 1x1 conv to class logits; keys `conv`, `conv_out`."""

    def __init__(self, in_channels: int, mid_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels, 3)
        self.conv_out = nn.Conv2d(mid_channels, n_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet as in face-parsing.PyTorch: the spatial path is replaced by the ResNet stride-8 feature.

    `conv_out` is the main head; `conv_out16` / `conv_out32` are the auxiliary training heads, kept so that the
    released file loads strictly, and computed only by `forward_all`.
    """

    def __init__(self, n_classes: int = 19) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegHead(256, 256, n_classes)
        self.conv_out16 = SegHead(128, 64, n_classes)
        self.conv_out32 = SegHead(128, 64, n_classes)

    @staticmethod
    def _upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(logits, size=size, mode='bilinear', align_corners=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B,3,H,W] ImageNet-normalised -> main-head logits [B,n_classes,H,W] (bilinear, align_corners=True)."""
        feat8, cp8, _ = self.cp(x)
        return self._upsample(self.conv_out(self.ffm(feat8, cp8)), tuple(x.shape[-2:]))

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(main, aux16, aux32) logits, each [B,n_classes,H,W], as the released forward returns them."""
        feat8, cp8, cp16 = self.cp(x)
        size = tuple(x.shape[-2:])
        heads = (self.conv_out(self.ffm(feat8, cp8)), self.conv_out16(cp8), self.conv_out32(cp16))
        return tuple(self._upsample(h, size) for h in heads)


class FaceParser(nn.Module):
    """Face parsing of [-1,1] frames and the binary face mask (the released `BGnet`)."""

    def __init__(self, n_classes: int = 19, parse_size: int = 512) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.parse_size = parse_size
        self.backbone = BiSeNet(n_classes)

    def logits(self, img: Tensor) -> Tensor:
        """img: [B,3,H,W] in [-1,1] -> main-head logits [B,n_classes,parse_size,parse_size].

        1. nearest resize to parse_size x parse_size; 2. clip to [-1,1] and map to [0,1]; 3. ImageNet normalise.
        """
        x = F.interpolate(img, size=(self.parse_size, self.parse_size), mode='nearest')
        x = (x.clamp(-1, 1) + 1) / 2
        x = imagenet_normalize(x)
        return self.backbone(x)

    @torch.no_grad()
    def labels(self, img: Tensor) -> Tensor:
        """img: [B,3,H,W] in [-1,1] -> int64 class map [B,1,parse_size,parse_size] (argmax of the main head)."""
        return self.logits(img).argmax(dim=1, keepdim=True)

    @torch.no_grad()
    def mask(self, img: Tensor, bg_classes: tuple[int, ...]) -> Tensor:
        """Hard face mask: img [B,3,H,W] in [-1,1] -> [B,1,H,W] float in {0,1}, 1 where the label is not background.

        The label map at parse_size is brought back to H x W with a nearest resize (no gradient flows).
        """
        labels = self.labels(img)
        bg = torch.tensor(bg_classes, dtype=labels.dtype, device=labels.device)
        fg = (~torch.isin(labels, bg)).to(img.dtype)
        return F.interpolate(fg, size=tuple(img.shape[-2:]), mode='nearest')
