"""Engine-native live tuning: the knobs only the engine itself can change.

The gate steers concurrency, the token budget, order and deadline for every
engine. A knob inside the engine's scheduler (the prefill token budget per
step) needs the engine's own API, and only a few engines have one. Each
adapter passes only the knobs its engine accepts live, and reports the
outcome as a `NativeResult`; it never raises, so a failing engine API can
never take the gate down. The gate calls `apply` on every configuration
write (so repeating a write retries a refused change) and whenever the
engine becomes ready again (a restarted engine is back at its startup
settings).

Adapters:

- `sglang`: `POST {upstream}/set_internal_state` with
  `{"server_args": {"chunked_prefill_size": <max_num_batched_tokens>}}`.
  SGLang answers a list with one entry per data-parallel rank: booleans in
  older releases, `{"updated": bool, ...}` objects in newer ones; anything
  but all-true is reported as `rejected`. Note: upstream SGLang's scheduler
  allow-list for `set_internal_state` is small (speculative-decoding
  thresholds, the pipeline micro-batch size) and, in the releases read for
  this adapter, does not include `chunked_prefill_size`, so a stock SGLang
  answers `rejected` and the gate says so. `batchpilot sim serve` with a
  runtime-tunable engine implements the same endpoint shape.
- `vllm`: runtime reconfiguration is only a proposal in vLLM (a prototype
  `GET/PATCH /v1/runtime_config` carrying `max_num_running_seqs`). The
  adapter probes `GET /v1/runtime_config` once; a 404/405 means
  `unsupported`, reported once and not retried. When present, the
  concurrency cap is sent as `max_num_running_seqs`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from batchpilot.contract.knobs import Knobs

APPLIED = "applied"
UNCHANGED = "unchanged"
UNSUPPORTED = "unsupported"
REJECTED = "rejected"
ERROR = "error"
# Outcomes that count as a failure in batchpilot_gate_failed_total{reason="native_apply"}.
FAILURE_STATUSES = (REJECTED, ERROR)

# An engine API call is a small control-plane request: 5 s is generous and
# keeps a wedged engine from holding the gate's config lock for long.
NATIVE_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


@dataclass(frozen=True, slots=True)
class NativeResult:
    adapter: str
    status: str
    detail: str
    sent: dict[str, Any] = field(default_factory=dict)
    at_unix_s: float = field(default_factory=time.time)

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


class NativeAdapter(Protocol):
    name: str

    async def apply(self, knobs: Knobs) -> NativeResult:
        """Pass the engine-supported part of `knobs` to the engine; never raises."""
        ...


class SGLangAdapter:
    """SGLang's `/set_internal_state`: the prefill chunk size per step."""

    name = "sglang"

    def __init__(self, session: aiohttp.ClientSession, upstream_url: str) -> None:
        self._session = session
        self._url = f"{upstream_url}/set_internal_state"

    async def apply(self, knobs: Knobs) -> NativeResult:
        if knobs.max_num_batched_tokens is None:
            # No value from batchpilot: the engine keeps its startup setting.
            return NativeResult(self.name, UNCHANGED, "max_num_batched_tokens not set")
        server_args = {"chunked_prefill_size": knobs.max_num_batched_tokens}
        try:
            async with self._session.post(
                self._url, json={"server_args": server_args}, timeout=NATIVE_TIMEOUT
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            return NativeResult(self.name, ERROR, f"POST {self._url} failed: {err!r}", server_args)
        if status in (404, 405):
            return NativeResult(
                self.name,
                UNSUPPORTED,
                f"engine has no /set_internal_state (HTTP {status})",
                server_args,
            )
        if status >= 400:
            return NativeResult(self.name, REJECTED, f"HTTP {status}: {text[:200]}", server_args)
        if not _all_updated(text):
            return NativeResult(
                self.name, REJECTED, f"engine did not apply it: {text[:200]}", server_args
            )
        return NativeResult(self.name, APPLIED, "applied", server_args)


def _all_updated(text: str) -> bool:
    """SGLang's answer: a bool, an {"updated"|"success": bool} object, or a list of those."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return False
    ranks = answer if isinstance(answer, list) else [answer]
    if not ranks:
        return False
    for rank in ranks:
        if isinstance(rank, dict):
            rank = rank.get("updated", rank.get("success"))
        if rank is not True:
            return False
    return True


class VLLMAdapter:
    """vLLM's proposed runtime-config endpoint, probed once; `unsupported` when absent."""

    name = "vllm"

    def __init__(self, session: aiohttp.ClientSession, upstream_url: str) -> None:
        self._session = session
        self._url = f"{upstream_url}/v1/runtime_config"
        self._supported: bool | None = None

    async def apply(self, knobs: Knobs) -> NativeResult:
        if self._supported is None:
            probe = await self._probe()
            if probe is not None:
                return probe
        if not self._supported:
            return NativeResult(self.name, UNSUPPORTED, f"engine has no {self._url}")
        if knobs.max_concurrency is None:
            return NativeResult(self.name, UNCHANGED, "max_concurrency not set")
        body = {"max_num_running_seqs": knobs.max_concurrency}
        try:
            async with self._session.patch(
                self._url, json=body, timeout=NATIVE_TIMEOUT
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            return NativeResult(self.name, ERROR, f"PATCH {self._url} failed: {err!r}", body)
        if status >= 400:
            return NativeResult(self.name, REJECTED, f"HTTP {status}: {text[:200]}", body)
        return NativeResult(self.name, APPLIED, "applied", body)

    async def _probe(self) -> NativeResult | None:
        """Decide support once; return a result only when the probe itself failed."""
        try:
            async with self._session.get(self._url, timeout=NATIVE_TIMEOUT) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            # Engine not up yet: decide on the next apply.
            return NativeResult(self.name, ERROR, f"probe GET {self._url} failed: {err!r}")
        if status in (404, 405):
            self._supported = False
        elif status < 400:
            self._supported = True
        else:
            # 5xx while the engine starts: decide on the next apply.
            return NativeResult(self.name, ERROR, f"probe GET {self._url}: HTTP {status}")
        return None


def make_adapter(
    kind: str, session: aiohttp.ClientSession, upstream_url: str
) -> NativeAdapter | None:
    """The adapter for the `native` setting; None when native tuning is off."""
    if kind == "sglang":
        return SGLangAdapter(session, upstream_url)
    if kind == "vllm":
        return VLLMAdapter(session, upstream_url)
    return None
