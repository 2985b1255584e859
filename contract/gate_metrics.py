"""The gate's Prometheus metrics: names, help, buckets and label values.

The controller reads the same series from a real gate (gate/metrics.py) and
from the simulator's gate model (sim/metrics.py), so the names, types and
labels here are binding: change them only together with the controller's
queries (controller/signals.py).

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

config_writes_rejected_total{reason=...}: `PUT /config` writes refused
because the configuration moved past what the writer knew, nothing applied:
stale_fence (409: a fencing token lower than the highest the gate accepted,
i.e. a write from a deposed leader), version_mismatch (412: `If-Match` named
a version that is no longer the applied one). Refusals of the token or the
body (401, 403, 400) are answered to the caller and not counted: they are
misconfigurations, not races between writers.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class GateMetric(StrEnum):
    """Every series name the gate exports (a counter's with its `_total`)."""

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
    CONFIG_WRITES_REJECTED_TOTAL = "batchpilot_gate_config_writes_rejected_total"
    # Per SLO class (label CLASS_LABEL): one series per class the gate
    # serves, the default class included, never one per header value sent.
    CLASS_QUEUE_LENGTH = "batchpilot_gate_class_queue_length"
    CLASS_INFLIGHT_REQUESTS = "batchpilot_gate_class_inflight_requests"
    CLASS_ADMITTED_TOTAL = "batchpilot_gate_class_admitted_total"
    CLASS_ADMITTED_TOKENS_TOTAL = "batchpilot_gate_class_admitted_tokens_total"
    CLASS_SHED_TOTAL = "batchpilot_gate_class_shed_total"
    CLASS_QUEUE_WAIT_SECONDS = "batchpilot_gate_class_queue_wait_seconds"
    CLASS_TIME_TO_FIRST_TOKEN_SECONDS = "batchpilot_gate_class_time_to_first_token_seconds"
    CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS = "batchpilot_gate_class_time_per_output_token_seconds"
    # Requests put in the default class because their class header named no
    # class the gate serves (label `reason`: ClassDefaultReason).
    CLASS_DEFAULTED_TOTAL = "batchpilot_gate_class_defaulted_total"


HELP: Mapping[GateMetric, str] = {
    GateMetric.QUEUE_LENGTH: "Requests waiting in the gate.",
    GateMetric.INFLIGHT_REQUESTS: "Requests admitted and not finished.",
    GateMetric.INFLIGHT_TOKENS: "Prompt + requested output tokens of the admitted requests.",
    GateMetric.QUEUE_WAIT_SECONDS: "Time a request waited in the gate's queue before admission.",
    GateMetric.TIME_TO_FIRST_TOKEN_SECONDS: (
        "Arrival at the gate to the first streamed chunk (TTFT including gate queueing)."
    ),
    GateMetric.TIME_PER_OUTPUT_TOKEN_SECONDS: (
        "Mean time between the streamed token events of a request, as the gate relays them."
    ),
    GateMetric.PROMPT_TOKENS: "Prompt tokens of each admitted request, as the gate sized it.",
    GateMetric.OUTPUT_TOKENS: "Token events of each streamed answer that ended cleanly.",
    GateMetric.ADMITTED_TOTAL: "Requests admitted to the engine.",
    GateMetric.SHED_TOTAL: "Requests refused by the gate.",
    GateMetric.FAILED_TOTAL: "Requests that failed after admission, by reason.",
    GateMetric.UPSTREAM_RETRIES_TOTAL: (
        "Requests resent on a new connection: the engine had closed the pooled one."
    ),
    GateMetric.RETRIED_REQUESTS_TOTAL: (
        "Requests a client SDK marked as its retry (x-stainless-retry-count >= 1), by outcome."
    ),
    GateMetric.KNOB: "Applied knob value (+Inf: no limit from batchpilot).",
    GateMetric.DISCIPLINE: "1 for the applied queue discipline, 0 for the others.",
    GateMetric.CONFIG_VERSION: "Version of the applied configuration.",
    GateMetric.CONFIG_WRITES_REJECTED_TOTAL: (
        "Configuration writes refused, nothing applied: a stale fence or an If-Match mismatch."
    ),
    GateMetric.CLASS_QUEUE_LENGTH: "Requests waiting in the gate, by SLO class.",
    GateMetric.CLASS_INFLIGHT_REQUESTS: "Requests admitted and not finished, by SLO class.",
    GateMetric.CLASS_ADMITTED_TOTAL: "Requests admitted to the engine, by SLO class.",
    GateMetric.CLASS_ADMITTED_TOKENS_TOTAL: (
        "Prompt + requested output tokens of the requests admitted, by SLO class."
    ),
    GateMetric.CLASS_SHED_TOTAL: "Requests refused at their class's queue deadline, by SLO class.",
    GateMetric.CLASS_QUEUE_WAIT_SECONDS: "Time a request waited in the gate's queue, by SLO class.",
    GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS: (
        "Arrival at the gate to the first streamed chunk, by SLO class."
    ),
    GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS: (
        "Mean time between the streamed token events of a request, by SLO class."
    ),
    GateMetric.CLASS_DEFAULTED_TOTAL: (
        "Requests served in the default class because their class header named no known class."
    ),
}

# Prometheus type of each family.
TYPE: Mapping[GateMetric, str] = {
    **dict.fromkeys(
        (
            GateMetric.QUEUE_LENGTH,
            GateMetric.INFLIGHT_REQUESTS,
            GateMetric.INFLIGHT_TOKENS,
            GateMetric.KNOB,
            GateMetric.DISCIPLINE,
            GateMetric.CONFIG_VERSION,
            GateMetric.CLASS_QUEUE_LENGTH,
            GateMetric.CLASS_INFLIGHT_REQUESTS,
        ),
        "gauge",
    ),
    **dict.fromkeys(
        (
            GateMetric.QUEUE_WAIT_SECONDS,
            GateMetric.TIME_TO_FIRST_TOKEN_SECONDS,
            GateMetric.TIME_PER_OUTPUT_TOKEN_SECONDS,
            GateMetric.PROMPT_TOKENS,
            GateMetric.OUTPUT_TOKENS,
            GateMetric.CLASS_QUEUE_WAIT_SECONDS,
            GateMetric.CLASS_TIME_TO_FIRST_TOKEN_SECONDS,
            GateMetric.CLASS_TIME_PER_OUTPUT_TOKEN_SECONDS,
        ),
        "histogram",
    ),
    **dict.fromkeys(
        (
            GateMetric.ADMITTED_TOTAL,
            GateMetric.SHED_TOTAL,
            GateMetric.FAILED_TOTAL,
            GateMetric.UPSTREAM_RETRIES_TOTAL,
            GateMetric.RETRIED_REQUESTS_TOTAL,
            GateMetric.CONFIG_WRITES_REJECTED_TOTAL,
            GateMetric.CLASS_ADMITTED_TOTAL,
            GateMetric.CLASS_ADMITTED_TOKENS_TOTAL,
            GateMetric.CLASS_SHED_TOTAL,
            GateMetric.CLASS_DEFAULTED_TOTAL,
        ),
        "counter",
    ),
}

# The label of each labelled series; the knob and discipline gauges are
# labelled by the knob's field name and the discipline's name.
KNOB_LABEL = "knob"
DISCIPLINE_LABEL = "discipline"
# The per-class families' label: a class name from the applied knobs.
CLASS_LABEL = "class"

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

# `reason` / `outcome` label values, pre-created at zero so rate() works from
# the first scrape and a dashboard shows every value even before it happens.


class ShedReason(StrEnum):
    QUEUE_DEADLINE = "queue_deadline"


class FailedReason(StrEnum):
    UPSTREAM_4XX = "upstream_4xx"
    UPSTREAM_5XX = "upstream_5xx"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_STREAM_BROKEN = "upstream_stream_broken"
    CLIENT_DISCONNECT = "client_disconnect"
    # Not a request: a native engine adapter failed to apply a knob change.
    NATIVE_APPLY = "native_apply"


class RetryReason(StrEnum):
    SERVER_DISCONNECTED = "server_disconnected"
    SOCKET_ERROR = "socket_error"


class RetriedOutcome(StrEnum):
    ADMITTED = "admitted"
    SHED = "shed"


class ConfigRejectReason(StrEnum):
    STALE_FENCE = "stale_fence"
    VERSION_MISMATCH = "version_mismatch"


class ClassDefaultReason(StrEnum):
    # The class header names no class the gate serves.
    UNKNOWN_CLASS = "unknown_class"
    # The class header is not a class name at all (contract.knobs.CLASS_NAME).
    MALFORMED_CLASS = "malformed_class"
