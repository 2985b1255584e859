"""`batchpilot sim load`: replay a scenario's workload against live OpenAI-compatible servers.

The requests are the scenario's (sim/workload.py: the same arrivals and
lengths the benchmark replays), sent at their arrival times divided by
`time_scale`, round-robin over the URLs, as streaming `/v1/completions`:

- the prompt is `prompt_tokens` token ids (exact for any engine, and the
  gate and `sim serve` count them without a tokenizer), also given as the
  `x-prompt-tokens` header; the ids differ from request to request, since
  an engine with prompt caching (llama.cpp's slots, vLLM's prefix cache)
  would otherwise skip the prefill of every prompt after the first;
- `max_tokens` = the scenario's output length, with `ignore_eos` (a vLLM
  extension) so a real engine produces all of them, and `x-output-tokens`
  for `sim serve`;
- a scenario with SLO classes names each request's class in the
  `x-batchpilot-class` header, as a client of a gate with classes does.

Measured at the client, per request: TTFT (request sent -> first token
chunk), each token chunk's time, and the outcome: ok (complete stream),
shed (HTTP 429, e.g. the gate's queue deadline) or error (any other status,
a connection failure, a stream cut short). Durations are reported in
scenario seconds, i.e. wall seconds x `time_scale`, so that a run against
`sim serve --time-scale K` reads like the benchmark (note that network and
gate overhead are scaled up by K too).

The summary is computed as the benchmark does (sim/bench.py): good = ok and
TTFT <= slo.ttft_ms and TPOT <= slo.tpot_ms, where TPOT = (last token -
first token) / (tokens - 1) and the token count is the server's
`usage.completion_tokens` when it reports one, else the number of chunks
with text; goodput_rps = good / workload duration; percentiles over ok
requests (TPOT over those with two or more tokens).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

from batchpilot.contract.knobs import CLASS_HEADER, DEFAULT_CLASS

# The benchmark's own outcome table and result fields, so the numbers compare.
from batchpilot.sim.bench import RequestTable, class_good_mask, class_outcomes
from batchpilot.sim.scenario import ScenarioSlo
from batchpilot.sim.workload import Workload

OK, SHED, ERROR = "ok", "shed", "error"
# Prompt token ids are drawn below this: every vocabulary in use is larger
# (the generated llama.cpp model's has 110 tokens, its first 97 plain bytes).
PROMPT_TOKEN_IDS = 97


def prompt_ids(index: int, length: int) -> list[int]:
    """Request `index`'s prompt: `length` token ids, seeded by the index, so a
    replay sends the same prompts and no two requests share a prefix."""
    ids: list[int] = np.random.default_rng(index).integers(0, PROMPT_TOKEN_IDS, length).tolist()
    return ids


class LoadError(RuntimeError):
    """The load cannot start (no server answers); the message says which URL."""


@dataclass
class RequestRecord:
    index: int
    url: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    status: str = ERROR
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    # Scenario seconds after the request was sent, one per token chunk.
    token_times_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    # The request's SLO class (the gate's default class when the scenario has none).
    service_class: str = DEFAULT_CLASS

    @property
    def tpot_s(self) -> float | None:
        if self.status != OK or not self.token_times_s:
            return None
        if self.completion_tokens <= 1:
            return 0.0
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.completion_tokens - 1)


@dataclass
class LoadProgress:
    sent: int = 0
    done: int = 0


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model id the server lists (requests must name one)."""
    try:
        async with session.get(f"{url}/v1/models") as response:
            response.raise_for_status()
            return str((await response.json())["data"][0]["id"])
    except (aiohttp.ClientError, KeyError, IndexError, ValueError) as err:
        raise LoadError(
            f"{url}/v1/models did not name a model ({err!r}); is the server up?"
        ) from err


async def replay(
    workload: Workload,
    urls: Sequence[str],
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    model: str | None = None,
    request_timeout_s: float = 600.0,
    on_progress: Callable[[LoadProgress], None] | None = None,
    fresh_connections: bool = False,
) -> list[RequestRecord]:
    """Send the workload's requests (those arriving before `duration_s`) and record each.

    `fresh_connections`: a new connection per request, for servers that close
    a connection after a streamed answer while advertising keep-alive
    (llama-server; the gate retries such a request, a bare client cannot).
    """
    urls = [url.rstrip("/") for url in urls]
    count = (
        len(workload)
        if duration_s is None
        else int(np.searchsorted(workload.arrival_s, duration_s))
    )
    progress = LoadProgress()
    # One connection per request in flight: a pool limit here would queue
    # requests in the client and hide the server's queueing.
    classes = workload.class_of()
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = model or await served_model(session, urls[0])
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for index in range(count):
            record = RequestRecord(
                index=index,
                url=urls[index % len(urls)],
                arrival_s=float(workload.arrival_s[index]),
                prompt_tokens=int(workload.prompt_tokens[index]),
                output_tokens=int(workload.output_tokens[index]),
                service_class=workload.class_names[classes[index]],
            )
            delay = start + record.arrival_s / time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(
                    _send(session, record, model, time_scale, progress, on_progress)
                )
            )
            progress.sent += 1
            if on_progress is not None:
                on_progress(progress)
        return list(await asyncio.gather(*tasks))


