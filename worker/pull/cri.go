package pull

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// criNamespace is the namespace containerd's CRI plugin works in; a
// Prepare that carries none is counted there.
const criNamespace = "k8s.io"

// criFailureTTL is how long a failed CRI fetch is remembered: the Prepares
// of the other layers of the same image get the same answer at once
// instead of asking an unreachable registry again, one layer at a time.
const criFailureTTL = 10 * time.Second

// criFetch is one CRI fetch, shared by the Prepares of an image's layers.
type criFetch struct {
	done    chan struct{} // closed once the header is in, or the pull failed
	err     error
	expires time.Time // for a failed fetch
}

// FetchCRI implements cri.Fetcher: a Kubernetes pull of imageRef is
// unpacking the platform manifest manifest into the starlight snapshotter.
// If imageRef's host is a configured Starlight registry, it pulls
// repository@manifest (the exact manifest containerd unpacks) like
// `ctr-starlight pull`, except that it leaves containerd alone (containerd
// creates the image and the snapshots itself): the layers are recorded,
// with the pushed layers they replace, and the contents stream in the
// background. It returns once the layers are recorded, or with the reason
// the image cannot be provided (unknown host, registry unreachable, image
// not converted yet), when ctx is done, or when the worker stops.
//
// The image appears in the worker's image list under imageRef, in the
// Prepare's namespace (CRI's k8s.io), with its progress. When the CRI proxy
// holds credentials for imageRef (the PullImage in flight carried a pod's
// pull secret), the pull uses them, first, for its whole life.
func (pl *Puller) FetchCRI(ctx context.Context, imageRef string, manifest digest.Digest) error {
	ref, err := ParseRef(imageRef)
	if err != nil {
		return err
	}
	if _, ok := pl.cfg.Registry(ref.Host); !ok {
		return fmt.Errorf("host %s is not a configured Starlight registry", ref.Host)
	}
	ep, err := ResolveEndpoint(pl.cfg, ref, false)
	if err != nil {
		return err
	}
	// The manifest containerd unpacks, whatever the tag points to now.
	ref.Digest = manifest
	ns, ok := namespaces.Namespace(ctx)
	if !ok || ns == "" {
		ns = criNamespace
	}

	f := pl.startCRI(imageRef, ref, ep, ns, manifest)
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// startCRI returns the fetch of manifest, starting it unless one is
// running or failed recently.
func (pl *Puller) startCRI(imageRef string, ref Ref, ep Endpoint, namespace string, manifest digest.Digest) *criFetch {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if f, ok := pl.cri[manifest]; ok {
		select {
		case <-f.done:
			if f.err != nil && time.Now().Before(f.expires) {
				return f
			}
		default:
			return f // in flight
		}
	}
	f := &criFetch{done: make(chan struct{})}
	if pl.ctx.Err() != nil {
		f.err = errors.New("the worker is shutting down")
		close(f.done)
		return f
	}
	pl.cri[manifest] = f
	var once sync.Once
	p := &Job{
		img: api.WorkerImage{
			Ref: ref.Name, Namespace: namespace, State: api.PullResolving,
			Started: time.Now().UTC(), PlainHTTP: ep.Registry.PlainHTTP,
		},
		changed: make(chan struct{}),
		active:  true,
		cri:     true,
	}
	if pl.criCredentials != nil && pl.clientWith != nil {
		if creds, ok := pl.criCredentials(imageRef); ok {
			p.remote = pl.clientWith(creds)
		}
	}
	p.header = func(err error) {
		once.Do(func() {
			pl.mu.Lock()
			f.err = err
			if err != nil {
				f.expires = time.Now().Add(criFailureTTL)
			} else if pl.cri[manifest] == f {
				// The layers are known now: later Prepares resolve
				// without asking.
				delete(pl.cri, manifest)
			}
			pl.mu.Unlock()
			close(f.done)
		})
	}
	pl.pulls[imageKey(namespace, ref.Name)] = p
	log.G(pl.ctx).WithFields(log.Fields{"ref": ref.Name, "manifest": manifest, "namespace": namespace, "pull_credentials": p.remote != nil}).
		Info("CRI pull of a Starlight image: fetching its bundle")
	pl.wg.Add(1)
	go func() {
		defer pl.wg.Done()
		pl.run(p, ref, ep)
	}()
	return f
}
