"""PromQL for one policy: one query per signal, aggregated `by (pod)`.

Every query selects the policy's pods with a single regex matcher, never one
query per pod, so a 64-pod policy costs the same ~20 queries as a 1-pod one:

    sum by (pod) (rate(vllm:prompt_tokens_total{namespace="ns",pod=~"a|b"}[60s]))

User-supplied strings (namespace, pod names, override label values) only
ever appear inside string literals, escaped twice where needed: pod names are
regex-escaped (they are alternatives of a regex) and then string-escaped (the
regex is a PromQL string). Label and metric NAMES cannot be escaped in
PromQL, so they are validated against Prometheus' grammar instead
(policy.LABEL_NAME_RE / METRIC_NAME_RE). Together no pod name or label value
can end the literal and change the query.

Histograms need their `_sum` rate (for the mean) as well as their buckets;
both come back from ONE query by appending the sum as a pseudo-bucket
`le="sum"` with `or label_replace(...)`.

A per-class signal (a policy with SLO classes) is grouped by the gate's
`class` label as well, still one query for every pod and class:

    sum by (pod, class, le) (rate(batchpilot_gate_class_time_to_first_token_seconds_bucket{...}[60s]))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from batchpilot.controller.policy import LABEL_NAME_RE, METRIC_NAME_RE, MetricsSpec, PolicyError
from batchpilot.controller.signals import Kind, Signal, SignalSpec

SUM_PSEUDO_BUCKET = "sum"


def escape_string(value: str) -> str:
    """The body of a PromQL double-quoted string literal holding `value` exactly."""
    out: list[str] = []
    for char in value:
        if char == "\\":
            out.append("\\\\")
        elif char == '"':
            out.append('\\"')
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # Control characters (newlines, NUL) as hex escapes: they stay in
            # the value and can never end a line of the query.
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


# The characters RE2 (Prometheus' regex engine) gives a meaning outside a
# character class; every other printable character stands for itself.
_RE2_METACHARACTERS = frozenset(r"\.+*?()|[]{}^$")


def escape_regex(value: str) -> str:
    """An RE2 pattern that matches exactly the literal `value`.

    Only metacharacters are escaped: Prometheus (2.x) looks a regex of
    literal alternatives up as a set of label values, which keeps a
    `pod=~"a|b|c"` matcher's cost independent of how many pods Prometheus
    holds, but it gives up on any escape it does not know, such as a
    backslash before `-`, and then matches the regex against every pod name
    it has.
    """
    out: list[str] = []
    for char in value:
        if char in _RE2_METACHARACTERS:
            # RE2 and Python's `re` both read a backslash before ASCII
            # punctuation as that literal character.
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def check_label_name(name: str) -> str:
    if not isinstance(name, str) or not LABEL_NAME_RE.fullmatch(name):
        raise PolicyError(
            "label", f"{name!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        )
    return name


def check_metric_name(name: str) -> str:
    if not isinstance(name, str) or not METRIC_NAME_RE.fullmatch(name):
        raise PolicyError(
            "metric", f"{name!r} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        )
    return name


def selector(equal: Iterable[tuple[str, str]], regex: Iterable[tuple[str, str]] = ()) -> str:
    """`{a="x",b=~"y"}` with every name validated and every value escaped."""
    parts = [f'{check_label_name(name)}="{escape_string(value)}"' for name, value in equal]
    parts += [f'{check_label_name(name)}=~"{escape_string(pattern)}"' for name, pattern in regex]
    return "{" + ",".join(parts) + "}"


def pods_regex(pods: Sequence[str]) -> str:
    """Alternation matching exactly these pod names (PromQL anchors regex matchers)."""
    return "|".join(escape_regex(pod) for pod in sorted(set(pods)))


def duration(seconds: float) -> str:
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


class QueryBuilder:
    """Builds the per-signal queries of one policy over one pod set."""

    def __init__(self, metrics: MetricsSpec, namespace: str) -> None:
        self._pod_label = check_label_name(metrics.pod_label)
        self._namespace_label = check_label_name(metrics.namespace_label)
        self._namespace = namespace
        self._window = duration(metrics.window_s)

    def query(self, spec: SignalSpec, pods: Sequence[str]) -> str:
        if not pods:
            raise ValueError("a query needs at least one pod")
        metric = spec.metric
        name = check_metric_name(metric.metric)
        sel = selector(
            ((self._namespace_label, self._namespace), *metric.labels),
            ((self._pod_label, pods_regex(pods)),),
        )
        window = self._window
        # A per-class signal is grouped by its label too: `pod, class`.
        pod = self._pod_label
        if spec.grouped:
            pod = f"{pod}, {check_label_name(spec.by_label or '')}"
        if spec.kind is Kind.COUNTER:
            return f"sum by ({pod}) (rate({name}{sel}[{window}]))"
        if spec.kind is Kind.GAUGE_SUM:
            return f"sum by ({pod}) (avg_over_time({name}{sel}[{window}]))"
        if spec.kind is Kind.GAUGE_MAX:
            return f"max by ({pod}) (avg_over_time({name}{sel}[{window}]))"
        if spec.kind is Kind.LABELLED:
            label = check_label_name(spec.by_label or "")
            return f"max by ({pod}, {label}) (last_over_time({name}{sel}[{window}]))"
        return (
            f"sum by ({pod}, le) (rate({name}_bucket{sel}[{window}]))"
            f" or label_replace(sum by ({pod}) (rate({name}_sum{sel}[{window}])),"
            f' "le", "{SUM_PSEUDO_BUCKET}", "", "")'
        )

    def queries(self, specs: Mapping[Signal, SignalSpec], pods: Sequence[str]) -> dict[Signal, str]:
        return {signal: self.query(spec, pods) for signal, spec in specs.items()}
