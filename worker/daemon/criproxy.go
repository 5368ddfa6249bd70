package daemon

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/starlight-project/starlight/worker/criproxy"
)

// maxCRIMessage is the message size containerd's CRI service allows (a
// ListImages answer of a node with many images is large).
const maxCRIMessage = 16 << 20

// criProxyServer is the CRI proxy on cfg.CRIProxy, in front of
// containerd's CRI service on cfg.Containerd. It returns the listener and
// server to Serve; serve with srv.Serve(l).
func (d *Daemon) criProxyServer(ctx context.Context) (net.Listener, *grpc.Server, func(), error) {
	conn, err := grpc.NewClient("unix://"+d.cfg.Containerd,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxCRIMessage), grpc.MaxCallSendMsgSize(maxCRIMessage)))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("containerd's CRI service at %s: %w", d.cfg.Containerd, err)
	}
	l, err := listenUnix(d.cfg.CRIProxy, 0o660)
	if err != nil {
		conn.Close()
		return nil, nil, nil, err
	}
	srv := criproxy.New(conn, d.criSecrets, d.criMetrics).
		Server(grpc.MaxRecvMsgSize(maxCRIMessage), grpc.MaxSendMsgSize(maxCRIMessage))
	log.G(ctx).WithField("address", d.cfg.CRIProxy).WithField("containerd", d.cfg.Containerd).Info("serving the CRI proxy")
	stop := func() {
		stopGRPC(srv, 5*time.Second)
		conn.Close()
	}
	return l, srv, stop, nil
}

// stopGRPC stops srv gracefully, at once after timeout (a PullImage in
// flight may take minutes; the kubelet retries it).
func stopGRPC(srv *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		srv.Stop()
	}
}
