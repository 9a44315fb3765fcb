"""CLIP-guided identity editing (DVA Sec. 4.2; released `editing_CLIP.py` and `losses/clip_loss.py`).

A text pair (src_txt, trg_txt), e.g. ('face', 'face with beard'), is turned into a direction in identity space:

1. `CLIPDirectionalLoss` embeds the pair with CLIP ViT-B/16 over the 79 ImageNet prompt templates and measures how
   well the CLIP-space change between two images follows the text change (StyleGAN-NADA's directional loss).
2. `find_clip_direction` optimises the identity feature of one frame so that one DDIM step of the autoencoder,
   taken from every state of that frame's short deterministic trajectory, moves along the text direction while
   staying close to the original identity and, inside the face mask, to the original trajectory.
3. `apply_clip_direction` moves the video's mean identity along the found `delta` by any scale, so one search serves
   many scales (`save_direction` / `load_direction` keep it on disk).

Only the directional loss is implemented and only ViT-B/16 is built: the released code also loads an unused RN50 and
four unused losses (dva_spec section 8, row 27). Weights come from a local file and nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import math
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cli import PRECISIONS, autocast, torch_save
from diffusion.sampling import ddim_invert, ddim_sample, ddim_step
from diffusion.schedule import NoiseSchedule
from editing.text_templates import IMAGENET_TEMPLATES, format_templates

if TYPE_CHECKING:
    from model.autoencoder import DiffusionVideoAutoencoder

CLIP_ARCH = 'ViT-B-16'
DEFAULT_CLIP_WEIGHTS = Path('pretrained_models') / 'ViT-B-16.pt'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIRECTION_FORMAT = 'dva-clip-direction-v1'


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing constants: resize the short side to `image_size` (bicubic), centre crop, normalise."""

    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


# --------------------------------------------------------------------------------------------------------------------
# Loading CLIP


def _missing_weights_error(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f'CLIP ViT-B/16 weights not found at {path}. Pass the OpenAI ViT-B-16.pt file with --clip_weights PATH, or '
        f'fetch it with `bash download_requirements.sh --only clip_vit_b16` (nothing is downloaded at run time).'
    )


def _is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (the OpenAI release format), which holds a `constants.pkl` record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit('/', 1)[-1] == 'constants.pkl' for name in archive.namelist())


