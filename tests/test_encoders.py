"""The frozen face networks: key layout and sizes of the released files, pre-processing, and parity with the released code.

The parity tests load the fixture weights (written in the released file formats) and compare with the tensors the
released implementation computed from them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import EncoderConfig
from model.encoders import IdentityEncoder, IRSEBackbone, LandmarkEncoder, MobileNetGDConv
from model.face_parsing import BiSeNet, FaceParser

# Released parameter counts (unique tensors), from building the released modules.
PARAMS_IR_SE50 = 43_797_696
PARAMS_MOBILENET = 3_744_504  # pretrain_net.classifier included, base_net.0 counted once
PARAMS_BISENET = 13_300_416
PRETRAINED = {
    'ir_se50': 'model_ir_se50.pth',
    'mobilenet': 'mobilenet_224_model_best_gdconv_external.pth.tar',
    'bisenet': '79999_iter.pth',
}


def _unique_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields each tensor once


def _listing(parity_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    with open(parity_dir / 'keys' / f'{name}.tsv') as f:
        rows = list(csv.DictReader((line for line in f if not line.startswith('#')), delimiter='\t'))
    return [(r['name'], [int(s) for s in r['shape'].strip('[]').split(',') if s.strip()]) for r in rows]


def _load(module: nn.Module, path: Path, strip: str = '') -> None:
    """Strict load of a released file: a plain state dict, or {'state_dict': {strip + key: ...}}."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    if 'state_dict' in state:
        state = state['state_dict']
    if strip:
        state = {k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
    module.load_state_dict(state, strict=True)


def _calibrate_batchnorm(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics from one train-mode pass, so random-weight outputs are O(1).

    With default init and identity BatchNorm statistics, the landmark net's outputs are ~1e-8, which would make the
    comparisons below vacuous.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    with torch.no_grad():
        module.train()(x)
    return module.eval()


@pytest.fixture(scope='module')
def random_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    lndnet = _calibrate_batchnorm(LandmarkEncoder(), torch.rand(4, 3, 256, 256) * 2 - 1)
    return {'id': IdentityEncoder().eval(), 'lnd': lndnet, 'parser': FaceParser().eval()}


# --------------------------------------------------------------------------------------------------------------------
# Layout


def test_parameter_counts_match_released(random_nets: dict[str, nn.Module]) -> None:
    assert _unique_params(random_nets['id'].backbone) == PARAMS_IR_SE50
    assert _unique_params(random_nets['lnd'].backbone) == PARAMS_MOBILENET
    assert _unique_params(random_nets['parser'].backbone) == PARAMS_BISENET
    # Only the backbones hold state: the normalisation constants are not in the state dict.
    for net in random_nets.values():
        assert all(k.startswith('backbone.') for k in net.state_dict())


def test_mobilenet_base_net_aliases_features() -> None:
    net = MobileNetGDConv(136)
    assert net.base_net[0] is net.pretrain_net.features
    sd = net.state_dict()
    alias = [k for k in sd if k.startswith('base_net.0.')]
    assert len(alias) == len([k for k in sd if k.startswith('pretrain_net.features.')]) > 0
    for k in alias:
        assert sd[k].data_ptr() == sd['pretrain_net.features.' + k[len('base_net.0.') :]].data_ptr()


@pytest.mark.parametrize('name', ['ir_se50', 'mobilenet', 'bisenet'])
def test_state_dict_equals_released_listing(name: str, parity_dir: Path) -> None:
    """Same keys, in the same order, with the same shapes as the released weight files."""
    net = {
        'ir_se50': lambda: IRSEBackbone(50),
        'mobilenet': lambda: MobileNetGDConv(136),
        'bisenet': lambda: BiSeNet(19),
    }[name]()
    got = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert got == _listing(parity_dir, name)


# --------------------------------------------------------------------------------------------------------------------
# Pre-processing and shapes at random init


def test_identity_encoder_shapes_and_resize(random_nets: dict[str, nn.Module]) -> None:
    idnet = random_nets['id']
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    y = x.clone()  # differs from x only outside the crop rows 35:223, cols 32:220
    y[:, :, :35] = 0.3
    y[:, :, :, 220:] = -0.7
    with torch.no_grad():
        feat = idnet(torch.cat([x, y]))
        assert feat.shape == (2, 512)
        torch.testing.assert_close(feat.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(feat[0], feat[1])
        # Any other size is first average-pooled to 256.
        x2 = torch.rand(1, 3, 200, 200) * 2 - 1
        torch.testing.assert_close(idnet(x2), idnet(F.adaptive_avg_pool2d(x2, 256)))


def test_landmark_encoder_sizes_and_selection(random_nets: dict[str, nn.Module]) -> None:
    lndnet = random_nets['lnd']
    cfg = EncoderConfig()
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        feat = lndnet(x)
        assert feat.shape == (2, 2 * cfg.n_landmarks)
        assert feat.min() >= 0 and feat.max() <= 1
        assert ((feat > 0.01) & (feat < 0.99)).any()  # not all clamped or vanishing
        # 256 -> centre crop [16:240]; 224 is used as is; other sizes are resized to 256 first.
        torch.testing.assert_close(lndnet(x[:, :, 16:240, 16:240]), feat)
        x3 = torch.rand(2, 3, 320, 320) * 2 - 1
        resized = F.interpolate(x3, size=(256, 256), mode='bilinear', align_corners=False, antialias=True)
        torch.testing.assert_close(lndnet(x3), lndnet(resized))
        # Point selection: the 51-point feature is points 17..67 of the full 68-point output, x/y interleaved.
        full = LandmarkEncoder(68, 0).eval()
        full.backbone.load_state_dict(lndnet.backbone.state_dict())
        all_points = full(x)
        assert all_points.shape == (2, 136)
        first = cfg.first_landmark
        torch.testing.assert_close(feat, all_points[:, 2 * first : 2 * (first + cfg.n_landmarks)])
    with pytest.raises(ValueError):
        LandmarkEncoder(60, 17)


def test_face_parser_shapes_and_binary_mask() -> None:
    torch.manual_seed(0)
    parser = FaceParser(19, parse_size=64).eval()
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        logits = parser.logits(x)
        assert logits.shape == (2, 19, 64, 64)
        main, aux16, aux32 = parser.backbone.forward_all(torch.randn(1, 3, 64, 64))
        assert main.shape == aux16.shape == aux32.shape == (1, 19, 64, 64)
        # Values outside [-1,1] are clipped before normalisation.
        torch.testing.assert_close(parser.logits(3 * x), parser.logits((3 * x).clamp(-1, 1)))
    labels = parser.labels(x)
    bg = EncoderConfig().bg_classes_video
    mask = parser.mask(x, bg)
    assert mask.shape == (2, 1, 48, 48) and mask.dtype == x.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = F.interpolate((~torch.isin(labels, torch.tensor(bg))).float(), size=(48, 48), mode='nearest')
    assert torch.equal(mask, expected)
    assert torch.equal(parser.mask(x, ()), torch.ones_like(mask))
    assert torch.equal(parser.mask(x, tuple(range(19))), torch.zeros_like(mask))


# --------------------------------------------------------------------------------------------------------------------
# Parity with the released implementation


@pytest.fixture(scope='module')
def pretrained_nets(parity_weights: Path) -> dict[str, nn.Module]:
    root = parity_weights / 'pretrained_models'
    idnet, lndnet, parser = IdentityEncoder(), LandmarkEncoder(), FaceParser()
    _load(idnet.backbone, root / PRETRAINED['ir_se50'])
    _load(lndnet.backbone, root / PRETRAINED['mobilenet'], strip='module.')
    _load(parser.backbone, root / PRETRAINED['bisenet'])
    return {'id': idnet.eval(), 'lnd': lndnet.eval(), 'parser': parser.eval()}


def test_identity_features_match_released(pretrained_nets: dict[str, nn.Module], parity: dict) -> None:
    with torch.no_grad():
        feat = pretrained_nets['id'](parity['x0'])
    assert feat.shape == parity['id_feats'].shape
    assert (feat - parity['id_feats']).abs().max() < 1e-4


def test_landmark_features_match_released(pretrained_nets: dict[str, nn.Module], parity: dict) -> None:
    with torch.no_grad():
        feat = pretrained_nets['lnd'](parity['x0'])
    assert feat.shape == parity['lnd_feats'].shape
    assert (feat - parity['lnd_feats']).abs().max() < 1e-4


def test_face_masks_match_released(pretrained_nets: dict[str, nn.Module], parity: dict) -> None:
    cfg = EncoderConfig()
    x0 = parity['x0']
    decided = parity['mask_margin'] > 1e-4  # elsewhere the top two logits tie and the argmax may flip
    assert decided.float().mean() > 0.99
    for key, bg in (('mask_train', cfg.bg_classes_train), ('mask_video', cfg.bg_classes_video)):
        mask = pretrained_nets['parser'].mask(x0, bg)
        assert mask.shape == parity[key].shape
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask[decided], parity[key][decided]), key
