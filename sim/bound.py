"""An analytic upper bound on the good requests of a benchmark scenario.

No schedule of the simulated engine (sim/engine.py) can make more requests
good than `upper_bound` returns: not the benchmark's controllers, not the
hindsight searches, not a scheduler that knows the future. It is loose on
purpose (a few lines of arithmetic per request, where the exact optimum is a
scheduling problem far too large to solve) but never below what a run can
achieve, so a controller's good count divided by it is a lower bound on how
close that controller comes to the best possible.

**What a step costs at least.** The engine's step time is the calibrated
`StepCostModel.step_ms` (sim/calibration.py) times ``engine.slowdown``; below,
every coefficient is already multiplied by the slowdown, all in milliseconds:
a = decode_base, k_s = decode_per_seq, k_c = decode_per_context_token, p_t =
prefill_per_token, p_a = prefill_attention; tau is the TPOT SLO and M is
max_num_seqs. With every fitted coefficient >= 0 (checked: the inequalities
need it):

- A step that carries B decodes with total context C lasts >= a + k_s*B +
  k_c*C, decode-only or mixed (a mixed step is the max of its
  prefill-plus-decode cost and exactly this). A shared KV cache's masked
  pairs only add.
- A step that carries prefill chunks of T tokens with attention work Q lasts
  >= p_t*T + p_a*Q: prefill_ms drops only its base and floor, and a mixed
  step adds mixed_base and a scaled decode term, both >= 0. A step of
  prefill alone lasts >= max(prefill_floor, prefill_base).
- The chunks of one prompt of P tokens add up to P tokens and P^2 attention
  however it is chunked, so its prefill work is pre = p_t*P + p_a*P^2.

**Which requests can be good at all.** TTFT includes the prompt's whole
prefill, >= prefill_ms(P, P^2) even in one step of its own (more chunks only
add bases). A request with O >= 2 output tokens needs a mean gap between
its tokens <= tau, and every gap is either a decode step holding it
(>= decode_ms(1, P)) or the recomputation after a preemption (a prefill of
>= P + 1 tokens, >= prefill_ms(P + 1, (P + 1)^2)); if both exceed tau it
can never be good.

**The time there is.** The good requests of a set that arrive in [t0, t1) on
one replica do all their work between arrival and finish, so inside
[t0, t1 + ttft + tau*(O_max - 1)], of length W; their first prefills end by
their first token, so inside [t0, t1 + ttft], of length W_pre. A replica
runs one step at a time, so the steps that carry prefill last W at most in
total, those that carry a first prefill W_pre, and those that give a token
after the first (below) W. A mixed step counts in each of these: prefill
and decode work may overlap, so each limit holds on its own.

**Prefill work.** PRE(n), the sum of the n smallest pre_r of the set's
feasible requests, is a lower bound on the first prefills of any n of them,
so PRE(n) <= W_pre.

**Decode work.** Let G be the good requests of the set and D = sum(O_r - 1)
the tokens they get after their first. Each comes from a *generation step*:
a decode, or, after a preemption, the step that completes the recomputation.
A generation step lasts >= a_gen = min(a, max(prefill_floor, prefill_base))
and holds at most M of G's requests, so there are S >= D/M of them. Without
preemption all D are decodes: with b_s of them in step s, the step lasts
>= a + k0*b_s, where k0 = k_s + k_c*P_min for the set's smallest prompt;
request r's decode steps lie between its first token and its finish, at
most tau*(O_r - 1) apart, so sum_s b_s*dur_s <= tau*D, and with
sum_s b_s^2 >= D^2/S_dec (Cauchy-Schwarz over the S_dec steps that decode
for G), a*D + k0*D^2/S_dec <= tau*D: S_dec >= k0*D/(tau - a). The k-th
decode of r attends to >= P_r + k - 1 tokens, so the generation steps last
at least

    max(a_gen*S, a*S_dec) + sum_r sum_k (k_s + k_c*(P_r + k - 1)) >= sum_r dec_r,
    dec_r = (O_r - 1)*(beta + k_s + k_c*P_r) + k_c*(O_r - 1)*(O_r - 2)/2,

with beta = max(a*k0/(tau - a), a_gen/M) (a_gen/M alone when tau <= a).

**Preemption.** A request preempted after g tokens gets its next token from
a prefill of P + g tokens instead of a decode. With q of the D tokens
recomputed, the Cauchy-Schwarz step bound becomes k0*D'^2/(tau*D - a*D') for
D' = D - q decodes; that is convex in D', so it stays above its tangent at
D' = D and drops by at most k0*(2*tau - a)/(tau - a)^2 steps per recomputed
token (S >= D/M holds whatever made the tokens). A recomputed token thus
takes at most u = a*k0*(2*tau - a)/(tau - a)^2 + k_s + k_c*(P + g - 1) off
the generation time and adds v = p_t*(P + g) + p_a*(P + g)^2 of prefill.
rho = min of v/u over every P + g >= P_min + 1 is the least prefill time a
preemption costs per millisecond of generation time it saves, so with
DEC(n) the sum of the n smallest dec_r, a good set of n requests needs

    PRE(n) + rho * max(0, DEC(n) - W) <= W.

Without preemption this follows from PRE(n) <= W and DEC(n) <= W, so it
holds for every schedule. The largest n that meets it and PRE(n) <= W_pre
bounds the set's good requests.

**Scenario bound.** Requests go round-robin to replicas; each (phase,
replica) is one set, its window the phase plus the tails above, and the
counts add up. The whole scenario as one phase, window [0, duration] plus
the tails, is a bound too; the result is the smaller. Both are O(N log N)
numpy work.

**Where it is loose.** It ignores the KV cache capacity (preemption is
allowed for, never forced); the time a replica cannot use because requests
have not arrived yet or wait in a queue (only each window's total counts);
that prefill and decode work compete for the same steps (each gets the
whole window), so a long prefill chunk never stretches the TPOT of the
decodes beside it; and the bases and floors of prefill steps. The tail adds
the largest TTFT + TPOT budget of the set to its window, and every decode
is credited with the smallest prompt's per-step cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchpilot.sim.calibration import StepCostModel
from batchpilot.sim.scenario import Scenario
from batchpilot.sim.workload import Workload

# Limits are compared with a little slack so that float rounding (the engine
# sums step times in seconds) never costs a request the bound should count.
_ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class _Limits:
    """Step cost coefficients times the engine's slowdown (ms), and the SLOs (ms)."""

    decode_base: float
    per_seq: float
    per_context: float
    prefill_floor: float
    prefill_base: float
    per_token: float
    attention: float
    ttft: float
    tpot: float
    max_num_seqs: int

    @classmethod
    def of(cls, scenario: Scenario) -> _Limits:
        cost = scenario.engine.cost
        _require_non_negative(cost)
        slowdown = scenario.engine.slowdown
        return cls(
            decode_base=cost.decode_base_ms * slowdown,
            per_seq=cost.decode_per_seq_ms * slowdown,
            per_context=cost.decode_per_context_token_ms * slowdown,
            prefill_floor=cost.prefill_floor_ms * slowdown,
            prefill_base=cost.prefill_base_ms * slowdown,
            per_token=cost.prefill_per_token_ms * slowdown,
            attention=cost.prefill_attention_ms * slowdown,
            ttft=scenario.slo.ttft_ms,
            tpot=scenario.slo.tpot_ms,
            max_num_seqs=scenario.engine.max_num_seqs,
        )

    def prefill_alone_ms(self, tokens: np.ndarray) -> np.ndarray:
        """A prompt of `tokens` prefilled in one step of its own (the cheapest way)."""
        linear = self.prefill_base + self.per_token * tokens + self.attention * tokens * tokens
        cheapest: np.ndarray = np.maximum(self.prefill_floor, linear)
        return cheapest


