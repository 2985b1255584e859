// Command kube-apiserver-etcd is the stock kube-apiserver with etcd embedded in
// the same process, so the test stack needs one binary and no etcd package.
//
// When BATCHPILOT_ETCD_DIR is set, an etcd member is started first with its data
// in that directory, serving clients on BATCHPILOT_ETCD_CLIENT_URL and peers on
// BATCHPILOT_ETCD_PEER_URL (both loopback). Every command-line flag goes to the
// apiserver unchanged, so --etcd-servers must point at the same client URL.
package main

import (
	"fmt"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// etcdStartTimeout bounds a cold start of the member; a fresh data dir on a
// loaded 2-core machine takes about a second.
const etcdStartTimeout = 60 * time.Second

func startEtcd(dataDir, clientURL, peerURL string) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Dir = dataDir
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	client, err := url.Parse(clientURL)
	if err != nil {
		return nil, fmt.Errorf("BATCHPILOT_ETCD_CLIENT_URL: %w", err)
	}
	peer, err := url.Parse(peerURL)
	if err != nil {
		return nil, fmt.Errorf("BATCHPILOT_ETCD_PEER_URL: %w", err)
	}
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peerURL
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case <-time.After(etcdStartTimeout):
		e.Close()
		return nil, fmt.Errorf("embedded etcd not ready after %s", etcdStartTimeout)
	}
}

func main() {
	if dir := os.Getenv("BATCHPILOT_ETCD_DIR"); dir != "" {
		e, err := startEtcd(dir, os.Getenv("BATCHPILOT_ETCD_CLIENT_URL"), os.Getenv("BATCHPILOT_ETCD_PEER_URL"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "embedded etcd:", err)
			os.Exit(1)
		}
		defer e.Close()
	}
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
