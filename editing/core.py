"""The arithmetic of DVA editing on aligned crops (tensors in, tensors out; no files, no faces).

Conventions: crops are [N,3,S,S] in [-1,1]; renders come back in [-1,1] (`to_unit` maps to [0,1]); identity features
are [N,512] (per frame L2-normalised); z_face is [N,512]. Everything here works on one batch that fits the device;
`editing.pipeline` streams a video through it batch by batch. Results come back on the CPU in the sampler's dtype
(float32, or float64 with precision 'fp64').

Where things happen: the respaced schedule is built in `respaced_schedule`, the conditioned noise prediction in
`conditioned_eps`, the DDIM inversion and the render of a batch in `Sampler.invert` / `Sampler.render` (the DDIM
maths itself is `diffusion.ddim_invert` / `diffusion.ddim_sample`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn

from cli import autocast
from diffusion import NoiseSchedule, ddim_invert, ddim_sample, dpm_solver_sample


def to_unit(x: Tensor) -> Tensor:
    """[-1,1] -> [0,1]."""
    return (x + 1) / 2


def to_uint8(x: Tensor) -> Tensor:
    """[N,3,S,S] in [-1,1] -> [N,S,S,3] uint8."""
    return (to_unit(x).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def crops_to_float(crops: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[N,S,S,3] uint8 -> [N,3,S,S] in [-1,1]."""
    return crops.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, batch_size)):
        yield slice(start, min(n, start + batch_size))


def dtype_of(precision: str) -> torch.dtype:
    """The dtype of the diffusion loops: float64 for 'fp64', else float32 (fp16/bf16 only autocast the network)."""
    return torch.float64 if precision == 'fp64' else torch.float32


def respaced_schedule(model: nn.Module, T: int) -> NoiseSchedule:
    """The released linear schedule of the model's diffusion config, respaced to T DDIM steps (the one place)."""
    d = model.cfg.diffusion
    return NoiseSchedule.linear(d.num_timesteps, d.beta_start, d.beta_end).respace(T)


def conditioned_eps(model: nn.Module, z_face: Tensor, precision: str = 'fp32', micro_batch: int | None = None
                    ) -> Callable[[Tensor, Tensor], Tensor]:
    """eps_fn(x_t, t) = model(x_t, t, z_face), autocast around the network call only (fp16/bf16 on CUDA); output in
    the loop dtype (`dtype_of(precision)`).

    micro_batch: run the network on slices of at most this many samples (CPU: 1, see `editing.speed`).
    """
    from editing.speed import chunked

    device, dtype = z_face.device, dtype_of(precision)
    net = chunked(model, micro_batch)

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        with autocast(device, precision):
            return net(x_t, t, z_face).to(dtype)

    return eps_fn


@torch.no_grad()
def identity_features(model: nn.Module, crops: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame identity features [N,512] (L2-normalised) and landmark features [N,2K] of crops [N,3,S,S]."""
    return model.encoder.identity(crops), model.encoder.landmarks(crops)


def average_identity(id_feats: Tensor) -> Tensor:
    """The video's identity: the mean of the per-frame features [N,512] -> [1,512], NOT re-normalised (as released)."""
    return id_feats.mean(0, keepdim=True)


@torch.no_grad()
def z_faces(model: nn.Module, id_feat: Tensor, lnd_feats: Tensor) -> Tensor:
    """z_face [N,512] of one identity [1,512] (or per frame [N,512]) with each frame's landmarks [N,2K]."""
    device = next(model.parameters()).device
    return model.encoder.combine(id_feat.to(device), lnd_feats.to(device))


@torch.no_grad()
def face_masks(model: nn.Module, crops: Tensor, kind: str = 'video') -> Tensor:
    """Binary face masks [N,1,S,S] (video background classes: hair, ears, neck stay from the source)."""
    return model.encoder.mask(crops, kind)


def finish_identity(edited_unit: Tensor, avg_id: Tensor, mode: Literal['unit', 'source']) -> Tensor:
    """'unit': the released L2-normalised edit. 'source': rescaled to the norm of the averaged identity, so that
    scale 0 gives back exactly the identity the video was inverted with (the reconstruction)."""
    return edited_unit if mode == 'unit' else edited_unit * avg_id.norm(dim=1, keepdim=True)


def blend(render: Tensor, crops: Tensor, mask: Tensor) -> Tensor:
    """The released hard-mask blend in the crop, in [0,1]: render*M + crop*(1-M). render/crops in [-1,1]."""
    return to_unit(render) * mask + to_unit(crops) * (1 - mask)


@dataclass
class Sampler:
    """DDIM inversion and rendering of ONE batch with a model, a respaced schedule and run settings.

    decoder 'ddim': the released sampler (T network calls per frame; the inversion always is DDIM, T-1 calls).
    'dpm++2m': DPM-Solver++(2M) from the same x_T in `decoder_steps` calls (None: T) on `decoder_spacing` points.
    step(n) is called after every network step with the number of frames it advanced (progress bars).
    """

    model: nn.Module
    T: int
    precision: str = 'fp32'
    micro_batch: int | None = None
    decoder: Literal['ddim', 'dpm++2m'] = 'ddim'
    decoder_steps: int | None = None
    decoder_spacing: Literal['time', 'logsnr'] = 'time'
    schedule: NoiseSchedule = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = respaced_schedule(self.model, self.T)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.precision)

    @property
    def render_steps(self) -> int:
        return self.T if self.decoder == 'ddim' else self.decoder_steps or self.T

    def _eps(self, z_face: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        return conditioned_eps(self.model, z_face.to(self.device, self.dtype), self.precision, self.micro_batch)

    @torch.no_grad()
    def invert(self, crops: Tensor, z_face: Tensor, step: Callable[[int], None] | None = None) -> Tensor:
        """x_T [B,3,S,S] of crops [B,3,S,S] in [-1,1] conditioned on z_face [B,512] (T-1 network calls)."""
        cb = (lambda _: step(len(crops))) if step else None
        return ddim_invert(self._eps(z_face), crops.to(self.device, self.dtype), self.schedule, callback=cb).cpu()

    @torch.no_grad()
    def render(self, x_T: Tensor, z_face: Tensor, step: Callable[[int], None] | None = None) -> Tensor:
        """x0 [B,3,S,S] in [-1,1] rendered from x_T [B,3,S,S] with z_face [B,512]."""
        cb = (lambda _: step(len(x_T))) if step else None
        x = x_T.to(self.device, self.dtype)
        if self.decoder == 'ddim':
            return ddim_sample(self._eps(z_face), x, self.schedule, callback=cb).cpu()
        return dpm_solver_sample(self._eps(z_face), x, self.schedule, self.decoder_steps, spacing=self.decoder_spacing,
                                 callback=cb).cpu()
