"""The three image objectives (ε, v-prediction, rectified flow): training inputs and targets against closed
forms, an oracle that proves each sampler inverts its objective, Min-SNR's v-form, the settings' errors, old
checkpoints, and a short training run per objective that measurably learns.

tests/test_generation_vs_training.py checks, per objective, that the sampler feeds the model exactly what a
training forward sees; the oracle here checks that the sampler's update rule matches the training target.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lit_transfusion.batch import Image, Text, pack_rows
from lit_transfusion.diffusion import OBJECTIVES, SAMPLERS, Diffusion
from lit_transfusion.module import TransfusionModule
from tests.conftest import SPECIAL, randomize_output_heads

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
BOS, EOS = SPECIAL.bos, SPECIAL.eos
TIMESTEPS = torch.tensor([0, 1, 10, 250, 500, 750, 999])


def cosine_alphas() -> torch.Tensor:
    """ā_t of the paper's schedule, from diffusers directly: [T]."""
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.float()


def draws(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


def make_module(**kwargs) -> TransfusionModule:
    torch.manual_seed(0)
    return TransfusionModule(vocab_size=32, special_ids=vars(SPECIAL), latent_shape=(4, 4, 4), size="nano",
                             max_seq_len=64, **kwargs)


# ------------------------------------------------------------------------------ (a) training targets
def test_epsilon_input_and_target_are_the_papers():
    d, a = Diffusion(objective="epsilon"), cosine_alphas()
    x0, noise = draws()
    a_t = a[TIMESTEPS].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.add_noise(x0, noise, TIMESTEPS), a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise)
    assert torch.equal(d.target(x0, noise, TIMESTEPS), noise)


def test_v_prediction_target_is_diffusers_velocity():
    d, a = Diffusion(objective="v_prediction"), cosine_alphas()
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x0, noise = draws()
    a_t = a[TIMESTEPS].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.add_noise(x0, noise, TIMESTEPS), a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise)
    v = d.target(x0, noise, TIMESTEPS)
    torch.testing.assert_close(v, a_t.sqrt() * noise - (1 - a_t).sqrt() * x0)
    for i in range(len(TIMESTEPS)):  # diffusers, one image (one t) at a time
        want = ref.get_velocity(x0[i:i + 1], noise[i:i + 1], TIMESTEPS[i:i + 1])
        torch.testing.assert_close(v[i:i + 1], want, rtol=1e-5, atol=1e-5)
    assert (v - noise).abs().mean() > 0.1  # v is not ε


