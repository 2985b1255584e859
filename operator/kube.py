"""The few Kubernetes API calls the operator makes outside kopf's watches.

kopf watches policies and pods and writes the policy's status; these three
calls it does not offer, so they go through the official client (synchronous,
run in a worker thread by the caller): read the admin token from the policy's
Secret, read a Deployment's or StatefulSet's pod selector, and write batchpilot's
annotations on a pod. Nothing here edits a workload.

Every API failure is mapped once, here, to `KubeError` with a message fit for
a status condition.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from batchpilot.operator.spec import LabelSelector, Requirement, SecretRef, WorkloadRef

# Without it this client sends a dict body as a JSON *patch* (a list of
# operations) and the API server rejects it.
_MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """An API call failed; the message names the object and the cause."""


def read_token(api: client.ApiClient, namespace: str, ref: SecretRef) -> str:
    """The admin token in `ref`, read from the policy's own namespace only."""
    where = f"Secret {namespace}/{ref.name}"
    try:
        secret = client.CoreV1Api(api).read_namespaced_secret(ref.name, namespace)
    except ApiException as err:
        raise KubeError(f"{where}: {_api_reason(err)}") from err
    except HTTPError as err:
        raise KubeError(f"{where}: API server unreachable ({err})") from err
    encoded = (secret.data or {}).get(ref.key)
    if encoded is None:
        raise KubeError(f"{where} has no key {ref.key!r} (spec.actuation.tokenSecretRef.key)")
    try:
        token = base64.b64decode(encoded, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError) as err:
        raise KubeError(f"{where} key {ref.key!r} is not a text token") from err
    if not token:
        raise KubeError(f"{where} key {ref.key!r} is empty")
    return token


def read_workload_selector(
    api: client.ApiClient, namespace: str, ref: WorkloadRef
) -> LabelSelector:
    """The pod selector of the Deployment or StatefulSet `ref` (never modified)."""
    apps = client.AppsV1Api(api)
    where = f"{ref.kind} {namespace}/{ref.name}"
    try:
        if ref.kind == "Deployment":
            workload: Any = apps.read_namespaced_deployment(ref.name, namespace)
        else:
            workload = apps.read_namespaced_stateful_set(ref.name, namespace)
    except ApiException as err:
        raise KubeError(f"{where} (spec.targetRef): {_api_reason(err)}") from err
    except HTTPError as err:
        raise KubeError(f"{where}: API server unreachable ({err})") from err
    selector = workload.spec.selector
    requirements = tuple(
        Requirement(expr.key, expr.operator, frozenset(expr.values or ()))
        for expr in selector.match_expressions or ()
    )
    return LabelSelector(dict(selector.match_labels or {}), requirements)


def write_annotations(
    api: client.ApiClient, namespace: str, pod: str, annotations: Mapping[str, str | None]
) -> None:
    """Merge `annotations` into the pod's (a None value removes that key)."""
    body = {"metadata": {"annotations": dict(annotations)}}
    try:
        client.CoreV1Api(api).patch_namespaced_pod(pod, namespace, body, _content_type=_MERGE_PATCH)
    except ApiException as err:
        if err.status == 404 and all(value is None for value in annotations.values()):
            return  # the pod is gone, and its annotations with it
        raise KubeError(f"pod {namespace}/{pod}: annotating failed: {_api_reason(err)}") from err
    except HTTPError as err:
        raise KubeError(f"pod {namespace}/{pod}: API server unreachable ({err})") from err


def _api_reason(err: ApiException) -> str:
    if err.status == 404:
        return "not found"
    if err.status == 403:
        return "forbidden: the operator's ServiceAccount lacks the RBAC permission"
    return f"{err.status} {err.reason}"
