"""Fenced and conditional writes to a real gate's admin API (issue #19).

A leader sends its fencing token in `X-Batchpilot-Fence`; the gate refuses a
token lower than the highest it accepted (409), so a deposed leader cannot
overwrite its successor's setting. `If-Match: <version>` makes a write
conditional on the applied version (412). Every test runs the real gate
(tests/test_gate_http.py's stack, or test_operator_gates.py's bare gate)
over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import pytest
from test_gate_http import TOKEN, Stack, gate_stack, run
from test_operator_gates import run as run_with_client
from test_operator_gates import running_gate

from batchpilot.contract.gate_api import FENCE_HEADER, GateConfig
from batchpilot.contract.knobs import Knobs
from batchpilot.operator.gates import GateClient, GateError, StaleFence, parse_gate_config

STALE = ("batchpilot_gate_config_writes_rejected_total", (("reason", "stale_fence"),))
MISMATCH = ("batchpilot_gate_config_writes_rejected_total", (("reason", "version_mismatch"),))


async def put(
    stack: Stack, body: Mapping[str, Any], **headers: str
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    """PUT /config with the admin token and `headers`: (status, JSON answer, answer headers)."""
    sent = {"Authorization": f"Bearer {TOKEN}", **headers}
    async with stack.client.put(f"{stack.admin_url}/config", json=body, headers=sent) as response:
        return response.status, await response.json(), response.headers


def fenced(fence: int) -> dict[str, str]:
    return {FENCE_HEADER: str(fence)}


def test_fenced_writes_in_order_are_accepted_and_raise_the_fence() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            assert (await stack.get_config())["fence"] is None
            for fence, cap, version in ((3, 8, 2), (5, 16, 3), (5, 24, 4)):
                status, answer, _ = await put(stack, {"max_concurrency": cap}, **fenced(fence))
                assert status == 200, answer
                assert (answer["fence"], answer["version"], answer["changed"]) == (
                    fence,
                    version,
                    True,
                )
            config = await stack.get_config()
            assert (config["fence"], config["knobs"]["max_concurrency"]) == (5, 24)
            # 0 is a token like any other: the first leader's Lease has had no transition.
            async with gate_stack() as fresh:
                status, answer, _ = await put(fresh, {}, **fenced(0))
                assert (status, answer["fence"]) == (200, 0)

    run(scenario)


def test_a_lower_fence_is_refused_with_409_and_changes_nothing() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            status, _, _ = await put(stack, {"max_concurrency": 16}, **fenced(5))
            assert status == 200
            before = await stack.get_config()
            assert (await stack.metrics())[STALE] == 0
            status, answer, headers = await put(stack, {"max_concurrency": 99}, **fenced(4))
            assert status == 409
            error = answer["error"]
            assert (error["field"], error["fence"], error["highest_fence"]) == (FENCE_HEADER, 4, 5)
            assert "fence 4 is lower than fence 5" in error["message"]
            assert "no longer the leader" in error["message"]
            assert headers["ETag"] == f'"{before["version"]}"'
            assert await stack.get_config() == before
            assert stack.gate.gate.queue.knobs == Knobs(max_concurrency=16)
            metrics = await stack.metrics()
            assert (metrics[STALE], metrics[MISMATCH]) == (1, 0)

    run(scenario)


def test_an_unfenced_write_is_accepted_after_fenced_ones_and_keeps_the_fence() -> None:
    """A person's curl must always work; the deposed leader still cannot write."""

    async def scenario() -> None:
        async with gate_stack() as stack:
            await put(stack, {"max_concurrency": 16}, **fenced(7))
            status, answer, _ = await put(stack, {"max_concurrency": 4})
            assert (status, answer["knobs"]["max_concurrency"], answer["fence"]) == (200, 4, 7)
            status, _, _ = await put(stack, {"max_concurrency": 99}, **fenced(6))
            assert status == 409
            assert stack.gate.gate.queue.knobs == Knobs(max_concurrency=4)

    run(scenario)


