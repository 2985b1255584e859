"""SLO classes at the gate over real HTTP: classification, order, deadlines, metrics.

The same stack as tests/test_gate_http.py: a real gate (its aiohttp servers,
its admin API) between a real aiohttp client and the small streaming engine
that records, on its own side, the order requests reach it. Classes are set
with `PUT /config`, as the operator sets them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from test_gate_http import Stack, gate_stack, run, wait_until

from batchpilot.contract.knobs import Knobs

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CLASSES: list[dict[str, Any]] = [
    {"name": "interactive", "priority": 1, "queue_deadline_ms": 150},
    {"name": "web", "match": {"header": "x-tenant", "values": ["shop", "blog"]}},
    {"name": "batch", "match": {"models": ["summarizer"]}},
]


async def configure(stack: Stack, **knobs: Any) -> None:
    """Apply CLASSES with `knobs` (a write replaces the whole document)."""
    status, answer = await stack.put_config({"classes": CLASSES, **knobs})
    assert status == 200, answer


async def post(
    stack: Stack, model: str = "fake-model", max_tokens: int = 4, **headers: str
) -> tuple[int, dict[str, Any] | str]:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    async with stack.client.post(
        f"{stack.url}/v1/completions", json=body, headers=headers
    ) as response:
        if response.status == 200:
            return response.status, await response.text()
        return response.status, (await response.json())["error"]


def by_class(samples: Samples, name: str) -> dict[str, float]:
    return {
        dict(labels)["class"]: value
        for (sample, labels), value in samples.items()
        if sample == name
    }


def class_label_values(samples: Samples) -> set[str]:
    return {dict(labels)["class"] for _, labels in samples if "class" in dict(labels)}


def test_requests_are_classified_by_header_tenant_and_model_and_counted() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=4)) as stack:
            await configure(stack)
            requests = [
                # (expected class, how the request says it)
                ("interactive", {"headers": {"x-batchpilot-class": "interactive"}}),
                ("interactive", {"headers": {"x-batchpilot-class": "interactive"}}),
                ("web", {"headers": {"x-tenant": "shop"}}),
                ("web", {"headers": {"X-Tenant": "blog"}}),
                ("batch", {"model": "summarizer"}),
                # The class header wins over the tenant, the tenant over the model.
                (
                    "batch",
                    {
                        "model": "summarizer",
                        "headers": {"x-batchpilot-class": "batch", "x-tenant": "shop"},
                    },
                ),
                ("web", {"model": "summarizer", "headers": {"x-tenant": "shop"}}),
                ("default", {"headers": {"x-tenant": "other"}}),
                ("default", {}),
            ]
            for _, how in requests:
                status, _ = await post(
                    stack, how.get("model", "fake-model"), **how.get("headers", {})
                )
                assert status == 200
            # An unknown class and anything that is no class name go to default,
            # counted, and never become a label value.
            strays = ["gold", "platinum-plus", "Interactive", "", "x" * 40, "a b", "ünïcode"]
            for name in strays:
                status, _ = await post(stack, **{"x-batchpilot-class": name})
                assert status == 200, name
            samples = await stack.metrics()
            admitted = by_class(samples, "batchpilot_gate_class_admitted_total")
            expected = {"interactive": 2, "web": 3, "batch": 2, "default": 2 + len(strays)}
            assert admitted == expected
            assert samples[("batchpilot_gate_admitted_total", ())] == sum(expected.values())
            # 4 output tokens, 1 prompt token ("hello", 5 characters, is 2).
            tokens = by_class(samples, "batchpilot_gate_class_admitted_tokens_total")
            assert tokens == {name: count * (2 + 4) for name, count in expected.items()}
            defaulted = {
                dict(labels)["reason"]: value
                for (sample, labels), value in samples.items()
                if sample == "batchpilot_gate_class_defaulted_total"
            }
            assert defaulted == {"unknown_class": 2, "malformed_class": 5}
            assert class_label_values(samples) == {"interactive", "web", "batch", "default"}

    run(scenario)


def test_per_class_metrics_are_there_from_the_start_and_observe_each_request() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=4)) as stack:
            await configure(stack)
            samples = await stack.metrics()
            # Pre-created at zero for every configured class, so rate() works.
            for name in (
                "batchpilot_gate_class_admitted_total",
                "batchpilot_gate_class_admitted_tokens_total",
                "batchpilot_gate_class_shed_total",
                "batchpilot_gate_class_queue_wait_seconds_count",
                "batchpilot_gate_class_queue_length",
                "batchpilot_gate_class_inflight_requests",
            ):
                assert by_class(samples, name) == dict.fromkeys(
                    ("interactive", "web", "batch", "default"), 0
                ), name
            for _ in range(3):
                assert (await post(stack, **{"x-batchpilot-class": "web"}))[0] == 200
            samples = await stack.metrics()
            for histogram in (
                "queue_wait_seconds",
                "time_to_first_token_seconds",
                "time_per_output_token_seconds",
            ):
                counts = by_class(samples, f"batchpilot_gate_class_{histogram}_count")
                assert counts == {"interactive": 0, "web": 3, "batch": 0, "default": 0}
                # The unlabelled family counts the same requests.
                assert samples[(f"batchpilot_gate_{histogram}_count", ())] == 3
            # A class configured away keeps its counters (a vanishing counter
            # reads as a reset); its gauges go.
            status, _ = await stack.put_config({"classes": CLASSES[:1]})
            assert status == 200
            samples = await stack.metrics()
            assert by_class(samples, "batchpilot_gate_class_admitted_total")["web"] == 3
            assert set(by_class(samples, "batchpilot_gate_class_queue_length")) == {
                "interactive",
                "default",
            }

    run(scenario)


def test_interactive_requests_are_admitted_ahead_of_a_batch_backlog() -> None:
    async def scenario() -> None:
        async with gate_stack(Knobs(max_concurrency=1)) as stack:
            await configure(stack, max_concurrency=1, aging_ms=60_000)
            blocker = asyncio.create_task(post(stack, **{"x-hold": "1", "x-request-id": "blocker"}))
            await wait_until(lambda: stack.engine.running == 1)
            tasks = [
                asyncio.create_task(post(stack, "summarizer", **{"x-request-id": f"batch-{i}"}))
                for i in range(5)
            ]
            await wait_until(lambda: stack.gate.gate.queue.queued == 5)
            tasks += [
                asyncio.create_task(
                    post(
                        stack,
                        **{"x-batchpilot-class": "interactive", "x-request-id": f"interactive-{i}"},
                    )
                )
                for i in range(2)
            ]
            await wait_until(lambda: stack.gate.gate.queue.queued == 7)
            samples = await stack.metrics()
            queued = by_class(samples, "batchpilot_gate_class_queue_length")
            assert queued == {"interactive": 2, "web": 0, "batch": 5, "default": 0}
            assert by_class(samples, "batchpilot_gate_class_inflight_requests")["default"] == 1
            stack.engine.release_holds.set()
            assert [status for status, _ in await asyncio.gather(blocker, *tasks)] == [200] * 8
            assert stack.engine.arrivals == [
                "blocker",
                "interactive-0",
                "interactive-1",
                *(f"batch-{i}" for i in range(5)),
            ]

    run(scenario)


def test_a_class_deadline_sheds_only_that_class_with_429_naming_it() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            await configure(stack, max_concurrency=1)
            blocker = asyncio.create_task(post(stack, **{"x-hold": "1"}))
            await wait_until(lambda: stack.engine.running == 1)
            started = time.monotonic()
            interactive = [
                asyncio.create_task(post(stack, **{"x-batchpilot-class": "interactive"}))
                for _ in range(2)
            ]
            batch = [asyncio.create_task(post(stack, "summarizer")) for _ in range(2)]
            answers = await asyncio.wait_for(asyncio.gather(*interactive), timeout=3)
            elapsed_ms = (time.monotonic() - started) * 1000
            assert 150 <= elapsed_ms < 650
            for status, error in answers:
                assert status == 429
                assert isinstance(error, dict)
                assert error["code"] == "queue_deadline_exceeded"
                assert "deadline of 150 ms of its SLO class interactive" in error["message"]
            # The batch class has no deadline: still waiting, never shed.
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in batch)
            stack.engine.release_holds.set()
            assert [status for status, _ in await asyncio.gather(blocker, *batch)] == [200] * 3
            samples = await stack.metrics()
            assert by_class(samples, "batchpilot_gate_class_shed_total") == {
                "interactive": 2,
                "web": 0,
                "batch": 0,
                "default": 0,
            }
            assert samples[("batchpilot_gate_shed_total", (("reason", "queue_deadline"),))] == 2

    run(scenario)


def test_queued_requests_of_a_class_configured_away_are_served_in_default() -> None:
    async def scenario() -> None:
        async with gate_stack() as stack:
            await configure(stack, max_concurrency=1)
            blocker = asyncio.create_task(
                post(stack, **{"x-hold": "1", "x-batchpilot-class": "web"})
            )
            await wait_until(lambda: stack.engine.running == 1)
            waiting = [asyncio.create_task(post(stack, "summarizer")) for _ in range(3)]
            await wait_until(lambda: stack.gate.gate.queue.queued == 3)
            # Neither the running class nor the queued one exists any more.
            status, _ = await stack.put_config({"max_concurrency": 1, "classes": CLASSES[:1]})
            assert status == 200
            stack.engine.release_holds.set()
            assert [status for status, _ in await asyncio.gather(blocker, *waiting)] == [200] * 4
            samples = await stack.metrics()
            admitted = by_class(samples, "batchpilot_gate_class_admitted_total")
            assert admitted == {"interactive": 0, "web": 1, "batch": 0, "default": 3}
            assert by_class(samples, "batchpilot_gate_class_inflight_requests") == {
                "interactive": 0,
                "default": 0,
            }
            assert samples[("batchpilot_gate_inflight_requests", ())] == 0

    run(scenario)
