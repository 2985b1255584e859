"""Benchmark scenario files (the YAML of ../shared/contracts/bench.md), strictly validated.

Every problem raises `ScenarioError` whose one-line message starts with the
field path, e.g. ``workload[1].synthetic.arrival.rate_rps: must be > 0, got -3``.
Unknown keys are errors; paths are relative to the scenario file; the
calibration rows and trace files are read at load time, so a scenario that
loads is a scenario that runs.

Optional keys and their defaults (the contract's example spells them all
out): ``engine.tp`` (the only tp in the calibration rows), ``engine.slowdown``
1.0, ``engine.runtime_tunable`` false, ``engine.shared_kv_cache`` false
(true for llama.cpp's unified cache: see sim/engine.py), ``replicas`` 1, ``control_interval_s``
30, a trace phase's ``start_s`` 0 and ``rate_scale`` 1.0, ``cv`` 1.0 for a
gamma arrival process (``poisson`` takes no cv).

SLO classes (our extension of the contract, docs/benchmark.md "Classes"): an
optional top-level ``classes`` list, each class with a ``name``, a
``priority`` (default 0), a ``weight`` (default 1), an optional ``slo``
(no looser than the top-level ``slo``, which is the default class's), an
optional ``max_concurrency`` and its own ``workload`` of phases, played from
t = 0 beside the other classes'. With classes the top-level ``workload`` is
optional: it is the traffic of the default class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchpilot.contract.errors import FieldError
from batchpilot.contract.knobs import (
    CLASS_NAME,
    CLASS_PRIORITY_LIMIT,
    DEFAULT_CLASS,
    MAX_CLASS_WEIGHT,
    MAX_CLASSES,
    MAX_CONCURRENCY_LIMIT,
)
from batchpilot.sim.calibration import CalibrationError, StepCostModel, fit_file
from batchpilot.sim.engine import EngineConfig
from batchpilot.sim.workload import TraceError, load_trace

ARRIVAL_PROCESSES = ("poisson", "gamma")
LENGTH_DISTS = ("lognormal",)


class ScenarioError(FieldError):
    """A scenario file is invalid; `field` is the path of the offending key."""


@dataclass(frozen=True)
class ScenarioEngine:
    calibration: Path
    model: str
    system: str
    tp: int
    slowdown: float
    kv_cache_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    runtime_tunable: bool
    shared_kv_cache: bool
    cost: StepCostModel

    def config(self) -> EngineConfig:
        return EngineConfig(
            cost=self.cost,
            kv_cache_tokens=self.kv_cache_tokens,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            runtime_tunable=self.runtime_tunable,
            slowdown=self.slowdown,
            shared_kv_cache=self.shared_kv_cache,
        )


@dataclass(frozen=True)
class ScenarioSlo:
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class TracePhase:
    duration_s: float
    trace: Path
    start_s: float
    rate_scale: float


@dataclass(frozen=True)
class Arrival:
    process: str
    rate_rps: float
    cv: float


@dataclass(frozen=True)
class LengthDist:
    dist: str
    p50: float
    p90: float
    max: int


@dataclass(frozen=True)
class SyntheticPhase:
    duration_s: float
    arrival: Arrival
    prompt_tokens: LengthDist
    output_tokens: LengthDist


Phase = TracePhase | SyntheticPhase


@dataclass(frozen=True)
class ScenarioClass:
    """One SLO class of a scenario: its gate settings, objectives and own traffic."""

    name: str
    priority: int
    weight: float
    slo: ScenarioSlo
    max_concurrency: int | None
    workload: tuple[Phase, ...]

    @property
    def duration_s(self) -> float:
        return sum(phase.duration_s for phase in self.workload)


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    engine: ScenarioEngine
    replicas: int
    slo: ScenarioSlo
    control_interval_s: float
    # The default class's phases; empty only when `classes` carry all the traffic.
    workload: tuple[Phase, ...]
    source: Path | None = None
    # SLO classes (empty: one class, every request in the default class).
    classes: tuple[ScenarioClass, ...] = ()

    @property
    def duration_s(self) -> float:
        """The longest class's phases (the default class's without classes)."""
        own = sum(phase.duration_s for phase in self.workload)
        return max([own, *(c.duration_s for c in self.classes)])

    @property
    def traffic_classes(self) -> tuple[ScenarioClass, ...]:
        """Every class with traffic: the default class first (when it has phases), then `classes`."""
        if not self.classes:
            return (self.default_class,)
        own = (self.default_class,) if self.workload else ()
        return (*own, *self.classes)

    @property
    def default_class(self) -> ScenarioClass:
        """The implicit default class: the top-level slo and workload, priority 0, weight 1."""
        return ScenarioClass(DEFAULT_CLASS, 0, 1.0, self.slo, None, self.workload)

    def slo_of(self, name: str) -> ScenarioSlo:
        """A class's objectives (the top-level slo for the default class or an unknown name)."""
        for service_class in self.classes:
            if service_class.name == name:
                return service_class.slo
        return self.slo

    @property
    def replica_names(self) -> tuple[str, ...]:
        return tuple(f"replica-{i}" for i in range(self.replicas))


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; every failure is a ScenarioError."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ScenarioError("", f"cannot read scenario file {path} ({err.strerror})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "unparsable"
        raise ScenarioError("", f"invalid YAML{where}: {problem}") from err
    return parse_scenario(data, base_dir=path.parent, source=path)


