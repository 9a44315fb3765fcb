"""Image metrics against scikit-image and an independent zero-padded SSIM (diffae's definition), pinned pytorch-msssim
numbers, STIT identity consistency against explicit
loops, the offline LPIPS wrapper, and the identity embedders (dlib on real frames, ArcFace on a stand-in module)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import metrics as M


def _noisy_pair(h: int = 48, w: int = 40, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def _smooth_pair(h: int, w: int) -> tuple[Tensor, Tensor]:
    """Deterministic smooth images (no RNG): a gradient plus low-frequency waves, and a shifted, distorted copy."""
    y = torch.arange(h, dtype=torch.float64).view(h, 1)
    x = torch.arange(w, dtype=torch.float64).view(1, w)
    chans = [0.5 + 0.3 * torch.sin(0.11 * x + 0.07 * y + c) * torch.cos(0.05 * y - 0.03 * x * c) for c in range(3)]
    a = torch.stack(chans)[None].clamp(0, 1)
    b = (0.9 * a + 0.05 + 0.06 * torch.sin(0.9 * x) * torch.cos(0.7 * y)).clamp(0, 1)
    a2 = torch.flip(a, dims=[3])
    b2 = (a2**1.3).clamp(0, 1)
    return torch.cat([a, a2]), torch.cat([b, b2])


def _skimage_ssim(a: Tensor, b: Tensor) -> list[float]:
    from skimage.metrics import structural_similarity

    return [
        structural_similarity(
            a[i].permute(1, 2, 0).numpy(),
            b[i].permute(1, 2, 0).numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=-1,
        )
        for i in range(a.shape[0])
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Image metrics


def test_identical_images() -> None:
    a, _ = _smooth_pair(176, 168)
    a = a.float()
    assert torch.equal(M.mse(a, a), torch.zeros(2))
    assert torch.isinf(M.psnr(a, a)).all() and (M.psnr(a, a) > 0).all()  # PSNR of an exact copy is +inf
    torch.testing.assert_close(M.ssim(a, a), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.ms_ssim(a, a), torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize('pair', ['noise', 'smooth'])
def test_ssim_and_psnr_match_skimage(pair: str) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _noisy_pair() if pair == 'noise' else _smooth_pair(37, 52)
    ours = M.ssim(a, b)
    assert ours.shape == (2,)
    # pytorch-msssim builds its Gaussian in float32: ~1e-6 offsets in float64
    torch.testing.assert_close(ours, torch.tensor(_skimage_ssim(a, b), dtype=ours.dtype), atol=1e-5, rtol=0)
    # float32 inputs agree too (within the required 1e-3)
    torch.testing.assert_close(M.ssim(a.float(), b.float()).double(), ours, atol=1e-4, rtol=0)
    ref = [peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1) for i in range(2)]
    torch.testing.assert_close(M.psnr(a, b), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.mse(a, b), (a - b).pow(2).mean((1, 2, 3)))


def test_ssim_data_range_and_shapes() -> None:
    a, b = _noisy_pair()
    torch.testing.assert_close(M.ssim(255 * a, 255 * b, data_range=255.0), M.ssim(a, b))
    torch.testing.assert_close(M.psnr(255 * a, 255 * b, data_range=255.0), M.psnr(a, b))
    with pytest.raises(ValueError, match='same shape'):
        M.ssim(a, b[:, :, :-1])
    with pytest.raises(ValueError, match='odd'):
        M.ssim(a, b, window=10)
    with pytest.raises(ValueError, match='at least 11x11'):
        M.ssim(a[..., :10], b[..., :10])
    assert M.ssim(a[..., :10], b[..., :10], border='zero').shape == (2,)  # padded: any size
    with pytest.raises(ValueError, match='border'):
        M.ssim(a, b, border='reflect')


def _diffae_ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM as diffae's ssim.py defines it (the released DVA evaluation imports it), written out here as the
    independent reference: a window x window Gaussian (sigma 1.5) as the outer product of the normalised 1-D one,
    conv2d per channel with padding=window // 2 (zero padding), C1 = 0.01^2, C2 = 0.03^2, the map's mean per image."""
    import torch.nn.functional as F

    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None]
    c = a.shape[1]
    w = (g @ g.T).expand(c, 1, window, window).to(a.dtype)

    def conv(t: Tensor) -> Tensor:
        return F.conv2d(t, w, padding=window // 2, groups=c)

    mu1, mu2 = conv(a), conv(b)
    s11, s22, s12 = conv(a * a) - mu1**2, conv(b * b) - mu2**2, conv(a * b) - mu1 * mu2
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return m.mean((1, 2, 3))


def _real_crops(sample_video_dir: Path) -> tuple[Tensor, Tensor]:
    """256-px face crops of 3 real frames and a blurred, JPEG-compressed copy of each (a stand-in reconstruction
    with SSIM about 0.9), float32 [3,3,256,256] in [0,1]."""
    import io

    from PIL import Image, ImageFilter

    a, b = [], []
    for i in (0, 40, 80):
        with Image.open(sample_video_dir / f'{i:04d}.jpeg') as im:
            face = im.convert('RGB').crop((1060, 108, 1740, 788)).resize((256, 256), Image.BICUBIC)
        buf = io.BytesIO()
        face.filter(ImageFilter.GaussianBlur(1.2)).save(buf, format='JPEG', quality=40)
        a.append(np.asarray(face))
        b.append(np.asarray(Image.open(buf)))
    return tuple(torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 255 for x in (a, b))


def test_ssim_borders_match_independent_references_on_real_crops(sample_video_dir: Path) -> None:
    a, b = _real_crops(sample_video_dir)
    valid, zero = M.ssim(a, b), M.ssim(a, b, border='zero')
    assert ((0.8 < valid) & (valid < 0.97)).all(), valid
    torch.testing.assert_close(valid.double(), torch.tensor(_skimage_ssim(a.double(), b.double())), atol=1e-4, rtol=0)
    torch.testing.assert_close(zero, _diffae_ssim(a, b), atol=1e-4, rtol=0)  # float32, as diffae ran
    assert (zero - valid > 0.001).all()  # the zero-padded border reads higher: the conventions really differ


def test_ms_ssim_pinned_against_pytorch_msssim() -> None:
    """Numbers from pytorch_msssim 1.0.0 `ms_ssim` / `ssim(a, b, data_range=1, size_average=False)` on these images
    (odd height 175 exercises the padded pooling). pytorch-msssim builds its Gaussian in float32, hence ~1e-6
    offsets."""
    a, b = _smooth_pair(175, 168)
    torch.testing.assert_close(
        M.ms_ssim(a, b), torch.tensor([0.9477321952, 0.9948118291], dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        M.ssim(a, b), torch.tensor([0.7193544298, 0.9685071623], dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(M.ssim(a, b), torch.tensor(_skimage_ssim(a, b), dtype=torch.float64), atol=1e-5, rtol=0)


def test_ms_ssim_properties() -> None:
    a, _ = _smooth_pair(176, 168)
    a = a[:1].float()
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    b = torch.cat([(a + s * noise).clamp(0, 1) for s in (0.02, 0.1, 0.3)])
    scores = M.ms_ssim(a.expand_as(b), b)
    assert ((0 < scores) & (scores < 1)).all()
    assert scores[0] > scores[1] > scores[2]
    # one scale is SSIM (clipped at 0) of the full-size image
    torch.testing.assert_close(M.ms_ssim(a, b[1:2], weights=(1.0,)), M.ssim(a, b[1:2]))


def test_ms_ssim_small_images() -> None:
    a, b = _noisy_pair(64, 64)
    with pytest.raises(ValueError, match='exceed 160 px'):
        M.ms_ssim(a, b)
    with pytest.raises(ValueError, match='exceed 160 px'):
        M.ms_ssim(*_noisy_pair(160, 200))
    assert M.ms_ssim(*_noisy_pair(161, 161)).shape == (2,)
    assert M.ms_ssim(a, b, window=3).shape == (2,)  # a smaller window makes small images usable


def test_metrics_follow_dtype_and_helpers() -> None:
    a, b = _noisy_pair()
    assert M.ssim(a.half(), b.half()).dtype == torch.float32
    assert M.mse(a, b).dtype == torch.float64
    per_image = M.reconstruction_metrics(a.float(), b.float(), with_ms_ssim=False)
    assert set(per_image) == {'mse', 'psnr', 'ssim'} and all(v.shape == (2,) for v in per_image.values())
    means = M.mean_metrics({'ssim': [per_image['ssim'][:1], per_image['ssim'][1:]], 'mse': per_image['mse']})
    assert means['ssim'] == pytest.approx(float(per_image['ssim'].double().mean()))
    assert means['mse'] == pytest.approx(float(per_image['mse'].double().mean()))


# ----------------------------------------------------------------------------------------------------------------------
# Temporal identity consistency


def _embeddings(n: int = 6, d: int = 16, spread: float = 0.3, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g, dtype=torch.float64)
    return base + spread * torch.randn(n, d, generator=g, dtype=torch.float64)


def _cos(u: Tensor, v: Tensor) -> float:
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def test_tl_tg_id_match_loops() -> None:
    src, edit = _embeddings(seed=0), 3.0 * _embeddings(spread=0.6, seed=1)  # scale must not matter
    n = src.shape[0]
    tl = sum(_cos(edit[i], edit[i + 1]) / _cos(src[i], src[i + 1]) for i in range(n - 1)) / (n - 1)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    tg = sum(_cos(edit[i], edit[j]) / _cos(src[i], src[j]) for i, j in pairs) / len(pairs)
    assert float(M.tl_id(src, edit)) == pytest.approx(tl, abs=1e-12)
    assert float(M.tg_id(src, edit)) == pytest.approx(tg, abs=1e-12)
    assert M.tl_id(src, edit).ndim == 0
    assert float(M.tl_id(src, edit)) != pytest.approx(1.0, abs=1e-3)  # the constructed edit does change identity
    curve = M.identity_similarity_curve(edit)
    torch.testing.assert_close(curve, torch.tensor([_cos(edit[0], edit[i]) for i in range(n)], dtype=torch.float64))


def test_tl_tg_id_identical_and_errors() -> None:
    src = _embeddings().float()
    assert float(M.tl_id(src, src)) == pytest.approx(1.0, abs=1e-6)
    assert float(M.tg_id(src, src)) == pytest.approx(1.0, abs=1e-6)
    assert float(M.identity_similarity_curve(src)[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match='at least 2 frames'):
        M.tl_id(src[:1], src[:1])
    with pytest.raises(ValueError, match='at least 2 frames'):
        M.tg_id(src[:1], src[:1])
    with pytest.raises(ValueError, match='at least 2 frames'):
        M.identity_similarity_curve(src[:1])
    with pytest.raises(ValueError, match='same'):
        M.tg_id(src, src[:-1])


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_random_init() -> None:
    lp = M.LPIPS(random_init=True)
    a, b = (t.float() for t in _noisy_pair(64, 64))
    assert torch.equal(lp(a, a), torch.zeros(2))
    d = lp(a, b)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d != 0).all()
    lp.train()
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())


def test_lpips_missing_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))  # keep a real hub cache out of the search
    with pytest.raises(FileNotFoundError, match=M.ALEXNET_FILE) as err:
        M.LPIPS(pretrained_dir=tmp_path)
    assert str(tmp_path / M.ALEXNET_FILE) in str(err.value)
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        M.LPIPS(alexnet_path=tmp_path / 'nope.pth')


def test_lpips_loads_torchvision_alexnet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file laid out as torchvision's AlexNet state dict lands in the right lpips trunk layers; heads come from the
    lpips package. The stand-in has random values (shapes from torchvision's AlexNet)."""
    import torchvision

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    torch.manual_seed(0)
    features = torchvision.models.alexnet().features
    state = {f'features.{k}': v for k, v in features.state_dict().items()}
    state['classifier.1.weight'] = torch.zeros(2, 2)  # extra torchvision keys are ignored
    torch.save(state, tmp_path / M.ALEXNET_FILE)
    lp = M.LPIPS(pretrained_dir=tmp_path)
    trunk = dict(lp.net.net.named_modules())
    for k, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            loaded = next(m for name, m in trunk.items() if name.endswith(f'.{k}') and isinstance(m, nn.Conv2d))
            assert torch.equal(loaded.weight, layer.weight) and torch.equal(loaded.bias, layer.bias)
    assert all(float(lin.model[1].weight.abs().sum()) > 0 for lin in lp.net.lins)
    a, b = (t.float() for t in _noisy_pair(64, 64))
    assert torch.equal(lp(a, a), torch.zeros(2))
    assert (lp(a, b) > 0).all()  # the shipped heads are non-negative


# ----------------------------------------------------------------------------------------------------------------------
# Identity embedders


def test_arcface_embedder_wraps_any_module() -> None:
    class TinyId(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, 32).double()
            self.seen: list[Tensor] = []

        def forward(self, x: Tensor) -> Tensor:
            self.seen.append(x)
            return self.proj(nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))

    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (5, 24, 24, 3), generator=g, dtype=torch.uint8).numpy()
    net = TinyId()
    emb = M.ArcFaceEmbedder(net, batch_size=2)(crops)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    assert [x.shape[0] for x in net.seen] == [2, 2, 1] and net.seen[0].dtype == torch.float64
    assert float(net.seen[0].min()) >= -1 and float(net.seen[0].max()) <= 1
    as_tensor = torch.from_numpy(crops).permute(0, 3, 1, 2).double() / 127.5 - 1
    torch.testing.assert_close(M.ArcFaceEmbedder(net)(as_tensor), emb)


