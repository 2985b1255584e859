"""One simulated serving replica: the batchpilot gate in front of a vLLM-like engine.

Why one module: one class, the replica's event loop (`Replica`, about 600
of these lines): the scheduler, the closed-form decode jumps, preemption and
cancel all update the same running-batch aggregates, and splitting them would
scatter one state machine across files.

**This module is the live API** that `batchpilot sim serve` drives in real time
and that the benchmark harness drives in virtual time. One `Replica` object is
one pod:

    replica = Replica(config, Knobs(), name="replica-0", record_tokens=True)
    handle = replica.submit(t, prompt_tokens=812, max_output_tokens=120, priority=0,
                            service_class="interactive")  # default: "default"
    events = replica.advance(t2)        # every engine step that ended by t2
    replica.set_knobs(t3, Knobs(max_concurrency=64))
    replica.cancel(t3, handle.request_id)  # its client left: drop it, free its KV blocks
    replica.snapshot(t4)                # {'vllm:num_requests_running': 12.0, ...}
    replica.render_text(t4)             # Prometheus text exposition
    replica.next_event_s()              # when the step in progress ends (None when idle)

Times are finite seconds on one clock chosen by the caller (virtual time in the
benchmark, `loop.time()` minus a start offset in a live server) and must never
go backwards across calls. `submit`, `set_knobs`, `cancel` and `snapshot` first
advance the replica to their `t`, so a caller may use them without calling
`advance`. With `record_tokens=True`, `advance` returns `EngineEvent`s in time
order: ``admitted``, ``tokens`` (the simulated timestamp of every token
produced since the last report, first token included), ``finished``, ``shed``
(gate queue deadline), ``rejected`` (a request that cannot fit the KV cache
even alone) and ``cancelled``; `SimRequest.token_times` keeps every token's
time. Without it (the benchmark) no events or per-token times are kept, which
is what makes the closed-form decode jumps below cheap.

The model, iteration by iteration:

- Gate: an `AdmissionQueue` (gate/admission.py) with the `Knobs`;
  `max_concurrency` is clamped to the engine's `max_num_seqs` ceiling. A
  request is queued in the SLO class `submit` names (one the knobs do not
  configure means the default class, as at the real gate); the per-class
  series are sim/metrics.py's.
  Admitted requests enter the engine's waiting queue; a finished request
  releases its ticket, which may admit the next ones at that instant.
- Engine (vLLM V1 scheduler): each step first gives every running decode one
  token of the `max_num_batched_tokens` budget, then continues running
  partial prefills in order, then starts waiting requests (FCFS) while the
  budget lasts, the running batch is below `max_num_seqs`, and the first
  chunk's KV blocks fit. The KV cache is paged in blocks of 16 tokens; when
  the decodes need more blocks than are free, or a running prefill's chunk
  does not fit, the newest running request is preempted by recomputation:
  its blocks are freed and it goes to the front of the waiting queue, to
  prefill its prompt and the tokens it had generated again.
- Step time = calibrated `StepCostModel.step_ms` x `slowdown`.
- Shared KV cache (`shared_kv_cache`, llama.cpp's `--kv-unified`): one
  cache serves every slot, and every token of a step is checked against
  every occupied cell; the mask hides other sequences' cells. A step pays
  `masked_pair_ms` per masked (token, cell) pair on top of its own
  attention (sim/calibration.py), so a prompt prefilled beside 16 long
  streams costs more than alone. A slot that finishes (or whose client
  left) keeps its cells until a new request takes it: llama.cpp gives a new
  request the least recently used idle slot, so the cells of up to
  `max_num_seqs` recent requests stay in every step's mask. Those idle cells
  do not count against `kv_cache_tokens` here (the cache is sized so that
  they fit).
- A request generates exactly `max_output_tokens` tokens (there is no EOS
  model); its first token comes from the step that completes its prefill.
- Cancel (vLLM's abort when a client disconnects): the request leaves the
  gate queue, the waiting queue or the running batch at once, and its KV
  blocks, batch slot and gate place are free for the next step. The step in
  progress keeps its duration (its work was launched) but yields nothing for
  the cancelled request.

Speed: between events, consecutive decode-only steps differ only in that
every context grows by one token, so the step time is an arithmetic series.
When nothing can join the batch (no partial prefills, and the waiting head is
blocked by `max_num_seqs`, the budget or free KV blocks, none of which can
loosen before a request finishes), the engine jumps over K steps in closed
form, where K stops at the first finishing request, the first step whose new
KV blocks would not fit, or the caller's horizon. The running batch is kept
as aggregates (count, sum of contexts, a count per position-in-block phase,
a heap of finishing step numbers), so even a single step costs O(1) in the
batch size.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, replace

from batchpilot.contract.gate_metrics import FailedReason, ShedReason
from batchpilot.contract.knobs import DEFAULT_CLASS, Knobs
from batchpilot.gate.admission import AdmissionQueue, Ticket
from batchpilot.sim.calibration import StepCostModel
from batchpilot.sim.metrics import ClassSeries, ReplicaGauges, ReplicaMetrics

# Shed reason of a request the engine refused because its queue was full
# (vLLM's --max-num-queued-tokens; see PeerAdmission).
SHED_ENGINE_QUEUE_FULL = "engine_queue_full"

# vLLM's default KV block size (tokens per page).
BLOCK_SIZE = 16

QUEUED, WAITING, PREFILL, DECODE, FINISHED, SHED, REJECTED, CANCELLED = range(8)
_STATUS = ("queued", "waiting", "prefill", "decode", "finished", "shed", "rejected", "cancelled")


class EngineConfigError(ValueError):
    """An engine setting is impossible; the message names the field."""


@dataclass(frozen=True, slots=True)
class PeerAdmission:
    """Admission rules of systems other than batchpilot's gate (the benchmark's peer baselines).

    - `max_num_seqs`: the engine was started with this ``--max-num-seqs``
      instead of the scenario's ceiling (the peers run vLLM's default).
    - `max_queued_prompt_tokens`: vLLM's ``--max-num-queued-tokens``. A
      request that reaches the engine when the prompt tokens already waiting
      plus its own would pass this is refused (503): shed, reason
      ``engine_queue_full``.
    - `hold_waiting` / `hold_kv_usage`: llm-d's saturation detector. The
      gateway dispatches nothing from its queue while the engine's waiting
      queue holds `hold_waiting` requests or more, or its KV cache usage is
      at `hold_kv_usage` or above; it checks again before every engine step.
    """

    max_num_seqs: int | None = None
    max_queued_prompt_tokens: int | None = None
    hold_waiting: int | None = None
    hold_kv_usage: float | None = None

    @property
    def holds(self) -> bool:
        return self.hold_waiting is not None or self.hold_kv_usage is not None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Startup configuration of one replica's engine."""

    cost: StepCostModel
    kv_cache_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    runtime_tunable: bool = False
    slowdown: float = 1.0
    shared_kv_cache: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_tokens < BLOCK_SIZE:
            raise EngineConfigError(
                f"kv_cache_tokens: must be >= {BLOCK_SIZE} (one block), got {self.kv_cache_tokens}"
            )
        if self.max_num_seqs < 1:
            raise EngineConfigError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        # vLLM refuses to start otherwise: every running decode needs a budget token.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise EngineConfigError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        if not self.slowdown > 0:
            raise EngineConfigError(f"slowdown: must be > 0, got {self.slowdown}")

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_tokens // BLOCK_SIZE


