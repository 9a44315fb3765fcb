"""The frozen face networks behind z_face: ArcFace IR-SE50 (identity) and MobileNetV2-GDConv (68 landmarks).

Pure architecture with random init; weights come from `model/pretrained.py`. State-dict keys equal the released
files: `model_ir_se50.pth` loads into `IdentityEncoder.backbone`, and the `state_dict` of
`mobilenet_224_model_best_gdconv_external.pth.tar` (with its `module.` prefix stripped) into `LandmarkEncoder.backbone`.

Neither network switches itself to eval mode: the owner (`FaceEncoder`) keeps them in eval so that BatchNorm uses its
running statistics and dropout is off, as the released code does by calling `.eval()` on every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(x: Tensor) -> Tensor:
    """(x - ImageNet mean) / ImageNet std per channel, x: [B,3,H,W] in [0,1]. The constants are made from the Python
    floats in x's dtype (not held as float32 buffers), so a float64 input is normalised with float64 constants."""
    mean, std = x.new_tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std

# --------------------------------------------------------------------------------------------------------------------
# ArcFace IR-SE backbone (InsightFace "improved residual" units with squeeze-and-excitation)

# Units per stage (widths 64, 128, 256, 512; the first unit of each stage has stride 2).
IRSE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IRSE_WIDTHS = (64, 128, 256, 512)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x))))) with bias-free 1x1 convs `fc1` (C -> C/r) and `fc2` (C/r -> C)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class IRSEUnit(nn.Module):
    """IR-SE bottleneck: shortcut(x) + res_layer(x).

    res_layer = BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN -> SE (keys `res_layer.0..5`). The shortcut is a
    stride-`stride` subsampling when the width is unchanged (a 1x1 max-pool, no parameters) and a strided 1x1 conv + BN
    (`shortcut_layer.0/1`) when it changes.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        if in_channels == channels:
            self.shortcut_layer = None
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(channels),
            SqueezeExcite(channels, 16),
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return shortcut + self.res_layer(x)


class IRSEBackbone(nn.Module):
    """ArcFace IR-SE backbone for 112x112 faces: [B,3,112,112] -> [B,512] embedding (NOT normalised).

    input_layer = conv3x3(3->64) -> BN -> PReLU; body = IR-SE units (3/4/14/3 for 50 layers); output_layer =
    BN2d -> Dropout(drop_ratio) -> flatten -> Linear(512*7*7 -> 512) -> BN1d (affine). The released backbone
    L2-normalises this output; here `IdentityEncoder` does it, so the embedding itself stays inspectable.

    Args:
        num_layers: 50, 100 or 152 (the released identity net uses 50).
        drop_ratio: dropout before the Linear; inactive in eval mode (released: 0.6).
    """

    def __init__(self, num_layers: int = 50, drop_ratio: float = 0.6) -> None:
        super().__init__()
        if num_layers not in IRSE_UNITS:
            raise ValueError(f'num_layers must be one of {sorted(IRSE_UNITS)}, got {num_layers}')
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        # Registered before `body` so that the state-dict order matches the released file.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, 512),
            nn.BatchNorm1d(512, affine=True),
        )
        units = []
        in_channels = 64
        for channels, n in zip(IRSE_WIDTHS, IRSE_UNITS[num_layers]):
            units += [IRSEUnit(in_channels if i == 0 else channels, channels, 2 if i == 0 else 1) for i in range(n)]
            in_channels = channels
        self.body = nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B,3,112,112] (the identity encoder feeds [-1,1] pixels) -> [B,512]."""
        return self.output_layer(self.body(self.input_layer(x)))


class IdentityEncoder(nn.Module):
    """Identity feature id_feat of an aligned face crop (ArcFace IR-SE50, as in the released `IDnet`).

    1. if the input is not 256x256, adaptive-average-pool it to 256x256;
    2. crop rows 35:223 and columns 32:220 (188x188, the ArcFace face region of an FFHQ-aligned 256 crop);
    3. adaptive-average-pool to 112x112;
    4. backbone on the [-1,1] pixels, with NO mean/std normalisation;
    5. L2-normalise along the feature dimension (x / ||x||_2, as the released `l2_norm`; here with an epsilon
       of 1e-12 in the denominator, so an all-zero embedding gives zeros instead of NaN).
    """

    size = 256
    crop = (slice(35, 223), slice(32, 220))
    face_size = 112

    def __init__(self, num_layers: int = 50, drop_ratio: float = 0.6) -> None:
        super().__init__()
        self.backbone = IRSEBackbone(num_layers, drop_ratio)

    def forward(self, img: Tensor) -> Tensor:
        """img: [B,3,H,W] in [-1,1] -> id_feat [B,512] with unit L2 norm."""
        if tuple(img.shape[-2:]) != (self.size, self.size):
            img = F.adaptive_avg_pool2d(img, self.size)
        face = F.adaptive_avg_pool2d(img[:, :, self.crop[0], self.crop[1]], self.face_size)
        return F.normalize(self.backbone(face), dim=1)


