"""The diffusion process: noise schedule and respacing, DDIM sampling and inversion, and the DVA training loss.

The network is only ever seen as `eps_fn(x_t, t) -> eps`, with t the original integer timesteps [B].
"""
from diffusion.dpm_solver import dpm_solver_sample, solver_indices
from diffusion.losses import dva_loss, sample_timesteps
from diffusion.sampling import ddim_invert, ddim_sample, ddim_step, predict_x0
from diffusion.schedule import NoiseSchedule, space_timesteps, valid_step_counts

__all__ = [
    'NoiseSchedule', 'space_timesteps', 'valid_step_counts', 'ddim_step', 'ddim_sample', 'ddim_invert', 'predict_x0',
    'dva_loss', 'sample_timesteps', 'dpm_solver_sample', 'solver_indices',
]
