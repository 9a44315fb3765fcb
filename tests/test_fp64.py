"""A float64 model computes in float64 everywhere: no float32 island in any network used for editing or in the loops.

Every aten op is watched with a TorchDispatchMode: a single floating output that is not float64 (a time embedding,
GroupNorm or softmax upcast to float32, a float32 constant, a schedule lookup cast to float32) fails the test. This is
what lets the parity tests compare the DDIM loops with the released float64 references at ~1e-8.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import templates
from diffusion import NoiseSchedule, ddim_invert, ddim_sample, dpm_solver_sample, dva_loss
from model.autoencoder import DiffusionVideoAutoencoder
from model.blocks import AttentionBlock
from model.classifier import AttributeClassifier


class NonFloat64Ops(TorchDispatchMode):
    """Records every aten op whose output holds a floating tensor that is not float64."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.found.append(f'{func} -> {t.dtype}')
        return out


def run_audited(fn, *args, **kwargs):
    audit = NonFloat64Ops()
    with audit:
        out = fn(*args, **kwargs)
    assert not audit.found, f'{len(audit.found)} non-float64 op outputs, first: {audit.found[:5]}'
    return out


def test_audit_catches_a_float32_island() -> None:
    """The auditor itself: an op that computes in float32 inside a float64 computation is reported."""
    x = torch.ones(3, dtype=torch.float64)
    audit = NonFloat64Ops()
    with audit:
        (x.float() * 2).double()
    assert any('float32' in f for f in audit.found)


@pytest.fixture(scope='module')
def tiny64() -> DiffusionVideoAutoencoder:
    """Tiny UNet (attention at 16 px and in the middle) with the released encoder networks, random weights, float64.
    The zero-initialised output convolutions are perturbed so that every branch contributes."""
    torch.manual_seed(0)
    model = DiffusionVideoAutoencoder(templates.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.double()


@pytest.mark.parametrize('attention', ['sdpa', 'math'])
@torch.no_grad()
def test_unet_float64_has_no_float32_op(tiny64, attention) -> None:
    blocks = [m for m in tiny64.modules() if isinstance(m, AttentionBlock)]
    assert blocks
    for m in blocks:
        m.impl = attention
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 512, generator=gen, dtype=torch.float64)
    eps = run_audited(tiny64, x, torch.tensor([3, 999]), z)
    assert eps.dtype == torch.float64 and eps.abs().sum() > 0


@torch.no_grad()
def test_face_encoders_float64_have_no_float32_op(tiny64) -> None:
    """ArcFace IR-SE50, MobileNetV2 landmarks, the fusion Linear and BiSeNet (both masks) at the released sizes."""
    img = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    enc = tiny64.encoder
    id_feat = run_audited(enc.identity, img)
    lnd = run_audited(enc.landmarks, img)
    z = run_audited(enc.combine, id_feat, lnd)
    mask = run_audited(enc.mask, img, 'video')
    assert id_feat.dtype == lnd.dtype == z.dtype == mask.dtype == torch.float64


def test_classifier_edit_float64_has_no_float32_op() -> None:
    torch.manual_seed(0)
    clf = AttributeClassifier().double()
    with torch.no_grad():
        clf.conds_mean.normal_(0, 0.01), clf.conds_std.uniform_(0.5, 1.5)
    id_feat = torch.nn.functional.normalize(torch.randn(1, 512, dtype=torch.float64), dim=1)
    edited = run_audited(clf.edit_identity, id_feat, 22, 0.25)
    assert edited.dtype == torch.float64 and not torch.allclose(edited, id_feat)


def test_diffusion_loops_and_loss_float64_have_no_float32_op(tiny64) -> None:
    """DDIM inversion and sampling, DPM-Solver++ and the training loss keep a float64 x in float64 (the schedule's
    coefficients included)."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 512, generator=gen, dtype=torch.float64)

    def eps_fn(x_t, t):
        return tiny64(x_t, t, z.expand(len(x_t), -1))

    sched = NoiseSchedule.linear().respace(4)
    x_T = run_audited(ddim_invert, eps_fn, x0, sched)
    out = run_audited(ddim_sample, eps_fn, x_T, sched)
    fast = run_audited(dpm_solver_sample, eps_fn, x_T, sched, 3)
    assert x_T.dtype == out.dtype == fast.dtype == torch.float64
    full = NoiseSchedule.linear()
    noise = torch.randn(2, *x0.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        losses = run_audited(dva_loss, eps_fn, x0, torch.tensor([5, 900]), noise[0], noise[1],
                             torch.ones(2, 1, 32, 32, dtype=torch.float64), full)
    assert losses['loss'].dtype == torch.float64
