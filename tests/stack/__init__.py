"""The real local test stack: kube-apiserver with embedded etcd, Prometheus, kubectl, helm,
and a real single-node cluster (kubelet, containerd, scheduler, controller manager, kube-proxy).

Importable as `stack` wherever tests/ is on sys.path (pytest puts it there;
benchmark scripts insert it themselves). Plain functions for scripts:

    with start_kube_apiserver() as kube, kube.api_client() as api:
        create_namespace(api, "demo")
        pod = create_serving_pod(api, "demo", "llm-0", pod_ip="127.0.0.2", ports={"http": 8000})
        with start_prometheus(["127.0.0.2:9090"]) as prom:
            ...

    with start_cluster(workdir) as cluster, cluster.api_client() as api:
        image = cluster.import_image(node_image_archive_path("agnhost"))
        ...  # real pods; reach them from inside the node with cluster.exec_in_node(argv)

The same as pytest fixtures (stack.fixtures, registered by tests/conftest.py):
kube_api, k8s_client, namespace, make_serving_pod, prometheus, kubectl, helm, cluster.
A missing binary raises StackError whose message is the fix: run scripts/dev-setup.
"""

from batchpilot.sim.sandbox.apiserver import KubeAPIServer, start_kube_apiserver
from batchpilot.sim.sandbox.kube import (
    ServingPod,
    create_crd,
    create_namespace,
    create_service_account,
    create_serving_pod,
    service_account_token,
    unique_name,
    wait_until_established,
)
from batchpilot.sim.sandbox.prometheus import PrometheusServer, ScrapeTarget, start_prometheus
from batchpilot.sim.sandbox.tools import (
    StackError,
    helm_path,
    kube_apiserver_path,
    kube_node_binary_path,
    kubectl_path,
    node_image_archive_path,
    prometheus_path,
)

from .node import Cluster, clear_leftovers, start_cluster

__all__ = [
    "Cluster",
    "KubeAPIServer",
    "PrometheusServer",
    "ScrapeTarget",
    "ServingPod",
    "StackError",
    "clear_leftovers",
    "create_crd",
    "create_namespace",
    "create_service_account",
    "create_serving_pod",
    "helm_path",
    "kube_apiserver_path",
    "kube_node_binary_path",
    "kubectl_path",
    "node_image_archive_path",
    "prometheus_path",
    "service_account_token",
    "start_cluster",
    "start_kube_apiserver",
    "start_prometheus",
    "unique_name",
    "wait_until_established",
]
