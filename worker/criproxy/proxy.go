// Package criproxy is the worker's CRI proxy: a gRPC server on a socket of
// the worker that kubelet (imageServiceEndpoint) or crictl (--image-endpoint)
// talks to instead of containerd. Every call goes through to containerd's
// CRI service unchanged; a PullImage also leaves the registry credentials
// it carries (a pod's imagePullSecrets, crictl --creds) in Secrets while
// containerd runs it, so that the snapshotter Prepares the pull makes fetch
// the bundle with the pod's own credentials. Nothing is written to disk.
//
// The proxy forwards frames, not messages: it decodes only PullImage
// requests, so any CRI version and any method containerd serves (the
// runtime service too) pass through.
package criproxy

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/log"
	"github.com/distribution/reference"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// pullImageMethod is the one method the proxy looks into.
const pullImageMethod = "/runtime.v1.ImageService/PullImage"

// Proxy forwards CRI calls to containerd.
type Proxy struct {
	backend *grpc.ClientConn
	secrets *Secrets
	metrics *Metrics
}

// New returns a proxy to backend (containerd's gRPC socket) that keeps the
// credentials of the pulls it forwards in secrets. metrics may be nil.
func New(backend *grpc.ClientConn, secrets *Secrets, metrics *Metrics) *Proxy {
	return &Proxy{backend: backend, secrets: secrets, metrics: metrics}
}

// Server returns a gRPC server that forwards every call through p.
func (p *Proxy) Server(opts ...grpc.ServerOption) *grpc.Server {
	opts = append(opts, grpc.ForceServerCodecV2(rawCodec{}), grpc.UnknownServiceHandler(p.forward))
	return grpc.NewServer(opts...)
}

// forward is the handler of every method: it opens the same method on the
// backend and copies frames both ways, and the header and trailer back.
func (p *Proxy) forward(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "criproxy: no method in the stream")
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	md, _ := metadata.FromIncomingContext(ctx)
	ctx = metadata.NewOutgoingContext(ctx, md.Copy())

	if method == pullImageMethod {
		return p.pullImage(ctx, ss)
	}
	cs, err := p.backend.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		return err
	}
	up := make(chan error, 1)
	go func() { up <- copyUp(ss, cs) }()
	down := copyDown(cs, ss)
	if down != nil {
		return down
	}
	// The backend ended the call; what the client still sends is moot.
	cancel()
	<-up
	return nil
}

// pullImage forwards a PullImage: the request's credentials are in Secrets
// for the image while containerd pulls it.
func (p *Proxy) pullImage(ctx context.Context, ss grpc.ServerStream) error {
	var in frame
	if err := ss.RecvMsg(&in); err != nil {
		return err
	}
	var req runtime.PullImageRequest
	if err := req.Unmarshal(in.bytes()); err != nil {
		in.free()
		return status.Errorf(codes.InvalidArgument, "criproxy: decoding PullImage: %v", err)
	}
	image := req.GetImage().GetImage()
	ref, err := NormalizeRef(image)
	if err != nil {
		// containerd says what is wrong with the reference.
		ref = ""
	}
	auth := req.GetAuth()
	withAuth := authGiven(auth)
	p.metrics.pull(withAuth)
	if ref != "" && withAuth {
		release := p.secrets.Hold(ref, auth)
		defer release()
	}
	log.G(ctx).WithField("image", ref).WithField("credentials", withAuth).Debug("CRI PullImage")

	var out frame
	err = p.backend.Invoke(ctx, pullImageMethod, &in, &out, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		return err
	}
	return ss.SendMsg(&out)
}

// copyUp copies the client's frames to the backend until the client
// closes its side.
func copyUp(ss grpc.ServerStream, cs grpc.ClientStream) error {
	for {
		var f frame
		if err := ss.RecvMsg(&f); err != nil {
			if errors.Is(err, io.EOF) {
				return cs.CloseSend()
			}
			return err
		}
		if err := cs.SendMsg(&f); err != nil {
			return err
		}
	}
}

// copyDown copies the backend's header, frames and trailer to the client;
// it returns the backend's status as the call's.
func copyDown(cs grpc.ClientStream, ss grpc.ServerStream) error {
	first := true
	for {
		var f frame
		err := cs.RecvMsg(&f)
		if first {
			// The header is there once the first frame or the end is.
			if md, herr := cs.Header(); herr == nil {
				if err := ss.SendHeader(md); err != nil && !errors.Is(err, io.EOF) {
					f.free()
					return err
				}
			}
			first = false
		}
		if err != nil {
			ss.SetTrailer(cs.Trailer())
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := ss.SendMsg(&f); err != nil {
			return err
		}
	}
}

// NormalizeRef is the reference containerd's CRI plugin records for image
// (and labels the snapshots of its pull with): docker.io/library/redis:latest
// for "redis".
func NormalizeRef(image string) (string, error) {
	named, err := reference.ParseDockerRef(image)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", image, err)
	}
	return named.String(), nil
}
