"""What ``fxopt tune`` may try: the search space, and one ``Candidate`` per point in it.

A point (``Config``) is a backend (fxopt's eager artifact or ONNX Runtime on fxopt's
export), a precision (fp32, fp16, bf16), a quantization scheme (static int8 per channel or
per tensor, dynamic int8), the layers that stay float, a pruning ratio and a thread count.
Each point becomes a ``fxopt.bench.candidates.Candidate`` whose pipeline text is what the
recipe replays, e.g. ``"prune(ratio=0.25),default,quantize(scheme=int8,target=ort,
per_channel=true,skip=['fc'])"``.

The space is pruned by what the model is, not by a guess about speed: dynamic int8 only
where linear layers carry a real share of the MACs (it quantizes nothing else), static
int8 only in ONNX Runtime (fxopt's eager artifact runs fake-quant in float, which can only
be slower). Everything left is measured.

Example::

    space = Space(runtimes=("onnx",), prune=0.0)
    configs = initial_configs(model, inputs, space)
    [c.candidate().name for c in configs]     # ['onnx-fp32', 'onnx-int8', ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fxopt.errors import SpecError

QUANT = ("none", "int8", "int8-pt", "dynamic")
PRECISIONS = ("fp32", "fp16", "bf16")
RUNTIMES = ("eager", "onnx")


@dataclass(frozen=True)
class Space:
    """The search space. ``runtimes``: ``eager`` and/or ``onnx``; ``quant``: schemes to
    try (``int8`` static per-channel, ``int8-pt`` static per-tensor, ``dynamic``);
    ``precisions``: float precisions besides fp32 (``fp16``, ``bf16``); ``prune``: the
    largest pruning ratio to try (0 turns pruning off) and ``prune_steps`` bisection steps
    below it; ``max_float_layers``: how many of the most sensitive layers static int8 may
    return to float; ``threads``: intra-op thread counts to time (``None``: the current
    torch setting); ``min_linear_share``: dynamic int8 is tried only when linear layers
    hold at least this share of the MACs; ``plain``: also try ONNX Runtime on the plain
    ``torch.onnx.export`` of the model as given (no fxopt pass: where nothing fxopt does
    pays, that is the honest answer).

    Example::

        Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0)
    """

    runtimes: tuple[str, ...] = RUNTIMES
    quant: tuple[str, ...] = ("int8", "int8-pt", "dynamic")
    precisions: tuple[str, ...] = ("fp16", "bf16")
    prune: float = 0.5
    prune_steps: int = 3
    max_float_layers: int = 8
    threads: tuple[int | None, ...] = (None,)
    min_linear_share: float = 0.2
    plain: bool = True

    def __post_init__(self) -> None:
        for name, values, known in (("runtimes", self.runtimes, RUNTIMES),
                                    ("quant", self.quant, QUANT),
                                    ("precisions", self.precisions, PRECISIONS)):
            bad = [v for v in values if v not in known]
            if bad:
                raise SpecError(f"Space.{name}: unknown {', '.join(map(repr, bad))}; "
                                f"use {', '.join(known)}")
        if not self.runtimes:
            raise SpecError("Space.runtimes is empty: name at least one of eager, onnx")
        if not 0 <= self.prune < 1:
            raise SpecError(f"Space.prune is the largest ratio to try, in [0, 1), "
                            f"not {self.prune!r}")
        if self.prune_steps < 1 or self.max_float_layers < 0:
            raise SpecError("Space.prune_steps must be >= 1 and max_float_layers >= 0")
        if not self.threads or any(t is not None and (not isinstance(t, int) or t < 1)
                                   for t in self.threads):
            raise SpecError(f"Space.threads: positive integers (or None), not {self.threads!r}")


@dataclass(frozen=True)
class Config:
    """One point of the space; ``candidate()`` is what ``fxopt.bench`` builds and times.

    Example::

        Config("onnx", quant="int8").pipeline()
        # "default,quantize(scheme=int8,target=ort,per_channel=true)"
    """

    runtime: str
    precision: str = "fp32"
    quant: str = "none"
    float_layers: tuple[str, ...] = ()
    prune: float = 0.0
    threads: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())  # quantize pass options
    baseline: str | None = None  # "plain-export": the model as given, exported plainly
    # finetune stage options (the fine-tuned twin of a lossy config): after static int8
    # (QAT through the fake-quant graph, frozen back to Q/DQ), before dynamic int8 (whose
    # int8 weights cannot train), after pruning otherwise
    finetune: tuple[tuple[str, Any], ...] = field(default=())

    def pipeline(self) -> str | None:
        if self.baseline is not None:
            return None
        stages = []
        if self.prune > 0:
            stages.append(f"prune(ratio={self.prune:g})")
        stages.append("default")
        ft = "finetune(" + ",".join(f"{k}={_arg(v)}" for k, v in self.finetune) + ")"
        if self.finetune and not self.quant.startswith("int8"):
            stages.append(ft)
        if self.quant != "none":
            args = {"int8": "scheme=int8,target=ort,per_channel=true",
                    "int8-pt": "scheme=int8,target=ort,per_channel=false",
                    "dynamic": "scheme=dynamic_int8"}[self.quant]
            if self.float_layers:
                args += ",skip=[" + ",".join(_quote(n) for n in self.float_layers) + "]"
            for k, v in self.extra:
                args += f",{k}={v:g}" if isinstance(v, float) else f",{k}={v}"
            stages.append(f"quantize({args})")
        if self.finetune and self.quant.startswith("int8"):
            stages.append(ft)
        if self.precision != "fp32":
            stages.append(f"half(dtype={self.precision})")
        return ",".join(stages)

    @property
    def name(self) -> str:
        if self.baseline is not None:
            return f"{self.runtime}-plain" + (f"@{self.threads}t" if self.threads else "")
        label = self.quant if self.quant != "none" else self.precision
        if self.quant != "none" and self.precision != "fp32":
            label += f"-{self.precision}"
        name = f"{self.runtime}-{label}"
        if self.float_layers:
            name += f"+float{len(self.float_layers)}"
        if any(k == "budget" for k, _ in self.extra):
            name += "+fallback"
        if self.finetune:
            name += "+ft"
        if self.prune > 0:
            name = f"prune{self.prune:g}-{name}"
        if self.threads is not None:
            name += f"@{self.threads}t"
        return name

    def candidate(self) -> Any:
        from fxopt.bench.candidates import Candidate

        options = (("threads", self.threads),) if self.threads is not None else ()
        if self.runtime == "onnx":
            # the tuned file must take any batch (val_data batches, the user's deployment),
            # not only the example's: fxopt bench's ONNX candidates default to static shapes
            options = tuple(sorted((*options, ("dynamic_batch", True))))
        return Candidate(name=self.name, runtime=self.runtime, pipeline=self.pipeline(),
                         baseline=self.baseline, options=options)

    def simplicity(self) -> int:
        """Passes beyond the default pipeline (fewer is simpler; ties go to the simpler)."""
        if self.baseline is not None:
            return 0  # no pass at all
        return 1 + (self.prune > 0) + (self.quant != "none") + (self.precision != "fp32") \
            + bool(self.finetune) + len(self.float_layers) / 100 + (self.runtime == "onnx") / 1000

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)


def _arg(v: Any) -> str:
    """A finetune stage argument as pipeline spec text."""
    if v is None or isinstance(v, bool):
        return {None: "none", True: "true", False: "false"}[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


def _quote(name: str) -> str:
    if "'" in name:
        raise SpecError(f"layer name {name!r} cannot be written in a pipeline spec")
    return f"'{name}'"


def linear_mac_share(gm: Any) -> float:
    """Share of the graph's MACs in layers dynamic int8 quantizes (0.0 when none)."""
    from fxopt.ops import op_of
    from fxopt.quant.dynamic import candidate_layers

    total = 0
    for node in gm.graph.nodes:
        if node.op.startswith("call"):
            total += op_of(node).macs() or 0
    linear = sum(op_of(n).macs() or 0 for n in candidate_layers(gm))
    return linear / total if total else 0.0