def upper_bound(scenario: Scenario, workload: Workload) -> dict[str, Any]:
    """{'arrived': int, 'capacity_good': int, 'good': int (min of the two),
    'goodput_rps': good / workload.duration_s,
    'phases': [{'phase': i, 'arrived': n, 'capacity_good': m}, ...]}

    SLO classes: every request is held to the top-level slo, the loosest of
    the scenario's (a class's slo is never looser, sim/scenario.py), so a
    request that is good under its class's SLO is counted as possible here
    too and the bound stays a bound; `phases` is empty, the classes' phases
    overlapping in time.
    """
    limits = _Limits.of(scenario)
    prompt = workload.prompt_tokens.astype(float)
    output = workload.output_tokens.astype(float)
    feasible = _feasible(limits, prompt, output)
    replica = np.arange(len(workload)) % scenario.replicas

    def capacity(selected: np.ndarray, span_s: float) -> int:
        total = 0
        for index in range(scenario.replicas):
            mine = selected & (replica == index)
            total += _replica_capacity(limits, prompt[mine], output[mine], span_s * 1000.0)
        return total

    phases = []
    # With SLO classes the classes' phases overlap in time: only the whole
    # run's capacity applies (the per-phase split is a tightening, not needed).
    for index, phase in enumerate(() if scenario.classes else scenario.workload):
        members = workload.phase == index
        phases.append(
            {
                "phase": index,
                "arrived": int(members.sum()),
                "capacity_good": capacity(members & feasible, phase.duration_s),
            }
        )
    whole = capacity(feasible, workload.duration_s)
    capacity_good = min(sum(entry["capacity_good"] for entry in phases), whole) if phases else whole
    arrived = len(workload)
    good = min(arrived, capacity_good)
    return {
        "arrived": arrived,
        "capacity_good": capacity_good,
        "good": good,
        "goodput_rps": good / workload.duration_s,
        "phases": phases,
    }


