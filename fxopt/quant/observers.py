"""Calibration observers: watch a tensor, then say which scale and zero point quantize it.

Built on ``torch.ao.quantization.observer`` (its observers, not its deprecated FX entry
points). ``forward(x)`` records statistics and returns ``x``; ``calculate_qparams()``
returns ``(scale float32, zero_point int32)``, shape ``[1]`` per tensor, ``[C]`` per
channel, computed from the chosen ``[lo, hi]`` with torch's own formulas:

* symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)`` (127.5 for int8, 7.5 for int4),
  zero_point 0 if signed, else the midpoint (128 for uint8; ``(qmin + qmax) // 2`` below 8 bits).
* asymmetric: ``scale = (max(hi, 0) - min(lo, 0)) / (qmax - qmin)``, zero_point
  ``qmin - round(min(lo, 0) / scale)``, an integer in range, so 0.0 is exact.
* scale is floored at float32 eps, so all-zero and constant tensors still quantize.

"percentile", "entropy" and per-tensor "mse" keep one running histogram: 4096 bins over
``[-b, b]`` (2048 bins of ``|x|``, TensorRT's entropy grid). The first batch sets ``b``;
a batch beyond it doubles ``b`` (repeatedly) and merges bins pairwise, which is exact
because the edges line up, unlike re-interpolating a histogram.

Example::

    obs = make_observer("entropy", bits=8)
    for x in batches:
        obs(x)
    scale, zero_point = obs.calculate_qparams()
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from torch.ao.quantization import observer as tao

from fxopt.errors import QuantizationError

OBSERVERS = ("minmax", "moving_average", "percentile", "entropy", "mse")
PER_CHANNEL = ("minmax", "moving_average", "mse")
_OPTIONS = {  # option: (observers taking it, test, what it must be)
    "eps": (OBSERVERS, lambda v: v > 0, "a positive float"),
    "averaging_constant": (("moving_average",), lambda v: 0 < v <= 1, "in (0, 1]"),
    "percentile": (("percentile",), lambda v: 0 < v <= 100, "in (0, 100]"),
    "candidates": (("mse",), lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
    "min_ratio": (("mse",), lambda v: 0 < v <= 1, "in (0, 1]"),
    "sample_size": (("mse",), lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
}
_BINS = 4096
_NOT_FED = "observer was never fed: run calibration data through the graph first (fxopt.calibrate)"


@contextlib.contextmanager
def _quiet():
    # torch.ao may flag its own quantization API; fxopt's users must never see that.
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        yield


def qrange(bits: int = 8, signed: bool = True) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)`` of a ``bits``-wide signed or unsigned type.

    >>> qrange(8), qrange(4, signed=False)
    ((-128, 127), (0, 15))
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"bits={bits!r} is not supported: use an integer from 2 to 8")
    half = 1 << (bits - 1)
    return (-half, half - 1) if signed else (0, 2 * half - 1)


def observed(obs: torch.nn.Module) -> bool:
    """True once ``obs`` has seen at least one non-empty tensor.

    >>> obs = make_observer("minmax"); observed(obs)
    False
    >>> _ = obs(torch.randn(4)); observed(obs)
    True
    """
    low = getattr(obs, "min_val", None)
    if not isinstance(low, torch.Tensor):
        raise QuantizationError(f"{type(obs).__name__} is not a calibration observer")
    return low.numel() > 0 and not bool(torch.isposinf(low).all())


class _Checked:
    """Shared by all fxopt observers: refuses to guess for unfed or NaN-fed observers and
    returns float32 scales and int32 zero points."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fed()
        with _quiet():
            scale, zero_point = self._qparams()
        return scale.float(), zero_point.to(torch.int32)

    def _check_fed(self) -> None:
        if not observed(self):
            raise QuantizationError(_NOT_FED)
        if not (torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all()):
            raise QuantizationError(
                "observer saw NaN or inf values during calibration: find the layer that "
                "produces them (fxopt.verify) or clean the calibration inputs"
            )

    def _qparams(self):
        return super().calculate_qparams()