def parse_scenario(data: Any, *, base_dir: Path, source: Path | None = None) -> Scenario:
    top = _Section(data, "")
    name = top.string("name")
    seed = top.integer("seed", minimum=0)
    engine = _parse_engine(top.section("engine"), base_dir)
    replicas = top.integer("replicas", minimum=1, default=1)
    slo_section = top.section("slo")
    slo = ScenarioSlo(
        ttft_ms=slo_section.number("ttft_ms", positive=True),
        tpot_ms=slo_section.number("tpot_ms", positive=True),
    )
    slo_section.finish()
    control_interval_s = top.number("control_interval_s", positive=True, default=30.0)
    classes = _parse_classes(top, slo, base_dir)
    phases = _parse_phases(top, "workload", base_dir, required=not classes)
    top.finish()
    return Scenario(
        name=name,
        seed=seed,
        engine=engine,
        replicas=replicas,
        slo=slo,
        control_interval_s=control_interval_s,
        workload=phases,
        source=source,
        classes=classes,
    )


def _parse_phases(
    section: _Section, key: str, base_dir: Path, *, required: bool = True
) -> tuple[Phase, ...]:
    if not required and key not in section.keys:
        section.value(key, None)
        return ()
    phases_raw = section.value(key)
    where = section.path_of(key)
    if not isinstance(phases_raw, list) or not phases_raw:
        raise ScenarioError(where, f"must be a non-empty list of phases, got {_show(phases_raw)}")
    return tuple(
        _parse_phase(_Section(raw, f"{where}[{i}]"), base_dir) for i, raw in enumerate(phases_raw)
    )


def _parse_classes(top: _Section, slo: ScenarioSlo, base_dir: Path) -> tuple[ScenarioClass, ...]:
    raw = top.value("classes", None)
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ScenarioError("classes", f"must be a non-empty list of classes, got {_show(raw)}")
    # The default class exists besides the declared ones (contract.knobs).
    if len(raw) > MAX_CLASSES - 1:
        raise ScenarioError("classes", f"at most {MAX_CLASSES - 1} classes, got {len(raw)}")
    classes: list[ScenarioClass] = []
    for index, item in enumerate(raw):
        section = _Section(item, f"classes[{index}]")
        name = section.string("name")
        if not CLASS_NAME.fullmatch(name):
            raise ScenarioError(
                section.path_of("name"),
                "must be 1-32 lower-case letters, digits and dashes, starting and ending with "
                f"a letter or digit, got {name!r}",
            )
        if name == DEFAULT_CLASS:
            raise ScenarioError(
                section.path_of("name"),
                f"{DEFAULT_CLASS!r} is the top-level slo and workload's class; pick another name",
            )
        if any(c.name == name for c in classes):
            raise ScenarioError(section.path_of("name"), f"{name!r} is declared twice")
        priority = section.integer("priority", minimum=-CLASS_PRIORITY_LIMIT, default=0)
        if priority > CLASS_PRIORITY_LIMIT:
            raise ScenarioError(
                section.path_of("priority"), f"must be <= {CLASS_PRIORITY_LIMIT}, got {priority}"
            )
        weight = section.number("weight", positive=True, default=1.0)
        if weight > MAX_CLASS_WEIGHT:
            raise ScenarioError(
                section.path_of("weight"), f"must be <= {MAX_CLASS_WEIGHT:g}, got {weight}"
            )
        class_slo = _parse_class_slo(section, slo)
        cap = section.integer("max_concurrency", minimum=1, default=None)
        if cap is not None and cap > MAX_CONCURRENCY_LIMIT:
            raise ScenarioError(
                section.path_of("max_concurrency"),
                f"must be <= {MAX_CONCURRENCY_LIMIT}, got {cap}",
            )
        phases = _parse_phases(section, "workload", base_dir)
        section.finish()
        classes.append(ScenarioClass(name, priority, weight, class_slo, cap, phases))
    return tuple(classes)