def read_openai_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """State dict of an OpenAI CLIP file: the released TorchScript archive, or a plain (optionally `state_dict`-
    wrapped, `module.`-prefixed) state dict saved with torch.save. Loaded on CPU; tensors keep the file's dtype
    (fp16 in the OpenAI release). The OpenAI archive's integer attributes (input_resolution, ...) and the text
    attention mask that a traced open_clip model carries (a non-persistent buffer, rebuilt by the model) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise _missing_weights_error(path)
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # torch.jit.load is deprecated, yet it is the only reader of this format
            warnings.simplefilter('ignore', FutureWarning)
            state = dict(torch.jit.load(str(path), map_location='cpu').state_dict())
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
        if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
            state = state['state_dict']
        if not isinstance(state, dict):
            raise ValueError(f'{path} holds a {type(state).__name__}, not a CLIP state dict')
        state = {k.removeprefix('module.'): v for k, v in state.items()}
    for key in ('input_resolution', 'context_length', 'vocab_size', 'attn_mask'):
        state.pop(key, None)
    return state


def load_clip(
    weights: str | Path | None,
    device: torch.device | str,
    random_init: bool = False,
    half: bool = False,
) -> tuple[nn.Module, ClipPreprocess]:
    """Load an OpenAI CLIP file with open_clip's own OpenAI loader, from a local path only (never a download).

    The state dict is read by `read_openai_clip_state_dict` (TorchScript archive or plain state dict) and built by
    `open_clip.model.build_model_from_openai_state_dict`, which reads the architecture off the tensors (widths,
    layers, patch size, embedding; heads = width // 64) and rounds the weights through fp16 as OpenAI's loader does.
    So the released ViT-B/16 and any smaller CLIP in the OpenAI layout load through the same code path.

    Args:
        weights: the OpenAI `ViT-B-16.pt`; None means `pretrained_models/ViT-B-16.pt` under the working directory.
            Ignored with `random_init`.
        device: where the model goes.
        random_init: open_clip's randomly initialised ViT-B-16 (QuickGELU); no file is read (tests, smoke runs).
        half: keep the fp16 weights, as the released code has them on CUDA (convolutions, linears, attention and
            projections in fp16; embeddings and LayerNorms in fp32). CUDA only. Default fp32, as released on CPU.

    Returns:
        (model in eval mode with frozen parameters, its preprocessing constants).

    A missing file raises FileNotFoundError naming the path, `--clip_weights` and the download script; a file that is
    not an OpenAI CLIP state dict raises ValueError.
    """
    device = torch.device(device)
    if half and device.type != 'cuda':
        raise ValueError(f'fp16 CLIP weights need a CUDA device, got {device}; use fp32 on {device.type}')
    import open_clip  # lazy: optional dependency

    if random_init:
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns "No pretrained weights loaded" for an architecture build
        try:
            model = open_clip.create_model(CLIP_ARCH, pretrained=None, precision='fp16' if half else 'fp32',
                                           device='cpu', force_quick_gelu=True)
        finally:
            logging.disable(previous)
    else:
        from open_clip.model import build_model_from_openai_state_dict

        path = DEFAULT_CLIP_WEIGHTS if weights is None else Path(weights)
        state = read_openai_clip_state_dict(path)
        try:
            model = build_model_from_openai_state_dict(state, cast_dtype=torch.float16 if half else None)
        except (KeyError, RuntimeError) as e:
            raise ValueError(f'{path} is not an OpenAI CLIP state dict ({type(e).__name__}: {str(e)[:300]})') from e
        if not half:
            model = model.float()  # built in OpenAI's mixed fp16 layout
    model = model.to(device).eval().requires_grad_(False)
    return model, _preprocess_of(model)


def tiny_clip(device: torch.device | str = 'cpu') -> tuple[nn.Module, ClipPreprocess]:
    """A randomly initialised miniature open_clip CLIP for tests and `--preset tiny` smoke runs.

    Same interfaces, tokenizer (context 77, OpenAI BPE vocabulary), input size (224) and preprocessing as ViT-B/16,
    but 32-px patches, one 64-wide vision layer, one 32-wide text layer and 32-d embeddings, so that a forward and
    backward pass costs milliseconds on a CPU. Use the global torch seed for reproducible weights.
    """
    from open_clip.model import CLIP  # lazy: optional dependency

    model = CLIP(
        embed_dim=32,
        vision_cfg={'layers': 1, 'width': 64, 'head_width': 32, 'patch_size': 32, 'image_size': 224},
        text_cfg={'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1},
        quick_gelu=True,
    )
    model = model.to(device).eval().requires_grad_(False)
    return model, _preprocess_of(model)


def _preprocess_of(model: nn.Module) -> ClipPreprocess:
    size = model.visual.image_size
    return ClipPreprocess(image_size=int(size[0] if isinstance(size, (tuple, list)) else size))


# --------------------------------------------------------------------------------------------------------------------
# The directional CLIP loss


def clip_preprocess(img: Tensor, pre: ClipPreprocess) -> Tensor:
    """The released preprocessing of generated images: [-1,1] -> [0,1] -> resize -> centre crop -> normalise.

    img: [B,3,H,W] in [-1,1]. The short side is resized to `pre.image_size` with bicubic interpolation applied to the
    tensor WITHOUT antialiasing (torchvision 0.13 tensor semantics; the long side becomes int(size * long / short)),
    then centre-cropped (top = round((h - size) / 2)) and normalised with CLIP's mean/std. Returns
    [B,3,size,size] in float32 (float64 for a float64 img). Differentiable.
    """
    x = (img.to(torch.promote_types(img.dtype, torch.float32)) + 1) / 2
    size = pre.image_size
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode='bicubic', align_corners=False, antialias=False)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # torchvision center_crop
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def clip_objective(l_dir: Tensor) -> Tensor:
    """The released CLIP term: -log((2 - L_dir) / 2), 0 for a perfectly aligned edit, growing without bound as
    L_dir -> 2 (opposite direction)."""
    return -torch.log((2 - l_dir) / 2)


def directional_loss(f_src: Tensor, f_trg: Tensor, direction: Tensor) -> Tensor:
    """L_dir = mean_b (1 - cos(u_b, d)), u = (f_trg - f_src) / (|f_trg - f_src| + 1e-7) (StyleGAN-NADA eq. 2).

    f_src, f_trg: [B,D] L2-normalised image embeddings; direction: [D] (or [1,D]) unit text direction. In [0, 2].
    """
    u = f_trg - f_src
    u = u / (u.norm(dim=-1, keepdim=True) + 1e-7)
    return (1 - F.cosine_similarity(u, direction.reshape(1, -1).to(u), dim=-1)).mean()


class CLIPDirectionalLoss(nn.Module):
    """Directional CLIP loss between image pairs and a text pair (the only CLIP loss the released editing uses).

    Args:
        clip_model: an open_clip-style model with `encode_image(x [B,3,s,s]) -> [B,D]` and
            `encode_text(tokens [N,L]) -> [N,D]`; it is frozen and kept in eval mode.
        preprocess: image size and normalisation (`load_clip` returns them).
        tokenizer: list[str] -> int tokens [N,L]; default open_clip's bundled OpenAI BPE tokenizer for ViT-B-16
            (`open_clip.get_tokenizer`, no download).
        templates: prompt templates averaged for each text (default the 79 ImageNet templates).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        preprocess: ClipPreprocess | None = None,
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
    ) -> None:
        super().__init__()
        self.clip = clip_model.requires_grad_(False).eval()
        self.pre = preprocess or ClipPreprocess()
        self.templates = tuple(templates)
        self._tokenizer = tokenizer
        self._directions: dict[tuple[str, str], Tensor] = {}

    def train(self, mode: bool = True) -> CLIPDirectionalLoss:
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def tokenizer(self) -> Callable[[list[str]], Tensor]:
        if self._tokenizer is None:
            import open_clip  # lazy: optional dependency

            self._tokenizer = open_clip.get_tokenizer(CLIP_ARCH)
        return self._tokenizer

    def _input_spec(self) -> tuple[torch.device, torch.dtype]:
        """The model's device, and the dtype its patch-embedding convolution expects (fp16 for half weights)."""
        for m in self.clip.modules():
            if isinstance(m, nn.Conv2d):
                return m.weight.device, m.weight.dtype
        p = next(self.clip.parameters(), None)
        return (torch.device('cpu') if p is None else p.device), torch.float32

    def preprocess(self, img: Tensor) -> Tensor:
        """[B,3,H,W] in [-1,1] -> [B,3,s,s] normalised CLIP input (see `clip_preprocess`)."""
        return clip_preprocess(img, self.pre)

    def encode_image(self, img: Tensor, normalize: bool = True) -> Tensor:
        """img [B,3,H,W] in [-1,1] -> CLIP image embeddings [B,D] (L2-normalised unless `normalize=False`), in float32
        (float64 for a float64 img; CLIP itself runs in its weights' dtype). Differentiable in img."""
        _, dtype = self._input_spec()
        f = self.clip.encode_image(self.preprocess(img).to(dtype)).to(torch.promote_types(img.dtype, torch.float32))
        return f / f.norm(dim=-1, keepdim=True) if normalize else f

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """N strings -> L2-normalised CLIP text embeddings [N,D] float32."""
        device, _ = self._input_spec()
        f = self.clip.encode_text(self.tokenizer(texts).to(device)).float()
        return f / f.norm(dim=-1, keepdim=True)

    def text_direction(self, src_txt: str, trg_txt: str) -> Tensor:
        """Unit text direction d [D] = normalise(mean_templates(f(template(trg)) - f(template(src)))), f normalised.

        Cached per (src_txt, trg_txt). Source and target prompts are encoded in separate, equally shaped batches, so
        swapping the texts negates the direction exactly.
        """
        key = (src_txt, trg_txt)
        if key not in self._directions:
            f_src = self.encode_text(format_templates(src_txt, self.templates))
            f_trg = self.encode_text(format_templates(trg_txt, self.templates))
            d = (f_trg - f_src).mean(dim=0)
            self._directions[key] = d / d.norm()
        return self._directions[key]

    def forward(self, src_img: Tensor, trg_img: Tensor, direction: Tensor) -> Tensor:
        """L_dir (scalar in [0, 2]) of the edits src_img[b] -> trg_img[b] ([B,3,H,W] in [-1,1]) against `direction`."""
        return directional_loss(self.encode_image(src_img), self.encode_image(trg_img), direction)


