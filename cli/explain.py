"""`batchpilot explain NAMESPACE/NAME`: why a policy recommends what it does, and who runs it.

Reads, from the cluster, only what the operator writes (operator/status.py
for the status shape, operator/gates.py for the pod annotation):

- the InferencePolicy's status: mode, pods, the recommendation and its
  reasons (split into the decision's own and the guards' that changed it),
  the model's quality, the last-known-good setting, the conditions, and the
  signals / predictions when the status carries them;
- for a policy with SLO classes (spec.classes), each class: its objectives
  and how it fared over the last window (status.classes), what the gate gives
  it (the recommended knobs' classes) and which requests it takes (spec);
- the selected pods' `batchpilot.dev/applied` annotations: what each pod's
  gate was given, and which pods lag behind the target.

It reads them with the operator's own code, so it shows what the operator
sees: the pod record and its readiness and the policy's selector or
workload (operator/pods.py), and the inverses of what wrote the status'
lines (`Laggard.parse`, controller/explain.py's `parse_reason_text`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from rich.console import Console
from rich.table import Table
from urllib3.exceptions import HTTPError

from batchpilot.cli.app import fail
from batchpilot.contract.knobs import CLASS_HEADER, DEFAULT_CLASS, knobs_document
from batchpilot.controller.explain import is_guard_step, parse_reason_text
from batchpilot.controller.policy import PolicyError
from batchpilot.operator.kube import GROUP, PLURAL, VERSION, KubeError, read_workload_selector
from batchpilot.operator.pods import PodInfo, pod_from_body, policy_selection, selector_query
from batchpilot.operator.spec import LabelSelector
from batchpilot.operator.status import Laggard


class ExplainError(RuntimeError):
    """The policy cannot be explained; the message says what to check."""


@dataclass(frozen=True)
class PodRow:
    name: str
    ready: bool
    knobs: Mapping[str, Any] | None  # from the applied record; None when absent or unreadable
    version: int | None
    time: str | None
    policy: str | None
    laggard: str | None  # why the pod is not at the target, or None


@dataclass(frozen=True)
class Explanation:
    namespace: str
    name: str
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    pods: tuple[PodRow, ...]
    selector: str


def parse_target(target: str) -> tuple[str, str]:
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ExplainError(f"NAMESPACE/NAME: expected e.g. llm/chat-policy, got {target!r}")
    return namespace, name


def policy_selector(api: Any, namespace: str, spec: Mapping[str, Any]) -> LabelSelector:
    """The policy's pod selector as the operator reads it: spec.selector, or
    the selector of spec.targetRef's Deployment / StatefulSet."""
    try:
        selection = policy_selection(spec)
        if isinstance(selection, LabelSelector):
            selector = selection
        else:
            selector = read_workload_selector(api, namespace, selection)
    except (PolicyError, KubeError) as err:
        raise ExplainError(str(err)) from err
    if selector.empty:
        raise ExplainError("the selector is empty: it would select every pod, so nothing is shown")
    return selector


def gather(api: Any, namespace: str, name: str) -> Explanation:
    """Read the policy and its pods (kubernetes ApiClient `api`); API errors become ExplainError."""
    try:
        # The client types custom objects as `object`; they are JSON documents.
        body = cast(
            dict[str, Any],
            client.CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            ),
        )
        spec = body.get("spec") or {}
        selector = selector_query(policy_selector(api, namespace, spec))
        listed = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    except ApiException as err:
        if err.status == 404:
            raise ExplainError(
                f"not found: {_what_404(err)} in namespace {namespace} "
                f"(list policies with `kubectl get inferencepolicies -n {namespace}`)"
            ) from err
        raise ExplainError(
            f"the API server refused ({err.status} {err.reason}): {_api_message(err)}"
        ) from err
    except HTTPError as err:
        raise ExplainError(f"cannot reach the API server: {err}") from err
    status = body.get("status") or {}
    # As listed (JSON), the body the operator's pod index reads too.
    pods = [pod_from_body(api.sanitize_for_serialization(pod)) for pod in listed]
    return Explanation(namespace, name, spec, status, pod_rows(pods, name, status), selector)


def pod_rows(pods: Sequence[PodInfo], policy: str, status: Mapping[str, Any]) -> tuple[PodRow, ...]:
    """Each pod's applied record next to the target; a pod not at the target is a laggard."""
    applied = status.get("applied") or {}
    target = applied.get("knobs")
    reported = {
        parsed.pod: parsed.why
        for line in applied.get("laggards") or ()
        if (parsed := Laggard.parse(line)) is not None
    }
    rows = []
    for pod in sorted(pods, key=lambda p: p.name):
        record = pod.record
        knobs = knobs_document(record.knobs) if record is not None else None
        laggard: str | None = None
        if pod.name in reported:
            laggard = reported[pod.name]
        elif not pod.ready:
            laggard = "not Ready: the operator skips it until it is"
        elif record is None and target is not None:
            laggard = (
                "no batchpilot.dev/applied record: the operator has not configured this pod yet"
            )
        elif record is not None and not pod.steered_by(policy):
            laggard = f"steered by InferencePolicy {record.policy}"
        elif target is not None and knobs != target:
            laggard = "runs other settings than the target"
        rows.append(
            PodRow(
                name=pod.name,
                ready=pod.ready,
                knobs=knobs,
                version=record.version if record else None,
                time=record.time if record else None,
                policy=record.policy if record else None,
                laggard=laggard,
            )
        )
    return tuple(rows)