class SimRequest:
    """One request's life in a replica; the handle `Replica.submit` returns."""

    __slots__ = (
        "_base",
        "_blocks",
        "_class_series",
        "_flushed_step",
        "_last_token_s",
        "_phase",
        "_prefill_done",
        "_prefill_target",
        "_ticket",
        "_version",
        "admitted_s",
        "arrival_s",
        "cancelled_s",
        "finish_s",
        "first_token_s",
        "generated",
        "output_tokens",
        "preemptions",
        "priority",
        "prompt_tokens",
        "request_id",
        "service_class",
        "shed_s",
        "token_times",
    )

    def __init__(
        self,
        request_id: int,
        prompt_tokens: int,
        output_tokens: int,
        arrival_s: float,
        priority: int,
        service_class: str = DEFAULT_CLASS,
    ) -> None:
        self.request_id = request_id
        # The class the request names (the gate serves an unknown one as default).
        self.service_class = service_class
        # The gate's series of the class it was admitted in.
        self._class_series: ClassSeries | None = None
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.arrival_s = arrival_s
        self.priority = priority
        self.admitted_s: float | None = None
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.shed_s: float | None = None
        self.cancelled_s: float | None = None
        self.generated = 0
        self.preemptions = 0
        self.token_times: list[float] | None = None
        self._phase = QUEUED
        self._prefill_target = prompt_tokens
        self._prefill_done = 0
        self._blocks = 0
        self._base = 0
        self._version = 0
        self._flushed_step = 0
        self._last_token_s = 0.0
        self._ticket: Ticket | None = None

    @property
    def status(self) -> str:
        return _STATUS[self._phase]

    @property
    def done(self) -> bool:
        return self._phase >= FINISHED

    @property
    def ttft_s(self) -> float | None:
        """Arrival at the gate to first token (gate queueing included)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; 0 for a one-token answer."""
        if self.finish_s is None or self.first_token_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    def __repr__(self) -> str:
        return (
            f"SimRequest(id={self.request_id}, prompt={self.prompt_tokens}, "
            f"output={self.output_tokens}, status={self.status})"
        )


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """Something that happened to a request, at simulated time `time_s`.

    kind: "admitted" | "tokens" | "finished" | "shed" | "rejected" |
    "cancelled". For "tokens", `token_times` holds the time of each new token
    (the first token included) and `time_s` is the last of them.
    """

    kind: str
    time_s: float
    request: SimRequest
    token_times: tuple[float, ...] = ()