def test_dlib_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='missing_resnet.dat'):
        M.DlibFaceEmbedder(model_path=tmp_path / 'missing_resnet.dat')


def _face_crop(img, embedder: M.DlibFaceEmbedder, size: int = 160) -> np.ndarray:
    """Square crop (1.6x the detected box) around the largest face in a PIL image, resized to size x size."""
    from PIL import Image

    r = embedder.face_box(np.asarray(img))
    cx, cy, s = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2, 0.8 * max(r.width(), r.height())
    return np.asarray(
        img.crop((int(cx - s), int(cy - s), int(cx + s), int(cy + s))).resize((size, size), Image.BICUBIC)
    )


def test_dlib_embedder_same_vs_other_person(sample_video_dir: Path, test_videos_dir: Path) -> None:
    pytest.importorskip('dlib')
    import av
    from PIL import Image

    embedder = M.DlibFaceEmbedder()
    frames = [Image.open(sample_video_dir / f'{i:04d}.jpeg').convert('RGB').reduce(4) for i in (0, 1)]
    with av.open(str(test_videos_dir / 'carphone.mp4')) as container:
        other = next(container.decode(video=0)).to_image()
    other = other.resize((other.width * 2, other.height * 2), Image.BICUBIC)  # 176x144: too small for the detector
    crops = np.stack([_face_crop(f, embedder) for f in [*frames, other]])
    emb = embedder(crops)
    assert emb.shape == (3, 128) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    same, different = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    # dlib's descriptors are not centred, so even different people have cosine ~0.85-0.9; the same person ~0.99+.
    assert same > 0.97
    assert different < 0.95 and different < same - 0.05
    # a tensor in [-1,1] is the same input as its uint8 frames
    as_tensor = torch.from_numpy(crops[:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(embedder(as_tensor), emb[:1])
    # no face in the crop: the whole crop is the face box, still a unit vector
    blank = np.full((1, 64, 64, 3), 128, dtype=np.uint8)
    assert len(embedder.detector(blank[0], 0)) == 0
    torch.testing.assert_close(embedder(blank).norm(dim=1), torch.ones(1))
