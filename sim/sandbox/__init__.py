"""The whole stack on one machine, as real processes on loopback.

A real kube-apiserver (apiserver), Prometheus (prometheus), simulated or
llama.cpp serving pods each behind a real gate (fleet, llama_server), and the
operator (operator_process), with their process plumbing (process) and the
binaries scripts/dev-setup installs (tools). `batchpilot sandbox` runs them for
hands-on use; the test suite (tests/stack) and the benchmarks run them too.

Nothing is imported here: engine_steps on the GPU machine imports
llama_server alone, where the Kubernetes client is not installed.
"""