def _require_non_negative(cost: StepCostModel) -> None:
    negative = {name: value for name, value in cost.to_dict().items() if value < 0}
    if negative:
        shown = ", ".join(f"{name}={value:g}" for name, value in negative.items())
        raise ValueError(
            f"step cost coefficient(s) {shown} are negative: the goodput bound needs every "
            "coefficient >= 0 (a step must never get cheaper as it carries more work)"
        )


def _feasible(limits: _Limits, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Requests that could be good if they had their replica to themselves."""
    ttft_ok = limits.prefill_alone_ms(prompt) <= limits.ttft * (1 + _ROUNDING_SLACK)
    lone_decode = limits.decode_base + limits.per_seq + limits.per_context * prompt
    recompute = limits.prefill_alone_ms(prompt + 1)
    gap_ok = np.minimum(lone_decode, recompute) <= limits.tpot * (1 + _ROUNDING_SLACK)
    # A one-token answer has no TPOT to meet.
    feasible: np.ndarray = ttft_ok & ((output < 2) | gap_ok)
    return feasible


def _replica_capacity(
    limits: _Limits, prompt: np.ndarray, output: np.ndarray, span_ms: float
) -> int:
    """Most of these feasible requests, arriving within `span_ms` on one replica, that can be good."""
    if len(prompt) == 0:
        return 0
    a, tau = limits.decode_base, limits.tpot
    # W and W_pre of the module docstring.
    room = (span_ms + limits.ttft + tau * (output.max() - 1)) * (1 + _ROUNDING_SLACK)
    first_prefill_room = (span_ms + limits.ttft) * (1 + _ROUNDING_SLACK)
    smallest_prompt = prompt.min()
    k0 = limits.per_seq + limits.per_context * smallest_prompt
    generation_step = min(a, max(limits.prefill_floor, limits.prefill_base))  # a_gen
    base_per_token = generation_step / limits.max_num_seqs  # beta
    base_lost_per_recompute = 0.0
    if tau > a:
        base_per_token = max(a * k0 / (tau - a), base_per_token)
        base_lost_per_recompute = a * k0 * (2 * tau - a) / (tau - a) ** 2
    decodes = output - 1
    decode_work = (
        decodes * (base_per_token + limits.per_seq + limits.per_context * prompt)
        + limits.per_context * decodes * (decodes - 1) / 2
    )
    first_prefills = np.cumsum(np.sort(limits.per_token * prompt + limits.attention * prompt**2))
    decode_excess = np.cumsum(np.sort(decode_work)) - room
    over = decode_excess > 0
    all_prefills = first_prefills.copy()
    # Indexed so that an infinite rate never meets a zero excess (inf * 0 is nan).
    all_prefills[over] += (
        _recompute_exchange_rate(limits, base_lost_per_recompute, smallest_prompt)
        * decode_excess[over]
    )
    by_first_prefills = np.searchsorted(first_prefills, first_prefill_room, side="right")
    by_all_work = np.searchsorted(all_prefills, room, side="right")
    return int(min(by_first_prefills, by_all_work))


def _recompute_exchange_rate(
    limits: _Limits, base_lost_per_recompute: float, smallest_prompt: float
) -> float:
    """rho: least prefill ms a recomputed token costs per generation ms it saves.

    The minimum over n >= smallest_prompt + 1 recomputed tokens of v(n) / u(n),
    v(n) = p_t*n + p_a*n^2, u(n) = base_lost + k_s + k_c*(n - 1).
    """
    shortest = smallest_prompt + 1
    saved_fixed = base_lost_per_recompute + limits.per_seq
    if saved_fixed >= limits.per_context:
        # v/u grows with n here (n/(c + k_c*n) with c >= 0, and p_t + p_a*n, both do).
        saved = saved_fixed + limits.per_context * (shortest - 1)
        if saved == 0:
            return math.inf  # a recomputation saves no generation time at all
        return (limits.per_token * shortest + limits.attention * shortest**2) / saved
    # Otherwise u(n) <= k_c*n, so v/u >= (p_t + p_a*n)/k_c >= its value at the shortest.
    return (limits.per_token + limits.attention * shortest) / limits.per_context
