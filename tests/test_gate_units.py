"""The gate's pure parts: request sizing, settings precedence, the annotations file,
the retry decision, and the token-event count behind time per output token."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from batchpilot.contract.gate_metrics import ClassDefaultReason
from batchpilot.contract.knobs import ClassMatch, Knobs, ServiceClass
from batchpilot.gate.annotations import AnnotationError, knobs_from_annotations, parse_annotations
from batchpilot.gate.estimate import RequestError, RequestSize, classify, estimate_request
from batchpilot.gate.metrics import TOKEN_BUCKETS, TPOT_BUCKETS_S, Histogram
from batchpilot.gate.proxy import TokenEvents, retry_reason
from batchpilot.gate.settings import GateSettings, GateSettingsError, load_settings, parse_host_port


def _size(
    body: dict[str, Any], headers: dict[str, str] | None = None, default: int = 256
) -> RequestSize:
    return estimate_request(json.dumps(body).encode(), headers or {}, default)


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        # characters / 4, rounded up
        ({"prompt": "x" * 400, "max_tokens": 10}, {}, RequestSize(100, 10, 0, False)),
        ({"prompt": "x" * 401, "max_tokens": 10}, {}, RequestSize(101, 10, 0, False)),
        ({"prompt": "", "max_tokens": 10}, {}, RequestSize(1, 10, 0, False)),
        ({"prompt": ["ab" * 10, "cd" * 10], "max_tokens": 5}, {}, RequestSize(10, 5, 0, False)),
        # token ids are counted exactly
        ({"prompt": [1, 2, 3, 4, 5], "max_tokens": 5}, {}, RequestSize(5, 5, 0, False)),
        ({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 5}, {}, RequestSize(5, 5, 0, False)),
        # the header wins over the body
        (
            {"prompt": "x" * 4000, "max_tokens": 5},
            {"x-prompt-tokens": "7"},
            RequestSize(7, 5, 0, False),
        ),
        # chat: string and multi-part text content; image parts are not characters
        (
            {
                "messages": [
                    {"role": "system", "content": "x" * 40},
                    {"role": "user", "content": "y" * 80},
                ]
            },
            {},
            RequestSize(30, 256, 0, False),
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "z" * 20},
                            {"type": "image_url", "image_url": {"url": "data:..."}},
                        ],
                    }
                ],
                "stream": True,
            },
            {},
            RequestSize(5, 256, 0, True),
        ),
        # output: max_completion_tokens, then max_tokens, then the default; times n
        (
            {"prompt": "abcd", "max_completion_tokens": 9, "max_tokens": 99},
            {},
            RequestSize(1, 9, 0, False),
        ),
        ({"prompt": "abcd", "max_tokens": 10, "n": 3}, {}, RequestSize(1, 30, 0, False)),
        ({"prompt": "abcd", "max_tokens": None}, {}, RequestSize(1, 256, 0, False)),
        # priority header
        ({"prompt": "abcd", "max_tokens": 1}, {"x-priority": " -2 "}, RequestSize(1, 1, -2, False)),
    ],
)
def test_request_size_estimate(
    body: dict[str, Any], headers: dict[str, str], expected: RequestSize
) -> None:
    assert _size(body, headers) == expected


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        (b"{", {}, "body"),
        (b"[1, 2]", {}, "body"),
        (b'{"max_tokens": 3}', {}, "prompt"),
        (b'{"prompt": 5}', {}, "prompt"),
        (b'{"prompt": [1, "a"]}', {}, "prompt"),
        (b'{"messages": "hi"}', {}, "messages"),
        (b'{"messages": ["hi"]}', {}, "messages[0]"),
        (b'{"prompt": "a", "max_tokens": 0}', {}, "max_tokens"),
        (b'{"prompt": "a", "max_tokens": true}', {}, "max_tokens"),
        (b'{"prompt": "a", "max_completion_tokens": "5"}', {}, "max_completion_tokens"),
        (b'{"prompt": "a", "n": 0}', {}, "n"),
        (b'{"prompt": "a"}', {"x-prompt-tokens": "-1"}, "x-prompt-tokens"),
        (b'{"prompt": "a"}', {"x-prompt-tokens": "lots"}, "x-prompt-tokens"),
        (b'{"prompt": "a"}', {"x-priority": "1.5"}, "x-priority"),
    ],
)
def test_unsizable_request_names_the_field(
    body: bytes, headers: dict[str, str], param: str
) -> None:
    with pytest.raises(RequestError) as caught:
        estimate_request(body, headers, 256)
    assert caught.value.field == param


def test_settings_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "gate.yaml"
    config.write_text(
        "upstream: http://engine-from-file:8000\n"
        "listen: 0.0.0.0:1111\n"
        "admin: 0.0.0.0:2222\n"
        "knobs: {max_concurrency: 12, discipline: priority}\n"
    )
    env = {
        "BATCHPILOT_GATE_CONFIG": str(config),
        "BATCHPILOT_GATE_LISTEN": "0.0.0.0:3333",
        "BATCHPILOT_GATE_ADMIN": "0.0.0.0:4444",
        "BATCHPILOT_GATE_GRACE_PERIOD_S": "7.5",
        "UNRELATED": "x",
    }
    settings = load_settings({"admin": "127.0.0.1:5555", "listen": None}, env)
    assert settings.upstream == "http://engine-from-file:8000"  # file
    assert settings.listen == "0.0.0.0:3333"  # env over file; None on the CLI means "not given"
    assert settings.admin == "127.0.0.1:5555"  # CLI over env
    assert settings.grace_period_s == 7.5  # env, converted
    assert settings.knobs == Knobs(max_concurrency=12, discipline="priority")
    assert settings.native == GateSettings().native  # default
    assert "hide-me" not in repr(load_settings({"token": "hide-me"}, {}))


@pytest.mark.parametrize(
    ("overrides", "env", "setting"),
    [
        ({"upstream": "127.0.0.1:8000"}, {}, "upstream"),
        ({"listen": "8080"}, {}, "listen"),
        ({"admin": "0.0.0.0:99999"}, {}, "admin"),
        ({"native": "trt"}, {}, "native"),
        ({}, {"BATCHPILOT_GATE_GRACE_PERIOD_S": "soon"}, "grace_period_s"),
        ({}, {"BATCHPILOT_GATE_SHUTDOWN_DELAY_S": "-1"}, "shutdown_delay_s"),
        ({}, {"BATCHPILOT_GATE_DEFAULT_MAX_TOKENS": "0"}, "default_max_tokens"),
        ({}, {"BATCHPILOT_GATE_HEALTH_INTERVAL_S": "-1"}, "health_interval_s"),
        ({}, {"BATCHPILOT_GATE_KNOBS": "{max_concurrency: 3}"}, "knobs"),
        ({"knobs": {"max_concurrency": -3}}, {}, "knobs.max_concurrency"),
        ({"config": "/nonexistent/gate.yaml"}, {}, "config"),
    ],
)
def test_bad_setting_is_named(overrides: dict[str, Any], env: dict[str, str], setting: str) -> None:
    with pytest.raises(GateSettingsError) as caught:
        load_settings(overrides, env)
    assert caught.value.setting == setting


def test_unknown_key_in_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gate.yaml"
    config.write_text("upstrem: http://x:1\n")
    with pytest.raises(GateSettingsError) as caught:
        load_settings({"config": config}, {})
    assert caught.value.setting == "upstrem"
    assert "known settings are" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0.0.0:8080", ("0.0.0.0", 8080)), (":9090", ("0.0.0.0", 9090)), ("[::1]:0", ("::1", 0))],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port("listen", value) == expected


def test_annotations_file_as_the_kubelet_writes_it() -> None:
    knobs_json = json.dumps({"max_concurrency": 48, "discipline": "shortest-prompt-first"})
    text = (
        'kubectl.kubernetes.io/restartedAt="2024-05-01T10:00:00Z"\n'
        f"batchpilot.dev/knobs={json.dumps(knobs_json)}\n"
        'note="line one\\nline two"\n'
    )
    assert parse_annotations(text)["note"] == "line one\nline two"
    assert knobs_from_annotations(text) == Knobs(
        max_concurrency=48, discipline="shortest-prompt-first"
    )
    assert knobs_from_annotations('other="1"\n') is None


@pytest.mark.parametrize(
    "text",
    [
        "batchpilot.dev/knobs\n",  # no value
        "batchpilot.dev/knobs={}\n",  # unquoted
        'batchpilot.dev/knobs="{\\"max_concurrency\\": 4"\n',  # JSON cut short
        'batchpilot.dev/knobs="{\\"max_concurrency\\": 0}"\n',  # out of range
        'batchpilot.dev/knobs="{\\"max_concurrency\\": 4, \\"burst\\": 1}"\n',  # unknown knob
        'batchpilot.dev/knobs="[4]"\n',  # not an object
    ],
)
def test_malformed_annotations_are_rejected_whole(text: str) -> None:
    with pytest.raises(AnnotationError):
        knobs_from_annotations(text)


@pytest.mark.parametrize(
    ("err", "reused", "expected"),
    [
        (aiohttp.ServerDisconnectedError(), True, "server_disconnected"),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), True, "socket_error"),
        (aiohttp.ClientOSError(32, "Can not write request body for x"), True, "socket_error"),
        # A new connection failing is the engine failing: not resent.
        (aiohttp.ServerDisconnectedError(), False, None),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), False, None),
        # Not a closed socket: the engine may be working on the request.
        (aiohttp.ServerTimeoutError(), True, None),
        (aiohttp.ClientPayloadError(), True, None),
    ],
)
def test_retry_decision(err: BaseException, reused: bool, expected: str | None) -> None:
    assert retry_reason(err, reused) == expected


def _llama_stream(tokens: int) -> list[bytes]:
    """llama-server's events: one per token, a closing one without a token, [DONE].

    Each token's text holds "data: " and an escaped newline, which must not count.
    """
    events = [
        b'data: {"choices":[{"text":"data: x\\n","finish_reason":null}]}\n\n' for _ in range(tokens)
    ]
    events.append(b'data: {"choices":[{"text":"","finish_reason":"length"}]}\n\n')
    return [*events, b"data: [DONE]\n\n"]


def _observed(events: TokenEvents) -> tuple[int, float]:
    histogram, lengths = Histogram(TPOT_BUCKETS_S), Histogram(TOKEN_BUCKETS)
    events.observe(histogram, lengths)
    # Every finished stream with a token has its length observed, exactly.
    assert (sum(lengths.counts), lengths.sum) == ((1, events.tokens) if events.tokens else (0, 0.0))
    return sum(histogram.counts), histogram.sum


def test_token_events_one_chunk_per_event_times_first_to_last() -> None:
    events = TokenEvents()
    stream = _llama_stream(5)
    # Tokens 10 ms apart; the closing event and [DONE] come with the last token.
    times = [0.0, 0.01, 0.02, 0.03, 0.04, 0.04, 0.04]
    for chunk, now_s in zip(stream, times, strict=True):
        events.feed(chunk, now_s)
    assert events.events == 7
    # 6 events besides [DONE] (the closing one counts as a token): 40 ms / 5.
    count, total = _observed(events)
    assert count == 1
    assert total == pytest.approx(0.008)


@pytest.mark.parametrize("seed", range(20))
def test_token_events_count_is_exact_for_any_chunking(seed: int) -> None:
    rng = random.Random(seed)
    data = b"".join(_llama_stream(rng.randint(0, 12)))
    if seed % 2:
        data = data.replace(b"\n", b"\r\n")
    expected = data.count(b"data: ") - data.count(b"data: x")
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(60, len(data) - 1))))
    if seed == 0:
        cuts = list(range(1, len(data)))  # one byte at a time
    events = TokenEvents()
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        events.feed(data[start:end], float(start))
    assert events.events == expected
    assert _observed(events)[0] == (1 if expected - 1 >= 2 else 0)


def test_token_events_without_done_and_too_short_streams() -> None:
    events = TokenEvents()
    events.feed(b"data: {}\n\ndata: {}\n\n", 1.0)
    events.feed(b"data: {}\n\n", 1.5)
    # No [DONE]: every event is a token; two intervals over 0.5 s.
    assert _observed(events) == (1, pytest.approx(0.25))
    single = TokenEvents()
    single.feed(b"data: {}\n\ndata: [DONE]\n\n", 1.0)
    assert _observed(single) == (0, 0.0)


CLASSES = Knobs(
    classes=(
        ServiceClass(
            "interactive", priority=1, match=ClassMatch(header="x-tenant", values=("web",))
        ),
        ServiceClass("batch", match=ClassMatch(models=("big-model", "summarizer"))),
        ServiceClass(
            "team-b",
            match=ClassMatch(header="x-tenant", values=("b", "web"), models=("big-model",)),
        ),
    )
)


@pytest.mark.parametrize(
    ("knobs", "payload", "headers", "expected"),
    [
        # The class header names a class the gate serves.
        (CLASSES, {}, {"x-batchpilot-class": "batch"}, ("batch", None)),
        (CLASSES, {}, {"X-Batchpilot-Class": " interactive "}, ("interactive", None)),
        (CLASSES, {}, {"x-batchpilot-class": "default"}, ("default", None)),
        (Knobs(), {}, {"x-batchpilot-class": "default"}, ("default", None)),
        # ...and wins over the tenant header and the model.
        (
            CLASSES,
            {"model": "big-model"},
            {"x-batchpilot-class": "interactive", "x-tenant": "b"},
            ("interactive", None),
        ),
        # A well-formed name the gate does not serve, with or without classes.
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "gold"},
            ("default", ClassDefaultReason.UNKNOWN_CLASS),
        ),
        (
            Knobs(),
            {},
            {"x-batchpilot-class": "batch"},
            ("default", ClassDefaultReason.UNKNOWN_CLASS),
        ),
        # Not a class name at all: never an error, never a new label value.
        (CLASSES, {}, {"x-batchpilot-class": ""}, ("default", ClassDefaultReason.MALFORMED_CLASS)),
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "Batch"},
            ("default", ClassDefaultReason.MALFORMED_CLASS),
        ),
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "a" * 33},
            ("default", ClassDefaultReason.MALFORMED_CLASS),
        ),
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "batch;drop"},
            ("default", ClassDefaultReason.MALFORMED_CLASS),
        ),
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "-batch"},
            ("default", ClassDefaultReason.MALFORMED_CLASS),
        ),
        (
            CLASSES,
            {},
            {"x-batchpilot-class": "bätch"},
            ("default", ClassDefaultReason.MALFORMED_CLASS),
        ),
        # The tenant header: the first class listing the value.
        (CLASSES, {}, {"x-tenant": "web"}, ("interactive", None)),
        (CLASSES, {}, {"X-Tenant": "b"}, ("team-b", None)),
        (CLASSES, {"model": "summarizer"}, {"x-tenant": "b"}, ("team-b", None)),
        (CLASSES, {}, {"x-tenant": "c"}, ("default", None)),
        # The model: only when no header rule matched.
        (CLASSES, {"model": "big-model"}, {}, ("batch", None)),
        (CLASSES, {"model": "big-model"}, {"x-tenant": "c"}, ("batch", None)),
        (CLASSES, {"model": "tiny"}, {}, ("default", None)),
        (CLASSES, {"model": ["big-model"]}, {}, ("default", None)),
        (CLASSES, {"model": None}, {}, ("default", None)),
        (CLASSES, [], {}, ("default", None)),
        (Knobs(), {"model": "big-model"}, {"x-tenant": "web"}, ("default", None)),
    ],
)
def test_classify(
    knobs: Knobs,
    payload: Any,
    headers: dict[str, str],
    expected: tuple[str, ClassDefaultReason | None],
) -> None:
    assert classify(payload, CIMultiDict(headers), knobs) == expected