def print_explanation(explanation: Explanation, console: Any) -> None:
    status = explanation.status
    spec = explanation.spec
    slo = spec.get("slo") or {}
    console.print(
        f"[bold]InferencePolicy {explanation.namespace}/{explanation.name}[/bold]: mode "
        f"{status.get('mode') or spec.get('mode', 'Recommend')}, pods {(status.get('pods') or {}).get('summary', '-')} "
        f"ready, SLO TTFT <= {slo.get('ttftMs', '-')} ms, TPOT <= {slo.get('tpotMs', '-')} ms, "
        f"selector {explanation.selector}"
    )
    if not status:
        console.print("no status yet: the operator has not run a control step for this policy")
        return

    recommendation = status.get("recommendation") or {}
    applied = status.get("applied") or {}
    good = (status.get("lastKnownGood") or {}).get("knobs")
    settings = Table(title="settings")
    # "applied": status.applied.knobs, the target in Auto, what the pods still
    # run in Recommend after Auto (operator/status.py); never a guess.
    for column in ("knob", "recommended", "applied", "last known good"):
        settings.add_column(column)
    knobs = recommendation.get("knobs") or {}
    # The classes' settings have a table of their own, below.
    for knob in sorted({*knobs, *(applied.get("knobs") or {}), *(good or {})} - {"classes"}):
        settings.add_row(
            knob,
            _value(knobs.get(knob)),
            _value((applied.get("knobs") or {}).get(knob)),
            _value((good or {}).get(knob)),
        )
    console.print(settings)
    console.print(
        f"recommended since {recommendation.get('time', '-')}; applied: {applied.get('summary', '-')}; "
        f"model: {_model_text(status.get('model') or {})}"
    )

    per_class = class_rows(spec, status)
    if per_class:
        classes = Table(title=f"SLO classes (last window; worst: {status.get('worstClass', '-')})")
        for column, justify in CLASS_COLUMNS:
            classes.add_column(column, justify=justify)
        for cells in per_class:
            classes.add_row(*cells)
        console.print(classes)

    # A guard's reason ends "(knob: wanted A, allowed B)"; arrows are only in
    # Events, for what a pod ran -> what it runs now.
    reasons = [parse_reason_text(line) for line in recommendation.get("reasons") or []]
    decided = [(step, text) for step, text in reasons if not is_guard_step(step)]
    guarded = [(step, text) for step, text in reasons if is_guard_step(step)]
    for title, rows in (("why (the decision)", decided), ("guards that changed it", guarded)):
        table = Table(title=title)
        table.add_column("step")
        table.add_column("reason")
        for step, text in rows:
            table.add_row(step, text)
        if not rows:
            table.add_row("-", "none")
        console.print(table)

    for key, title in (
        ("signals", "signals (last window)"),
        ("predictions", "predictions for the recommendation"),
    ):
        values = status.get(key)
        if values:
            table = Table(title=title)
            table.add_column("name")
            table.add_column("value", justify="right")
            for field, value in sorted(values.items()):
                table.add_row(field, _value(value))
            console.print(table)
    if not status.get("signals") and not status.get("predictions"):
        console.print(
            "[dim]signals and predictions: not in this status (the operator publishes reasons only)[/dim]"
        )

    conditions = Table(title="conditions")
    for column in ("type", "status", "reason", "message", "since"):
        conditions.add_column(column)
    for condition in status.get("conditions") or []:
        conditions.add_row(
            condition.get("type", ""),
            condition.get("status", ""),
            condition.get("reason", ""),
            condition.get("message", ""),
            condition.get("lastTransitionTime", ""),
        )
    console.print(conditions)

    pods = Table(title="pods")
    for column in ("pod", "ready", "applied settings", "version", "applied at", "laggard: why"):
        pods.add_column(column)
    for row in explanation.pods:
        pods.add_row(
            row.name,
            "yes" if row.ready else "no",
            _knobs_text(row.knobs),
            _value(row.version),
            row.time or "-",
            row.laggard or "-",
        )
    if not explanation.pods:
        pods.add_row("-", "-", "no pod matches the selector", "-", "-", "-")
    console.print(pods)