class MinMaxObserver(_Checked, tao.MinMaxObserver):
    """Running min/max of the whole tensor."""


class PerChannelMinMaxObserver(_Checked, tao.PerChannelMinMaxObserver):
    """Running min/max of each slice along ``ch_axis``."""


class MovingAverageMinMaxObserver(_Checked, tao.MovingAverageMinMaxObserver):
    """Exponential moving average of per-batch min/max (``averaging_constant``)."""


class MovingAveragePerChannelMinMaxObserver(_Checked, tao.MovingAveragePerChannelMinMaxObserver):
    """Per-channel moving average of per-batch min/max."""


class _HistogramObserver(_Checked, tao.UniformQuantizationObserverBase):
    """Exact min/max plus a 4096-bin histogram over ``[-bound, bound]`` (see module doc);
    subclasses choose the clipping range ``_range() -> (lo, hi)`` from it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("bound", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("histogram", torch.zeros(_BINS, dtype=torch.float64))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().float()
        low, high = torch.aminmax(x)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            self.min_val.fill_(float("nan"))  # reported by calculate_qparams
            return x_orig
        self.min_val.copy_(torch.minimum(self.min_val, low))
        self.max_val.copy_(torch.maximum(self.max_val, high))
        amax, bound = max(-low.item(), high.item()), self.bound.item()
        if amax > bound:
            if bound > 0.0:
                factor = 2
                while bound * factor < amax:
                    factor *= 2
                self._widen(factor)
                amax = bound * factor
            self.bound.fill_(amax)  # from 0: the histogram holds only zeros, in the centre bin
        if self.bound.item() == 0.0:
            self.histogram[_BINS // 2] += x.numel()
        else:
            b = self.bound.item()  # bincount: faster than torch.histc on CPU
            index = torch.add(x.flatten(), b).mul_(_BINS / (2 * b)).clamp_(0, _BINS - 1).long()
            self.histogram += torch.bincount(index, minlength=_BINS).to(self.histogram)
        return x_orig

    def _widen(self, factor: int) -> None:
        # old bin i (centre -b + (i + .5) w) lands in bin (i + .5 + (f - 1) N / 2) // f
        i = torch.arange(_BINS, dtype=torch.float64, device=self.histogram.device)
        j = torch.floor((i + 0.5 + (factor - 1) * _BINS / 2) / factor).long()
        merged = torch.zeros_like(self.histogram).index_add_(0, j, self.histogram)
        self.histogram.copy_(merged)

    @property
    def _symmetric(self) -> bool:
        return self.qscheme == torch.per_tensor_symmetric

    def _width(self) -> float:
        return 2 * self.bound.item() / _BINS

    def _abs_histogram(self) -> np.ndarray:
        h = self.histogram.cpu().numpy()
        return h[_BINS // 2 :] + h[: _BINS // 2][::-1]

    def clip_range(self) -> tuple[float, float]:
        """The float range ``(lo, hi)`` the scale and zero point are computed from: the
        observer's clipping range (percentile, entropy, mse) within the observed min/max.

        >>> obs = make_observer("percentile", percentile=100.0)
        >>> _ = obs(torch.tensor([-1.0, 0.5, 2.0]))
        >>> obs.clip_range()
        (-1.0, 2.0)
        """
        self._check_fed()
        lo, hi = self._range()
        lo = max(lo, self.min_val.item())
        return lo, max(min(hi, self.max_val.item()), lo)

    def _qparams(self):
        lo, hi = self.clip_range()
        device = self.eps.device
        return self._calculate_qparams(
            torch.tensor(lo, device=device), torch.tensor(hi, device=device)
        )

    def extra_repr(self) -> str:
        return f"min_val={self.min_val.item():.4g}, max_val={self.max_val.item():.4g}"


def _quantile(h: np.ndarray, q: float) -> float:
    """Fractional bin position below which a fraction ``q`` of the histogram's mass lies."""
    cdf = np.cumsum(h)
    target = q * cdf[-1]
    k = min(int(np.searchsorted(cdf, target)), len(h) - 1)
    before = cdf[k - 1] if k else 0.0
    return k + (float(np.clip((target - before) / h[k], 0.0, 1.0)) if h[k] > 0 else 0.0)


