"""Hypothesis against the running gate: any config payload, any client request.

One `batchpilot sim serve` + `batchpilot gate` pair (real processes) serves
the whole module; every example is a real HTTP request to it. Properties:

- `PUT /config` with any body answers 200 with exactly the knobs the body
  describes, or 400 naming the offending field and changing nothing;
  never a 5xx, never a partial change.
- `POST /v1/completions` with any body and any sizing headers answers 2xx
  or a clear 4xx (never 5xx); afterwards the gate is live, ready, idle and
  still serves a good request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults_gate import (
    INFLIGHT,
    QUEUE_LENGTH,
    TOKEN,
    GateProcess,
    completion,
    gate_metrics,
    sim_and_gate,
)

from batchpilot.contract.knobs import KnobError, Knobs

# Small enough that a "huge" body is cheap to send; large enough for every
# well-formed request generated here.
MAX_BODY_BYTES = 16 * 1024

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # seeded: the same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateProcess]:
    log_dir = tmp_path_factory.mktemp("props-gate")
    # Time scale 1000: any generated request, even one asking for the
    # default 256 tokens after a 100k-token prompt, finishes in milliseconds.
    with sim_and_gate(
        Path(log_dir),
        {"max_concurrency": 8},
        time_scale=1000.0,
        env={"BATCHPILOT_GATE_MAX_BODY_BYTES": str(MAX_BODY_BYTES)},
    ) as (_, gate_process):
        yield gate_process


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def get_config(gate: GateProcess) -> dict[str, Any]:
    status, body, _ = http("GET", gate.admin_url + "/config")
    assert status == 200
    return json.loads(body)


# -- PUT /config --------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats()  # NaN and +-Infinity too: Python's json writes and reads them
    | st.text(max_size=20)
)
any_json = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
KNOB_NAMES = [f.name for f in fields(Knobs)]
knob_values = (
    st.none()
    | st.integers(min_value=-3, max_value=70_000)
    | st.integers()
    | st.sampled_from(["fcfs", "shortest-prompt-first", "priority", "lifo", "", "FCFS"])
    | st.booleans()
    | st.floats(allow_nan=True)
    | any_json
)
# Mostly knob-shaped objects (so that many are valid and really apply),
# sometimes with a stray key, sometimes any JSON at all, sometimes raw bytes.
knob_objects = st.dictionaries(st.sampled_from(KNOB_NAMES), knob_values, max_size=6)
in_range_knob_objects = st.fixed_dictionaries(
    {},
    optional={
        "max_concurrency": st.none() | st.integers(min_value=1, max_value=65_536),
        "max_inflight_tokens": st.none() | st.integers(min_value=1, max_value=2**31),
        "discipline": st.sampled_from(["fcfs", "shortest-prompt-first", "priority"]),
        "queue_deadline_ms": st.none() | st.integers(min_value=1, max_value=3_600_000),
        "aging_ms": st.integers(min_value=1, max_value=3_600_000),
        "max_num_batched_tokens": st.none() | st.integers(min_value=16, max_value=2**31),
    },
)
config_bodies = st.one_of(
    in_range_knob_objects.map(lambda body: json.dumps(body).encode()),
    knob_objects.map(lambda body: json.dumps(body).encode()),
    st.tuples(knob_objects, st.text(max_size=10), knob_values).map(
        lambda parts: json.dumps({**parts[0], parts[1]: parts[2]}).encode()
    ),
    any_json.map(lambda body: json.dumps(body).encode()),
    st.binary(max_size=64),
)


def expected_knobs(body: bytes) -> Knobs | KnobError:
    """What the gate must apply (or the field it must name) for `body`."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return KnobError("<body>", "not JSON")
    try:
        return Knobs.from_mapping(data)
    except KnobError as err:
        return err


@PROPERTY_SETTINGS
@given(body=config_bodies)
def test_any_config_payload_applies_whole_or_not_at_all(gate: GateProcess, body: bytes) -> None:
    before = get_config(gate)
    status, answer, _ = http(
        "PUT", gate.admin_url + "/config", body, {"Authorization": f"Bearer {TOKEN}"}
    )
    after = get_config(gate)
    expected = expected_knobs(body)
    if isinstance(expected, KnobError):
        assert status == 400, answer
        error = json.loads(answer)["error"]
        assert error["field"] == expected.field and error["message"]
        assert after == before  # nothing changed, not even the version
    else:
        assert status == 200, answer
        assert after["knobs"] == expected.to_mapping()
        changed = expected.to_mapping() != before["knobs"]
        assert json.loads(answer)["changed"] is changed
        assert after["version"] == before["version"] + changed