async def _send(
    session: aiohttp.ClientSession,
    record: RequestRecord,
    model: str,
    time_scale: float,
    progress: LoadProgress,
    on_progress: Callable[[LoadProgress], None] | None,
) -> RequestRecord:
    body = {
        "model": model,
        "prompt": prompt_ids(record.index, record.prompt_tokens),
        "max_tokens": record.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {
        "x-prompt-tokens": str(record.prompt_tokens),
        "x-output-tokens": str(record.output_tokens),
    }
    if record.service_class != DEFAULT_CLASS:
        headers[CLASS_HEADER] = record.service_class
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        async with session.post(
            f"{record.url}/v1/completions", json=body, headers=headers
        ) as response:
            record.http_status = response.status
            if response.status != 200:
                record.status = SHED if response.status == 429 else ERROR
                record.error = (await response.text())[:300]
            else:
                await _read_stream(response, record, sent, time_scale)
    except (aiohttp.ClientError, TimeoutError) as err:
        record.status = ERROR
        record.error = repr(err)
    progress.done += 1
    if on_progress is not None:
        on_progress(progress)
    return record


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, sent: float, time_scale: float
) -> None:
    loop = asyncio.get_running_loop()
    usage_tokens = None
    complete = False
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            # Read on to the end of the body: closing early would look like a
            # client disconnect to the gate (and count as one).
            complete = True
            continue
        event = json.loads(data)
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens")
        for choice in event.get("choices", ()):
            text = choice.get("text") or (choice.get("delta") or {}).get("content")
            if text:
                record.token_times_s.append((loop.time() - sent) * time_scale)
    if not complete:
        record.status = ERROR
        record.error = "stream ended before data: [DONE]"
        return
    record.completion_tokens = (
        usage_tokens if usage_tokens is not None else len(record.token_times_s)
    )
    record.ttft_s = record.token_times_s[0] if record.token_times_s else None
    record.status = OK


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: ScenarioSlo,
    class_slos: Mapping[str, ScenarioSlo] | None = None,
) -> dict[str, Any]:
    """The benchmark's result fields, from client-side measurements.

    `class_slos`: each SLO class's objectives (a scenario with classes): a
    request is judged against its own class's, `slo` being the default
    class's, and the summary gains `classes`, the same fields per class.
    """
    nan = math.nan
    names = np.array([r.service_class for r in records], dtype=object)
    table = RequestTable(
        arrival_s=np.array([r.arrival_s for r in records]),
        ttft_s=np.array([nan if r.ttft_s is None else r.ttft_s for r in records]),
        tpot_s=np.array([nan if r.tpot_s is None else r.tpot_s for r in records]),
        output_tokens=np.array([r.completion_tokens for r in records]),
        finished=np.array([r.status == OK for r in records], dtype=bool),
        shed=np.array([r.status == SHED for r in records], dtype=bool),
        service_class=names,
        prompt_tokens=np.array([r.prompt_tokens for r in records]),
    )
    good = class_good_mask(table, slo, class_slos or {})
    ok = table.finished
    by_url: dict[str, dict[str, int]] = {}
    for record in records:
        counts = by_url.setdefault(record.url, {OK: 0, SHED: 0, ERROR: 0})
        counts[record.status] += 1
    summary = {
        "arrived": len(records),
        "ok": int(ok.sum()),
        **table.outcome(good, duration_s),
        "errors": int((~ok & ~table.shed).sum()),
        "by_url": by_url,
    }
    if class_slos is not None:
        with_traffic = [n for n in (*class_slos, DEFAULT_CLASS) if (names == n).any()]
        summary["classes"] = class_outcomes(table, good, with_traffic, duration_s)
    return summary


def record_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Per-request JSON rows; times rounded to 0.1 ms to keep the file small."""
    rows = []
    for record in records:
        row = asdict(record)
        row["token_times_s"] = [round(t, 4) for t in record.token_times_s]
        row["tpot_s"] = record.tpot_s
        rows.append(row)
    return rows