class PercentileObserver(_HistogramObserver):
    """Clips at the ``percentile`` of ``|x|`` (symmetric) or of each tail (asymmetric)."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = float(percentile)

    def _range(self) -> tuple[float, float]:
        p, w = self.percentile / 100, self._width()
        if self._symmetric:
            t = _quantile(self._abs_histogram(), p) * w
            return -t, t
        h, b = self.histogram.cpu().numpy(), self.bound.item()
        return -b + _quantile(h, 1 - p) * w, -b + _quantile(h, p) * w


def _log(a: np.ndarray) -> np.ndarray:
    """log where positive, 0 elsewhere (the terms it multiplies are 0 there)."""
    return np.log(np.where(a > 0, a, 1.0))


def _xlogx(a: np.ndarray) -> np.ndarray:
    return a * _log(a)


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: the number of ``|x|`` bins to keep, minimising
    KL(P || Q) between the clipped histogram P and Q, P squeezed into ``levels`` levels.

    Every candidate ``i`` (bins kept) is scored at once. For candidate ``i``, P is
    ``h[:i]`` with the clipped tail added to its last bin, and Q spreads each level's mass
    ``S_g`` evenly over the level's ``C_g`` nonzero bins, so with ``P = sum(p)`` and
    ``sum(q) = sum(h[:i])``::

        KL_i = (sum_j p_j log p_j - sum_g S_g log(S_g / C_g)) / P + log(sum(h[:i]) / P)

    and every sum is a difference of prefix sums: O(candidates x levels), not x bins.
    Ties keep the wider range. ``tests/quant/test_observers_reference.py`` checks it against the
    per-candidate loop it replaces.
    """
    nonzero = np.flatnonzero(hist)
    n = int(nonzero[-1]) + 1 if len(nonzero) else 0
    if n <= levels:
        return n
    h = hist[:n].astype(np.float64)  # a copy
    h[0] = h[1]  # exact zeros (ReLU outputs) would otherwise dominate the first level
    nz = h > 0
    mass = np.concatenate([[0.0], np.cumsum(h)])  # mass[k] = sum(h[:k])
    count = np.concatenate([[0], np.cumsum(nz)])
    entropy = np.concatenate([[0.0], np.cumsum(_xlogx(h))])
    total = mass[n]
    i = np.arange(levels, n + 1)  # candidates
    # level g of candidate i holds bins [ceil(g i / levels), ceil((g + 1) i / levels))
    edge = (np.arange(levels + 1)[None, :] * i[:, None] + levels - 1) // levels
    s, c = np.diff(mass[edge], axis=1), np.diff(count[edge], axis=1)
    level_mean = s / np.maximum(c, 1)  # Q's value on each nonzero bin of the level
    kl = entropy[i] - (s * _log(level_mean)).sum(axis=1)
    # the last kept bin also holds the clipped tail t: its h log h becomes p log p - t log q
    tail, last = total - mass[i], h[i - 1]
    kl += _xlogx(last + tail) - _xlogx(last) - tail * _log(level_mean[:, -1])
    kl = kl / total + _log(mass[i] / total)
    kl[(tail > 0) & (last == 0)] = np.inf  # the tail lands where Q has no mass
    return int(i[len(kl) - 1 - np.argmin(kl[::-1])])


class EntropyObserver(_HistogramObserver):
    """KL-divergence (TensorRT entropy) calibration of the ``|x|`` threshold; asymmetric
    observers clip the observed ``[min, max]`` to ``[-t, t]``."""

    def _range(self) -> tuple[float, float]:
        span = self.quant_max - self.quant_min + 1
        one_sided = self.min_val.item() >= 0 or self.max_val.item() <= 0
        levels = span if one_sided and not self._symmetric else span // 2
        t = _kl_threshold(self._abs_histogram(), levels) * self._width()
        return -t, t


