"""Our DDIM and DPM-Solver++ against diffusers' DDIMScheduler and DPMSolverMultistepScheduler, driven by the
same noise-prediction function: the same timesteps, and the same final samples to 1e-5. diffusers is a
test-only dependency (requirements-dev.txt); without it these tests are skipped."""
import pytest
import torch
from diffusion_refs import GaussianEps
from helpers import make_diffusion

from config import SampleConfig
from ddpm.samplers import sample_loop, sampler_timesteps

T = 1000
# diffusers 0.42 calls np.array(tensor, copy=False) in set_timesteps, which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def schedulers():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    return DDIMScheduler, DPMSolverMultistepScheduler


def dpm_scheduler(schedulers, order, spacing, **kw):
    """DPM-Solver++ multistep, data prediction, 2M = 'midpoint', the lower-order final steps, the last to sigma 0
    (the defaults of the last three, spelled out), on DDPM's linear schedule."""
    return schedulers[1](num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
                         timestep_spacing=spacing, lower_order_final=True, final_sigmas_type="zero",
                         prediction_type="epsilon", **kw)


def run_diffusers(scheduler, eps_fn, x_T, steps, ddim_eta=None, seed=None):
    """diffusers' sampling loop: eps at each of the scheduler's timesteps, then its step. With ddim_eta, each
    DDIM step gets that eta and variance noise drawn as ours draws it (one randn per step from one generator)."""
    scheduler.set_timesteps(steps)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for t in scheduler.timesteps:
        extra = {} if ddim_eta is None else {"eta": ddim_eta, "variance_noise": torch.randn(x.shape, generator=g)}
        x = scheduler.step(eps_fn(x, t.reshape(1).expand(len(x))), t, x, **extra).prev_sample
    return x


def compare(settings, scheduler, model, x_T, diffusion, eps_fn=None, seed=None, ddim_noise=False, **denoiser):
    """(ours, theirs): sample_loop with these sample settings and denoiser arguments, and diffusers' loop with
    eps_fn (default: the model itself; ddim_noise: DDIMScheduler's eta and noise); both on the same timesteps."""
    s = SampleConfig(**settings)
    g = None if seed is None else torch.Generator().manual_seed(seed)
    ours = sample_loop(diffusion, diffusion.denoiser(model, **denoiser), x_T, s, g)
    theirs = run_diffusers(scheduler, eps_fn or (lambda x, t: model(x, t)), x_T, s.steps,
                           s.eta if ddim_noise else None, seed)
    assert scheduler.timesteps.tolist() == sampler_timesteps(diffusion, s)
    assert (theirs - x_T).abs().max() > 0.5  # it went somewhere
    return ours, theirs


X_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [7, 20])  # under 15 steps the second-to-last step is lowered too
def test_dpmpp_matches_diffusers(schedulers, order, spacing, steps):
    d = make_diffusion(timesteps=T, clip_denoised=False)
    model = GaussianEps(d.alphas_cumprod64, wiggle=0.1)  # smooth, nonlinear, samples of order 1
    ours, theirs = compare(dict(sampler="dpmpp", steps=steps, order=order, spacing=spacing),
                           dpm_scheduler(schedulers, order, spacing), model, X_T, d)
    # diffusers keeps its schedule in float32 (cumprod of float32 betas): 1e-6 apart here
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("steps", [10, 20])
def test_ddim_matches_diffusers_ddim_with_trailing(schedulers, eta, steps):
    """DDIMScheduler steps from t to t - T // steps. Only under 'trailing' with steps dividing T is that the next
    timestep of its own list, ending at -1 (the data, with set_alpha_to_one), so that is where it is the same
    method as ours; with 'linspace' or 'leading' it steps to points it never evaluates. Our DDIM under
    linspace is compared with diffusers' DPM-Solver++ of order 1 below. eta > 0: the same noise each step."""
    d = make_diffusion(timesteps=T, clip_denoised=False)
    model = GaussianEps(d.alphas_cumprod64, wiggle=0.1)
    scheduler = schedulers[0](num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
                              prediction_type="epsilon")
    ours, theirs = compare(dict(sampler="ddim", steps=steps, eta=eta, spacing="trailing"), scheduler, model, X_T, d,
                           seed=5, ddim_noise=True)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddim_matches_diffusers_dpm_solver_of_order_1(schedulers, spacing):
    d = make_diffusion(timesteps=T, clip_denoised=False)
    model = GaussianEps(d.alphas_cumprod64, wiggle=0.1)
    ours, theirs = compare(dict(sampler="ddim", steps=12, spacing=spacing), dpm_scheduler(schedulers, 1, spacing),
                           model, X_T, d)
    assert (ours - theirs).abs().max().item() < 1e-5


class ClassGaussianEps(torch.nn.Module):
    """A class-conditional stand-in network: GaussianEps with a mean per class (the null label: mean 0)."""

    num_classes = 3

    def __init__(self, abar64):
        super().__init__()
        self.per_class = [GaussianEps(abar64, mu=mu, wiggle=0.1) for mu in (-0.6, 0.2, 0.7, 0.0)]

    def null_condition(self, cond):
        return torch.full_like(cond, self.num_classes)

    def forward(self, x, t, cond=None):
        cond = self.null_condition(t) if cond is None else cond
        return torch.stack([self.per_class[int(c)](x[i:i + 1], t[i:i + 1])[0] for i, c in enumerate(cond)])


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("threshold", [False, True])
def test_guidance_clipping_and_thresholding_match_diffusers(schedulers, order, threshold):
    """Guidance w = 3 on a class-conditional model; diffusers gets eps_u + w (eps_c - eps_u) from two plain
    calls of the model. Our clip_denoised is its thresholding with sample_max_value=1 (s is then always 1: a
    clamp to [-1, 1]); our dynamic thresholding is its thresholding without that cap. (A random U-Net would
    do too, but its trajectories with guidance and clipping amplify float32 rounding to 5e-5 in 8 steps.)"""
    d = make_diffusion(timesteps=T, clip_denoised=True)
    model = ClassGaussianEps(d.alphas_cumprod64)
    y = torch.tensor([0, 2, 2, 1])
    w = 3.0

    def guided(x, t):
        eps_c, eps_u = model(x, t, y), model(x, t, None)
        return eps_u + w * (eps_c - eps_u)
    scheduler = dpm_scheduler(schedulers, order, "linspace", thresholding=True, dynamic_thresholding_ratio=0.995,
                              sample_max_value=1e9 if threshold else 1.0)
    ours, theirs = compare(dict(sampler="dpmpp", steps=8, order=order, guidance_scale=w, dynamic_threshold=threshold),
                           scheduler, model, X_T * 2, d, cond=y, guidance_scale=w, threshold=threshold, eps_fn=guided)
    assert (ours - theirs).abs().max().item() < 1e-5
    # and both paths matter: without them the samples differ
    unclipped = make_diffusion(timesteps=T, clip_denoised=False)
    plain = sample_loop(unclipped, unclipped.denoiser(model, y, w), X_T * 2,
                        SampleConfig(sampler="dpmpp", steps=8, order=order))
    assert (plain - ours).abs().max() > 1e-2 and plain.abs().max() > 1.5
