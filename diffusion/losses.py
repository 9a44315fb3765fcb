"""The DVA training objective (Kim et al. 2023, Sec. 3.3): noise L1 on two noise draws + masked x0 consistency."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffusion.sampling import predict_x0
from diffusion.schedule import NoiseSchedule


def sample_timesteps(batch: int, num_timesteps: int, device: torch.device, generator: torch.Generator | None = None
                     ) -> Tensor:
    """t ~ Uniform{0, ..., T-1} per sample, int64 [batch]."""
    return torch.randint(0, num_timesteps, (batch,), device=device, generator=generator)


def dva_loss(
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    t: Tensor,
    noise_a: Tensor,
    noise_b: Tensor,
    mask: Tensor,
    schedule: NoiseSchedule,
    eps_weight: float = 1.0,
    consistency_weight: float = 1.0,
) -> dict[str, Tensor]:
    """L = eps_weight * mean_b[|eps_a - eps_hat_a| + |eps_b - eps_hat_b|] + consistency_weight * mean|m (x0_a - x0_b)|.

    x0: [B,3,H,W] in [-1,1]; t: [B] indices into the full schedule; noise_a/noise_b: two independent N(0, I) draws;
    mask: [B,1,H,W] face mask (training background classes). eps_fn(x_t, t) is the conditioned network: its
    conditioning z_face(x0) is computed once by the caller, since both branches use the same x0 (the released code
    runs the frozen encoders twice to get identical values). Both branches run as one batch of 2B (GroupNorm is
    per sample, so this equals two calls). The x0 estimates are not clipped; means run over all C*H*W values.
    Returns {'loss_eps', 'loss_consistency', 'loss'} (scalars; 'loss' is the weighted total).
    """
    x_t = torch.cat([schedule.q_sample(x0, t, noise_a), schedule.q_sample(x0, t, noise_b)])
    t2 = torch.cat([t, t])
    dtype = torch.promote_types(x0.dtype, torch.float32)  # float32 under AMP, float64 for a float64 check
    eps_hat = eps_fn(x_t, schedule.timesteps.to(t.device)[t2]).to(dtype)
    noise = torch.cat([noise_a, noise_b]).to(dtype)
    per_sample = (noise - eps_hat).abs().flatten(1).mean(1)  # [2B]
    loss_eps = per_sample.view(2, -1).sum(0).mean()
    x0_hat = predict_x0(x_t.to(dtype), eps_hat, schedule.at(t2, x_t), clip=False)
    x0_a, x0_b = x0_hat.chunk(2)
    loss_consistency = (mask * (x0_a - x0_b)).abs().flatten(1).mean(1).mean()
    loss = eps_weight * loss_eps + consistency_weight * loss_consistency
    return {'loss_eps': loss_eps, 'loss_consistency': loss_consistency, 'loss': loss}
