"""The gate's admin token: writes need it, comparison is constant-time, it never leaks.

The leak check runs the shipped `batchpilot gate` process at DEBUG log level
(the most talkative it gets), does authorized, unauthorized and malformed
writes plus proxied traffic, then searches everything the process wrote and
every answer it gave for the token.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from test_faults_gate import TOKEN, completion, put_config, run, sim_and_gate

from batchpilot.gate import admin as gate_admin


@pytest.mark.parametrize("token_source", ["env", "file"])
def test_token_never_appears_in_logs_or_answers(
    tmp_path: Path, token_source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gate logs at DEBUG here, so aiohttp's and asyncio's own debug
    # output is captured too.
    if token_source == "file":
        token_file = tmp_path / "admin-token"
        token_file.write_text(TOKEN + "\n")
        monkeypatch.setenv("BATCHPILOT_GATE_TOKEN_FILE", str(token_file))
    with sim_and_gate(tmp_path, {"max_concurrency": 4}, log_level="DEBUG") as (_, gate):

        async def scenario() -> list[tuple[int, str]]:
            answers: list[tuple[int, str]] = []
            async with aiohttp.ClientSession() as session:
                for token, body in [
                    (TOKEN, {"max_concurrency": 6}),
                    (TOKEN, {"max_concurrency": 0}),  # 400 with the right token
                    (TOKEN + "x", {"max_concurrency": 7}),
                    (TOKEN[:-1], {"max_concurrency": 7}),
                    ("", {"max_concurrency": 7}),
                    (None, {"max_concurrency": 7}),
                ]:
                    status, answer = await put_config(session, gate, body, token)
                    answers.append((status, json.dumps(answer)))
                headers = {"Authorization": f"Basic {TOKEN}"}
                async with session.put(
                    gate.admin_url + "/config", json={"max_concurrency": 7}, headers=headers
                ) as response:
                    answers.append((response.status, await response.text()))
                for path in ("/config", "/metrics", "/readyz", "/livez"):
                    async with session.get(gate.admin_url + path) as response:
                        answers.append((response.status, await response.text()))
                async with session.post(
                    gate.url + "/v1/completions", json=completion(3), headers={"x-token": TOKEN}
                ) as response:
                    answers.append((response.status, await response.text()))
            return answers

        answers = run(scenario())
        statuses = [status for status, _ in answers[:7]]
        assert statuses == [200, 400, 401, 401, 401, 401, 401]
        for _, text in answers:
            assert TOKEN not in text
        config = json.loads(answers[7][1])
        assert config["knobs"]["max_concurrency"] == 6 and config["version"] == 2
    # Stopped (drained) above: the log is complete, shutdown messages included.
    log = gate.process.log_path.read_text(errors="replace")
    assert "DEBUG" in log, "the gate did not log at DEBUG; the check would prove little"
    assert TOKEN not in log


def _authorize(header: str | None) -> tuple[int | None, list[tuple[bytes, bytes]]]:
    calls: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        calls.append((given, expected))
        return real_compare(given, expected)

    admin = gate_admin.Admin(gate=None, token_file=None, token=TOKEN, readiness=lambda: (True, ""))  # type: ignore[arg-type]
    headers = {} if header is None else {"Authorization": header}
    request = make_mocked_request("PUT", "/config", headers=headers)
    original = gate_admin.hmac.compare_digest
    gate_admin.hmac.compare_digest = spy  # type: ignore[assignment]
    try:
        refusal = admin._authorize(request)
    finally:
        gate_admin.hmac.compare_digest = original  # type: ignore[assignment]
    return (None if refusal is None else refusal.status), calls


@pytest.mark.parametrize(
    ("given", "expected_status"),
    [
        (TOKEN, None),  # authorized: no refusal
        ("x" * len(TOKEN), 401),  # same length, every byte wrong
        (TOKEN[:-1] + "0", 401),  # same length, last byte wrong
        (TOKEN[:4], 401),  # a prefix: no early exit on length either
        (TOKEN + TOKEN, 401),
    ],
)
def test_bearer_token_is_compared_in_constant_time(given: str, expected_status: int | None) -> None:
    status, calls = _authorize(f"Bearer {given}")
    assert status == expected_status
    # Every candidate goes through hmac.compare_digest, whose run time does
    # not depend on where the first differing byte is.
    assert calls == [(given.encode(), TOKEN.encode())]


@pytest.mark.parametrize("header", [None, f"Basic {TOKEN}", "Bearer", TOKEN])
def test_writes_without_a_bearer_token_are_refused(header: str | None) -> None:
    status, _ = _authorize(header)
    assert status == 401