# --------------------------------------------------------------------------------------------------------------------
# Direction search


@dataclass
class ClipDirection:
    """Result of `find_clip_direction`.

    delta: [1,id_dim] e - z0, the optimised raw identity parameter minus the start identity (NOT re-normalised, as
        released); z0: [1,id_dim] the start frame's unit-norm identity; losses: one dict per iteration with the
        unweighted terms 'clip' (-log((2 - L_dir)/2)), 'id', 'l1' and the weighted 'total', measured before that
        iteration's update; n_iter_run: iterations run; stopped_early: whether early stopping ended the search.
    """

    delta: Tensor
    z0: Tensor
    losses: list[dict[str, float]] = field(default_factory=list)
    n_iter_run: int = 0
    stopped_early: bool = False


FirstStep = Literal['projected', 'released']
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def _l2norm(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


@dataclass
class SearchReference:
    """What the direction search keeps fixed, computed once from the start frame I0.

    z0: [1,id_dim] unit identity of I0; lnd0: [1,2K] its landmarks; mask0: [1,1,S,S] its training face mask;
    states: R [n+1,3,S,S], the reference trajectory [x_{n-1}, ..., x_0, x0_clean] with I0's own conditioning;
    f_src: [n,E] L2-normalised CLIP embeddings of R[1:]; direction: [E] unit text direction; schedule: the n-step
    respaced schedule of the search.
    """

    z0: Tensor
    lnd0: Tensor
    mask0: Tensor
    states: Tensor
    f_src: Tensor
    direction: Tensor
    schedule: NoiseSchedule


def reference_trajectory(eps_fn: Callable[[Tensor, Tensor], Tensor], frame: Tensor, schedule: NoiseSchedule
                         ) -> Tensor:
    """R = [x_{n-1}, ..., x_0, x0_clean] [n+1,3,S,S]: DDIM inversion of frame [1,3,S,S] to index n-1 (n-1 calls),
    then the n DDIM steps back, one state at a time (x0 clipped, eta 0)."""
    states = [ddim_invert(eps_fn, frame, schedule)]
    ddim_sample(eps_fn, states[0], schedule, callback=lambda d: states.append(d['x']))
    return torch.cat(states)


def batched_step(net: Callable[[Tensor, Tensor, Tensor], Tensor], states: Tensor, c: Tensor,
                 schedule: NoiseSchedule) -> Tensor:
    """B [n,3,S,S]: one DDIM step (eta 0, x0 clipped) from every state R[0:n] at once, R[k] at sampler index n-1-k
    stepping to n-2-k (-1: the clean estimate), each with its own alpha_bar and timestep, all conditioned on
    c [1,z_dim]. net(x_t, t, z_face) -> eps."""
    n = len(schedule)
    x = states[:n]
    index = torch.arange(n - 1, -1, -1, device=x.device)
    eps = net(x, schedule.t_at(index, n, x.device), c.expand(n, -1)).to(x.dtype)
    return ddim_step(x, eps, schedule.at(index, x), schedule.at(index - 1, x), clip=True)[0]


def search_terms(
    net: Callable[[Tensor, Tensor, Tensor], Tensor],
    combine: Callable[[Tensor, Tensor], Tensor],
    clip_loss: CLIPDirectionalLoss,
    ref: SearchReference,
    e: Tensor,
) -> dict[str, Tensor]:
    """The unweighted loss terms of the direction search at the identity parameter e [1,id_dim].

    z = e / |e|; c = combine(z, lnd0); B = batched_step(R, c); f_trg = CLIP(B) (normalised);
        'L_dir' = directional_loss(f_src, f_trg, d)           (the released term, in [0, 2])
        'clip'  = -log((2 - L_dir) / 2)
        'id'    = 1 - <z, z0>
        'l1'    = mean |M0 R[1:] - M0 B|
        'projected' = -mean_b <f_trg_b - f_src_b, d>, the first-order form of the CLIP term that the search
                      differentiates instead of 'clip' at iteration 0 with `first_step='projected'`
    Also returns 'z', 'c', 'B' and 'f_trg'. Differentiable in e.
    """
    z = _l2norm(e)
    c = combine(z, ref.lnd0)
    x_next = batched_step(net, ref.states, c, ref.schedule)
    f_trg = clip_loss.encode_image(x_next)
    l_dir = directional_loss(ref.f_src, f_trg, ref.direction)
    projected = -((f_trg - ref.f_src) @ ref.direction.reshape(-1).to(f_trg)).mean()
    mask = ref.mask0
    loss_l1 = (mask * ref.states[1:] - mask * x_next).abs().mean()
    loss_id = 1 - (z * ref.z0).sum()
    return {'z': z, 'c': c, 'B': x_next, 'f_trg': f_trg, 'L_dir': l_dir, 'clip': clip_objective(l_dir),
            'projected': projected, 'id': loss_id, 'l1': loss_l1}


def identity_optimizer(e: Tensor, lr: float) -> torch.optim.Adam:
    """The released optimiser of the identity parameter: Adam(betas (0.9, 0.999), eps 1e-8, no weight decay)."""
    return torch.optim.Adam([e], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)


def optimise_identity(
    net: Callable[[Tensor, Tensor, Tensor], Tensor],
    combine: Callable[[Tensor, Tensor], Tensor],
    clip_loss: CLIPDirectionalLoss,
    ref: SearchReference,
    *,
    n_iter: int,
    lr: float,
    weights: tuple[float, float, float],
    first_step: FirstStep = 'projected',
    early_stop_patience: int | None = None,
    early_stop_tol: float = 1e-4,
    progress: str | None = None,
    snapshot_every: int = 100,
    snapshot_fn: Callable[[int, Tensor], None] | None = None,
    callback: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> tuple[Tensor, list[dict[str, float]], bool]:
    """The optimisation loop of `find_clip_direction` on a fixed `ref`: e starts at ref.z0 and takes n_iter Adam
    steps on clip_w * clip + id_w * id + l1_w * l1 (weights = (clip_w, id_w, l1_w)); at iteration 0 with
    `first_step='projected'` the gradient is that of clip_w * projected + id_w * id (same recorded loss value; see
    `find_clip_direction`).

    progress: a tqdm description, or None for no bar. callback(it, terms) sees every iteration's `search_terms`
    (with 'grad', d loss / d e, added) before the Adam step. Returns (e [1,id_dim] detached, per-iteration losses
    {'total', 'clip', 'id', 'l1'}, whether early stopping ended the loop).
    """
    clip_w, id_w, l1_w = weights
    e = ref.z0.clone().requires_grad_(True)
    opt = identity_optimizer(e, lr)
    losses: list[dict[str, float]] = []
    best, since_best, stopped_early = math.inf, 0, False
    iterations = range(n_iter)
    if progress is not None:
        from tqdm.auto import tqdm  # lazy: the maths does not depend on tqdm

        iterations = tqdm(iterations, desc=progress)
    for it in iterations:
        terms = search_terms(net, combine, clip_loss, ref, e)
        loss = clip_w * terms['clip'] + id_w * terms['id'] + l1_w * terms['l1']
        record = {'total': loss.item(), 'clip': terms['clip'].item(), 'id': terms['id'].item(),
                  'l1': terms['l1'].item()}
        if not math.isfinite(record['total']):
            raise FloatingPointError(f'CLIP direction search diverged at iteration {it}: {record} '
                                     f'(try --precision fp32 or a smaller --lr)')
        if it == 0 and first_step == 'projected':  # the same loss value, a well-defined gradient (see the docstring)
            loss = clip_w * terms['projected'] + id_w * terms['id']
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[e])  # gradients for e only: the network's weights get none
        if callback is not None:
            callback(it, {**terms, 'grad': e.grad.detach().clone()})
        opt.step()
        losses.append(record)
        if progress is not None:
            iterations.set_postfix({k: f'{v:.4f}' for k, v in record.items()}, refresh=False)
        if snapshot_fn is not None and snapshot_every > 0 and it % snapshot_every == 0:
            snapshot_fn(it, terms['B'].detach())
        if early_stop_patience is not None:
            if not math.isfinite(best) or record['total'] < best - early_stop_tol * abs(best):
                best, since_best = record['total'], 0
            else:
                since_best += 1
                if since_best >= early_stop_patience:
                    stopped_early = True
                    break
    if progress is not None:
        iterations.close()
    return e.detach(), losses, stopped_early


def find_clip_direction(
    model: DiffusionVideoAutoencoder,
    frame: Tensor,
    clip_loss: CLIPDirectionalLoss,
    src_txt: str,
    trg_txt: str,
    *,
    n_train_step: int = 5,
    n_iter: int = 2000,
    lr: float = 0.002,
    clip_w: float = 3.0,
    id_w: float = 5.0,
    l1_w: float = 5.0,
    early_stop_patience: int | None = None,
    early_stop_tol: float = 1e-4,
    precision: str = 'fp32',
    progress: bool = True,
    snapshot_every: int = 100,
    snapshot_fn: Callable[[int, Tensor], None] | None = None,
    first_step: FirstStep = 'projected',
) -> ClipDirection:
    """Optimise the identity of one frame so that the autoencoder's DDIM steps follow the text edit (released
    editing_CLIP.py objective; its first step is made well defined unless `first_step='released'`).

    Setup, on frame I0 ([1,3,S,S] in [-1,1]) with the schedule respaced to n = `n_train_step` steps
    (n=5: tau = 0,200,...,800):
        z0 = identity(I0) (unit norm), lnd0 = landmarks(I0), c0 = combine(z0, lnd0), M0 = mask(I0, 'train');
        R = `reference_trajectory` of I0 with c0 (n+1 states); f_src = CLIP(R[1:]); d = text direction.
    Each iteration, with the parameter e (initialised to z0; `identity_optimizer`, i.e. Adam without weight decay):
        loss = clip_w * clip + id_w * id + l1_w * l1, the terms of `search_terms` (B = one batched DDIM step from
        R[0:n], x0 clipped, as the released sampler does); Adam step on e. The recorded losses are these values.
    Gradients reach e through the network and the fusion Linear; network weights are not updated.

    The first step. At iteration 0, e = z0, so B repeats the computation that built R[1:] and f(B) - f_src is float
    noise (norm ~4e-7, the size of the 1e-7 in the directional loss). The released directional term is then
    normalised noise: its gradient is huge (~6000 on the fixture models) and points in a noise-chosen direction,
    Adam's first update moves every coordinate by +-lr along it, and Adam's second moment, holding that gradient,
    damps the real gradients for ~1000 iterations. `first_step='projected'` (default) differentiates at iteration 0
    the first-order form of the term instead, -mean_b <f(B_b) - f_src_b, d>, whose gradient -J^T d (J = d f(B) / d e)
    is the well-defined steepest direction that moves the CLIP embeddings along the text direction; it does not
    depend on the float noise at e = z0 (the gradient of a linear form is the same at every point). The l1 term is
    left out of that first gradient: at e = z0 it sits at its minimum 0, where its (sub)gradient is zero, and
    torch's sign(B - R) there is again float noise (norm 0.0025 on the fixture models, the size of the projected
    CLIP gradient); the id term's gradient is zero there too. From iteration 1 on, f(B) - f_src is no longer noise
    and the released terms are used. `first_step='released'` keeps the released
    behaviour (parity). See docs/clip_search.md for measurements.

    Args:
        model: DiffusionVideoAutoencoder (`model(x_t, t, z_face) -> eps`, `model.encoder`); run in eval mode
            (dropout off) and restored to its mode afterwards.
        frame: [1,3,S,S] in [-1,1], the aligned crop whose identity is optimised.
        clip_loss: the directional loss; its text direction for (src_txt, trg_txt) is computed once and cached.
        n_iter: iterations (released: 2000, hard-coded); early_stop_patience: if set, stop once the total loss has
            not improved by more than `early_stop_tol` (relative to the best so far) for that many iterations.
        precision: autocast of the network call only ('fp32' | 'fp16' | 'bf16'; CUDA only), the DDIM maths, the
            losses and CLIP inputs staying float32; or 'fp64' (a float64 model, e.g. `model.double()`): the
            frame, the loops and the losses in float64.
        progress: tqdm bar with the loss terms.
        snapshot_fn: called as snapshot_fn(it, B) (B detached, [n,3,S,S]) at iterations 0, snapshot_every, ...
        first_step: 'projected' (default) or 'released', see above.

    Memory: every iteration backpropagates through the UNet on a batch of n full-resolution states, so the UNet
    activations of all n states are kept for the backward pass. That is the dominant cost and grows linearly with
    `n_train_step`: for the released 256-px network in fp32, autograd keeps about 3.7 GiB per state, i.e. about
    19 GiB for n=5 (counted from the tensors autograd saves, on the meta device), on top of the weights; fp16
    autocast roughly halves it. CLIP's share (n images at 224 px) is small. The CLIP embeddings of the fixed
    reference states R[1:] are computed once, not every iteration (the released loop recomputes the same numbers).

    Returns a ClipDirection with delta = e - z0.
    """
    if frame.dim() != 4 or frame.shape[0] != 1:
        raise ValueError(f'frame must be [1,3,S,S], got {tuple(frame.shape)}')
    if n_iter < 1:
        raise ValueError(f'n_iter must be >= 1, got {n_iter}')
    if precision not in PRECISIONS:
        raise ValueError(f'precision {precision!r} is not one of {PRECISIONS}')
    if early_stop_patience is not None and early_stop_patience < 1:
        raise ValueError(f'early_stop_patience must be >= 1 or None, got {early_stop_patience}')
    if first_step not in ('projected', 'released'):
        raise ValueError(f"first_step must be 'projected' or 'released', got {first_step!r}")
    device = frame.device
    dtype = torch.float64 if precision == 'fp64' else torch.float32
    frame = frame.to(dtype)
    dcfg = model.cfg.diffusion
    schedule = NoiseSchedule.linear(dcfg.num_timesteps, dcfg.beta_start, dcfg.beta_end).respace(n_train_step)
    encoder = model.encoder

    def net(x_t: Tensor, t: Tensor, z_face: Tensor) -> Tensor:
        with autocast(device, precision):
            eps = model(x_t, t, z_face)
        return eps.to(dtype)

    def combine(z: Tensor, lnd: Tensor) -> Tensor:
        return encoder.combine(z, lnd).to(dtype)

    was_training = model.training
    model.eval()
    try:
        # 1. What stays fixed: I0's identity, landmarks, mask, reference trajectory and CLIP embeddings, the text.
        with torch.no_grad():
            z0 = encoder.identity(frame).to(dtype)
            lnd0 = encoder.landmarks(frame).to(dtype)
            c0 = combine(z0, lnd0)
            states = reference_trajectory(lambda x_t, t: net(x_t, t, c0.expand(x_t.shape[0], -1)), frame, schedule)
            ref = SearchReference(z0=z0, lnd0=lnd0, mask0=encoder.mask(frame, 'train').to(dtype), states=states,
                                  f_src=clip_loss.encode_image(states[1:]),
                                  direction=clip_loss.text_direction(src_txt, trg_txt).to(device), schedule=schedule)

        # 2. Optimise the raw identity parameter.
        e, losses, stopped_early = optimise_identity(
            net, combine, clip_loss, ref, n_iter=n_iter, lr=lr, weights=(clip_w, id_w, l1_w), first_step=first_step,
            early_stop_patience=early_stop_patience, early_stop_tol=early_stop_tol,
            progress=f'clip direction {trg_txt!r}' if progress else None, snapshot_every=snapshot_every,
            snapshot_fn=snapshot_fn)
    finally:
        model.train(was_training)
    return ClipDirection(delta=(e - z0), z0=z0, losses=losses, n_iter_run=len(losses), stopped_early=stopped_early)


def apply_clip_direction(avg_id: Tensor, delta: Tensor, scale: float) -> Tensor:
    """Edited identity L2norm(avg_id + scale * delta): avg_id [1,id_dim] (the frame-averaged identity, not
    necessarily unit norm), delta [1,id_dim] from `find_clip_direction`. Returns [1,id_dim], unit norm."""
    return _l2norm(avg_id + scale * delta.to(avg_id))


# --------------------------------------------------------------------------------------------------------------------
# Saving and loading a found direction


def _plain(value: Any, where: str) -> Any:
    """Check that `value` is plain data that torch.load(weights_only=True) can read back; tensors go to CPU."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f'{where}[{i}]') for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f'{where}: keys must be strings, got {k!r}')
            out[k] = _plain(v, f'{where}.{k}')
        return out
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f'{where} is a {type(value).__name__}; only plain data (str, numbers, lists, dicts, tensors) '
                    f'can be saved with a direction')


def save_direction(path: str | Path, direction: ClipDirection, meta: dict[str, Any]) -> Path:
    """Write a direction and its metadata (texts, weights, ...) atomically with torch.save; plain data only, so
    `load_direction` reads it with weights_only=True."""
    payload = {
        'format': DIRECTION_FORMAT,
        'delta': direction.delta.detach().float().cpu(),
        'z0': direction.z0.detach().float().cpu(),
        'losses': _plain(direction.losses, 'losses'),
        'n_iter_run': int(direction.n_iter_run),
        'stopped_early': bool(direction.stopped_early),
        'meta': _plain(meta, 'meta'),
    }
    return torch_save(payload, path)


def load_direction(path: str | Path) -> tuple[ClipDirection, dict[str, Any]]:
    """Read a file written by `save_direction` -> (ClipDirection on CPU, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'CLIP direction file not found: {path}')
    payload = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(payload, dict) or payload.get('format') != DIRECTION_FORMAT:
        raise ValueError(f'{path} is not a CLIP direction file ({DIRECTION_FORMAT})')
    direction = ClipDirection(delta=payload['delta'], z0=payload['z0'], losses=payload['losses'],
                              n_iter_run=payload['n_iter_run'], stopped_early=payload['stopped_early'])
    return direction, payload['meta']