def _parse_class_slo(section: _Section, default: ScenarioSlo) -> ScenarioSlo:
    if "slo" not in section.keys:
        section.value("slo", None)
        return default
    slo_section = section.section("slo")
    values = {}
    for key in ("ttft_ms", "tpot_ms"):
        value = slo_section.number(key, positive=True, default=getattr(default, key))
        if value > getattr(default, key):
            raise ScenarioError(
                slo_section.path_of(key),
                f"must be <= the top-level slo.{key} ({getattr(default, key):g}), which is the "
                f"default class's and the loosest, got {value:g}",
            )
        values[key] = value
    slo_section.finish()
    return ScenarioSlo(**values)


def _parse_engine(section: _Section, base_dir: Path) -> ScenarioEngine:
    calibration = section.path("calibration", base_dir)
    model = section.string("model")
    system = section.string("system")
    tp = section.integer("tp", minimum=1, default=None)
    slowdown = section.number("slowdown", positive=True, default=1.0)
    kv_cache_tokens = section.integer("kv_cache_tokens", minimum=16)
    max_num_seqs = section.integer("max_num_seqs", minimum=1)
    max_num_batched_tokens = section.integer("max_num_batched_tokens", minimum=1)
    runtime_tunable = section.boolean("runtime_tunable", default=False)
    shared_kv_cache = section.boolean("shared_kv_cache", default=False)
    section.finish()
    if max_num_batched_tokens < max_num_seqs:
        # vLLM refuses to start this way: each running decode needs a token of the budget.
        raise ScenarioError(
            "engine.max_num_batched_tokens",
            f"must be >= engine.max_num_seqs ({max_num_seqs}), got {max_num_batched_tokens}",
        )
    try:
        fitted = fit_file(calibration, model, system, tp, shared_kv_cache=shared_kv_cache)
    except CalibrationError as err:
        raise ScenarioError(f"engine.{err.field or 'calibration'}", str(err)) from err
    return ScenarioEngine(
        calibration=calibration,
        model=model,
        system=system,
        tp=fitted.tp,
        slowdown=slowdown,
        kv_cache_tokens=kv_cache_tokens,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        runtime_tunable=runtime_tunable,
        shared_kv_cache=shared_kv_cache,
        cost=fitted.cost,
    )