# --------------------------------------------------------------------------------------------------------------------
# MobileNetV2 with a global depthwise-conv head (pytorch_face_landmark `MobileNet_GDConv`)

# (expansion t, width c, repeats n, first stride s) of MobileNetV2 at width multiplier 1.
MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BN -> ReLU6; keys `0` (conv) and `1` (BN)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand -> ReLU6] -> 3x3 depthwise(stride) -> ReLU6 -> 1x1 linear projection -> BN.

    The input is added back when stride is 1 and the width is unchanged. The expansion is omitted when t = 1.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-layout MobileNetV2 (width 1.0): `features` ([B,3,224,224] -> [B,1280,7,7]) and `classifier`.

    Only `features` is used by the landmark net; `classifier` (Dropout, Linear 1280 -> 1000) exists because the
    released weight file stores it.
    """

    def __init__(self, num_classes: int = 1000, last_channels: int = 1280) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        in_channels = 32
        for t, c, n, s in MOBILENET_V2_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        layers.append(_conv_bn_relu6(in_channels, last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] ImageNet-normalised -> [B,num_classes] logits."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class ConvBN(nn.Module):
    """Bias-free conv followed by BN, no activation (the released `ConvBlock(..., linear=True)`); keys `conv`, `bn`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, 1, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class MobileNetGDConv(nn.Module):
    """68-point landmark regressor: MobileNetV2 features -> global depthwise 7x7 conv + BN -> 1x1 conv + BN.

    [B,3,224,224] ImageNet-normalised -> [B,num_classes] (136 = 68 points x (x, y), roughly in [0,1]).

    Layout as released: `pretrain_net` is a full MobileNetV2 and `base_net` is a Sequential whose only child
    `base_net.0` IS `pretrain_net.features` (one module registered twice), so the state dict lists those tensors under
    both names and the released file loads strictly. `pretrain_net.classifier` is stored but never used.
    """

    def __init__(self, num_classes: int = 136) -> None:
        super().__init__()
        self.pretrain_net = MobileNetV2()
        self.base_net = nn.Sequential(self.pretrain_net.features)
        self.linear7 = ConvBN(1280, 1280, 7, groups=1280)
        self.linear1 = ConvBN(1280, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B,3,224,224] -> [B,num_classes]."""
        return self.linear1(self.linear7(self.base_net(x))).flatten(1)


class LandmarkEncoder(nn.Module):
    """Landmark feature lnd_feat of an aligned face crop (MobileNetV2-GDConv, as in the released `LNDnet`).

    1. size: a 224x224 input is used as is and a 256x256 input is centre-cropped to [16:240, 16:240] (released).
       Any other size is first resized to 256x256 (bilinear, antialiased when shrinking) and then cropped; the
       released code crops every non-224 input, which fails or picks a wrong region for sizes other than 256;
    2. x' = ((x + 1) / 2 - ImageNet mean) / ImageNet std;
    3. net -> clamp to [0,1] -> 68 (x, y) points -> keep points first_landmark .. first_landmark + n_landmarks - 1
       (17..67: brows, nose, eyes, mouth; the jaw is dropped) -> flatten, x/y interleaved.

    `mean`/`std` are non-persistent buffers, so they follow `.to()` but are not in the state dict.
    """

    crop_from = 256
    crop = slice(16, 240)
    net_size = 224
    n_points = 68

    def __init__(self, n_landmarks: int = 51, first_landmark: int = 17) -> None:
        super().__init__()
        if first_landmark < 0 or n_landmarks < 1 or first_landmark + n_landmarks > self.n_points:
            raise ValueError(
                f'landmarks {first_landmark}..{first_landmark + n_landmarks - 1} are outside the '
                f'{self.n_points}-point layout'
            )
        self.n_landmarks = n_landmarks
        self.first_landmark = first_landmark
        self.backbone = MobileNetGDConv(2 * self.n_points)

    @property
    def out_dim(self) -> int:
        return 2 * self.n_landmarks

    def forward(self, img: Tensor) -> Tensor:
        """img: [B,3,H,W] in [-1,1] -> lnd_feat [B,2*n_landmarks] in [0,1] as (x0, y0, x1, y1, ...)."""
        size = tuple(img.shape[-2:])
        if size != (self.net_size, self.net_size):
            if size != (self.crop_from, self.crop_from):
                img = F.interpolate(
                    img, size=(self.crop_from, self.crop_from), mode='bilinear', align_corners=False, antialias=True
                )
            img = img[:, :, self.crop, self.crop]
        x = imagenet_normalize((img + 1) / 2)
        points = self.backbone(x).clamp(0, 1).reshape(img.shape[0], self.n_points, 2)
        return points[:, self.first_landmark : self.first_landmark + self.n_landmarks].flatten(1)