# -- client requests ----------------------------------------------------------

prompt_values = (
    st.text(max_size=40)
    | st.lists(st.integers(min_value=-5, max_value=100_000), max_size=6)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.lists(st.lists(st.integers(min_value=0, max_value=50_000), max_size=4), max_size=3)
    | json_scalars
)
message_values = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name"]),
        st.text(max_size=20)
        | st.lists(
            st.dictionaries(st.sampled_from(["type", "text"]), st.text(max_size=10), max_size=2),
            max_size=2,
        )
        | json_scalars,
        max_size=3,
    ),
    max_size=3,
)
# Output sizes are small or far beyond the simulated 450k-token KV cache
# (refused at once), never a long generation that would slow the run.
size_values = (
    st.integers(min_value=-3, max_value=8)
    | st.integers(min_value=10**6, max_value=2**64)
    | st.floats()
    | st.text(max_size=5)
    | st.none()
    | st.booleans()
)
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.text(max_size=10) | json_scalars,
        "prompt": prompt_values,
        "messages": message_values,
        "max_tokens": size_values,
        "max_completion_tokens": size_values,
        "n": st.integers(min_value=-2, max_value=3) | json_scalars,
        "stream": st.booleans() | json_scalars,
        "stream_options": st.dictionaries(st.just("include_usage"), json_scalars, max_size=1),
    },
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12
) | st.integers(min_value=-5, max_value=200_000).map(str)
request_headers = st.fixed_dictionaries(
    {}, optional={"x-prompt-tokens": header_values, "x-priority": header_values}
)
request_bodies = st.one_of(
    request_objects.map(lambda body: json.dumps(body).encode()),
    any_json.map(lambda body: json.dumps(body).encode()),
    st.binary(max_size=64),
)


@PROPERTY_SETTINGS
@given(body=request_bodies, headers=request_headers, chat=st.booleans())
def test_any_client_request_gets_a_clear_answer_and_leaves_the_gate_whole(
    gate: GateProcess, body: bytes, headers: dict[str, str], chat: bool
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, answer, _ = http("POST", gate.url + path, body, headers)
    assert status in (200, 400), answer[:300]
    if status == 400:
        error = json.loads(answer)["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    samples = gate_metrics(gate)
    assert samples[INFLIGHT] == 0 and samples[QUEUE_LENGTH] == 0


@pytest.mark.parametrize(
    ("body", "headers", "expected_status"),
    [
        (b"{" * (MAX_BODY_BYTES + 1), {}, 413),
        (json.dumps(completion(2, prompt="x" * (4 * MAX_BODY_BYTES))).encode(), {}, 413),
        (b"\xff\xfe not utf-8", {}, 400),
        (b"", {}, 400),
        (b"[]", {}, 400),
        (json.dumps({"prompt": "x", "max_tokens": "3"}).encode(), {}, 400),
        (json.dumps(completion(2)).encode(), {"x-prompt-tokens": "many"}, 400),
        (json.dumps(completion(2)).encode(), {"x-priority": "1e400"}, 400),
    ],
)
def test_malformed_requests_get_4xx_and_the_gate_stays_healthy(
    gate: GateProcess, body: bytes, headers: dict[str, str], expected_status: int
) -> None:
    status, answer, _ = http("POST", gate.url + "/v1/completions", body, headers)
    assert status == expected_status, answer[:300]
    assert http("GET", gate.admin_url + "/livez")[0] == 200
    assert http("GET", gate.admin_url + "/readyz")[0] == 200
    good = json.dumps(completion(3, stream=False)).encode()
    status, answer, _ = http("POST", gate.url + "/v1/completions", good)
    assert status == 200 and json.loads(answer)["choices"][0]["finish_reason"] == "length"


def test_property_strategies_reach_both_outcomes() -> None:
    """Guards the properties above against a strategy that only ever makes one kind of body."""
    outcomes = {"valid": 0, "invalid": 0}

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(body=config_bodies)
    def tally(body: bytes) -> None:
        kind = "invalid" if isinstance(expected_knobs(body), KnobError) else "valid"
        outcomes[kind] += 1

    tally()
    assert outcomes["valid"] >= 20 and outcomes["invalid"] >= 20, outcomes
