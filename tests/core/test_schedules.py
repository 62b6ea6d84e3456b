import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_fill import (
    calculate_shift as diffusers_calculate_shift,
)
from hypothesis import given
from hypothesis import strategies as st

from core.sampling.schedules import (
    calculate_shift,
    check_sigmas,
    flux_sigmas,
    image_seq_len,
)

# the scheduler config shipped with FLUX.1 Fill [dev]
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def pipeline_sigmas(num_steps: int, height: int, width: int) -> torch.Tensor:
    """What FluxFillPipeline.__call__ hands its scheduler, and what the scheduler makes of it."""
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    seq = (height // 8 // 2) * (width // 8 // 2)
    mu = diffusers_calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return sched.sigmas, sched.timesteps


@pytest.mark.parametrize("num_steps", [1, 6, 10, 28, 50])
@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (768, 1360), (256, 256)])
def test_dynamic_shift_reproduces_flux_fill_pipeline(num_steps, size):
    expected, timesteps = pipeline_sigmas(num_steps, *size)
    ours = flux_sigmas(num_steps, image_seq_len=image_seq_len(*size))
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-7)
    # the pipeline feeds the transformer timesteps / 1000
    torch.testing.assert_close(ours[:-1], timesteps / 1000, rtol=0, atol=2e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_static_shift_reproduces_scheduler(shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 12, 12))
    torch.testing.assert_close(flux_sigmas(12, shift=shift), sched.sigmas, rtol=0, atol=2e-7)


def test_calculate_shift_and_seq_len():
    for n in (64, 256, 1024, 4096, 9000):
        assert calculate_shift(n) == pytest.approx(diffusers_calculate_shift(n), abs=1e-12)
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)
    assert image_seq_len(1024, 1024) == 4096 and image_seq_len(64, 32, vae_scale_factor=2) == 16 * 8


def test_plain_linear_and_shift_one():
    torch.testing.assert_close(flux_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(flux_sigmas(7, shift=1.0), flux_sigmas(7))


def test_static_shift_is_dynamic_shift_with_log():
    # s t / (1 + (s - 1) t) == e^mu t / (e^mu t + 1 - t) with mu = log s; pick L so mu = log 2
    mu = np.log(2.0)
    L = 256 + (mu - 0.5) * (4096 - 256) / 0.65
    torch.testing.assert_close(flux_sigmas(9, image_seq_len=L), flux_sigmas(9, shift=2.0), rtol=0, atol=1e-6)


@given(n=st.integers(1, 200), shift=st.floats(0.1, 20), seq=st.integers(1, 20000), kind=st.sampled_from("lsd"))
def test_schedule_properties(n, shift, seq, kind):
    kw = {"l": {}, "s": {"shift": shift}, "d": {"image_seq_len": seq}}[kind]
    s = flux_sigmas(n, **kw)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all())
    assert check_sigmas(s) is s


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_steps=0), "num_steps must be a positive int"),
    (dict(num_steps=2.0), "num_steps must be a positive int"),
    (dict(num_steps=4, shift=3.0, image_seq_len=1024), "not both"),
    (dict(num_steps=4, shift=-1.0), "shift must be a positive"),
    (dict(num_steps=4, image_seq_len=0), "image_seq_len must be a positive"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flux_sigmas(**kwargs)


@pytest.mark.parametrize("sigmas, message", [
    (torch.tensor([[1.0, 0.0]]), "1-D"),
    (torch.tensor([1.0, 0.5, 0.5, 0.0]), "strictly decreasing"),
    (torch.tensor([0.0, 1.0]), "strictly decreasing"),
    (torch.tensor([1.5, 0.0]), r"\[0, 1\]"),
    (torch.tensor([1.0, float("nan")]), r"\[0, 1\]"),
])
def test_check_sigmas_rejects(sigmas, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(sigmas)
