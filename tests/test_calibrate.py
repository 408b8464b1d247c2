"""Radius calibrations of ``mac_core.rules`` (per-head radius factors from a prompt) and ``MACConfig.calibrated``."""

import math

import pytest
import torch

import mac_ref
from mac_core.rules import radius_scale_from_prompt as radius_scale


def _prompt(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_pre = torch.randn(2, 6, 10, 8, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:, None, None]
    k_cache = torch.randn(2, 2, 16, 8, generator=gen)  # capacity 16, prompt of 10
    k_cache[:, :, 10:] = math.nan  # past the prompt: never read
    return q_pre, k_cache


def test_keynorm_scale_is_sqrt_d_over_largest_key_norm_of_the_group():
    q_pre, k_cache = _prompt()
    k_cache[1, 1, 0] = 100.0  # a huge sink key: excluded with sinks = 1
    scale = radius_scale("keynorm", q_pre, k_cache, prompt_len=10, sinks=1)
    key_norm = k_cache[:, :, 1:10].norm(dim=-1).amax(dim=(0, 2))  # [Hkv]
    expected = [math.sqrt(8) / key_norm[h // 3].item() for h in range(6)]
    assert scale == pytest.approx(expected)
    with_sink = radius_scale("keynorm", q_pre, k_cache, prompt_len=10, sinks=0)
    assert with_sink[3] == pytest.approx(math.sqrt(8) / k_cache[1, 1, 0].norm().item())


def test_qnorm_scale_is_median_query_norm_over_sqrt_d():
    q_pre, k_cache = _prompt(1)
    scale = radius_scale("qnorm", q_pre, k_cache, prompt_len=10, sinks=0)
    expected = [q_pre[:, h].norm(dim=-1).flatten().median().item() / math.sqrt(8) for h in range(6)]
    assert scale == pytest.approx(expected)
    assert all(a < b for a, b in zip(scale, scale[1:]))  # heads were drawn with growing scale


def test_no_calibration_keeps_the_config_and_unknown_calibrations_fail():
    q_pre, k_cache = _prompt()
    config = mac_ref.MACConfig(window=4, band=2)
    assert config.calibrated(q_pre, k_cache, 10) == config
    keynorm = mac_ref.MACConfig(window=4, band=2, calibration="keynorm").calibrated(q_pre, k_cache, 10)
    assert keynorm.radius_scale is not None and len(keynorm.radius_scale) == 6 and keynorm.tau == config.tau
    assert keynorm.radius_scale == pytest.approx(radius_scale("keynorm", q_pre, k_cache, 10, 0))
    with pytest.raises(ValueError, match="calibration must be one of"):
        radius_scale("cosine", q_pre, k_cache, 10, 0)
    with pytest.raises(ValueError, match="MACConfig.calibration must be None or one of"):
        mac_ref.MACConfig(calibration="cosine")


def test_a_calibration_must_be_applied_before_a_step():
    """A configuration that names a calibration but was never calibrated is refused, not run with s_h = 1."""
    q, k, v = mac_ref.synthetic_stream(1, 2, 1, 12, 8, seed=0)
    config = mac_ref.MACConfig(window=4, band=2, calibration="qnorm")
    _, _, state = mac_ref.prefill(q[:, :, :8], k, v, 8, config)
    with pytest.raises(ValueError, match="config.calibration is 'qnorm' but config.radius_scale is unset"):
        mac_ref.decode_step(q[:, :, 8], k, v, state, torch.tensor([8]), config)
    calibrated = config.calibrated(q[:, :, :8], k, 8)
    mac_ref.decode_step(q[:, :, 8], k, v, state, torch.tensor([8]), calibrated)
