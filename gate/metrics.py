"""The gate's Prometheus metrics: binding names, shared with the simulator's gate model.

The controller reads the same series from a real gate and from the
simulator, so the names, types and labels here are a contract: change them
only together with the controller's queries.

`reason` values: shed_total{reason="queue_deadline"} (429 at the queue
deadline); failed_total{reason=...}: upstream_4xx / upstream_5xx (the
engine's error status, passed through), upstream_unreachable (502 from the
gate), upstream_stream_broken (the engine cut a stream; the gate cuts the
client's too), client_disconnect (the client left after admission, or its
stream was still open when the shutdown grace period ended), native_apply (an
engine-native knob change was rejected or failed; not a request).
upstream_retries_total{reason=...}: requests sent to the engine a second time,
on a new connection, because the pooled keep-alive connection the first
attempt went out on turned out to be closed by the engine before any byte of
an answer came back (see proxy.py): server_disconnected (the engine closed
it), socket_error (a reset, or the request could not be written). Each one is
a request that would otherwise have failed as upstream_unreachable; a retry
that fails too is counted there as well.

retried_requests_total{outcome=...}: generation requests that a client SDK
marked as its own retry of a request it sent before (`x-stainless-retry-count`
of 1 or more; the openai and anthropic SDKs resend a 429 twice by default,
after `Retry-After`), by what the gate did with them: admitted or shed. Each
one is counted in admitted_total or shed_total too, so
shed_total - retried_requests_total{outcome="shed"} counts first attempts
shed, i.e. distinct requests that met a full queue. A label of two values,
not the retry count: the count is whatever a client sends.

time_per_output_token_seconds: per streamed request that ended cleanly with
at least two token events, (last event - first event) / (events - 1), timed
as the engine's SSE `data:` events reach the gate; `data: [DONE]` is not an
event. Engines send one token per event, but also a few events without one
(llama-server's closing event with finish_reason and timings, a chat stream's
opening role event): each such event counts as a token, which biases the
value low by at most about 2 / (tokens - 1); they arrive with the first or
last token, so the time span is unaffected.

prompt_tokens / output_tokens: request lengths, for engines that export none
(llama-server): the prompt as the gate sized it at admission (estimate.py:
exact for token ids and the x-prompt-tokens header, characters / 4 for text),
the output as the token events of a streamed answer that ended cleanly
(counted as above, so llama-server's closing event adds one).

State gauges (queue length, in-flight, knobs, version) are read from the
gate at scrape time instead of being set on every request, so the request
path pays only for a few integer increments.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import fields

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from batchpilot.controller.knobs import DISCIPLINES, Knobs
from batchpilot.gate.admission import AdmissionQueue

QUEUE_LENGTH = "batchpilot_gate_queue_length"
INFLIGHT_REQUESTS = "batchpilot_gate_inflight_requests"
INFLIGHT_TOKENS = "batchpilot_gate_inflight_tokens"
QUEUE_WAIT_SECONDS = "batchpilot_gate_queue_wait_seconds"
TIME_TO_FIRST_TOKEN_SECONDS = "batchpilot_gate_time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN_SECONDS = "batchpilot_gate_time_per_output_token_seconds"
PROMPT_TOKENS = "batchpilot_gate_prompt_tokens"
OUTPUT_TOKENS = "batchpilot_gate_output_tokens"
ADMITTED_TOTAL = "batchpilot_gate_admitted_total"
SHED_TOTAL = "batchpilot_gate_shed_total"
FAILED_TOTAL = "batchpilot_gate_failed_total"
UPSTREAM_RETRIES_TOTAL = "batchpilot_gate_upstream_retries_total"
RETRIED_REQUESTS_TOTAL = "batchpilot_gate_retried_requests_total"
KNOB = "batchpilot_gate_knob"
DISCIPLINE = "batchpilot_gate_discipline"
CONFIG_VERSION = "batchpilot_gate_config_version"

# vLLM's own buckets for vllm:time_to_first_token_seconds, so gate and engine
# quantiles computed with histogram_quantile() share their resolution.
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)

# vLLM's buckets for vllm:time_per_output_token_seconds, with finer low ones:
# a small model on a fast engine (or the CPU test engine) decodes in a few ms.
TPOT_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)

# vLLM's token-count buckets (1, 2, 5, 10, ... up to 131,072 tokens of context).
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5) if m * 10**e <= 131_072)

# `reason` label values, pre-created at zero so rate() works from the first
# scrape and a dashboard shows every reason even before it happens.
SHED_QUEUE_DEADLINE = "queue_deadline"
SHED_REASONS = (SHED_QUEUE_DEADLINE,)
FAILED_UPSTREAM_4XX = "upstream_4xx"
FAILED_UPSTREAM_5XX = "upstream_5xx"
FAILED_UPSTREAM_UNREACHABLE = "upstream_unreachable"
FAILED_UPSTREAM_STREAM_BROKEN = "upstream_stream_broken"
FAILED_CLIENT_DISCONNECT = "client_disconnect"
# Not a request: a native engine adapter failed to apply a knob change.
FAILED_NATIVE_APPLY = "native_apply"
FAILED_REASONS = (
    FAILED_UPSTREAM_4XX,
    FAILED_UPSTREAM_5XX,
    FAILED_UPSTREAM_UNREACHABLE,
    FAILED_UPSTREAM_STREAM_BROKEN,
    FAILED_CLIENT_DISCONNECT,
    FAILED_NATIVE_APPLY,
)
RETRY_SERVER_DISCONNECTED = "server_disconnected"
RETRY_SOCKET_ERROR = "socket_error"
RETRY_REASONS = (RETRY_SERVER_DISCONNECTED, RETRY_SOCKET_ERROR)
RETRIED_ADMITTED = "admitted"
RETRIED_SHED = "shed"
RETRIED_OUTCOMES = (RETRIED_ADMITTED, RETRIED_SHED)

# Numeric Knobs fields, exported as batchpilot_gate_knob{knob=...}.
NUMERIC_KNOBS = tuple(f.name for f in fields(Knobs) if f.name != "discipline")


class Histogram:
    """Cumulative-bucket histogram kept as plain numbers (one event loop, no lock needed)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = list(itertools.accumulate(self.counts))
        buckets = [
            (floatToGoString(bound), count)  # type: ignore[no-untyped-call]
            for bound, count in zip((*self.bounds, math.inf), cumulative, strict=True)
        ]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class GateMetrics(Collector):
    """Everything the gate exports, collected at scrape time.

    Counters and histograms are plain numbers updated on the event loop;
    prometheus_client's own metric objects would add a lock per update and
    `_created` series that are not part of the contract.
    """

    def __init__(
        self,
        queue: Callable[[], AdmissionQueue],
        config_version: Callable[[], int],
    ) -> None:
        self._queue = queue
        self._config_version = config_version
        self.queue_wait = Histogram(TTFT_BUCKETS_S)
        self.time_to_first_token = Histogram(TTFT_BUCKETS_S)
        self.time_per_output_token = Histogram(TPOT_BUCKETS_S)
        self.prompt_tokens = Histogram(TOKEN_BUCKETS)
        self.output_tokens = Histogram(TOKEN_BUCKETS)
        self.admitted = 0
        self.shed = dict.fromkeys(SHED_REASONS, 0)
        self.failed = dict.fromkeys(FAILED_REASONS, 0)
        self.upstream_retries = dict.fromkeys(RETRY_REASONS, 0)
        self.retried_requests = dict.fromkeys(RETRIED_OUTCOMES, 0)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        queue = self._queue()
        knobs = queue.knobs
        yield GaugeMetricFamily(QUEUE_LENGTH, "Requests waiting in the gate.", value=queue.queued)
        yield GaugeMetricFamily(
            INFLIGHT_REQUESTS, "Requests admitted and not finished.", value=queue.in_flight
        )
        yield GaugeMetricFamily(
            INFLIGHT_TOKENS,
            "Prompt + requested output tokens of the admitted requests.",
            value=queue.inflight_tokens,
        )
        yield self.queue_wait.family(
            QUEUE_WAIT_SECONDS, "Time a request waited in the gate's queue before admission."
        )
        yield self.time_to_first_token.family(
            TIME_TO_FIRST_TOKEN_SECONDS,
            "Arrival at the gate to the first streamed chunk (TTFT including gate queueing).",
        )
        yield self.time_per_output_token.family(
            TIME_PER_OUTPUT_TOKEN_SECONDS,
            "Mean time between the streamed token events of a request, as the gate relays them.",
        )
        yield self.prompt_tokens.family(
            PROMPT_TOKENS, "Prompt tokens of each admitted request, as the gate sized it."
        )
        yield self.output_tokens.family(
            OUTPUT_TOKENS, "Token events of each streamed answer that ended cleanly."
        )
        yield CounterMetricFamily(
            ADMITTED_TOTAL, "Requests admitted to the engine.", value=self.admitted
        )
        yield _by_label(SHED_TOTAL, "Requests refused by the gate.", self.shed)
        yield _by_label(
            FAILED_TOTAL, "Requests that failed after admission, by reason.", self.failed
        )
        yield _by_label(
            UPSTREAM_RETRIES_TOTAL,
            "Requests resent on a new connection: the engine had closed the pooled one.",
            self.upstream_retries,
        )
        yield _by_label(
            RETRIED_REQUESTS_TOTAL,
            "Requests a client SDK marked as its retry (x-stainless-retry-count >= 1), by outcome.",
            self.retried_requests,
            label="outcome",
        )
        knob_family = GaugeMetricFamily(
            KNOB, "Applied knob value (+Inf: no limit from batchpilot).", labels=["knob"]
        )
        for name in NUMERIC_KNOBS:
            value = getattr(knobs, name)
            knob_family.add_metric([name], math.inf if value is None else float(value))
        yield knob_family
        discipline_family = GaugeMetricFamily(
            DISCIPLINE,
            "1 for the applied queue discipline, 0 for the others.",
            labels=["discipline"],
        )
        for discipline in DISCIPLINES:
            discipline_family.add_metric(
                [discipline], 1.0 if discipline == knobs.discipline else 0.0
            )
        yield discipline_family
        yield GaugeMetricFamily(
            CONFIG_VERSION, "Version of the applied configuration.", value=self._config_version()
        )


def _by_label(
    name: str, documentation: str, counts: dict[str, int], label: str = "reason"
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