def _parse_phase(section: _Section, base_dir: Path) -> Phase:
    duration_s = section.number("duration_s", positive=True)
    has_trace = "trace" in section.keys
    has_synthetic = "synthetic" in section.keys
    if has_trace == has_synthetic:
        raise ScenarioError(section.path_of(""), "needs exactly one of `trace` or `synthetic`")
    if has_trace:
        trace_path = section.path("trace", base_dir)
        start_s = section.number("start_s", minimum=0.0, default=0.0)
        rate_scale = section.number("rate_scale", positive=True, default=1.0)
        section.finish()
        try:
            trace = load_trace(trace_path)
        except TraceError as err:
            raise ScenarioError(section.path_of("trace"), str(err)) from err
        if start_s > trace.span_s:
            raise ScenarioError(
                section.path_of("start_s"),
                f"must be <= the trace's span ({trace.span_s:.1f} s), got {start_s}",
            )
        return TracePhase(duration_s, trace_path, start_s, rate_scale)
    synthetic = section.section("synthetic")
    section.finish()
    arrival_section = synthetic.section("arrival")
    process = arrival_section.choice("process", ARRIVAL_PROCESSES)
    rate_rps = arrival_section.number("rate_rps", positive=True)
    # poisson is gamma with cv 1; a `cv` key under poisson is rejected as unknown
    cv = arrival_section.number("cv", positive=True, default=1.0) if process == "gamma" else 1.0
    arrival_section.finish()
    prompt = _parse_lengths(synthetic.section("prompt_tokens"))
    output = _parse_lengths(synthetic.section("output_tokens"))
    synthetic.finish()
    return SyntheticPhase(duration_s, Arrival(process, rate_rps, cv), prompt, output)


def _parse_lengths(section: _Section) -> LengthDist:
    dist = section.choice("dist", LENGTH_DISTS)
    p50 = section.number("p50", positive=True)
    p90 = section.number("p90", positive=True)
    if p90 < p50:
        raise ScenarioError(section.path_of("p90"), f"must be >= p50 ({p50}), got {p90}")
    maximum = section.integer("max", minimum=1)
    if maximum < p50:
        raise ScenarioError(section.path_of("max"), f"must be >= p50 ({p50}), got {maximum}")
    section.finish()
    return LengthDist(dist, p50, p90, maximum)


_REQUIRED = object()


class _Section:
    """One mapping of the file; remembers which keys were read so the rest are unknown."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ScenarioError(path or "<file>", f"must be a mapping, got {_show(data)}")
        self._data = data
        self._path = path
        self._used: set[str] = set()
        self.keys = frozenset(str(k) for k in data)

    def path_of(self, key: str) -> str:
        if not key:
            return self._path
        return f"{self._path}.{key}" if self._path else key

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        self._used.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise ScenarioError(self.path_of(key), "is required")
            return default
        return self._data[key]

    def section(self, key: str) -> _Section:
        return _Section(self.value(key), self.path_of(key))

    def string(self, key: str) -> str:
        value = self.value(key)
        if not isinstance(value, str) or not value.strip():
            raise ScenarioError(
                self.path_of(key), f"must be a non-empty string, got {_show(value)}"
            )
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.value(key)
        if value not in options:
            raise ScenarioError(
                self.path_of(key), f"must be one of {', '.join(options)}, got {_show(value)}"
            )
        return str(value)

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise ScenarioError(self.path_of(key), f"must be true or false, got {_show(value)}")
        return value

    def integer(self, key: str, *, minimum: int, default: Any = _REQUIRED) -> Any:
        value = self.value(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(self.path_of(key), f"must be an integer, got {_show(value)}")
        if value < minimum:
            raise ScenarioError(self.path_of(key), f"must be >= {minimum}, got {value}")
        return value

    def number(
        self,
        key: str,
        *,
        positive: bool = False,
        minimum: float | None = None,
        default: Any = _REQUIRED,
    ) -> float:
        value = self.value(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ScenarioError(self.path_of(key), f"must be a finite number, got {_show(value)}")
        if positive and value <= 0:
            raise ScenarioError(self.path_of(key), f"must be > 0, got {value}")
        if minimum is not None and value < minimum:
            raise ScenarioError(self.path_of(key), f"must be >= {minimum}, got {value}")
        return float(value)

    def path(self, key: str, base_dir: Path) -> Path:
        resolved = (base_dir / self.string(key)).resolve()
        if not resolved.is_file():
            raise ScenarioError(self.path_of(key), f"file not found: {resolved}")
        return resolved

    def finish(self) -> None:
        unknown = sorted(self.keys - self._used)
        if unknown:
            known = ", ".join(sorted(self._used))
            raise ScenarioError(self.path_of(unknown[0]), f"unknown key (known here: {known})")


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)