def _alphas(candidates: int, min_ratio: float) -> torch.Tensor:
    # geometric, descending from 1.0: argmin's first-minimum rule prefers the widest range
    return torch.logspace(0.0, float(np.log10(min_ratio)), candidates, dtype=torch.float64)


def _fq_error(obs, lo, hi, x, weight) -> torch.Tensor:
    """Weighted squared fake-quantization error of ``x`` ([L, S] or [1, S]) under the
    qparams of each range ``(lo[l], hi[l])``, summed over S."""
    scale, zero_point = obs._calculate_qparams(lo.float(), hi.float())
    x, s, z = x.expand(len(scale), -1), scale.to(x.device), zero_point.to(x.device, torch.int32)
    fq = torch.fake_quantize_per_channel_affine(x, s, z, 0, obs.quant_min, obs.quant_max)
    return ((fq - x).square() * weight).sum(1, dtype=torch.float64)


def _search(error, size: int, n: int, device) -> torch.Tensor:
    """Coarse-to-fine argmin, per row of ``n``, of ``error(index [n]) -> [n]`` over grid
    positions ``[0, size)``: every step-th position, then the neighbours of the best."""
    step = max(1, round(size**0.5))
    coarse = torch.arange(0, size, step, device=device)
    err = torch.stack([error(i.expand(n)) for i in coarse])
    offsets = torch.arange(1 - step, step, device=device)[:, None]
    index = (coarse[err.argmin(0)][None] + offsets).clamp(0, size - 1)
    err = torch.stack([error(i) for i in index])
    return index.gather(0, err.argmin(0)[None])[0]