def test_flow_input_interpolates_and_target_is_the_velocity():
    d = Diffusion(objective="flow")
    x0, noise = draws()
    s = (TIMESTEPS.float() / T).view(-1, 1, 1, 1)
    x_s = d.add_noise(x0, noise, TIMESTEPS)
    torch.testing.assert_close(x_s, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(x_s[0], x0[0])  # t = 0: the clean image (captioning, context images)
    torch.testing.assert_close(d.target(x0, noise, TIMESTEPS), noise - x0)
    # diffusers' own forward process at the same σ = t/T (its training grid holds t = 1..T)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=1.0)
    for i in range(1, len(TIMESTEPS)):
        want = ref.scale_noise(x0[i:i + 1], torch.tensor([float(TIMESTEPS[i])]), noise[i:i + 1])
        torch.testing.assert_close(x_s[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_noise_limit_caps_flow_time_at_half():
    """t is drawn as for ε/v, so t_max = 500 (image-first captioning documents) caps s = t/T below 0.5."""
    t = Diffusion(objective="flow").sample_timesteps(torch.full((4000,), 500), torch.Generator().manual_seed(0))
    assert t.max() <= 499 and t.float().div(T).max() < 0.5 and t.min() >= 0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_module_loss_is_the_mse_to_the_objectives_target(objective):
    """``losses`` == MSE of the model's output at the closed-form input against the closed-form target,
    per image (``mse_per_image``, which val/cond_gap averages)."""
    m = randomize_output_heads(make_module(objective=objective), seed=1, std=0.05).eval()
    g = torch.Generator().manual_seed(2)
    docs = [[Text([BOS, 5 + k]), Image(torch.randn(4, 4, 4, generator=g)), Text([EOS])] for k in range(4)]
    b = pack_rows([docs[:2], docs[2:]], 24, 2, SPECIAL)
    t = torch.tensor([0, 100, 600, 999])
    with torch.no_grad():
        out = m.losses(b, t=t, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(b.latents.shape, generator=torch.Generator().manual_seed(3))  # losses' one draw
        x0, tt = b.latents, t.view(-1, 1, 1, 1)
        a = cosine_alphas()[t].view(-1, 1, 1, 1)
        if objective == "flow":
            x_t, target = (1 - tt / T) * x0 + tt / T * noise, noise - x0
        else:
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise if objective == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = m(b, x_t, t).eps
    mse = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["mse_per_image"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_image"], mse.mean(), rtol=1e-5, atol=1e-6)
    wrong = (pred - (target + 0.3 * x0)).pow(2).flatten(1).mean(1)  # the check has power
    assert ((wrong - mse).abs() / mse).max() > 0.05


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_patchers_take_training_and_sampling_timesteps_alike(patcher):
    """Training feeds long t; flow sampling feeds σ·T floats. Integer-valued floats give exactly the long
    result (one scale in both), and a fractional t is a valid input between its neighbours."""
    m = randomize_output_heads(make_module(patcher=patcher, objective="flow"), seed=1).eval()
    lat = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t_long = torch.tensor([0, 500, 999])
    with torch.no_grad():
        p_long, state = m.model.patcher.encode(lat, t_long)
        p_float, _ = m.model.patcher.encode(lat, t_long.float())
        torch.testing.assert_close(p_float, p_long, rtol=0, atol=0)
        p_mid, _ = m.model.patcher.encode(lat, torch.tensor([0.5, 500.5, 1000.0]))
    assert torch.isfinite(p_mid).all() and (p_mid - p_long).abs().max() > 0


# ------------------------------------------------------------------------- (b) the sampler's oracle
def oracle(x0: torch.Tensor, process: str, output: str, inferred: list):
    """A perfect "model": from the sample x and the step's t it infers the noise that made x out of the known
    x0 under ``process`` ("flow", or the ε/v schedule otherwise), records it in ``inferred``, and returns the
    exact training target of ``output`` (an objective). process == output: the perfect model of that objective."""
    a = cosine_alphas()

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if process == "flow":
            s = float(t) / T
            noise = (x - (1 - s) * x0) / s
            inferred.append((t, noise))
            return {"flow": noise - x0, "epsilon": noise}[output]
        a_t = a[int(t)]
        noise = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        inferred.append((t, noise))
        return {"epsilon": noise, "v_prediction": a_t.sqrt() * noise - (1 - a_t).sqrt() * x0}[output]

    return predict


CASES = [(o, s) for o in ("epsilon", "v_prediction") for s in SAMPLERS] + [("flow", s) for s in SAMPLERS]
WRONG = {"epsilon": "v_prediction", "v_prediction": "epsilon", "flow": "epsilon"}  # a mismatched target


def run_oracle(objective: str, sampler: str, steps: int, output: str):
    """(final sample, [(t, inferred noise)] per step) of ``Diffusion.sample`` driven by the oracle."""
    d = Diffusion(objective=objective)
    x0 = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    inferred: list = []
    predict = oracle(x0, "flow" if objective == "flow" else "ddpm", output, inferred)
    return x0, d.sample(predict, x0.shape, sampler, steps, torch.Generator().manual_seed(1)), inferred


@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize(("objective", "sampler"), CASES)
def test_oracle_predictions_recover_the_clean_latent(objective, sampler, steps):
    """The sampling loop (``Diffusion.sample``, the one generation runs) driven by a perfect model of the
    objective stays on the objective's forward process and lands on x0; so the sampler's update rule and the
    training target agree, and the model gets t on training's scale (flow: σ·T floats, first σ = 1).

    For the deterministic samplers (DDIM, DPM-Solver++, flow's Euler) the noise the oracle infers from each
    step's sample is the same at every step (the sample moves along x_t = α_t·x0 + σ_t·ε with ε fixed); for
    DDPM it is N(0, 1) (std 1: the sample stays on the forward process's marginal). A perfect model of ANOTHER
    objective's target breaks that (while the self-correcting oracle may still end near x0, since at t ≈ 0
    ε ≈ v: ending at x0 alone would not prove agreement)."""
    x0, got, inferred = run_oracle(objective, sampler, steps, objective)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=2e-4)
    times = [t for t, _ in inferred]
    assert len(times) == steps and all(t.dim() == 0 for t in times)
    if objective == "flow":
        assert all(t.is_floating_point() for t in times) and float(times[0]) == T  # σ = 1: pure noise
    else:
        assert all(t.dtype == torch.long for t in times) and int(times[0]) < T
    deterministic = objective == "flow" or sampler != "ddpm"
    if deterministic:  # float32 noise inference near t = T divides by sqrt(ā_t) ~ 1e-4: hence 1e-2
        for _, n in inferred:
            torch.testing.assert_close(n, inferred[0][1], rtol=0, atol=1e-2)
    else:  # after the first step (the initial draw need not lie on the marginal of the first t)
        stds = torch.stack([n.std() for _, n in inferred[1:]])
        assert ((stds - 1).abs() < 0.1).all(), stds
    _, wrong, wrong_inferred = run_oracle(objective, sampler, steps, WRONG[objective])
    drift = max(float((n - wrong_inferred[0][1]).abs().max()) for _, n in wrong_inferred)
    wrong_stds = torch.stack([n.std() for _, n in wrong_inferred[1:]])
    assert (drift > 0.5 if deterministic else ((wrong_stds - 1).abs() > 0.2).any()), (drift, wrong_stds)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sampler_follows_the_objective(objective):
    for name in SAMPLERS:
        s = Diffusion(objective=objective).sampler(name, 8)
        assert len(s.timesteps) == 8 and not getattr(s.config, "clip_sample", False)
        if objective == "flow":  # whatever the name
            assert isinstance(s, FlowMatchEulerDiscreteScheduler) and s.config.shift == 1.0
            assert s.timesteps.is_floating_point() and s.init_noise_sigma == 1.0
        else:
            assert s.config.prediction_type == objective and s.timesteps.dtype == torch.long
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        Diffusion(objective=objective).sampler("euler")


# ---------------------------------------------------------------------------------- Min-SNR for v
def test_min_snr_v_form_weighs_the_same_as_the_epsilon_form():
    """w_v(t)·‖v̂ - v‖² == w_ε(t)·‖ε̂ - ε‖² for the v and ε predictions of one model output (the same x̂0),
    with w_v = min(SNR, γ)/(SNR + 1) and w_ε = min(SNR, γ)/SNR."""
    eps_d, v_d, a = Diffusion(objective="epsilon"), Diffusion(objective="v_prediction"), cosine_alphas()
    x0, noise = draws()
    t = TIMESTEPS
    a_t = a[t].view(-1, 1, 1, 1)
    x_t = eps_d.add_noise(x0, noise, t)
    eps_hat = noise + 0.3 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    x0_hat = (x_t - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()
    v_hat = a_t.sqrt() * eps_hat - (1 - a_t).sqrt() * x0_hat
    for gamma in (1.0, 5.0):
        w_eps, w_v = eps_d.loss_weights(t, gamma), v_d.loss_weights(t, gamma)
        snr = a[t] / (1 - a[t])
        torch.testing.assert_close(w_v, snr.clamp(max=gamma) / (snr + 1))
        lhs = w_v * (v_hat - v_d.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        rhs = w_eps * (eps_hat - noise).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=1e-6)
    assert torch.equal(v_d.loss_weights(t, None), torch.ones(len(t)))


# ---------------------------------------------------------------------------- (e) settings' errors
def test_flow_refuses_min_snr_and_importance_sampling():
    with pytest.raises(ValueError, match=r"model.objective='flow' with model.snr_gamma=1.0 .*snr_gamma: null"):
        make_module(objective="flow", snr_gamma=1.0)
    with pytest.raises(ValueError, match=r"model.objective='flow'.*timestep_sampling='importance'"):
        make_module(objective="flow", snr_gamma=1.0, timestep_sampling="importance")
    with pytest.raises(ValueError, match="timestep_sampling"):
        make_module(objective="flow", timestep_sampling="importance")
    with pytest.raises(ValueError, match="not for objective='flow'"):
        Diffusion(objective="flow").loss_weights(TIMESTEPS, 1.0)
    make_module(objective="v_prediction", snr_gamma=1.0, timestep_sampling="importance")  # defined for v


def test_unknown_objective_fails_naming_the_setting():
    with pytest.raises(ValueError, match="model.objective='x0': expected 'epsilon', 'v_prediction' or 'flow'"):
        make_module(objective="x0")
    with pytest.raises(ValueError, match="objective='x0'"):
        Diffusion(objective="x0")


def test_old_checkpoints_load_with_the_papers_settings(tmp_path):
    """A checkpoint whose hyper-parameters predate ``objective`` and ``image_attention`` loads as ε-prediction
    with bidirectional image attention (the paper, the behaviour it was trained with)."""
    import lightning as L

    m = make_module()
    hparams = {k: v for k, v in m.hparams.items() if k not in ("objective", "image_attention")}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)
    loaded = TransfusionModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams.objective == "epsilon" and loaded.diffusion.objective == "epsilon"
    assert loaded.hparams.image_attention == "bidirectional" and loaded.model.cfg.image_attention == "bidirectional"
    for name, value in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_settings_round_trip_through_the_exported_hparams():
    """``export.py`` writes the module's hparams as JSON and rebuilds the module from them."""
    import json

    m = make_module(objective="flow", image_attention="causal")
    hparams = json.loads(json.dumps(dict(m.hparams)))
    hparams["latent_shape"] = tuple(hparams["latent_shape"])
    rebuilt = TransfusionModule(**hparams)
    assert rebuilt.diffusion.objective == "flow" and rebuilt.model.cfg.image_attention == "causal"


# ----------------------------------------------------------------------------------- (d) it learns
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_learns_a_tiny_problem(objective):
    """A nano model on four fixed latents (one caption each), 100 AdamW steps with fresh t and noise every
    step: the image MSE on held-out draws (fixed t and noise, the same before and after) falls well below
    its value at step 0 (where the zero-initialised head predicts 0: E[target²] = 1 for ε and v, 2 for flow)."""
    m = make_module(objective=objective)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 4, 4, generator=g) for _ in range(4)]
    docs = [[Text([BOS, 5 + k]), Image(latents[k]), Text([EOS])] for k in range(4)] * 2
    b = pack_rows([docs[:4], docs[4:]], 40, 2, SPECIAL)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(m.losses(b, generator=torch.Generator().manual_seed(10_000 + i))["mse_image"])
                       for i in range(8)) / 8

    first = held_out()
    for step in range(100):
        loss = m.losses(b, generator=torch.Generator().manual_seed(step))["loss_image"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = held_out()
    assert last < 0.5 * first, (objective, first, last)