def initial_configs(share: float, space: Space) -> tuple[list[Config], list[tuple[str, str]]]:
    """The first round of configs (no pruning, no float fallback), simplest first, and
    ``(config name, why it was left out)`` for the ones the model's shape rules out.
    ``share``: ``linear_mac_share`` of the captured model."""
    configs: list[Config] = []
    skipped: list[tuple[str, str]] = []
    if space.plain and "onnx" in space.runtimes:
        configs.append(Config("onnx", baseline="plain-export"))
    for runtime in space.runtimes:
        configs.append(Config(runtime))
        for precision in space.precisions:
            if runtime == "onnx" and precision == "bf16":
                skipped.append((f"onnx-{precision}", "ONNX Runtime's CPU provider has no "
                                "bf16 kernels for conv / matmul"))
                continue
            configs.append(Config(runtime, precision=precision))
        for quant in space.quant:
            if quant.startswith("int8") and runtime == "eager":
                skipped.append((f"eager-{quant}", "fxopt's eager artifact runs static "
                                "int8 as fake-quant in float: never faster than fp32"))
                continue
            if quant == "dynamic" and share < space.min_linear_share:
                skipped.append((f"{runtime}-dynamic", f"linear layers hold {share:.0%} of "
                                f"the MACs (< {space.min_linear_share:.0%}): dynamic int8 "
                                "quantizes only those"))
                continue
            configs.append(Config(runtime, quant=quant))
    return configs, skipped


def with_threads(configs: Sequence[Config], space: Space) -> list[Config]:
    """Every config at every thread count of the space."""
    return [c.with_(threads=t) for c in configs for t in space.threads]


__all__ = ["PRECISIONS", "QUANT", "RUNTIMES", "Config", "Space", "initial_configs",
           "linear_mac_share", "with_threads"]
