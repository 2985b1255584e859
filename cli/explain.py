"""`batchpilot explain NAMESPACE/NAME`: why a policy recommends what it does, and who runs it.

Reads, from the cluster, only what the operator writes (operator/status.py
for the status shape, operator/gates.py for the pod annotation):

- the InferencePolicy's status: mode, pods, the recommendation and its
  reasons (split into the decision's own and the guards' that changed it),
  the model's quality, the last-known-good setting, the conditions, and the
  signals / predictions when the status carries them;
- the selected pods' `batchpilot.dev/applied` annotations: what each pod's
  gate was given, and which pods lag behind the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

GROUP, VERSION, PLURAL = "batchpilot.dev", "v1alpha1", "inferencepolicies"


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


def selector_string(selector: Mapping[str, Any]) -> str:
    """A LabelSelector object -> the API server's `labelSelector` query syntax."""
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = ",".join(sorted(str(v) for v in expression.get("values") or ()))
        if operator == "In":
            parts.append(f"{key} in ({values})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({values})")
        elif operator == "Exists":
            parts.append(str(key))
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise ExplainError(f"selector: unknown operator {operator!r} for key {key!r}")
    if not parts:
        raise ExplainError("spec.selector is empty: it would select every pod, so nothing is shown")
    return ",".join(parts)


def gather(api: Any, namespace: str, name: str) -> Explanation:
    """Read the policy and its pods (kubernetes ApiClient `api`); API errors become ExplainError."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        body = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        spec = body.get("spec") or {}
        selector = selector_string(_policy_selector(api, namespace, spec))
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
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
    return Explanation(namespace, name, spec, status, pod_rows(pods, name, status), selector)


def pod_rows(pods: Sequence[Any], policy: str, status: Mapping[str, Any]) -> tuple[PodRow, ...]:
    """Each pod's applied record next to the target; a pod not at the target is a laggard."""
    from batchpilot.operator.gates import APPLIED_ANNOTATION, AppliedRecord
    from batchpilot.operator.status import knobs_document

    applied = status.get("applied") or {}
    target = applied.get("knobs")
    reported = {_pod_of(line): line for line in applied.get("laggards") or ()}
    rows = []
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        name = pod.metadata.name
        ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
        record = AppliedRecord.from_json((pod.metadata.annotations or {}).get(APPLIED_ANNOTATION))
        knobs = knobs_document(record.knobs) if record is not None else None
        laggard: str | None = None
        if name in reported:
            laggard = reported[name].partition(": ")[2] or reported[name]
        elif not ready:
            laggard = "not Ready: the operator skips it until it is"
        elif record is None and target is not None:
            laggard = (
                "no batchpilot.dev/applied record: the operator has not configured this pod yet"
            )
        elif record is not None and record.policy != policy:
            laggard = f"steered by InferencePolicy {record.policy}"
        elif target is not None and knobs != target:
            laggard = "runs other settings than the target"
        rows.append(
            PodRow(
                name=name,
                ready=ready,
                knobs=knobs,
                version=record.version if record else None,
                time=record.time if record else None,
                policy=record.policy if record else None,
                laggard=laggard,
            )
        )
    return tuple(rows)


def print_explanation(explanation: Explanation, console: Any) -> None:
    from rich.table import Table

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
    for knob in sorted({*knobs, *(applied.get("knobs") or {}), *(good or {})}):
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

    # A guard's reason ends "(knob: wanted A, allowed B)"; arrows are only in
    # Events, for what a pod ran -> what it runs now.
    reasons = list(recommendation.get("reasons") or [])
    decided = [r for r in reasons if not r.startswith("guard")]
    guarded = [r for r in reasons if r.startswith("guard")]
    for title, rows in (("why (the decision)", decided), ("guards that changed it", guarded)):
        table = Table(title=title)
        table.add_column("step")
        table.add_column("reason")
        for reason in rows:
            step, _, text = reason.partition(": ")
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
    from rich.console import Console

    try:
        namespace, name = parse_target(target)
        with _api_client(kubeconfig, context) as api:
            explanation = gather(api, namespace, name)
    except ExplainError as err:
        _fail(str(err))
    print_explanation(explanation, Console())


# -- helpers --------------------------------------------------------------------


def _api_client(kubeconfig: Path | None, context: str | None) -> Any:
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is not None and not kubeconfig.is_file():
        raise ExplainError(f"--kubeconfig: no such file {kubeconfig}")
    try:
        return config.new_client_from_config(
            config_file=str(kubeconfig) if kubeconfig is not None else None, context=context
        )
    except ConfigException as err:
        raise ExplainError(f"--kubeconfig: cannot load a cluster configuration ({err})") from err


def _policy_selector(api: Any, namespace: str, spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """spec.selector, or the pod selector of spec.targetRef's Deployment / StatefulSet."""
    from kubernetes import client

    if "selector" in spec:
        return spec["selector"]
    ref = spec.get("targetRef") or {}
    apps = client.AppsV1Api(api)
    if ref.get("kind") == "Deployment":
        workload = apps.read_namespaced_deployment(ref.get("name"), namespace)
    elif ref.get("kind") == "StatefulSet":
        workload = apps.read_namespaced_stateful_set(ref.get("name"), namespace)
    else:
        raise ExplainError("spec has neither selector nor a Deployment / StatefulSet targetRef")
    return api.sanitize_for_serialization(workload.spec.selector)


def _pod_of(laggard: str) -> str:
    return laggard.partition(": ")[0]


def _model_text(model: Mapping[str, Any]) -> str:
    if not model:
        return "-"
    error = model.get("heldOutError")
    trusted = "trusted" if model.get("trusted") else "not trusted (feedback rule)"
    return f"{model.get('samples', 0)} samples, held-out error {'-' if error is None else error}, {trusted}"


def _knobs_text(knobs: Mapping[str, Any] | None) -> str:
    if knobs is None:
        return "-"
    return ", ".join(f"{key}={value}" for key, value in sorted(knobs.items()))


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _what_404(err: Any) -> str:
    message = _api_message(err)
    return message or "the policy"


def _api_message(err: Any) -> str:
    import json

    try:
        return str(json.loads(err.body).get("message", ""))
    except (TypeError, ValueError, AttributeError):
        return str(err.body or "")[:200]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