class MSEObserver(_HistogramObserver):
    """Scales the observed range by the factor in ``[min_ratio, 1]`` (``candidates``
    geometric steps, searched coarse-to-fine) that minimises the histogram's mean squared
    quantization error; each bin's mass is spread over 4 points inside it."""

    def __init__(self, candidates: int = 100, min_ratio: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.candidates, self.min_ratio = int(candidates), float(min_ratio)

    def _range(self) -> tuple[float, float]:
        h, device = self.histogram, self.histogram.device
        alphas = _alphas(self.candidates, self.min_ratio).to(device)
        used = torch.nonzero(h).flatten()
        points = used[:, None] + torch.tensor([0.125, 0.375, 0.625, 0.875], device=device)
        points = (-self.bound.item() + points.flatten() * self._width()).float()[None]
        weight = (h[used].repeat_interleave(4) / 4).float()[None]
        lo, hi = self.min_val.reshape(1), self.max_val.reshape(1)
        error = lambda i: _fq_error(self, alphas[i] * lo, alphas[i] * hi, points, weight)
        a = alphas[_search(error, len(alphas), 1, device)].item()
        return a * lo.item(), a * hi.item()


def _thin(values: torch.Tensor, weight: torch.Tensor, k: int):
    """Shrink each row of a weighted sample to ``k`` entries: the ``k // 4`` largest |x|
    kept as they are (clipping error is all in the tail, which a uniform sample misses)
    plus a weighted random sample of the rest carrying the rest's total weight."""
    t = k // 4
    top = values.abs().topk(t, 1).indices
    g = torch.Generator().manual_seed(values.shape[1])
    keys = torch.rand(values.shape, generator=g).to(values).log() / weight  # Efraimidis-Spirakis
    keys.scatter_(1, top, float("inf"))
    keep = keys.topk(k, 1).indices
    rest = (weight.sum(1) - weight.gather(1, top).sum(1)) / (k - t)
    is_top = keys.gather(1, keep) == float("inf")
    return values.gather(1, keep), torch.where(is_top, weight.gather(1, keep), rest[:, None])


class PerChannelMSEObserver(_Checked, tao.PerChannelMinMaxObserver):
    """Per-channel MSE clipping (for weights): exact per-channel min/max plus, per
    channel, a weighted sample of ``sample_size`` values that keeps the largest quarter
    exactly (all of it when a channel has no more values than that)."""

    def __init__(self, candidates=100, min_ratio=0.01, sample_size=1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.candidates, self.min_ratio = int(candidates), float(min_ratio)
        self.sample_size = int(sample_size)
        self.register_buffer("sample", torch.zeros(0, 0))
        self.register_buffer("weight", torch.zeros(0, 0))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        super().forward(x_orig)
        if x_orig.numel() == 0:
            return x_orig
        y = torch.flatten(x_orig.detach().float().movedim(self.ch_axis, 0), 1)
        values, weight = y, torch.ones_like(y)
        if self.sample.numel():
            values, weight = torch.cat([self.sample, y], 1), torch.cat([self.weight, weight], 1)
        if values.shape[1] > self.sample_size:
            values, weight = _thin(values, weight, self.sample_size)
        self.sample, self.weight = values, weight
        return x_orig

    def _qparams(self):
        lo, hi = self.min_val, self.max_val
        grid = _alphas(self.candidates, self.min_ratio).to(lo)

        error = lambda i: _fq_error(self, grid[i] * lo, grid[i] * hi, self.sample, self.weight)
        best = grid[_search(error, len(grid), len(lo), lo.device)]
        return self._calculate_qparams(best * lo, best * hi)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("sample", "weight"):  # their width depends on what was fed
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_CLASSES = {
    ("minmax", False): MinMaxObserver,
    ("minmax", True): PerChannelMinMaxObserver,
    ("moving_average", False): MovingAverageMinMaxObserver,
    ("moving_average", True): MovingAveragePerChannelMinMaxObserver,
    ("percentile", False): PercentileObserver,
    ("entropy", False): EntropyObserver,
    ("mse", False): MSEObserver,
    ("mse", True): PerChannelMSEObserver,
}


def make_observer(
    kind: str = "minmax",
    *,
    bits: int = 8,
    signed: bool = True,
    symmetric: bool = True,
    ch_axis: int | None = None,
    **options,
) -> torch.nn.Module:
    """A calibration observer of ``kind`` (one of ``OBSERVERS``) for a ``bits``-wide
    signed/unsigned integer type; ``ch_axis`` makes it per-channel (minmax,
    moving_average, mse). ``options``: ``eps``; ``averaging_constant`` (moving_average,
    0.01); ``percentile`` (99.99); ``candidates`` (100), ``min_ratio`` (0.01) and
    ``sample_size`` (per-channel, 1024) for mse.

    >>> obs = make_observer("percentile", percentile=99.9)
    >>> _ = obs(torch.randn(1000))
    >>> scale, zero_point = obs.calculate_qparams()
    >>> make_observer("mse", bits=4, ch_axis=0)(torch.randn(8, 16)).shape
    torch.Size([8, 16])
    """
    if kind not in OBSERVERS:
        raise QuantizationError(f"unknown observer {kind!r}: choose one of {', '.join(OBSERVERS)}")
    qmin, qmax = qrange(bits, signed)
    per_channel = ch_axis is not None
    if per_channel and kind not in PER_CHANNEL:
        raise QuantizationError(
            f"observer {kind!r} is per-tensor only: per-channel quantization (ch_axis=...) "
            f"is supported by {', '.join(PER_CHANNEL)}"
        )
    if per_channel and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
        raise QuantizationError(f"ch_axis must be an integer dimension, got {ch_axis!r}")
    for name, value in options.items():
        kinds, test, what = _OPTIONS.get(name, ((), None, ""))
        if kind not in kinds:
            takes = [o for o, (ks, _, _) in _OPTIONS.items() if kind in ks]
            raise QuantizationError(
                f"observer {kind!r} takes no option {name!r}; its options are: {', '.join(takes)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise QuantizationError(f"{name}={value!r} is invalid: it must be {what}")
    if symmetric:
        qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    else:
        qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    kwargs = dict(dtype=torch.int8 if signed else torch.uint8, qscheme=qscheme, **options)
    if bits != 8:  # at 8 bits torch's defaults are the same range (and uint8's zp is 128)
        kwargs.update(quant_min=qmin, quant_max=qmax)
    if per_channel:
        kwargs["ch_axis"] = ch_axis
    with _quiet():
        return _CLASSES[kind, per_channel](**kwargs)
