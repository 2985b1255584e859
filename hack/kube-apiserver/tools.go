//go:build tools

// The node's binaries (scripts/build-kube-node) are built from this module, so
// the kubelet, scheduler, controller manager and kube-proxy share the
// apiserver's exact module set. These imports keep their packages' modules in
// go.mod and go.sum under `go mod tidy`; the build tag keeps them out of the
// apiserver binary. agnhost is Kubernetes' own e2e test server: the node's
// tests serve HTTP from a pod with it.
package main

import (
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/test/images/agnhost"
)
