from __future__ import annotations

import pytest
import torch

import templates
from diffusion import NoiseSchedule, ddim_sample
from diffusion.dpm_solver import dpm_solver_sample, solver_indices
from model.unet import UNet

FULL = NoiseSchedule.linear()


def sub_schedule(schedule: NoiseSchedule, indices: list[int]) -> NoiseSchedule:
    """The schedule restricted to the solver's indices, so that ddim_sample walks the same grid."""
    keep = sorted(indices)
    return NoiseSchedule(schedule.alpha_bar[keep], schedule.timesteps[keep])


def gaussian_eps(mu: float, s: float):
    """Exact eps for data x0 ~ N(mu, s^2 I): eps(x_t, t) = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def eps_fn(x_t, t):
        a = FULL.at(t, x_t)
        return ((1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s * s + 1 - a)).to(x_t.dtype)

    return eps_fn


def gaussian_ode_solution(x_T, a_T: float, mu: float, s: float):
    """The probability-flow ODE keeps the standardised coordinate (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) fixed."""
    return mu + s / (a_T * s * s + 1 - a_T) ** 0.5 * (x_T - a_T**0.5 * mu)


def gaussian_x_T(schedule: NoiseSchedule, mu: float, s: float, seed: int = 0):
    a_T = float(schedule.alpha_bar[-1])
    g = torch.Generator().manual_seed(seed)
    x_T = a_T**0.5 * mu + (a_T * s * s + 1 - a_T) ** 0.5 * torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    return x_T, a_T


def rms(a, b) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope='module')
def tiny_eps():
    """The tiny UNet with random weights, its zero-initialised output convolutions perturbed so eps is not 0."""
    torch.manual_seed(0)
    cfg = templates.tiny().unet
    model = UNet(cfg, z_dim=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    z = torch.randn(1, 8)

    def eps_fn(x_t, t):
        return model(x_t, t, z)

    x_T = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert eps_fn(x_T, torch.tensor([500])).abs().mean() > 0.01
    return eps_fn, x_T


def test_solver_indices():
    s = FULL.respace(100)
    assert solver_indices(s) == list(range(99, -1, -1))
    assert solver_indices(s, 500) == list(range(99, -1, -1))
    assert solver_indices(FULL, 4) == [999, 666, 333, 0]
    assert solver_indices(s, 1) == [99]
    for steps in (2, 3, 7, 10, 33, 99):
        idx = solver_indices(s, steps)
        assert len(idx) == steps and idx[0] == 99 and idx[-1] == 0 and idx == sorted(set(idx), reverse=True)
    idx = solver_indices(s, 10, 'logsnr')
    assert idx[0] == 99 and idx[-1] == 0 and idx == sorted(set(idx), reverse=True) and 2 <= len(idx) <= 10
    # log-SNR spacing puts more points near both ends of the linear schedule than the uniform grid does
    assert idx[-2] < solver_indices(s, 10)[-2]
    with pytest.raises(ValueError):
        solver_indices(s, 0)
    with pytest.raises(ValueError):
        solver_indices(s, 5, 'karras')


def test_first_order_equals_ddim_on_tiny_unet(tiny_eps):
    """DPM-Solver++(1) is DDIM: the same render up to float32 rounding, on every kept timestep and on a subset."""
    eps_fn, x_T = tiny_eps
    s = FULL.respace(5)
    ddim = ddim_sample(eps_fn, x_T, s)
    assert ddim.abs().max() > 0.5  # not a trivial all-zero render
    assert (dpm_solver_sample(eps_fn, x_T, s, order=1) - ddim).abs().max() < 1e-5
    idx = solver_indices(s, 3)
    ddim_sub = ddim_sample(eps_fn, x_T, sub_schedule(s, idx))
    assert (dpm_solver_sample(eps_fn, x_T, s, steps=3, order=1) - ddim_sub).abs().max() < 1e-5
    # unclipped, a random network drives x far outside [-1, 1] (|x| ~ 200): equal to 1e-5 relative
    ddim = ddim_sample(eps_fn, x_T, s, clip=False)
    dpm1 = dpm_solver_sample(eps_fn, x_T, s, order=1, clip=False)
    assert ((dpm1 - ddim).abs() / ddim.abs().clamp_min(1)).max() < 1e-5


def test_first_order_equals_ddim_on_gaussian_data_float32():
    mu, s = 0.3, 0.5
    sch = FULL.respace(50)
    eps_fn = gaussian_eps(mu, s)
    x_T = gaussian_x_T(sch, mu, s)[0].float()
    for steps in (None, 12):
        ddim = ddim_sample(eps_fn, x_T, sub_schedule(sch, solver_indices(sch, steps)), clip=False)
        assert (dpm_solver_sample(eps_fn, x_T, sch, steps, order=1, clip=False) - ddim).abs().max() < 1e-5


def test_calls_network_once_per_step_with_kept_timesteps(tiny_eps):
    eps_fn, x_T = tiny_eps
    s = FULL.respace(20)
    seen, states = [], []

    def counting(x, t):
        seen.append(t.tolist())
        return eps_fn(x, t)

    out = dpm_solver_sample(counting, x_T, s, steps=6, callback=lambda d: states.append(d))
    expected = [int(s.timesteps[i]) for i in solver_indices(s, 6)]
    assert [t[0] for t in seen] == expected and all(len(t) == 1 for t in seen)
    assert [d['t'] for d in states] == expected
    assert torch.equal(states[-1]['x'], out) and out.abs().max() <= 1


def test_point_mass_is_exact():
    """eps exact for a point mass: every x0 estimate is x_star, so both orders return it at any step count."""
    g = torch.Generator().manual_seed(1)
    x_star = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8

    def eps_fn(x_t, t):
        a = FULL.at(t, x_t)
        return ((x_t - a.sqrt() * x_star) / (1 - a).sqrt()).to(x_t.dtype)

    s = FULL.respace(20)
    x_T = s.q_sample(x_star, torch.full((2,), len(s) - 1), torch.randn(x_star.shape, generator=g))
    for steps in (None, 3, 7):
        for order in (1, 2):
            out = dpm_solver_sample(eps_fn, x_T, s, steps=steps, order=order)
            assert (out - x_star).abs().max() < 1e-5, (steps, order)


@pytest.mark.parametrize('spacing,steps,factor', [('time', 20, 2.5), ('time', 25, 4.0), ('logsnr', 10, 10.0)])
def test_second_order_beats_ddim_on_gaussian_data(spacing, steps, factor):
    """Gaussian data N(mu, s^2): exact eps and exact ODE solution in closed form. At equal network calls on the same
    grid, DPM-Solver++(2M) lands `factor` times closer to the ODE solution than DDIM."""
    mu, s = 0.3, 0.5
    eps_fn = gaussian_eps(mu, s)
    x_T, a_T = gaussian_x_T(FULL, mu, s)
    exact = gaussian_ode_solution(x_T, a_T, mu, s)
    # the reference is right: DDIM with all 1000 steps converges to it
    assert rms(ddim_sample(eps_fn, x_T, FULL, clip=False), exact) < 2e-3
    idx = solver_indices(FULL, steps, spacing)
    err_ddim = rms(ddim_sample(eps_fn, x_T, sub_schedule(FULL, idx), clip=False), exact)
    err_dpm = rms(dpm_solver_sample(eps_fn, x_T, FULL, steps, clip=False, spacing=spacing), exact)
    assert err_dpm * factor < err_ddim, (err_dpm, err_ddim)


def test_second_order_convergence_and_lower_order_final():
    """Doubling the steps shrinks the 2M error more than 4x (DDIM: about 2x); without the first-order move into
    t=0 the 2M error at 20 time-uniform steps is several times larger (and worse than DDIM)."""
    mu, s = 0.3, 0.5
    eps_fn = gaussian_eps(mu, s)
    x_T, a_T = gaussian_x_T(FULL, mu, s)
    exact = gaussian_ode_solution(x_T, a_T, mu, s)
    e25, e50 = (rms(dpm_solver_sample(eps_fn, x_T, FULL, n, clip=False), exact) for n in (25, 50))
    d25, d50 = (rms(dpm_solver_sample(eps_fn, x_T, FULL, n, order=1, clip=False), exact) for n in (25, 50))
    assert e25 / e50 > 4 and 1.5 < d25 / d50 < 2.5
    with_rule = rms(dpm_solver_sample(eps_fn, x_T, FULL, 20, clip=False), exact)
    without = rms(dpm_solver_sample(eps_fn, x_T, FULL, 20, clip=False, lower_order_final=False), exact)
    assert without > 3 * with_rule


def test_respaced_schedule_and_dtype():
    """On the pipeline's respaced grid (x_T at t=990 for --T 100), float32 in -> float32 out, closer than DDIM."""
    mu, s = 0.3, 0.5
    sch = FULL.respace(100)
    eps_fn = gaussian_eps(mu, s)
    x_T, a_T = gaussian_x_T(sch, mu, s)
    exact = gaussian_ode_solution(x_T, a_T, mu, s)
    out = dpm_solver_sample(eps_fn, x_T.float(), sch, 25, clip=False)
    assert out.dtype == torch.float32
    idx = solver_indices(sch, 25)
    assert rms(out.double(), exact) * 3 < rms(ddim_sample(eps_fn, x_T, sub_schedule(sch, idx), clip=False), exact)


def test_rejects_unsupported_order(tiny_eps):
    eps_fn, x_T = tiny_eps
    with pytest.raises(ValueError, match='order'):
        dpm_solver_sample(eps_fn, x_T, FULL.respace(10), order=3)
