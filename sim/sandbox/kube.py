"""Objects in the test apiserver, made the way a full cluster would leave them.

No controller manager, scheduler or kubelet runs (see batchpilot.sim.sandbox.apiserver), so the
helpers here do their part: a namespace gets its `default` ServiceAccount, and
a pod gets a Running status with a loopback pod IP where the gate or simulator
under test really listens.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .process import require_loopback
from .tools import StackError

# Where the fake kubelet "runs" pods; shown as the pods' node and host IP.
NODE_NAME = "batchpilot-test-node"
NODE_IP = "127.0.0.1"
# Pods need an image; nothing pulls it, since no kubelet runs.
PLACEHOLDER_IMAGE = "batchpilot.invalid/serving:test"
# Status writes that race another writer (e.g. the operator annotating the pod)
# get 409 Conflict; each retry re-reads, and 5 is plenty for a handful of writers.
CONFLICT_RETRIES = 5
# A CRD turns Established within about 100 ms on an idle machine.
CRD_ESTABLISHED_TIMEOUT_S = 30.0

_MAX_NAME_LENGTH = 63


def unique_name(prefix: str) -> str:
    """A DNS-1123 label from `prefix` plus a random suffix, at most 63 characters."""
    suffix = secrets.token_hex(3)
    stem = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    stem = stem[: _MAX_NAME_LENGTH - len(suffix) - 1].rstrip("-")
    return f"{stem}-{suffix}" if stem else suffix


def create_namespace(
    api: client.ApiClient, name: str, labels: Mapping[str, str] | None = None
) -> client.V1Namespace:
    """Create a namespace and its `default` ServiceAccount.

    kube-controller-manager would create the ServiceAccount; without it the
    ServiceAccount admission plugin rejects every pod in the namespace.
    """
    core = client.CoreV1Api(api)
    namespace = core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=dict(labels or {})))
    )
    create_service_account(api, name, "default")
    return namespace


def create_service_account(
    api: client.ApiClient, namespace: str, name: str
) -> client.V1ServiceAccount:
    return client.CoreV1Api(api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    )


def service_account_token(
    api: client.ApiClient, namespace: str, name: str, *, expiration_seconds: int = 3600
) -> str:
    """A bound token for the ServiceAccount from the TokenRequest API.

    Its audience is the apiserver's own (--api-audiences). The apiserver
    refuses expirations under 600 s.
    """
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
    )
    response = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, request
    )
    if response.status is None:
        raise RuntimeError(f"the apiserver issued no token for service account {namespace}/{name}")
    return str(response.status.token)


def create_crd(
    api: client.ApiClient,
    manifest: Mapping[str, Any],
    *,
    timeout_s: float = CRD_ESTABLISHED_TIMEOUT_S,
) -> client.V1CustomResourceDefinition:
    """Create a CustomResourceDefinition and wait until it is Established."""
    # The client sends a dict body as it is: no need to build the model objects.
    client.ApiextensionsV1Api(api).create_custom_resource_definition(dict(manifest))  # type: ignore[arg-type]
    return wait_until_established(api, manifest["metadata"]["name"], timeout_s=timeout_s)


def wait_until_established(
    api: client.ApiClient, name: str, *, timeout_s: float = CRD_ESTABLISHED_TIMEOUT_S
) -> client.V1CustomResourceDefinition:
    """Wait until the CRD `name` is Established, however it was created.

    Established means the apiserver serves the new resource, so objects of it
    can be created right after this returns. `kubectl wait
    --for=condition=Established` cannot stand in for this: right after an
    apply the CRD may have no conditions yet, and kubectl then fails at once
    (".status.conditions accessor error: <nil>") instead of waiting.
    """
    extensions = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout_s
    while True:
        crd = extensions.read_custom_resource_definition(name)
        conditions = crd.status.conditions if crd.status else None
        if any(c.type == "Established" and c.status == "True" for c in conditions or ()):
            return crd
        if time.monotonic() > deadline:
            raise StackError(f"CRD {name} not Established after {timeout_s:.0f} s: {conditions}")
        time.sleep(0.05)


@dataclass
class ServingPod:
    """A pod the apiserver reports as running at `pod_ip`, on the ports given.

    Whatever serves those ports (a gate, the simulator) is the test's to start,
    bound to pod_ip, e.g. 127.0.0.2:8000.
    """

    api: client.ApiClient = field(repr=False)
    namespace: str
    name: str
    pod_ip: str
    ports: Mapping[str, int]

    def read(self) -> client.V1Pod:
        return client.CoreV1Api(self.api).read_namespaced_pod(self.name, self.namespace)

    def set_ready(self, ready: bool) -> client.V1Pod:
        """Flip the Ready and ContainersReady conditions and container readiness,
        as a kubelet does when a readiness probe starts or stops passing."""
        return _write_running_status(self.api, self.namespace, self.name, self.pod_ip, ready)


def create_serving_pod(
    api: client.ApiClient,
    namespace: str,
    name: str,
    *,
    pod_ip: str,
    ports: Mapping[str, int],
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    ready: bool = True,
) -> ServingPod:
    """Create a one-container pod with `ports` (name -> containerPort) and give it
    the status a kubelet would: Running on pod_ip, Ready if `ready`.

    pod_ip must be on loopback (127.0.0.x): the operator will send requests there.
    """
    require_loopback(pod_ip, "pod_ip")
    container = client.V1Container(
        name="server",
        image=PLACEHOLDER_IMAGE,
        ports=[
            client.V1ContainerPort(name=port_name, container_port=port)
            for port_name, port in ports.items()
        ],
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name, labels=dict(labels or {}), annotations=dict(annotations or {})
        ),
        # A node name marks the pod as scheduled, which no scheduler will do here.
        spec=client.V1PodSpec(node_name=NODE_NAME, containers=[container]),
    )
    client.CoreV1Api(api).create_namespaced_pod(namespace, pod)
    _write_running_status(api, namespace, name, pod_ip, ready)
    return ServingPod(api=api, namespace=namespace, name=name, pod_ip=pod_ip, ports=dict(ports))


def _write_running_status(
    api: client.ApiClient, namespace: str, name: str, pod_ip: str, ready: bool
) -> client.V1Pod:
    core = client.CoreV1Api(api)
    for attempt in range(1, CONFLICT_RETRIES + 1):
        pod = core.read_namespaced_pod(name, namespace)
        pod.status = _running_status(pod, pod_ip, ready)
        try:
            # A whole-status PUT: a patch's content type would have to be forced
            # to merge-patch, which the generated client picks per call.
            return core.replace_namespaced_pod_status(name, namespace, pod)
        except ApiException as error:
            if error.status != 409 or attempt == CONFLICT_RETRIES:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _running_status(pod: client.V1Pod, pod_ip: str, ready: bool) -> client.V1PodStatus:
    now = datetime.now(UTC)
    previous = pod.status
    started_at = previous.start_time if previous and previous.start_time else now
    old_conditions = {c.type: c for c in (previous.conditions if previous else None) or ()}

    def condition(kind: str, status: bool) -> client.V1PodCondition:
        value = "True" if status else "False"
        old = old_conditions.get(kind)
        # The transition time moves only when the value changes, as the kubelet does.
        changed_at = old.last_transition_time if old and old.status == value else now
        return client.V1PodCondition(type=kind, status=value, last_transition_time=changed_at)

    return client.V1PodStatus(
        phase="Running",
        host_ip=NODE_IP,
        host_ips=[client.V1HostIP(ip=NODE_IP)],
        pod_ip=pod_ip,
        pod_ips=[client.V1PodIP(ip=pod_ip)],
        start_time=started_at,
        conditions=[
            condition("PodScheduled", True),
            condition("Initialized", True),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        container_statuses=[
            client.V1ContainerStatus(
                name=container.name,
                image=container.image or "",
                image_id="",
                ready=ready,
                started=True,
                restart_count=0,
                state=client.V1ContainerState(
                    running=client.V1ContainerStateRunning(started_at=started_at)
                ),
            )
            for container in (pod.spec.containers if pod.spec is not None else [])
        ],
    )