def test_if_match_writes_only_over_the_version_named() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            async with stack.client.get(f"{stack.admin_url}/config") as response:
                etag = response.headers["ETag"]
            assert etag == '"1"'
            # The ETag sent back as it came, or the bare version.
            status, answer, headers = await put(stack, {"max_concurrency": 3}, **{"If-Match": etag})
            assert (status, answer["version"], headers["ETag"]) == (200, 2, '"2"')
            status, answer, _ = await put(stack, {"max_concurrency": 4}, **{"If-Match": "2"})
            assert (status, answer["version"]) == (200, 3)
            before = await stack.get_config()
            status, answer, headers = await put(stack, {"max_concurrency": 5}, **{"If-Match": "2"})
            assert status == 412
            assert (answer["error"]["field"], answer["error"]["version"]) == ("If-Match", 3)
            assert "names version 2, but version 3 is applied" in answer["error"]["message"]
            assert headers["ETag"] == '"3"'
            assert await stack.get_config() == before
            metrics = await stack.metrics()
            assert (metrics[STALE], metrics[MISMATCH]) == (0, 1)
            # A list naming the applied version matches, and `*` matches any.
            for condition, version in (('"1", "3"', 4), ("*", 5)):
                status, answer, _ = await put(
                    stack, {"max_concurrency": 10 + version}, **{"If-Match": condition}
                )
                assert (status, answer["version"]) == (200, version)

    run(scenario)


def test_a_write_refused_for_its_version_does_not_raise_the_fence() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            await put(stack, {"max_concurrency": 8}, **fenced(2))
            status, _, _ = await put(
                stack, {"max_concurrency": 9}, **fenced(3), **{"If-Match": "1"}
            )
            assert status == 412
            assert (await stack.get_config())["fence"] == 2
            # Both conditions fail: the stale fence is the answer, being the one that
            # tells a deposed leader to stop.
            await put(stack, {"max_concurrency": 10}, **fenced(4))
            status, _, _ = await put(
                stack, {"max_concurrency": 11}, **fenced(3), **{"If-Match": "1"}
            )
            assert status == 409

    run(scenario)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (FENCE_HEADER, "-1"),
        (FENCE_HEADER, "abc"),
        (FENCE_HEADER, "1.5"),
        (FENCE_HEADER, "+3"),
        (FENCE_HEADER, ""),
        (FENCE_HEADER, "٣"),
        (FENCE_HEADER, str(2**63)),
        (FENCE_HEADER, "9" * 5000),
        ("If-Match", "abc"),
        ("If-Match", 'W/"1"'),
        ("If-Match", '"1", x'),
        ("If-Match", ""),
    ],
)
def test_a_malformed_header_is_a_400_naming_it_and_changes_nothing(header: str, value: str) -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=2)) as stack:
            await put(stack, {"max_concurrency": 3}, **fenced(5))
            before = await stack.get_config()
            status, answer, _ = await put(stack, {"max_concurrency": 4}, **{header: value})
            assert status == 400
            assert answer["error"]["field"] == header
            message = answer["error"]["message"]
            assert message.startswith(f"{header}: ") and "send" in message
            assert await stack.get_config() == before
            metrics = await stack.metrics()
            assert (metrics[STALE], metrics[MISMATCH]) == (0, 0)

    run(scenario)


def test_fences_are_checked_after_the_admin_token() -> None:
    async def scenario() -> None:
        async with (
            gate_stack() as stack,
            stack.client.put(
                f"{stack.admin_url}/config", json={}, headers={FENCE_HEADER: "nonsense"}
            ) as response,
        ):
            assert response.status == 401

    run(scenario)


