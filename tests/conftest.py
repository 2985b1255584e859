"""Shared pytest setup. The local stack's fixtures (kube_api, k8s_client,
namespace, make_serving_pod, prometheus, kubectl, helm) live in tests/stack;
see tests/stack/__init__.py."""

pytest_plugins = ["stack.fixtures"]
