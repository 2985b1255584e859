"""The real local test stack: kube-apiserver with embedded etcd, Prometheus, kubectl, helm.

Importable as `stack` wherever tests/ is on sys.path (pytest puts it there;
benchmark scripts insert it themselves). Plain functions for scripts:

    with start_kube_apiserver() as kube, kube.api_client() as api:
        create_namespace(api, "demo")
        pod = create_serving_pod(api, "demo", "llm-0", pod_ip="127.0.0.2", ports={"http": 8000})
        with start_prometheus(["127.0.0.2:9090"]) as prom:
            ...

The same as pytest fixtures (stack.fixtures, registered by tests/conftest.py):
kube_api, k8s_client, namespace, make_serving_pod, prometheus, kubectl, helm.
A missing binary raises StackError whose message is the fix: run scripts/dev-setup.
"""

from .apiserver import KubeAPIServer, start_kube_apiserver
from .kube import (
    ServingPod,
    create_crd,
    create_namespace,
    create_service_account,
    create_serving_pod,
    service_account_token,
    unique_name,
)
from .prometheus import PrometheusServer, ScrapeTarget, start_prometheus
from .tools import StackError, helm_path, kube_apiserver_path, kubectl_path, prometheus_path

__all__ = [
    "KubeAPIServer",
    "PrometheusServer",
    "ScrapeTarget",
    "ServingPod",
    "StackError",
    "create_crd",
    "create_namespace",
    "create_service_account",
    "create_serving_pod",
    "helm_path",
    "kube_apiserver_path",
    "kubectl_path",
    "prometheus_path",
    "service_account_token",
    "start_kube_apiserver",
    "start_prometheus",
    "unique_name",
]
