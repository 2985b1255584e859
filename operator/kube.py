"""The few Kubernetes API calls the operator makes outside kopf's watches.

kopf watches policies and pods; the calls here go through the official client
(synchronous, run in a worker thread by the caller): read the admin token from
the policy's Secret, read a Deployment's or StatefulSet's pod selector, list
a namespace's pods after kopf re-listed them (podledger.py says why), write
batchpilot's annotations on a pod, and write the policy's status. Nothing here
edits a workload.

The status is written here and not through kopf's `patch.status`: kopf applies
a timer's patch after the handler returns, outside its error handling, and a
patch that fails there (a 409 Conflict, or an API server down for longer than
kopf's retries) ends that policy's timer for good, silently, until the
operator restarts (kopf 1.45; tests/test_faults_kube_api.py).

Every API failure is mapped once, here, to `KubeError` with a message fit for
a status condition.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from batchpilot.operator.spec import LabelSelector, Requirement, SecretRef, WorkloadRef

GROUP, VERSION, PLURAL = "batchpilot.dev", "v1alpha1", "inferencepolicies"
# Without it this client sends a dict body as a JSON *patch* (a list of
# operations) and the API server rejects it.
_MERGE_PATCH = "application/merge-patch+json"
# The same bound as kopf's own requests (settings.networking.request_timeout):
# a status write or pod listing that hangs longer is better tried again later.
REQUEST_TIMEOUT_S = 30.0
# kubectl's page size: a namespace of thousands of pods comes in a few answers.
LIST_PAGE_SIZE = 500
# The API server answers a list with each object's metadata alone.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


class KubeError(Exception):
    """An API call failed; the message names the object and the cause.

    `status` is the HTTP status (None when no answer came), `retry_after_s`
    the answer's Retry-After, if it had one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


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


def list_pod_uids(api: client.ApiClient, namespace: str) -> set[str]:
    """The uids of every pod in `namespace` now (a consistent list, page by page)."""
    where = f"pods in namespace {namespace}"
    uids: set[str] = set()
    page_token = None
    try:
        while True:
            # Metadata only, as plain JSON: building the client's pod models,
            # for one field each, took most of the operator's CPU with 16,000
            # pods (py-spy, bench/operator_cost.py --policies 1000).
            # With _preload_content=False the client hands back urllib3's
            # response, not the V1PodList its signature declares.
            response: Any = client.CoreV1Api(api).list_namespaced_pod(
                namespace,
                limit=LIST_PAGE_SIZE,
                _continue=page_token,
                _request_timeout=REQUEST_TIMEOUT_S,
                _headers={"Accept": METADATA_ONLY},
                _preload_content=False,
            )
            page = json.loads(response.data)
            uids.update(
                uid for item in page.get("items") or () if (uid := item["metadata"].get("uid"))
            )
            page_token = (page.get("metadata") or {}).get("continue")
            if not page_token:
                return uids
    except ApiException as err:
        raise KubeError(f"listing {where}: {_api_reason(err)}", status=err.status) from err
    except HTTPError as err:
        raise KubeError(f"listing {where}: API server unreachable ({err})") from err


def write_policy_status(
    api: client.ApiClient, namespace: str, name: str, patch: Mapping[str, Any]
) -> bool:
    """Merge `patch` into the InferencePolicy's status; False if the policy is gone."""
    where = f"InferencePolicy {namespace}/{name} status"
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(patch)},
            _content_type=_MERGE_PATCH,
            _request_timeout=REQUEST_TIMEOUT_S,
        )
    except ApiException as err:
        if err.status == 404:
            return False  # deleted meanwhile: nothing left to describe
        raise KubeError(
            f"{where}: {_api_reason(err)}", status=err.status, retry_after_s=_retry_after(err)
        ) from err
    except HTTPError as err:
        raise KubeError(f"{where}: API server unreachable ({err})") from err
    return True


def _retry_after(err: ApiException) -> float | None:
    """The answer's Retry-After in seconds (the API server sends whole seconds)."""
    value = (err.headers or {}).get("Retry-After")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None  # an HTTP date: never sent by the API server
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _api_reason(err: ApiException) -> str:
    if err.status == 404:
        return "not found"
    if err.status == 403:
        return "forbidden: the operator's ServiceAccount lacks the RBAC permission"
    return f"{err.status} {err.reason}"