def test_concurrent_writes_under_shuffled_fences_end_at_the_highest_and_never_go_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes race for the apply lock while the SGLang adapter awaits the engine
    in each apply: whichever order they land in, no write lands over a higher fence."""
    rng = random.Random(19)
    # Every fence twice (a leader repeats its write every interval), sent
    # roughly in order but shuffled within a dozen places: many writes land
    # and many come too late, where a full shuffle would mostly be refused.
    fences = sorted([*range(40), *range(40)], key=lambda fence: fence + rng.uniform(0, 12))

    def knobs_of(fence: int) -> Knobs:
        return Knobs(max_concurrency=fence + 1, max_num_batched_tokens=1000 + fence)

    async def scenario() -> None:
        async with gate_stack(native="sglang") as stack:
            seen: list[tuple[int, int | None]] = []
            writing = True

            async def read_between() -> None:
                while writing:
                    config = await stack.get_config()
                    seen.append((config["version"], config["fence"]))
                    await asyncio.sleep(0)

            reader = asyncio.create_task(read_between())
            answers = await asyncio.gather(
                *(put(stack, knobs_of(fence).to_mapping(), **fenced(fence)) for fence in fences)
            )
            writing = False
            await reader

            accepted = [
                (answer["version"], fence)
                for fence, (status, answer, _) in zip(fences, answers, strict=True)
                if status == 200
            ]
            refused = [answer["error"] for status, answer, _ in answers if status == 409]
            assert len(accepted) + len(refused) == len(fences)
            assert all(error["fence"] < error["highest_fence"] for error in refused)
            # Ordered by the version they produced, accepted fences never go down.
            in_order = [fence for _, fence in sorted(accepted)]
            assert in_order == sorted(in_order) and in_order[-1] == 39
            # Neither does what a reader saw between the writes.
            assert seen == sorted(seen, key=lambda pair: (pair[0], pair[1] or -1))
            assert [fence for _, fence in seen if fence is not None] == sorted(
                fence for _, fence in seen if fence is not None
            )
            # The gate's log raises its fence only upwards.
            raised = [
                record.args[0]
                for record in caplog.records
                if record.getMessage().startswith("accepted fence ")
                and isinstance(record.args, tuple)
            ]
            assert raised == sorted(set(raised)) and raised[-1] == 39
            # The engine got the native part of the accepted writes in the same
            # order (and of no refused one; the gate also resends the applied
            # knobs when the engine first answers its probe).
            chunked = [
                call["server_args"]["chunked_prefill_size"] - 1000
                for call in stack.engine.internal_state_calls
            ]
            assert chunked == sorted(chunked)
            assert set(chunked) == {fence for _, fence in accepted}
            assert len(accepted) > 10 and len(refused) > 10

            config = await stack.get_config()
            assert (config["fence"], Knobs.from_mapping(config["knobs"])) == (39, knobs_of(39))
            assert (await stack.metrics())[STALE] == len(refused)

    caplog.set_level(logging.INFO, logger="batchpilot.gate")
    run(scenario)


def test_gate_client_sends_the_fence_and_raises_stale_fence_on_409() -> None:
    async def scenario(client: GateClient) -> None:
        async with running_gate(token=TOKEN, knobs={"max_concurrency": 96}) as gate:
            port = gate.admin_port
            written = await client.write(
                "127.0.0.1", port, TOKEN, Knobs(max_concurrency=8), fence=6
            )
            assert (written.fence, written.version) == (6, 2)
            with pytest.raises(StaleFence) as caught:
                await client.write("127.0.0.1", port, TOKEN, Knobs(max_concurrency=4), fence=5)
            stale = caught.value
            assert isinstance(stale, GateError)
            assert (stale.fence, stale.highest) == (5, 6)
            assert "accepted fence 6 from another leader" in str(stale)
            assert "stopped being the leader" in str(stale)
            assert gate.gate.queue.knobs == Knobs(max_concurrency=8)
            # Without a fence the client writes as before (election off, or a person).
            unfenced = await client.write("127.0.0.1", port, TOKEN, Knobs(max_concurrency=4))
            assert (unfenced.knobs, unfenced.fence) == (Knobs(max_concurrency=4), 6)

    run_with_client(scenario)


def test_a_document_from_a_gate_without_fencing_still_reads() -> None:
    old = '{"knobs": {"max_concurrency": 8}, "version": 3, "source": "api"}'
    config = parse_gate_config(old, "http://127.0.0.2:9090/config")
    assert (config.version, config.fence) == (3, None)
    assert GateConfig.from_document({**config.to_document(), "fence": 12}).fence == 12
    with pytest.raises(GateError):
        parse_gate_config(
            '{"knobs": {}, "version": 1, "fence": "x"}', "http://127.0.0.2:9090/config"
        )
