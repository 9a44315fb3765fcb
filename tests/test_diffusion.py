from __future__ import annotations

import pytest
import torch

from diffusion import NoiseSchedule, ddim_invert, ddim_sample, ddim_step, dva_loss, space_timesteps, valid_step_counts


def point_mass_eps(x_star: torch.Tensor, schedule: NoiseSchedule):
    """The exact noise predictor when the data distribution is a point mass at x_star."""
    full = NoiseSchedule.linear()

    def eps_fn(x_t, t):
        a = full.at(t, x_t)
        return (x_t - a.sqrt() * x_star) / (1 - a).sqrt()

    return eps_fn


def test_linear_schedule_invariants():
    s = NoiseSchedule.linear(1000)
    assert s.alpha_bar.dtype == torch.float64 and len(s) == 1000
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


@pytest.mark.parametrize('n,stride', [(5, 200), (10, 100), (20, 50), (100, 10), (1000, 1), (3, 334)])
def test_respacing_table(n, stride):
    assert space_timesteps(1000, n) == list(range(0, 1000, stride))
    assert space_timesteps(1000, f'ddim{n}') == list(range(0, 1000, stride))
    r = NoiseSchedule.linear().respace(n)
    full = NoiseSchedule.linear()
    assert torch.allclose(r.alpha_bar, full.alpha_bar[::stride][:n], rtol=1e-12, atol=0)
    # respaced betas reproduce the kept alpha_bar
    assert torch.allclose(torch.cumprod(1 - r.betas, 0), r.alpha_bar)


@pytest.mark.parametrize('n', [1, 37, 300, 400, 600])
def test_invalid_step_counts_name_neighbours(n):
    with pytest.raises(ValueError, match='nearest valid values') as e:
        space_timesteps(1000, n)
    assert f'--T {n}' in str(e.value)
    assert len(valid_step_counts(1000)) == 62


def test_at_broadcasts_and_handles_before_first():
    s = NoiseSchedule.linear().respace(10)
    x = torch.zeros(3, 2, 4, 4)
    a = s.at(torch.tensor([0, 5, 9]), x)
    assert a.shape == (3, 1, 1, 1) and a.dtype == torch.float64
    assert s.at(-1, x).flatten().tolist() == [1.0, 1.0, 1.0]
    assert s.t_at(9, 2, x.device).tolist() == [900, 900]


def test_ddim_round_trip_exact_for_point_mass():
    g = torch.Generator().manual_seed(0)
    x_star = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    s = NoiseSchedule.linear().respace(20)
    eps_fn = point_mass_eps(x_star, s)
    x_T = ddim_invert(eps_fn, x_star, s)
    assert not torch.allclose(x_T, x_star)
    assert torch.allclose(ddim_sample(eps_fn, x_T, s), x_star, atol=1e-5)


def test_call_counts_and_timesteps():
    s = NoiseSchedule.linear().respace(10)
    seen = []

    def eps_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    x = torch.zeros(2, 1, 2, 2)
    ddim_invert(eps_fn, x, s)
    assert seen == [[t, t] for t in range(0, 900, 100)]  # N-1 calls, ending AT 900
    seen.clear()
    ddim_sample(eps_fn, x, s)
    assert seen == [[t, t] for t in range(900, -1, -100)]  # N calls from 900 down to 0


def test_ddim_step_per_sample_equals_one_by_one():
    s = NoiseSchedule.linear().respace(20)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    idx = torch.tensor([19, 7, 3, 0])
    batched, x0b = ddim_step(x, eps, s.at(idx, x), s.at(idx - 1, x))
    for b in range(4):
        one, x0 = ddim_step(x[b:b + 1], eps[b:b + 1], s.at(int(idx[b]), x[b:b + 1]), s.at(int(idx[b]) - 1, x[b:b + 1]))
        assert torch.equal(one, batched[b:b + 1]) and torch.equal(x0, x0b[b:b + 1])
    # the last step (target alpha_bar = 1) returns the clipped x0 estimate
    assert torch.equal(batched[3], x0b[3])
    assert x0b.abs().max() <= 1


def test_dva_loss_zero_for_exact_noise_and_positive_otherwise():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([0, 500, 999])
    na, nb = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    mask = torch.ones(3, 1, 8, 8)
    exact = point_mass_eps(x0.repeat(2, 1, 1, 1), s)
    out = dva_loss(exact, x0, t, na, nb, mask, s)
    assert out['loss'].item() == pytest.approx(0, abs=1e-4)
    out = dva_loss(lambda x, t: torch.zeros_like(x), x0, t, na, nb, mask, s, consistency_weight=0.5)
    assert out['loss_eps'].item() == pytest.approx(((na.abs().flatten(1).mean(1) + nb.abs().flatten(1).mean(1)).mean()).item(), rel=1e-5)
    assert out['loss'].item() == pytest.approx(out['loss_eps'].item() + 0.5 * out['loss_consistency'].item(), rel=1e-6)
    # the consistency term only sees the masked region
    out0 = dva_loss(lambda x, t: torch.zeros_like(x), x0, t, na, nb, torch.zeros_like(mask), s)
    assert out0['loss_consistency'].item() == 0
