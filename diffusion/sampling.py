"""Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0) sampling and inversion, as the released code does them.

Conventions of the released implementation, kept exactly:
- x0 is predicted from eps and clipped to [-1, 1]; the noise is then re-derived from the CLIPPED x0;
- sampling runs N steps from index N-1 down to 0, the last one returning x0;
- inversion runs N-1 steps from the clean image (indices 0..N-2) and ends AT index N-1, where sampling starts.
Coefficients are computed from the float64 schedule and cast to x's dtype; the loops run in x's dtype (float32 as
released, or float64 for exact checks: a float64 x keeps every op in float64), whatever precision the network uses
inside `eps_fn` (its output is cast to x's dtype).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffusion.schedule import NoiseSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict], None]


def _coef(c: Tensor, x: Tensor) -> Tensor:
    """A schedule coefficient computed in float64 (a_t from `NoiseSchedule.at`), cast to x's dtype only now."""
    return c.to(x.dtype)


def predict_x0(x_t: Tensor, eps: Tensor, a_t: Tensor, clip: bool = True) -> Tensor:
    """x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), optionally clipped to [-1, 1]. a_t broadcasts against x_t.

    The coefficients sqrt(1/a_t) and sqrt(1/a_t - 1) are computed in a_t's dtype (float64 from the schedule) and
    cast to x_t's dtype, exactly as the released code does; computing them from a float32 a_t gives different
    rounding, which the clipping and the randomly initialised fixture network amplify past 1e-3.
    """
    x0 = _coef((1.0 / a_t).sqrt(), x_t) * x_t - _coef((1.0 / a_t - 1).sqrt(), x_t) * eps
    return x0.clamp(-1, 1) if clip else x0


def ddim_step(x_t: Tensor, eps: Tensor, a_t: Tensor, a_next: Tensor, clip: bool = True) -> tuple[Tensor, Tensor]:
    """One eta=0 DDIM move from noise level a_t to a_next (a_next > a_t samples, a_next < a_t inverts).

    1. x0_hat = clip(predict_x0(x_t, eps, a_t))
    2. eps~ = (x_t / sqrt(a_t) - x0_hat) / sqrt(1/a_t - 1)        (noise consistent with the clipped x0_hat)
    3. x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next) eps~
    a_t, a_next: alpha_bar (float64, from `NoiseSchedule.at(i, x)`) broadcastable to x_t, per sample allowed.
    Returns (x_next, x0_hat) in x_t's dtype.
    """
    x0 = predict_x0(x_t, eps, a_t, clip)
    eps = (_coef((1.0 / a_t).sqrt(), x_t) * x_t - x0) / _coef((1.0 / a_t - 1).sqrt(), x_t)
    a_next = a_next.to(x_t.dtype)  # the released code looks alpha_bar_next up as float32 and takes its roots there
    return x0 * a_next.sqrt() + (1 - a_next).sqrt() * eps, x0


def _progress(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    from tqdm.auto import tqdm  # lazy: the maths does not depend on tqdm

    return tqdm(iterable, desc=desc, leave=False)


def _eps(eps_fn: EpsFn, x: Tensor, schedule: NoiseSchedule, i: int) -> Tensor:
    eps = eps_fn(x, schedule.t_at(i, x.shape[0], x.device))
    return eps.to(x.dtype)


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    clip: bool = True,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Render x0 from x_T at schedule index N-1 with N network calls. x_T: [B,C,H,W]; returns x0 in [-1,1].

    callback receives {'i', 't', 'x' (the new state), 'x0'} after every step.
    """
    x = x_T
    for i in _progress(range(len(schedule) - 1, -1, -1), progress, 'render'):
        eps = _eps(eps_fn, x, schedule, i)
        x, x0 = ddim_step(x, eps, schedule.at(i, x), schedule.at(i - 1, x), clip)
        if callback is not None:
            callback({'i': i, 't': int(schedule.timesteps[i]), 'x': x, 'x0': x0})
    return x


@torch.no_grad()
def ddim_invert(
    eps_fn: EpsFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    clip: bool = True,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Deterministic DDIM inversion of a clean image x0 [B,C,H,W] in [-1,1] to x_T at index N-1 (N-1 calls)."""
    x = x0
    for i in _progress(range(len(schedule) - 1), progress, 'invert'):
        eps = _eps(eps_fn, x, schedule, i)
        x, x0_hat = ddim_step(x, eps, schedule.at(i, x), schedule.at(i + 1, x), clip)
        if callback is not None:
            callback({'i': i, 't': int(schedule.timesteps[i]), 'x': x, 'x0': x0_hat})
    return x
