"""`sim serve` and `sim load` over real HTTP: the simulated engine on the wall clock,
the real gate in front of it, and the client-side load generator; with a real
Prometheus for the end-to-end check of the engine's TTFT histogram."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from batchpilot.cli.main import app
from batchpilot.contract.knobs import Knobs
from batchpilot.gate.server import GateServer
from batchpilot.gate.settings import load_settings
from batchpilot.sim.calibration import fit_file
from batchpilot.sim.engine import EngineConfig, Replica
from batchpilot.sim.load import ERROR, OK, SHED, replay, summarize
from batchpilot.sim.metrics import TTFT_BUCKETS
from batchpilot.sim.scenario import ScenarioSlo, load_scenario
from batchpilot.sim.serve import SimServer
from batchpilot.sim.workload import build_workload

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION = SHARED / "data" / "calibration" / "llama3.1-8b_vllm_step_latency.csv"
MODEL = "meta-llama/Meta-Llama-3.1-8B"

pytestmark = pytest.mark.skipif(
    not CALIBRATION.exists(), reason=f"needs the shared calibration data at {CALIBRATION}"
)


def engine_config(**changes: Any) -> EngineConfig:
    settings: dict[str, Any] = {
        "cost": fit_file(CALIBRATION, MODEL, "h100_sxm").cost,
        "kv_cache_tokens": 450_000,
        "max_num_seqs": 512,
        "max_num_batched_tokens": 8192,
        **changes,
    }
    return EngineConfig(**settings)


def write_scenario(
    path: Path,
    *,
    rate_rps: float,
    duration_s: float,
    kv_cache_tokens: int = 450_000,
    prompt_max: int = 4000,
    slo: str = "{ttft_ms: 2000, tpot_ms: 50}",
) -> Path:
    path.write_text(
        f"""
name: live-test
seed: 11
engine:
  calibration: {CALIBRATION}
  model: {MODEL}
  system: h100_sxm
  kv_cache_tokens: {kv_cache_tokens}
  max_num_seqs: 512
  max_num_batched_tokens: 8192
slo: {slo}
workload:
  - duration_s: {duration_s}
    synthetic:
      arrival: {{process: poisson, rate_rps: {rate_rps}}}
      prompt_tokens: {{dist: lognormal, p50: 600, p90: 2000, max: {prompt_max}}}
      output_tokens: {{dist: lognormal, p50: 20, p90: 60, max: 120}}
