"""Calibration observers: qparams on known data, the clipping observers beating min/max
where they should, per-channel shapes, edge cases and typed errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fxopt.errors import QuantizationError
from fxopt.quant import observers
from fxopt.quant.observers import OBSERVERS, PER_CHANNEL, make_observer, observed, qrange


def _feed(obs, data, batches=10):
    for chunk in data.chunk(batches):
        assert obs(chunk) is chunk  # forward is the identity
    return obs.calculate_qparams()


def _fq_mse(obs, data):
    scale, zp = obs.calculate_qparams()
    fq = torch.fake_quantize_per_tensor_affine(
        data, float(scale), int(zp), obs.quant_min, obs.quant_max
    )
    return (fq - data).square().mean().item()


def _laplace(n=100_000):
    return torch.distributions.Laplace(0.0, 1.0).sample((n,))


def test_qrange():
    assert qrange(8) == (-128, 127)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4) == (-8, 7)
    assert qrange(4, False) == (0, 15)
    assert qrange(2) == (-2, 1)
    for bad in (1, 9, 16, 8.0, True):
        with pytest.raises(QuantizationError, match="from 2 to 8"):
            qrange(bad)


def test_minmax_symmetric_scale_is_max_abs_over_127_5():
    x = torch.rand(10_000) * 2 - 1
    scale, zp = _feed(make_observer("minmax"), x)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.numel() == 1 and zp.item() == 0
    # torch's symmetric qscheme: max|x| / ((qmax - qmin) / 2), so about 1/127.5
    assert scale.item() == pytest.approx(x.abs().max().item() / 127.5, rel=1e-6)
    assert scale.item() == pytest.approx(1 / 127.5, rel=1e-3)


@pytest.mark.parametrize("kind", OBSERVERS)
def test_symmetric_signed_uniform(kind):
    x = torch.rand(100_000) * 2 - 1
    scale, zp = _feed(make_observer(kind), x)
    assert zp.tolist() == [0]
    # nothing to clip in uniform data: every observer lands near min/max's 1/127.5
    assert 0.9 / 127.5 < scale.item() <= 1.0001 / 127.5


@pytest.mark.parametrize("kind", OBSERVERS)
def test_asymmetric_uint8_relu_data_has_zero_point_0(kind):
    x = torch.randn(50_000).relu()
    scale, zp = _feed(make_observer(kind, signed=False, symmetric=False), x)
    assert zp.item() == 0 and scale.item() > 0


@pytest.mark.parametrize("kind", OBSERVERS)
@pytest.mark.parametrize("signed", [True, False])
def test_asymmetric_shifted_data_represents_zero_exactly(kind, signed):
    x = torch.rand(50_000) * 4 - 1  # [-1, 3]
    obs = make_observer(kind, signed=signed, symmetric=False)
    scale, zp = _feed(obs, x)
    qmin, qmax = qrange(8, signed)
    assert qmin < zp.item() < qmax
    zero = torch.fake_quantize_per_tensor_affine(torch.zeros(3), float(scale), int(zp), qmin, qmax)
    assert torch.equal(zero, torch.zeros(3))
    assert scale.item() == pytest.approx(4 / 255, rel=0.1)


def test_unsigned_symmetric_uses_torch_midpoint():
    scale, zp = _feed(make_observer("minmax", signed=False), torch.rand(1000) * 2 - 1)
    assert zp.item() == 128


def test_moving_average_constant():
    obs = make_observer("moving_average", averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 3.0]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(2.0 / 127.5)  # min/max moved halfway: -2, 2
    assert zp.item() == 0


@pytest.mark.parametrize("kind", PER_CHANNEL)
def test_per_channel_weights(kind):
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 2.0, 16)[:, None, None, None]
    obs = make_observer(kind, ch_axis=0)
    scale, zp = _feed(obs, w, batches=1)
    assert scale.shape == (16,) and zp.shape == (16,)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert torch.all(zp == 0)
    minmax = w.flatten(1).abs().amax(1) / 127.5
    if kind == "mse":  # clips at most, never widens
        assert torch.all(scale <= minmax * (1 + 1e-6)) and torch.all(scale > 0.3 * minmax)
    else:
        torch.testing.assert_close(scale, minmax)


@pytest.mark.parametrize("kind", PER_CHANNEL)
def test_per_channel_activations_axis_1_asymmetric(kind):
    x = torch.randn(64, 6, 5, 5) + torch.arange(6.0)[None, :, None, None]
    obs = make_observer(kind, ch_axis=1, symmetric=False, signed=False)
    scale, zp = _feed(obs, x, batches=4)
    assert scale.shape == (6,) and zp.shape == (6,)
    assert torch.all((zp >= 0) & (zp <= 255)) and torch.all(scale > 0)
    assert zp[0] > zp[-1]  # channel 0 is mostly negative, channel 5 mostly positive


def test_per_channel_mse_beats_minmax_on_heavy_tailed_weights():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((32, 4096))  # sampled: 1024 < 4096 values
    errors = {}
    for kind in ("minmax", "mse"):
        obs = make_observer(kind, bits=4, ch_axis=0)
        scale, zp = _feed(obs, w, batches=1)
        fq = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -8, 7)
        errors[kind] = (fq - w).square().mean(1)
    assert errors["mse"].mean() < 0.5 * errors["minmax"].mean()
    assert (errors["mse"] <= errors["minmax"]).float().mean() > 0.9


def test_percentile_clips_a_single_outlier():
    x = torch.randn(100_000)
    x[123] = 1000.0
    minmax_scale, _ = _feed(make_observer("minmax"), x)
    scale, zp = _feed(make_observer("percentile"), x)
    assert zp.item() == 0
    assert scale.item() < minmax_scale.item() / 100
    assert 3.0 / 127.5 < scale.item() < 6.0 / 127.5  # p99.99 of |N(0, 1)| is about 3.9
    lo_scale, _ = _feed(make_observer("percentile", percentile=99.0), x)
    assert lo_scale < scale


def test_percentile_asymmetric_clips_each_tail():
    x = torch.rand(100_000) * 3 - 1  # [-1, 2]
    x[0], x[1] = -40.0, 50.0
    obs = make_observer("percentile", symmetric=False, signed=False, percentile=99.9)
    scale, zp = _feed(obs, x)
    assert scale.item() == pytest.approx(3 / 255, rel=0.15)
    assert zp.item() == pytest.approx(255 / 3, abs=12)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["entropy", "mse"])
def test_clipping_observers_beat_minmax_on_laplace(kind, bits):
    x = _laplace()
    reference = make_observer("minmax", bits=bits)
    _feed(reference, x)
    obs = make_observer(kind, bits=bits)
    _feed(obs, x, batches=20)
    assert _fq_mse(obs, x) < 0.9 * _fq_mse(reference, x)


def test_mse_beats_minmax_on_student_t():
    x = torch.distributions.StudentT(3.0).sample((100_000,))
    errors = {}
    for kind in ("minmax", "mse"):
        obs = make_observer(kind)
        _feed(obs, x, batches=20)
        errors[kind] = _fq_mse(obs, x)
    assert errors["mse"] < 0.8 * errors["minmax"]


def test_entropy_matches_tensorrt_threshold_on_gaussian():
    # TensorRT's entropy calibrator puts int8 thresholds of N(0, 1) near 4 sigma, under max
    x = torch.randn(200_000)
    scale, _ = _feed(make_observer("entropy"), x)
    threshold = scale.item() * 127.5
    assert 3.0 < threshold < x.abs().max().item()


@pytest.mark.parametrize("kind", OBSERVERS)
def test_four_bit(kind):
    x = torch.rand(20_000) * 2 - 1
    obs = make_observer(kind, bits=4)
    assert (obs.quant_min, obs.quant_max) == (-8, 7)
    scale, zp = _feed(obs, x)
    assert zp.item() == 0
    assert 0.6 / 7.5 < scale.item() <= 1.0001 / 7.5
    obs = make_observer(kind, bits=4, signed=False, symmetric=False)
    scale, zp = _feed(obs, x)
    assert 0 <= zp.item() <= 15 and (obs.quant_min, obs.quant_max) == (0, 15)


@pytest.mark.parametrize("kind", OBSERVERS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_constant_tensors(kind, symmetric, value):
    obs = make_observer(kind, symmetric=symmetric)
    scale, zp = _feed(obs, torch.full((4, 8), value), batches=2)
    assert torch.isfinite(scale).all() and scale.item() > 0
    assert -128 <= zp.item() <= 127
    fq = torch.fake_quantize_per_tensor_affine(
        torch.tensor(value), float(scale), int(zp), -128, 127
    )
    assert fq.item() == pytest.approx(value, abs=scale.item())


@pytest.mark.parametrize("kind", PER_CHANNEL)
def test_constant_and_zero_channels(kind):
    w = torch.zeros(3, 10)
    w[1] = 2.0
    scale, zp = _feed(make_observer(kind, ch_axis=0), w, batches=1)
    assert torch.all(scale > 0) and torch.isfinite(scale).all()
    assert scale[1].item() == pytest.approx(2.0 / 127.5)


def test_histogram_grows_exactly():
    obs = make_observer("percentile", percentile=100.0)
    obs(torch.zeros(100))  # all-zero first batch: no range yet
    obs(torch.tensor([0.001, -0.002]))
    obs(torch.randn(10_000) * 50)  # range grows by a large power of two
    assert obs.histogram.sum().item() == 100 + 2 + 10_000
    hi = obs.max_val.item()
    assert obs.bound.item() >= max(hi, -obs.min_val.item()) > obs.bound.item() / 2
    scale, _ = obs.calculate_qparams()  # the 100th percentile is the max
    assert scale.item() == pytest.approx(max(hi, -obs.min_val.item()) / 127.5, rel=1e-6)


@pytest.mark.parametrize("kind", OBSERVERS)
def test_unfed_observer_is_an_error(kind):
    obs = make_observer(kind)
    assert not observed(obs)
    obs(torch.empty(0))  # empty tensors are not data
    with pytest.raises(QuantizationError, match=r"never fed.*fxopt\.calibrate"):
        obs.calculate_qparams()
    obs(torch.randn(8))
    assert observed(obs)


@pytest.mark.parametrize("kind", PER_CHANNEL)
def test_unfed_per_channel_observer_is_an_error(kind):
    obs = make_observer(kind, ch_axis=0)
    assert not observed(obs)
    with pytest.raises(QuantizationError, match="never fed"):
        obs.calculate_qparams()


@pytest.mark.parametrize("kind", OBSERVERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_is_an_error(kind, bad):
    obs = make_observer(kind)
    obs(torch.tensor([1.0, bad, -1.0]))
    obs(torch.randn(10))
    with pytest.raises(QuantizationError, match="NaN or inf"):
        obs.calculate_qparams()


def test_bad_arguments():
    with pytest.raises(QuantizationError, match="minmax, moving_average, percentile"):
        make_observer("kl")
    for kind in ("percentile", "entropy"):
        with pytest.raises(QuantizationError, match="per-channel.*minmax, moving_average, mse"):
            make_observer(kind, ch_axis=0)
    with pytest.raises(QuantizationError, match="from 2 to 8"):
        make_observer("minmax", bits=16)
    with pytest.raises(QuantizationError, match="takes no option 'percentile'.*eps"):
        make_observer("minmax", percentile=99.0)
    with pytest.raises(QuantizationError, match=r"percentile=120.*\(0, 100\]"):
        make_observer("percentile", percentile=120)
    with pytest.raises(QuantizationError, match="ch_axis"):
        make_observer("minmax", ch_axis="0")
    with pytest.raises(QuantizationError, match="not a calibration observer"):
        observed(torch.nn.ReLU())


@pytest.mark.parametrize("kind", OBSERVERS)
def test_deepcopy_and_state_dict_keep_state(kind):
    obs = make_observer(kind, symmetric=False)
    _feed(obs, _laplace(20_000))
    clone = copy.deepcopy(obs)
    torch.testing.assert_close(clone.calculate_qparams(), obs.calculate_qparams())
    clone(torch.full((10,), 100.0))  # the clone's state is its own
    assert clone.calculate_qparams()[0] != obs.calculate_qparams()[0]
    fresh = make_observer(kind, symmetric=False)
    fresh.load_state_dict(obs.state_dict())
    torch.testing.assert_close(fresh.calculate_qparams(), obs.calculate_qparams())


@pytest.mark.parametrize("kind", PER_CHANNEL)
def test_per_channel_deepcopy_and_state_dict(kind):
    obs = make_observer(kind, ch_axis=0)
    _feed(obs, torch.randn(4, 2000), batches=1)
    expected = obs.calculate_qparams()
    torch.testing.assert_close(copy.deepcopy(obs).calculate_qparams(), expected)
    fresh = make_observer(kind, ch_axis=0)
    fresh.load_state_dict(obs.state_dict())
    torch.testing.assert_close(fresh.calculate_qparams(), expected)


def test_per_channel_mse_sample_keeps_the_tail_and_total_weight():
    obs = make_observer("mse", ch_axis=1, sample_size=64)
    for _ in range(5):
        obs(torch.randn(100, 3))
    assert obs.sample.shape == (3, 64)
    torch.testing.assert_close(obs.weight.sum(1), torch.full((3,), 500.0))
    assert obs.sample.abs().amax(1).tolist() == pytest.approx(
        torch.maximum(-obs.min_val, obs.max_val).tolist()
    )


def test_no_warnings_reach_users():
    cases = [(kind, None) for kind in OBSERVERS] + [(kind, 0) for kind in PER_CHANNEL]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind, ch_axis in cases:
            for bits, signed, symmetric in [(8, True, True), (4, False, False)]:
                obs = make_observer(
                    kind, bits=bits, signed=signed, symmetric=symmetric, ch_axis=ch_axis
                )
                obs(torch.randn(8, 16))
                obs(torch.randn(8, 16) * 3)
                obs.calculate_qparams()
    assert [str(w.message) for w in caught] == []


def test_public_functions_have_examples():
    for fn in (observers.make_observer, observers.qrange, observers.observed):
        assert fn.__doc__ and ">>>" in fn.__doc__