# (header, justify) of the class table, in the order of `class_rows`' cells.
CLASS_COLUMNS: tuple[tuple[str, Literal["left", "right"]], ...] = (
    ("class", "left"), ("priority", "right"), ("weight", "right"), ("met", "left"),
    ("attainment", "right"), ("TTFT ms (seen/objective)", "right"),
    ("TPOT ms (seen/objective)", "right"), ("arrivals/s", "right"), ("shed/s", "right"),
    ("deadline ms", "right"), ("cap", "right"), ("requests", "left"),
)  # fmt: skip


def class_rows(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """One row per SLO class in status.classes (highest priority first); none without classes.

    The observed latencies are at each class's own percentile (its slo's, or
    spec.slo's); the weight is what the recommendation gives the gate.
    """
    declared = {c.get("name"): c for c in spec.get("classes") or () if isinstance(c, Mapping)}
    recommended = {
        c.get("name"): c
        for c in ((status.get("recommendation") or {}).get("knobs") or {}).get("classes") or ()
        if isinstance(c, Mapping)
    }
    default_percentile = (spec.get("slo") or {}).get("percentile", 99)
    rows: list[tuple[str, ...]] = []
    for entry in status.get("classes") or ():
        if not isinstance(entry, Mapping):
            continue
        name = str(entry.get("name", "-"))
        own = declared.get(name) or {}
        percentile = (own.get("slo") or {}).get("percentile", default_percentile)
        objective, observed = entry.get("objective") or {}, entry.get("observed") or {}
        met = entry.get("sloMet")
        attainment = entry.get("attainment")
        rows.append(
            (
                name,
                _value(entry.get("priority")),
                f"{float((recommended.get(name) or own).get('weight', 1)):g}",
                "-" if met is None else "yes" if met else "[bold]no[/bold]",
                "-" if attainment is None else f"{float(attainment) * 100:.1f}%",
                f"p{percentile:g} {_value(observed.get('ttftMs'))}/{_value(objective.get('ttftMs'))}",
                f"p{percentile:g} {_value(observed.get('tpotMs'))}/{_value(objective.get('tpotMs'))}",
                _value(entry.get("arrivalRps")),
                _value(entry.get("shedRps")),
                _value(entry.get("queueDeadlineMs")),
                _value(entry.get("maxConcurrency")),
                _match_text(name, own.get("match") or {}),
            )
        )
    return rows


def explain(
    target: Annotated[
        str, typer.Argument(metavar="NAMESPACE/NAME", help="The InferencePolicy to explain.")
    ],
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config)."
        ),
    ] = None,
    context: Annotated[
        str | None, typer.Option("--context", help="Kubeconfig context (default: the current one).")
    ] = None,
) -> None:
    """Explain a policy: its recommendation, the reasons and guards behind it, each pod's applied settings.

    Examples:

      batchpilot explain llm/chat-policy

      batchpilot explain llm/chat-policy --kubeconfig ~/.kube/staging --context staging
    """
    try:
        namespace, name = parse_target(target)
        with _api_client(kubeconfig, context) as api:
            explanation = gather(api, namespace, name)
    except ExplainError as err:
        fail(str(err))
    print_explanation(explanation, Console())


# -- helpers --------------------------------------------------------------------


def _api_client(kubeconfig: Path | None, context: str | None) -> Any:
    if kubeconfig is not None and not kubeconfig.is_file():
        raise ExplainError(f"--kubeconfig: no such file {kubeconfig}")
    try:
        return config.new_client_from_config(
            config_file=str(kubeconfig) if kubeconfig is not None else None, context=context
        )
    except ConfigException as err:
        raise ExplainError(f"--kubeconfig: cannot load a cluster configuration ({err})") from err


def _model_text(model: Mapping[str, Any]) -> str:
    if not model:
        return "-"
    error = model.get("heldOutError")
    trusted = "trusted" if model.get("trusted") else "not trusted (feedback rule)"
    return f"{model.get('samples', 0)} samples, held-out error {'-' if error is None else error}, {trusted}"


def _knobs_text(knobs: Mapping[str, Any] | None) -> str:
    if knobs is None:
        return "-"
    text = ", ".join(f"{key}={value}" for key, value in sorted(knobs.items()) if key != "classes")
    # The classes' own settings are in the class table: here, which ones the gate runs.
    names = [str(c.get("name")) for c in knobs.get("classes") or () if isinstance(c, Mapping)]
    return text + (f", classes={'/'.join(names)}" if names else "")


def _match_text(name: str, match: Mapping[str, Any]) -> str:
    """Which requests a class takes, besides those naming it (gate/estimate.py's classify)."""
    parts = [f"{CLASS_HEADER}: {name}"]
    if match.get("header"):
        parts.append(f"{match['header']}: {', '.join(map(str, match.get('values') or ()))}")
    if match.get("models"):
        parts.append(f"model: {', '.join(map(str, match['models']))}")
    if name == DEFAULT_CLASS:
        parts.append("any other")
    return "; ".join(parts)


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _what_404(err: Any) -> str:
    message = _api_message(err)
    return message or "the policy"


def _api_message(err: Any) -> str:
    try:
        return str(json.loads(err.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return str(err.body or "")[:200]
