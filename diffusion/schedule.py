"""Linear beta schedule, cumulative alphas in float64, and the released "ddimN" timestep respacing."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


@lru_cache(maxsize=None)
def valid_step_counts(num_timesteps: int = 1000) -> tuple[int, ...]:
    """Every N that `space_timesteps` accepts: the lengths of range(0, T, k) for strides k = 1..T-1."""
    return tuple(sorted({len(range(0, num_timesteps, k)) for k in range(1, max(num_timesteps, 2))}))


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """Timesteps kept by the released respacing rule for `--T N` (equivalently the string "ddimN").

    Take the smallest integer stride k in 1..T-1 with len(range(0, T, k)) == N and keep range(0, T, k).
    Example with T=1000: N=20 -> stride 50 -> [0, 50, ..., 950]; N=100 -> [0, 10, ..., 990]; N=1000 -> 0..999.
    An N that no stride produces raises ValueError naming the nearest valid values.
    """
    if isinstance(steps, str):
        if not steps.startswith('ddim') or not steps[4:].isdigit():
            raise ValueError(f'timestep spacing {steps!r} must look like "ddimN"')
        steps = int(steps[4:])
    for stride in range(1, max(num_timesteps, 2)):
        if len(range(0, num_timesteps, stride)) == steps:
            return list(range(0, num_timesteps, stride))
    valid = valid_step_counts(num_timesteps)
    pos = bisect.bisect_left(valid, steps)
    near = sorted({valid[j] for j in (pos - 1, pos) if 0 <= j < len(valid)})
    raise ValueError(
        f'--T {steps} is not a valid number of DDIM steps for a {num_timesteps}-step diffusion (no integer stride '
        f'gives exactly {steps} steps); nearest valid values: {" or ".join(map(str, near))}'
    )


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """alpha_bar at a set of kept timesteps. Index i in 0..N-1 is a sampler step; `timesteps[i]` is what the network
    sees. The full schedule keeps every timestep (timesteps = 0..T-1); `respace(N)` keeps the released ddimN subset.

    alpha_bar: [N] float64, decreasing; timesteps: [N] int64, increasing.
    """

    alpha_bar: Tensor
    timesteps: Tensor

    def __post_init__(self) -> None:
        if self.alpha_bar.dtype != torch.float64:
            raise TypeError('alpha_bar must be float64')
        if not ((self.alpha_bar > 0).all() and (self.alpha_bar <= 1).all()):
            raise ValueError('alpha_bar must lie in (0, 1]')

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """The DDPM linear schedule (Ho et al. 2020): beta_t linear in t, alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)  # numpy: bit-equal to released
        return cls(torch.from_numpy(np.cumprod(1.0 - betas)), torch.arange(num_timesteps))

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def betas(self) -> Tensor:
        """beta'_i = 1 - alpha_bar_i / alpha_bar_{i-1} (for a respaced schedule, the respaced betas)."""
        prev = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar[:-1]])
        return 1.0 - self.alpha_bar / prev

    def respace(self, steps: int | str) -> NoiseSchedule:
        """The schedule restricted to `space_timesteps(len(self), steps)`: alpha_bar'_i = alpha_bar[tau_i].

        Computed as the released code does, through the respaced betas (beta'_i = 1 - ab[tau_i] / ab[tau_{i-1}],
        ab' = cumprod(1 - beta')), which rounds differently from indexing in the last bit; DDIM with clipping
        amplifies such differences, so parity needs the same arithmetic.
        """
        keep = torch.tensor(space_timesteps(len(self), steps))
        kept = self.alpha_bar[keep].numpy()
        betas = 1.0 - kept / np.concatenate([[1.0], kept[:-1]])
        return NoiseSchedule(torch.from_numpy(np.cumprod(1.0 - betas)), self.timesteps[keep])

    def at(self, index: Tensor | int, like: Tensor) -> Tensor:
        """alpha_bar at sampler indices, float64 on like's device, broadcast to `like` ([B] -> [B,1,...,1]).

        An index of -1 means "before the first step" and gives alpha_bar = 1 (the clean image), which is what the
        last DDIM step targets. `index` may be an int (same for the whole batch) or a [B] tensor (per sample).
        """
        table = torch.cat([self.alpha_bar.new_ones(1), self.alpha_bar])  # table[i + 1] = alpha_bar_i
        index = torch.as_tensor(index, device=self.alpha_bar.device).reshape(-1)
        a = table[index + 1].to(like.device)
        if a.numel() == 1:
            a = a.expand(like.shape[0])
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def t_at(self, index: Tensor | int, batch: int, device: torch.device) -> Tensor:
        """The network's integer timesteps [batch] for sampler indices."""
        t = self.timesteps[torch.as_tensor(index).reshape(-1).cpu()].to(device)
        return t.expand(batch) if t.numel() == 1 else t

    def q_sample(self, x0: Tensor, index: Tensor, noise: Tensor) -> Tensor:
        """Forward process q(x_t | x0): sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. eq. 4)."""
        a = self.at(index, x0)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * noise