"""
    )
    return path


@asynccontextmanager
async def sim_server(
    config: EngineConfig | None = None, time_scale: float = 1.0
) -> AsyncIterator[tuple[SimServer, str]]:
    server = SimServer(config or engine_config(), MODEL, time_scale)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


@asynccontextmanager
async def gate_in_front(
    upstream: str, knobs: Knobs, **settings: Any
) -> AsyncIterator[tuple[GateServer, str, str]]:
    config = {
        "upstream": upstream,
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "token": "t",
        "knobs": knobs,
        "health_interval_s": 0.05,
        **settings,
    }
    gate = GateServer(load_settings(config, {}))
    await gate.start()
    try:
        yield gate, f"http://127.0.0.1:{gate.proxy_port}", f"http://127.0.0.1:{gate.admin_port}"
    finally:
        await gate.stop()


def run(test: Callable[[], Awaitable[None]], timeout_s: float = 60) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=timeout_s))


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str
) -> tuple[int, str, list[float]]:
    """Status, body text, and the wall time of each received line that carries data."""
    started = time.monotonic()
    times = []
    chunks = []
    async with session.post(url, json=body, headers=headers) as response:
        async for line in response.content:
            chunks.append(line)
            if (
                line.startswith(b"data: {")
                and b'"choices": []' not in line
                and b'"finish_reason": "length"' not in line
            ):
                times.append(time.monotonic() - started)
        return response.status, b"".join(chunks).decode(), times


def sse_events(text: str) -> list[Any]:
    assert text.endswith("data: [DONE]\n\n"), text[-80:]
    return [json.loads(block.removeprefix("data: ")) for block in text.split("\n\n")[:-2]]


@pytest.mark.parametrize(
    ("path", "body", "headers", "expected_tokens"),
    [
        ("/v1/completions", {"prompt": "hello", "max_tokens": 7, "stream": True}, {}, 7),
        (
            "/v1/completions",
            {"prompt": [1] * 50, "max_tokens": 7, "stream": True},
            {"x-output-tokens": "3"},
            3,
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 5,
                "stream": True,
            },
            {},
            5,
        ),
    ],
)
def test_streams_exactly_the_requested_tokens(
    path: str, body: dict[str, Any], headers: dict[str, str], expected_tokens: int
) -> None:
    async def scenario() -> None:
        async with sim_server(time_scale=20) as (_, url), aiohttp.ClientSession() as session:
            status, text, _ = await post(
                session, url + path, {**body, "stream_options": {"include_usage": True}}, **headers
            )
            assert status == 200
            events = sse_events(text)
            usage = events[-1]["usage"]
            assert usage["completion_tokens"] == expected_tokens
            choices = [event["choices"][0] for event in events[:-1]]
            texts = [c.get("text") or (c.get("delta") or {}).get("content") for c in choices]
            assert texts[:-1] == [f" t{i}" for i in range(expected_tokens)]
            assert choices[-1]["finish_reason"] == "length"
            if "chat" in path:
                assert choices[0]["delta"]["role"] == "assistant"
            # Non-streaming: the same tokens in one body.
            async with session.post(
                url + path, json={**body, "stream": False}, headers=headers
            ) as response:
                whole = await response.json()
            assert whole["usage"]["completion_tokens"] == expected_tokens

    run(scenario)


@pytest.mark.parametrize("time_scale", [1.0, 4.0])
def test_tokens_leave_at_their_simulated_times(time_scale: float) -> None:
    """One request alone: wall x time_scale matches the virtual-time replica, never earlier."""
    prompt, output = 8000, 60
    virtual = Replica(engine_config(), Knobs(), record_tokens=True)
    request = virtual.submit(0.0, prompt, output)
    virtual.advance(1e9)
    assert request.first_token_s is not None and request.finish_s is not None

    async def scenario() -> None:
        async with (
            sim_server(time_scale=time_scale) as (_, url),
            aiohttp.ClientSession() as session,
        ):
            body = {"prompt": "x", "max_tokens": output, "stream": True}
            status, _, times = await post(
                session, url + "/v1/completions", body, **{"x-prompt-tokens": str(prompt)}
            )
            assert status == 200 and len(times) == output
            ttft, last = times[0] * time_scale, times[-1] * time_scale
            # Event-loop and HTTP latency only ever add; 60 ms of slack (wall)
            # covers a loaded two-core machine.
            slack = 0.06 * time_scale
            assert request.first_token_s <= ttft + 0.002 <= request.first_token_s + slack
            assert request.finish_s <= last + 0.002 <= request.finish_s + slack

    run(scenario)


def test_prefill_budget_is_tunable_live_through_set_internal_state() -> None:
    prompt = 8000

    def virtual_ttft(budget: int) -> float:
        replica = Replica(
            engine_config(max_num_batched_tokens=budget, runtime_tunable=True),
            Knobs(),
            record_tokens=True,
        )
        request = replica.submit(0.0, prompt, 2)
        replica.advance(1e9)
        assert request.ttft_s is not None
        return request.ttft_s

    small_budget_ttft, large_budget_ttft = virtual_ttft(512), virtual_ttft(8192)
    # Sixteen 512-token chunks take measurably longer than one 8192-token step.
    assert small_budget_ttft > large_budget_ttft + 0.03

    async def scenario() -> None:
        config = engine_config(runtime_tunable=True)
        async with sim_server(config) as (server, url), aiohttp.ClientSession() as session:
            body = {"prompt": "x", "max_tokens": 2, "stream": True}
            headers = {"x-prompt-tokens": str(prompt)}
            _, _, before = await post(session, url + "/v1/completions", body, **headers)
            async with session.post(
                url + "/set_internal_state", json={"server_args": {"chunked_prefill_size": 512}}
            ) as response:
                assert await response.json() == [
                    {"updated": True, "server_args": {"chunked_prefill_size": 512}}
                ]
            _, _, after = await post(session, url + "/v1/completions", body, **headers)
            assert large_budget_ttft <= before[0] + 0.002 < large_budget_ttft + 0.03
            assert small_budget_ttft <= after[0] + 0.002 < small_budget_ttft + 0.03
            assert server.engine.replica.knobs.max_num_batched_tokens == 512
            for bad, status in [
                ({"server_args": {"chunked_prefill_size": 4}}, 400),
                ({"nothing": 1}, 400),
            ]:
                async with session.post(url + "/set_internal_state", json=bad) as response:
                    assert response.status == status
            async with session.post(
                url + "/set_internal_state", json={"server_args": {"max_running_requests": 8}}
            ) as response:
                assert (await response.json())[0]["updated"] is False
            assert server.engine.replica.knobs.max_num_batched_tokens == 512

    run(scenario)


def test_engine_without_runtime_tuning_has_no_set_internal_state() -> None:
    async def scenario() -> None:
        body = {"server_args": {"chunked_prefill_size": 512}}
        async with (
            sim_server() as (_, url),
            aiohttp.ClientSession() as session,
            session.post(url + "/set_internal_state", json=body) as response,
        ):
            assert response.status == 404

    run(scenario)


def test_metrics_are_the_engines_own_and_count_requests() -> None:
    async def scenario() -> None:
        async with sim_server(time_scale=20) as (_, url), aiohttp.ClientSession() as session:
            for _ in range(3):
                await post(
                    session,
                    url + "/v1/completions",
                    {"prompt": "x", "max_tokens": 4, "stream": True},
                )
            async with session.get(url + "/metrics") as response:
                text = await response.text()
            assert "batchpilot_gate" not in text
            samples = {
                s.name: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if not s.labels or s.name.endswith("_count")
            }
            assert samples["vllm:time_to_first_token_seconds_count"] == 3
            assert samples["vllm:generation_tokens_total"] == 12
            assert samples["vllm:num_requests_running"] == 0

    run(scenario)


def test_gate_passes_the_engines_other_routes_through() -> None:
    async def scenario() -> None:
        async with (
            sim_server(time_scale=20) as (_, engine_url),
            gate_in_front(engine_url, Knobs(max_concurrency=1)) as (_, url, _),
            aiohttp.ClientSession() as session,
        ):
            body = {"prompt": "x", "max_tokens": 4, "stream": True}
            assert (await post(session, url + "/v1/completions", body))[0] == 200
            # vLLM serves /metrics on its API port: through the gate it is the engine's.
            async with session.get(url + "/metrics") as response:
                through = await response.text()
            async with session.get(engine_url + "/metrics") as response:
                assert through == await response.text()
            assert "vllm:generation_tokens_total 4.0" in through
            # No embeddings on a generative engine: the client hears the engine's
            # own 404, not one from the gate.
            async with session.post(url + "/v1/embeddings", json={"input": "x"}) as response:
                assert (response.status, await response.text()) == (404, "404: Not Found")

    run(scenario)


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        ({"prompt": "x", "max_tokens": 3, "n": 2}, {}, "n"),
        ({"prompt": "x", "max_tokens": 3}, {"x-output-tokens": "none"}, "x-output-tokens"),
        ({"prompt": "x", "max_tokens": 3}, {"x-output-tokens": "0"}, "x-output-tokens"),
        ({"max_tokens": 3}, {}, "prompt"),
        # 450,000-token KV cache: this request can never fit, even alone.
        ({"prompt": "x", "max_tokens": 3}, {"x-prompt-tokens": "500000"}, "max_tokens"),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    body: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    async def scenario() -> None:
        async with sim_server(time_scale=20) as (_, url), aiohttp.ClientSession() as session:
            for stream in (True, False):
                async with session.post(
                    url + "/v1/completions", json={**body, "stream": stream}, headers=headers
                ) as response:
                    assert response.status == 400
                    assert (await response.json())["error"]["param"] == param

    run(scenario)


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_gate_caps_hold_at_sim_serve(cap: int) -> None:
    async def scenario() -> None:
        async with (
            sim_server(time_scale=5) as (server, url),
            gate_in_front(url, Knobs(max_concurrency=cap)) as (_, gate_url, _),
        ):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                body = {"prompt": "x" * 4000, "max_tokens": 12, "stream": True}
                results = await asyncio.gather(
                    *(post(session, gate_url + "/v1/completions", body) for _ in range(40))
                )
            assert all(status == 200 and len(times) == 12 for status, _, times in results)
            assert server.max_open_requests == cap

    run(scenario)


def test_gate_native_adapter_tunes_sim_serve_end_to_end() -> None:
    async def scenario() -> None:
        config = engine_config(runtime_tunable=True)
        async with (
            sim_server(config) as (server, url),
            gate_in_front(url, Knobs(), native="sglang") as (_, _, admin),
        ):
            async with aiohttp.ClientSession() as session:
                headers = {"Authorization": "Bearer t"}
                async with session.put(
                    admin + "/config", json={"max_num_batched_tokens": 1024}, headers=headers
                ) as response:
                    answer = await response.json()
            assert answer["native"]["status"] == "applied"
            assert server.engine.replica.knobs.max_num_batched_tokens == 1024

    run(scenario)


def test_load_replays_the_workload_and_measures_each_request(tmp_path: Path) -> None:
    scenario_file = write_scenario(tmp_path / "s.yaml", rate_rps=6, duration_s=10)
    parsed = load_scenario(scenario_file)
    workload = build_workload(parsed)

    async def scenario() -> None:
        async with sim_server(time_scale=10) as (_, url_a), sim_server(time_scale=10) as (_, url_b):
            records = await replay(workload, [url_a, url_b], time_scale=10)
            assert len(records) == len(workload)
            for index, record in enumerate(records):
                assert record.status == OK, record.error
                assert (record.prompt_tokens, record.output_tokens) == (
                    workload.prompt_tokens[index],
                    workload.output_tokens[index],
                )
                assert record.url == (url_a, url_b)[index % 2]
                assert record.completion_tokens == record.output_tokens == len(record.token_times_s)
                assert record.token_times_s == sorted(record.token_times_s)
            summary = summarize(records, parsed.duration_s, parsed.slo)
            assert summary["arrived"] == summary["ok"] == len(workload)
            assert summary["by_url"] == {
                url_a: {OK: math.ceil(len(workload) / 2), SHED: 0, ERROR: 0},
                url_b: {OK: len(workload) // 2, SHED: 0, ERROR: 0},
            }
            assert summary["output_tok_s"] == pytest.approx(
                workload.output_tokens.sum() / parsed.duration_s
            )
            # The same measurements against an SLO nothing meets, and one everything meets.
            assert (
                summarize(records, parsed.duration_s, ScenarioSlo(ttft_ms=0.001, tpot_ms=50))["good"] == 0
            )
            everything = summarize(records, parsed.duration_s, ScenarioSlo(ttft_ms=1e9, tpot_ms=1e9))
            assert everything["good"] == len(workload)
            assert everything["goodput_rps"] == pytest.approx(len(workload) / parsed.duration_s)

    run(scenario)


def test_load_classifies_shed_and_error_responses(tmp_path: Path) -> None:
    # A 3,000-token KV cache: prompts up to 4,000 tokens cannot all fit (400 from the engine).
    scenario_file = write_scenario(
        tmp_path / "s.yaml", rate_rps=30, duration_s=4, kv_cache_tokens=3000
    )
    parsed = load_scenario(scenario_file)
    workload = build_workload(parsed)

    async def scenario() -> None:
        config = engine_config(kv_cache_tokens=3000)
        # One at a time and a 20 ms deadline: a burst of 30 rps gets shed.
        knobs = Knobs(max_concurrency=1, queue_deadline_ms=20)
        async with (
            sim_server(config, time_scale=1) as (_, url),
            gate_in_front(url, knobs) as (gate, gate_url, _),
        ):
            records = await replay(workload, [gate_url], time_scale=1)
        shed = [r for r in records if r.status == SHED]
        assert shed and all(r.http_status == 429 for r in shed)
        assert len(shed) == gate.gate.metrics.shed["queue_deadline"]
        # Too long for the KV cache: refused by the engine, unless shed first.
        too_long = [
            r for r in records if r.prompt_tokens + r.output_tokens - 1 > 3000 and r.status != SHED
        ]
        errors = [r for r in records if r.status == ERROR]
        assert too_long and errors == too_long
        assert all(r.http_status == 400 for r in errors)
        summary = summarize(records, parsed.duration_s, parsed.slo)
        assert (summary["shed"], summary["errors"]) == (len(shed), len(errors))
        assert summary["ok"] == len(records) - len(shed) - len(errors) > 0

    run(scenario)


def test_cli_serve_and_load(tmp_path: Path) -> None:
    scenario_file = write_scenario(tmp_path / "s.yaml", rate_rps=5, duration_s=6)
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchpilot.cli.main",
            "sim",
            "serve",
            "--scenario",
            str(scenario_file),
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "10",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stderr is not None
        line = serve.stderr.readline()
        while "on port" not in line:
            assert line, "sim serve exited before listening"
            line = serve.stderr.readline()
        port = int(re.search(r"on port (\d+)", line).group(1))  # type: ignore[union-attr]
        out = tmp_path / "out" / "load.json"
        result = CliRunner().invoke(
            app,
            [
                "sim",
                "load",
                str(scenario_file),
                "--url",
                f"http://127.0.0.1:{port}",
                "--time-scale",
                "10",
                "--duration",
                "3",
                "--json",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        document = json.loads(out.read_text())
        assert document["duration_s"] == 3
        assert document["summary"]["arrived"] == len(document["requests"]) > 0
        assert all(row["arrival_s"] < 3 and row["status"] == OK for row in document["requests"])
        assert "goodput_rps" in result.output
        bad = CliRunner().invoke(
            app,
            [
                "sim",
                "load",
                str(tmp_path / "missing.yaml"),
                "--url",
                "http://127.0.0.1:9",
                "--json",
                str(out),
            ],
        )
        assert bad.exit_code == 2 and "cannot read scenario file" in bad.output
    finally:
        serve.terminate()
        serve.wait(10)


def _bucket_around(value: float) -> tuple[float, float]:
    upper = next(bound for bound in TTFT_BUCKETS if bound >= value)
    lower = max([0.0, *(bound for bound in TTFT_BUCKETS if bound < upper)])
    return lower, upper


@pytest.mark.stack
def test_prometheus_ttft_quantiles_match_client_measurements(
    tmp_path: Path, prometheus: Callable[..., Any]
) -> None:
    """Real time, real Prometheus: the engine's TTFT histogram and the client agree."""
    scenario_file = write_scenario(tmp_path / "s.yaml", rate_rps=8, duration_s=15)
    parsed = load_scenario(scenario_file)
    workload = build_workload(parsed)

    async def scenario() -> None:
        async with sim_server(time_scale=1) as (_, url), aiohttp.ClientSession() as session:
            port = url.rsplit(":", 1)[1]
            server = await asyncio.to_thread(prometheus, [f"127.0.0.1:{port}"])
            try:
                records = await replay(workload, [url], time_scale=1)
                await asyncio.sleep(2.5)  # two more 1 s scrapes
                ttfts = sorted(r.ttft_s for r in records if r.ttft_s is not None)
                assert len(ttfts) == len(workload)
                for quantile in (0.5, 0.9):
                    query = f"histogram_quantile({quantile}, sum by (le) (vllm:time_to_first_token_seconds_bucket))"
                    async with session.get(
                        f"{server.url}/api/v1/query", params={"query": query}
                    ) as response:
                        result = (await response.json())["data"]["result"]
                    from_prometheus = float(result[0]["value"][1])
                    client = ttfts[min(len(ttfts) - 1, int(quantile * len(ttfts)))]
                    lower, upper = _bucket_around(from_prometheus)
                    # Same bucket as PromQL's interpolation; the client's own
                    # HTTP time (a few ms) may carry it just past the bound.
                    assert lower <= client <= upper + 0.01, (quantile, from_prometheus, client)
            finally:
                await asyncio.to_thread(server.stop)

    run(scenario, timeout_s=120)