class Replica:
    """A gate plus a continuous-batching engine; see the module docstring (live API)."""

    def __init__(
        self,
        config: EngineConfig,
        knobs: Knobs | None = None,
        *,
        name: str = "replica-0",
        record_tokens: bool = False,
        start_s: float = 0.0,
        peer_admission: PeerAdmission | None = None,
    ) -> None:
        if peer_admission is not None and peer_admission.max_num_seqs is not None:
            config = replace(config, max_num_seqs=peer_admission.max_num_seqs)
        self.config = config
        self._peer = peer_admission
        self.name = name
        self._cost = config.cost
        # ms -> s, with the slowdown folded in once.
        self._time_scale = config.slowdown / 1000.0
        self._total_blocks = config.num_blocks
        self.metrics = ReplicaMetrics(block_size=BLOCK_SIZE, num_gpu_blocks=self._total_blocks)
        self._knobs = self._resolve(knobs or Knobs())
        self._budget = self._knobs.max_num_batched_tokens or config.max_num_batched_tokens
        self.config_version = 1
        self._gate = AdmissionQueue(self._knobs)
        self.metrics.serve_classes(self._knobs.class_names)
        self._clock = start_s  # engine time: start of the step in progress, else `now`
        self._now = start_s
        self._step = 0
        # (end_s, duration_s, num_decodes, [(request, chunk), ...]) of the step in progress.
        self._pending: tuple[float, float, int, list[tuple[SimRequest, int]]] | None = None
        self._running: dict[SimRequest, None] = {}  # insertion order = scheduling order
        self._prefilling: list[SimRequest] = []
        self._waiting: deque[SimRequest] = deque()
        self._used_blocks = 0
        # Shared KV cache only: the cells each idle slot still holds, least recently used first.
        self._idle_slots: deque[int] = deque()
        self._idle_cells = 0
        # Decode aggregates: a decode request's KV length at step G is base + G.
        self._dec_count = 0
        self._dec_sum_base = 0
        self._dec_phase = [0] * BLOCK_SIZE
        self._finish_heap: list[tuple[int, int, SimRequest, int]] = []
        self._heap_seq = 0
        self._next_id = 0
        # Requests neither ended nor cancelled, by id: what `cancel` can find.
        self._live: dict[int, SimRequest] = {}
        self.finished_count = 0
        self.cancelled_count = 0
        self._record = record_tokens
        self._events: list[EngineEvent] | None = [] if record_tokens else None
        self._step_end: list[float] = []

    # ------------------------------------------------------------------ live API

    @property
    def now(self) -> float:
        """The latest time the replica was advanced to."""
        return self._now

    @property
    def knobs(self) -> Knobs:
        """The knobs in effect (max_concurrency clamped, the engine's prefill budget filled in)."""
        return self._knobs

    @property
    def idle(self) -> bool:
        """Nothing queued at the gate and nothing admitted that has not finished."""
        return self._gate.queued == 0 and self._gate.in_flight == 0

    @property
    def preemptions(self) -> int:
        return self.metrics.preemptions_total

    def submit(
        self,
        t: float,
        prompt_tokens: int,
        max_output_tokens: int,
        priority: int = 0,
        service_class: str = DEFAULT_CLASS,
    ) -> SimRequest:
        """A request of SLO class `service_class` arrives at the gate at time t; returns its handle."""
        if prompt_tokens < 1 or max_output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and max_output_tokens must be >= 1, got {prompt_tokens}, {max_output_tokens}"
            )
        self._run_until(t)
        request = SimRequest(
            self._next_id, prompt_tokens, max_output_tokens, t, priority, service_class
        )
        self._next_id += 1
        if self._record:
            request.token_times = []
        # The longest KV footprint: prompt plus every output token but the last.
        if -(-(prompt_tokens + max_output_tokens - 1) // BLOCK_SIZE) > self._total_blocks:
            request._phase = REJECTED
            request.finish_s = t
            self.metrics.count_failed("too_long")
            self._emit("rejected", t, request)
            return request
        ticket = Ticket(
            prompt_tokens,
            max_output_tokens,
            t,
            priority,
            payload=request,
            service_class=service_class,
        )
        request._ticket = ticket
        self._live[request.request_id] = request
        self._gate.push(ticket)
        self._admit(t)
        self._run_until(t)
        return request

    def advance(self, t: float) -> list[EngineEvent]:
        """Run every engine step that ends at or before t; return the events since the last call."""
        self._run_until(t)
        events = self._events
        if events is None:
            return []
        if self._record:
            self._flush_decode_tokens()
        self._events = []
        events.sort(key=lambda e: e.time_s)
        return events

    def set_knobs(self, t: float, knobs: Knobs) -> Knobs:
        """Apply knobs at time t; returns what is in effect. Admitted requests are never dropped."""
        self._run_until(t)
        applied = self._resolve(knobs)
        if applied != self._knobs:
            self._knobs = applied
            self.config_version += 1
            self._gate.reconfigure(applied)
            self.metrics.serve_classes(applied.class_names)
            if self.config.runtime_tunable:
                self._budget = applied.max_num_batched_tokens or self.config.max_num_batched_tokens
        self._admit(t)
        self._run_until(t)
        return applied

    def cancel(self, t: float, request_id: int) -> bool:
        """The client of request `request_id` left at time t: drop the request wherever it is.

        Metrics as vLLM V1 keeps them for a client abort: what was recorded as
        its tokens came stays (token counters, TTFT, inter-token latency), and
        no series recorded at a request's end (e2e latency, token-count
        histograms) ever sees it. The gate model
        counts one admitted before t as failed with reason client_disconnect,
        as the real gate does; one still queued at the gate just leaves it.
        Returns False, changing nothing, when no live request has this id
        (never submitted, already ended, or already cancelled), so cancelling
        twice is harmless.
        """
        self._run_until(t)
        request = self._live.pop(request_id, None)
        if request is None:
            return False
        ticket: Ticket = request._ticket  # type: ignore[assignment]
        phase = request._phase
        if phase == QUEUED:
            self._gate.cancel(ticket)
        else:
            if phase == WAITING:
                self._waiting.remove(request)
            elif phase == PREFILL:
                self._drop_prefill(request)
                self._keep_idle_slot(request._prefill_done)
            else:
                self._drop_decode(request)
                self._keep_idle_slot(request.prompt_tokens + request.generated)
            self._gate.release(ticket)
            self.metrics.count_failed(FailedReason.CLIENT_DISCONNECT)
        request._phase = CANCELLED
        request.cancelled_s = t
        self.cancelled_count += 1
        self._emit("cancelled", t, request)
        # Its gate place, batch slot or head-of-line spot may let others start now.
        self._run_until(t)
        return True

    def snapshot(self, t: float | None = None) -> dict[str, float]:
        if t is not None:
            self._run_until(t)
        return self.metrics.snapshot(self._gauges())

    def render_text(self, t: float | None = None) -> str:
        if t is not None:
            self._run_until(t)
        return self.metrics.render_text(self._gauges())

    def next_event_s(self) -> float | None:
        """End of the step in progress; None when the engine is idle."""
        return None if self._pending is None else self._pending[0]

    # ------------------------------------------------------------------ internals

    def _resolve(self, knobs: Knobs) -> Knobs:
        cfg = self.config
        cap = knobs.max_concurrency
        if cap is not None and cap > cfg.max_num_seqs:
            cap = cfg.max_num_seqs
        if cfg.runtime_tunable and knobs.max_num_batched_tokens is not None:
            # vLLM needs a budget token for each running decode.
            budget = max(knobs.max_num_batched_tokens, cfg.max_num_seqs)
        else:
            budget = cfg.max_num_batched_tokens
        return knobs.with_changes(max_concurrency=cap, max_num_batched_tokens=budget)

    def _gauges(self) -> ReplicaGauges:
        gate = self._gate
        return ReplicaGauges(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_usage=self._used_blocks / self._total_blocks,
            gate_queued=gate.queued,
            gate_in_flight=gate.in_flight,
            gate_inflight_tokens=gate.inflight_tokens,
            knobs=self._knobs,
            config_version=self.config_version,
            class_loads=tuple(gate.class_loads()),
        )

    def _emit(
        self, kind: str, t: float, request: SimRequest, times: tuple[float, ...] = ()
    ) -> None:
        if self._events is not None:
            self._events.append(EngineEvent(kind, t, request, times))

    def _run_until(self, horizon: float) -> None:
        if horizon < self._now:
            raise ValueError(f"time went backwards: {horizon} < {self._now}")
        self._now = horizon
        while True:
            pending = self._pending
            if pending is not None:
                if pending[0] > horizon:
                    break
                self._complete_step()
            elif not self._start_step(horizon):
                break
        if self._pending is None:
            self._clock = horizon
        if self._gate.queued:
            self._admit(horizon)
            if self._pending is None and self._waiting:
                self._run_until(horizon)

    def _admit(self, now: float) -> None:
        gate = self._gate
        if not gate.queued:
            return
        metrics = self.metrics
        classes = metrics.classes
        for ticket in gate.expire(now):
            classes[ticket.service_class].shed += 1
            self._shed(ticket.payload, now, ShedReason.QUEUE_DEADLINE)
        peer = self._peer
        at_most = self._dispatch_room() if peer is not None and peer.holds else None
        queue_limit = None if peer is None else peer.max_queued_prompt_tokens
        if queue_limit is not None:
            queued_tokens = sum(r._prefill_target for r in self._waiting)
        for ticket in gate.admit(now, at_most):
            request = ticket.payload
            if queue_limit is not None:
                if queued_tokens + request._prefill_target > queue_limit:
                    # The engine's queue is full: it refuses what the gate let through.
                    gate.release(ticket)
                    self._shed(request, now, SHED_ENGINE_QUEUE_FULL)
                    continue
                queued_tokens += request._prefill_target
            request._phase = WAITING
            request.admitted_s = now
            metrics.gate_admitted_total += 1
            wait = now - request.arrival_s
            metrics.gate_queue_wait.observe(wait)
            series = classes[ticket.service_class]
            series.admitted += 1
            series.admitted_tokens += ticket.tokens
            series.queue_wait.observe(wait)
            request._class_series = series
            self._waiting.append(request)
            self._emit("admitted", now, request)

    def _dispatch_room(self) -> int:
        """How many queued requests the saturation detector lets through now."""
        peer = self._peer
        assert peer is not None
        if peer.hold_kv_usage is not None and (
            self._used_blocks / self._total_blocks >= peer.hold_kv_usage
        ):
            return 0
        if peer.hold_waiting is None:
            return self._gate.queued
        return max(0, peer.hold_waiting - len(self._waiting))

    def _shed(self, request: SimRequest, now: float, reason: str) -> None:
        """The request is refused (a 429 or 503) and never runs."""
        del self._live[request.request_id]
        request._phase = SHED
        request.shed_s = now
        self.metrics.count_shed(reason)
        self._emit("shed", now, request)

    def _start_step(self, horizon: float) -> bool:
        """Start the next step at the clock (or jump over several); False when idle."""
        if self._peer is not None and self._peer.holds:
            # The saturation detector looks again before every step: the
            # last one may have emptied the waiting queue or freed KV blocks.
            self._admit(self._clock)
        step = self._step
        count = self._dec_count
        if count and not self._prefilling and self._jump(horizon):
            return True
        total_blocks = self._total_blocks
        phase_index = (1 - step) % BLOCK_SIZE
        need = self._dec_phase[phase_index] if count else 0
        while need > total_blocks - self._used_blocks:
            victim = next(reversed(self._running))
            if victim._phase == DECODE and victim._base % BLOCK_SIZE == phase_index:
                need -= 1
            self._preempt(victim, step, allocated=False)
        self._used_blocks += need
        budget = self._budget - self._dec_count
        chunks: list[tuple[SimRequest, int]] = []
        prefill_tokens = 0
        attention = 0
        if self._prefilling:
            for request in list(self._prefilling):
                if budget <= 0:
                    break
                if request._phase != PREFILL:
                    continue  # preempted to make room for an older one
                done = request._prefill_done
                chunk = min(request._prefill_target - done, budget)
                new_blocks = -(-(done + chunk) // BLOCK_SIZE) - request._blocks
                while new_blocks > total_blocks - self._used_blocks and request._phase == PREFILL:
                    victim = next(reversed(self._running))
                    if victim._phase == DECODE:
                        budget += 1  # its decode token leaves this step
                    self._preempt(victim, step, allocated=True)
                if request._phase != PREFILL:
                    continue
                request._blocks += new_blocks
                self._used_blocks += new_blocks
                chunks.append((request, chunk))
                budget -= chunk
                prefill_tokens += chunk
                attention += (done + chunk) ** 2 - done**2
        waiting = self._waiting
        running = self._running
        max_seqs = self.config.max_num_seqs
        while budget > 0 and waiting and len(running) < max_seqs:
            request = waiting[0]
            chunk = min(request._prefill_target, budget)
            new_blocks = -(-chunk // BLOCK_SIZE)
            if new_blocks > total_blocks - self._used_blocks:
                break
            waiting.popleft()
            running[request] = None
            if len(running) + len(self._idle_slots) > max_seqs:
                # No empty slot: the request takes the least recently used idle one.
                self._idle_cells -= self._idle_slots.popleft()
            self._prefilling.append(request)
            request._phase = PREFILL
            request._prefill_done = 0
            request._blocks = new_blocks
            self._used_blocks += new_blocks
            chunks.append((request, chunk))
            budget -= chunk
            prefill_tokens += chunk
            attention += chunk * chunk
        count = self._dec_count
        if not count and not chunks:
            return False
        context = self._dec_sum_base + count * step
        masked = 0
        if self.config.shared_kv_cache:
            # Every token of the step meets every occupied cell; those of other
            # sequences (and of idle slots) are masked. Prefilling requests'
            # earlier chunks are cells already, this step's chunks become cells.
            cells = (
                context
                + self._idle_cells
                + sum(request._prefill_done for request in self._prefilling)
                + prefill_tokens
            )
            masked = count * cells - context
            for request, chunk in chunks:
                masked += chunk * (cells - request._prefill_done - chunk)
        duration = (
            self._cost.step_ms(count, context, prefill_tokens, attention, masked) * self._time_scale
        )
        self._pending = (self._clock + duration, duration, count, chunks)
        return True

    def _jump(self, horizon: float) -> bool:
        """Apply K >= 2 identical-shape decode-only steps at once, if nothing can join them."""
        step = self._step
        count = self._dec_count
        free = self._total_blocks - self._used_blocks
        phases = self._dec_phase
        start = (1 - step) % BLOCK_SIZE
        waiting = self._waiting
        if waiting and len(self._running) < self.config.max_num_seqs:
            budget = self._budget - count
            if budget > 0:
                head_blocks = -(-min(waiting[0]._prefill_target, budget) // BLOCK_SIZE)
                if head_blocks <= free - phases[start]:
                    return False  # the head can start now: a prefill joins this step
        heap = self._finish_heap
        while heap and (heap[0][2]._version != heap[0][3]):
            heapq.heappop(heap)
        steps_to_finish = heap[0][0] - step + 1
        # Steps whose new blocks fit: each request needs one block per 16 steps.
        cycles, spare = divmod(free, count)
        partial = 0
        cumulative = 0
        for offset in range(BLOCK_SIZE):
            cumulative += phases[(start - offset) % BLOCK_SIZE]
            if cumulative > spare:
                break
            partial += 1
        steps_fitting = cycles * BLOCK_SIZE + partial
        limit = min(steps_to_finish, steps_fitting)
        if limit < 2:
            return False
        cost = self._cost
        scale = self._time_scale
        context = self._dec_sum_base + count * step
        growth_ms = cost.decode_per_context_token_ms * count
        masked = 0
        if self.config.shared_kv_cache:
            # As in _start_step, with no prefills: each step adds `count` cells,
            # each masked for the other count - 1 decodes.
            masked = (count - 1) * context + count * self._idle_cells
            growth_ms += cost.masked_pair_ms * (count - 1) * count
        first = cost.decode_ms(count, context, masked) * scale
        growth = growth_ms * scale
        span = horizon - self._clock
        steps = min(limit, _steps_within(first, growth, span))
        if steps < 2:
            return False
        elapsed = steps * first + growth * steps * (steps - 1) / 2
        full, rest = divmod(steps, BLOCK_SIZE)
        new_blocks = full * count + sum(phases[(start - j) % BLOCK_SIZE] for j in range(rest))
        self._used_blocks += new_blocks
        metrics = self.metrics
        metrics.generation_tokens_total += count * steps
        metrics.itl.observe_series(first, growth, steps, count)
        begin = self._clock
        if self._record:
            # Same expression as `elapsed`, so the last token time equals the clock exactly.
            self._step_end.extend(
                begin + (n * first + growth * n * (n - 1) / 2) for n in range(1, steps + 1)
            )
        last_step = step + steps - 1
        self._step = step + steps
        self._clock = begin + elapsed
        if steps == steps_to_finish:
            self._finish_decodes(last_step, self._clock)
            self._admit(self._clock)
        return True

    def _complete_step(self) -> None:
        end, duration, count, chunks = self._pending  # type: ignore[misc]
        self._pending = None
        step = self._step
        metrics = self.metrics
        self._clock = end
        if self._record:
            self._step_end.append(end)
        if count:
            metrics.generation_tokens_total += count
            metrics.itl.observe(duration, count)
        for request, chunk in chunks:
            request._prefill_done += chunk
            if request._prefill_done < request._prefill_target:
                continue
            self._prefilling.remove(request)
            self._token_after_prefill(request, end)
            if request.generated >= request.output_tokens:
                self._finish(request, end, request._blocks)
            else:
                self._enter_decode(request, step + 1, end)
        self._finish_decodes(step, end)
        self._step = step + 1
        self._admit(end)

    def _token_after_prefill(self, request: SimRequest, now: float) -> None:
        metrics = self.metrics
        metrics.generation_tokens_total += 1
        if request.generated == 0:
            request.first_token_s = now
            metrics.prompt_tokens_total += request.prompt_tokens
            metrics.ttft.observe(now - request.admitted_s)  # type: ignore[operator]
            ttft = now - request.arrival_s
            metrics.gate_ttft.observe(ttft)
            request._class_series.ttft.observe(ttft)  # type: ignore[union-attr]
        else:
            # Resumed after a preemption: the gap since its last token is one long ITL.
            metrics.itl.observe(now - request._last_token_s)
        request.generated += 1
        request._last_token_s = now
        if self._record:
            request.token_times.append(now)  # type: ignore[union-attr]
            self._emit("tokens", now, request, (now,))

    def _enter_decode(self, request: SimRequest, first_step: int, now: float) -> None:
        base = request.prompt_tokens + request.generated - first_step
        request._phase = DECODE
        request._base = base
        request._version += 1
        request._flushed_step = first_step
        self._dec_count += 1
        self._dec_sum_base += base
        self._dec_phase[base % BLOCK_SIZE] += 1
        finish_step = first_step + request.output_tokens - request.generated - 1
        self._heap_seq += 1
        heapq.heappush(self._finish_heap, (finish_step, self._heap_seq, request, request._version))

    def _leave_decode(self, request: SimRequest) -> None:
        base = request._base
        self._dec_count -= 1
        self._dec_sum_base -= base
        self._dec_phase[base % BLOCK_SIZE] -= 1
        request._version += 1  # invalidates its heap entry

    def _finish_decodes(self, last_step: int, now: float) -> None:
        heap = self._finish_heap
        while heap and heap[0][0] <= last_step:
            _, _, request, version = heapq.heappop(heap)
            if request._version != version:
                continue
            if self._record:
                self._flush_tokens(request, last_step + 1)
            self._leave_decode(request)
            request.generated = request.output_tokens
            self._finish(request, now, -(-(request._base + last_step) // BLOCK_SIZE))

    def _finish(self, request: SimRequest, now: float, blocks: int) -> None:
        del self._running[request]
        del self._live[request.request_id]
        self._used_blocks -= blocks
        self._keep_idle_slot(request.prompt_tokens + request.generated)
        request._blocks = 0
        request._phase = FINISHED
        request.finish_s = now
        self.finished_count += 1
        metrics = self.metrics
        metrics.e2e.observe(now - request.admitted_s)  # type: ignore[operator]
        metrics.prompt_tokens_hist.observe(request.prompt_tokens)
        metrics.generation_tokens_hist.observe(request.generated)
        if request.output_tokens > 1:
            request._class_series.tpot.observe(  # type: ignore[union-attr]
                (now - request.first_token_s) / (request.output_tokens - 1)  # type: ignore[operator]
            )
        self._gate.release(request._ticket)  # type: ignore[arg-type]
        self._emit("finished", now, request)

    def _keep_idle_slot(self, cells: int) -> None:
        """A shared cache keeps a released slot's cells in every step's attention until reuse."""
        if self.config.shared_kv_cache:
            self._idle_slots.append(cells)
            self._idle_cells += cells

    def _preempt(self, victim: SimRequest, step: int, *, allocated: bool) -> None:
        """Recompute-preempt `victim` while scheduling `step`.

        `allocated`: this step's decode blocks were already counted, so a
        decode victim also returns the block it was given for this step.
        """
        if victim._phase == DECODE:
            base = victim._base
            if self._record:
                self._flush_tokens(victim, step)
            self._leave_decode(victim)
            victim.generated = base + step - victim.prompt_tokens
            blocks = -(-(base + step - 1) // BLOCK_SIZE)
            if allocated and (base + step - 1) % BLOCK_SIZE == 0:
                blocks += 1
            victim._last_token_s = self._clock
        else:
            self._prefilling.remove(victim)
            blocks = victim._blocks
        del self._running[victim]
        self._used_blocks -= blocks
        victim._blocks = 0
        victim._phase = WAITING
        victim._prefill_done = 0
        victim._prefill_target = victim.prompt_tokens + victim.generated
        victim.preemptions += 1
        self.metrics.preemptions_total += 1
        self._waiting.appendleft(victim)

    def _drop_prefill(self, request: SimRequest) -> None:
        """Take a prefilling request out of the batch and out of the step in progress."""
        self._prefilling.remove(request)
        del self._running[request]
        # Its blocks include those given to its chunk of the step in progress.
        self._used_blocks -= request._blocks
        request._blocks = 0
        chunks = self._pending[3]  # type: ignore[index]
        chunks[:] = [(other, chunk) for other, chunk in chunks if other is not request]

    def _drop_decode(self, request: SimRequest) -> None:
        """Take a decoding request out of the batch and out of the step in progress."""
        # A running batch always has a step in progress, and every decode is in it.
        end, duration, count, chunks = self._pending  # type: ignore[misc]
        step = self._step
        base = request._base
        if self._record:
            self._flush_tokens(request, step)
        self._leave_decode(request)
        request.generated = base + step - request.prompt_tokens
        del self._running[request]
        # The step in progress was given its block: its KV length after that step.
        self._used_blocks -= -(-(base + step) // BLOCK_SIZE)
        self._pending = (end, duration, count - 1, chunks)

    def _flush_tokens(self, request: SimRequest, upto_step: int) -> None:
        start = request._flushed_step
        if upto_step <= start:
            return
        times = tuple(self._step_end[start:upto_step])
        request._flushed_step = upto_step
        request.token_times.extend(times)  # type: ignore[union-attr]
        self._emit("tokens", times[-1], request, times)

    def _flush_decode_tokens(self) -> None:
        for request in self._running:
            if request._phase == DECODE:
                self._flush_tokens(request, self._step)


def _steps_within(first: float, growth: float, span: float) -> int:
    """Largest n with n*first + growth*n*(n-1)/2 <= span (step j lasts first + j*growth)."""
    if span < first:
        return 0
    if growth <= 0:
        n = int(span // first)
    else:
        half = growth / 2
        linear = first - half
        n = int((-linear + (linear * linear + 4 * half * span) ** 0.5) / (2 * half))
    while n > 0 and n * first + growth * n * (n - 1) / 2 > span:
        n -= 1
    while (n + 1) * first + growth * (n + 1) * n / 2 <= span:
        n += 1
    return n
