"""The arithmetic of DVA editing on aligned crops (tensors in, tensors out; no files, no faces).

Conventions: crops are [N,3,S,S] in [-1,1]; renders are returned in [-1,1] (map with `to_unit` for [0,1]);
identity features are [N,512] L2-normalised; z_face is [N,512]. Heavy work runs in batches of `batch_size` on
`device`, results come back on the CPU so that long videos never hold all frames on the GPU.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cli import autocast
from diffusion import NoiseSchedule, ddim_invert, ddim_sample, dpm_solver_sample


def to_unit(x: Tensor) -> Tensor:
    """[-1,1] -> [0,1]."""
    return (x + 1) / 2


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, batch_size)):
        yield slice(start, min(n, start + batch_size))


def conditioned_eps(model: nn.Module, z_face: Tensor, precision: str = 'fp32', micro_batch: int | None = None
                    ) -> Callable[[Tensor, Tensor], Tensor]:
    """eps_fn(x_t, t) = model(x_t, t, z_face) with autocast around the network call only; output in float32.

    micro_batch: run the network on slices of at most this many samples (CPU: 1, see `editing.speed`).
    """
    from editing.speed import chunked

    device = z_face.device
    net = chunked(model, micro_batch)

    def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
        with autocast(device, precision):
            return net(x_t, t, z_face).float()

    return eps_fn


def _progress(total: int, desc: str, enabled: bool, unit: str = 'frame'):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _step_progress(frames: int, steps: int, desc: str, enabled: bool):
    """A bar over every network step of every frame, so that a long DDIM loop shows its rate and ETA from its first
    step on (a bar per batch stays at 0 for hours on a CPU)."""
    return _progress(frames * steps, f'{desc} ({frames} frames x {steps} steps)', enabled, 'step')


@torch.no_grad()
def encode_frames(model: nn.Module, crops: Tensor, batch_size: int, device: torch.device, progress: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """Per-frame identity features [N,512] and landmark features [N,2K] of crops [N,3,S,S] in [-1,1]."""
    ids, lnds = [], []
    with _progress(len(crops), 'encode', progress) as bar:
        for sl in batches(len(crops), batch_size):
            x = crops[sl].to(device)
            ids.append(model.encoder.identity(x).float().cpu())
            lnds.append(model.encoder.landmarks(x).float().cpu())
            bar.update(len(x))
    return torch.cat(ids), torch.cat(lnds)


def average_identity(id_feats: Tensor) -> Tensor:
    """The video's identity: the mean of the per-frame features [N,512] -> [1,512], NOT re-normalised (as released)."""
    return id_feats.mean(0, keepdim=True)


@torch.no_grad()
def z_faces(model: nn.Module, id_feat: Tensor, lnd_feats: Tensor, device: torch.device) -> Tensor:
    """z_face [N,512] of one identity [1,512] (or per frame [N,512]) with each frame's landmarks [N,2K]."""
    return model.encoder.combine(id_feat.to(device), lnd_feats.to(device)).float().cpu()


@torch.no_grad()
def face_masks(model: nn.Module, crops: Tensor, batch_size: int, device: torch.device, kind: str = 'video') -> Tensor:
    """Binary face masks [N,1,S,S] (video background classes: hair, ears, neck stay from the source)."""
    return torch.cat([model.encoder.mask(crops[sl].to(device), kind).cpu() for sl in batches(len(crops), batch_size)])


@torch.no_grad()
def invert(model: nn.Module, crops: Tensor, z_face: Tensor, schedule: NoiseSchedule, batch_size: int,
           device: torch.device, precision: str = 'fp32', progress: bool = False, micro_batch: int | None = None,
           on_batch: Callable[[slice, Tensor], None] | None = None) -> Tensor:
    """DDIM inversion of crops [N,3,S,S] conditioned on z_face [N,512] -> x_T [N,3,S,S] (T-1 steps per frame).

    on_batch(sl, x_T[sl]) is called after every batch (e.g. to persist partial results)."""
    out = []
    with _step_progress(len(crops), len(schedule) - 1, 'invert', progress) as bar:
        for sl in batches(len(crops), batch_size):
            eps_fn = conditioned_eps(model, z_face[sl].to(device), precision, micro_batch)
            step = (lambda _, n=sl.stop - sl.start: bar.update(n)) if progress else None
            out.append(ddim_invert(eps_fn, crops[sl].to(device).float(), schedule, callback=step).cpu())
            if on_batch is not None:
                on_batch(sl, out[-1])
    return torch.cat(out) if out else crops.new_empty((0, *crops.shape[1:])).float()


@torch.no_grad()
def render(model: nn.Module, x_T: Tensor, z_face: Tensor, schedule: NoiseSchedule, batch_size: int,
           device: torch.device, precision: str = 'fp32', progress: bool = False, desc: str = 'render',
           micro_batch: int | None = None, decoder: str = 'ddim', decoder_steps: int | None = None,
           decoder_spacing: str = 'time', on_batch: Callable[[slice, Tensor], None] | None = None) -> Tensor:
    """Render x0 [N,3,S,S] in [-1,1] from x_T [N,3,S,S] with z_face [N,512].

    decoder 'ddim': the released DDIM sampler, N network calls per frame. 'dpm++2m': DPM-Solver++(2M) from the same
    x_T in `decoder_steps` calls (None = N) on `decoder_spacing` ('time' or 'logsnr') points of the schedule.
    on_batch(sl, x0[sl]) is called after every batch (e.g. to persist partial results).
    """
    out = []
    steps = len(schedule) if decoder == 'ddim' else decoder_steps or len(schedule)
    with _step_progress(len(x_T), steps, desc, progress) as bar:
        for sl in batches(len(x_T), batch_size):
            eps_fn = conditioned_eps(model, z_face[sl].to(device), precision, micro_batch)
            x = x_T[sl].to(device).float()
            step = (lambda _, n=sl.stop - sl.start: bar.update(n)) if progress else None
            if decoder == 'ddim':
                out.append(ddim_sample(eps_fn, x, schedule, callback=step).cpu())
            else:
                out.append(dpm_solver_sample(eps_fn, x, schedule, decoder_steps, spacing=decoder_spacing,
                                             callback=step).cpu())
            if on_batch is not None:
                on_batch(sl, out[-1])
    return torch.cat(out) if out else x_T.new_empty((0, *x_T.shape[1:])).float()


def blend(render: Tensor, crops: Tensor, mask: Tensor) -> Tensor:
    """The released hard-mask blend in the crop, in [0,1]: render*M + crop*(1-M). render/crops in [-1,1]."""
    return to_unit(render) * mask + to_unit(crops) * (1 - mask)
