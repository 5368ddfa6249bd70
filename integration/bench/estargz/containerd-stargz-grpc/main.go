// Command containerd-stargz-grpc is stargz-snapshotter's remote snapshotter
// as a containerd proxy plugin, for the benchmark's eStargz systems.
//
// stargz-snapshotter's own command lives in its cmd module, which the Go
// module proxy does not serve (it is built from the repository with replace
// directives). This is the same daemon on the served library module: the
// flags, the config file (stargz-snapshotter's config.toml: the filesystem
// options, [resolver], [snapshotter]), the docker-config keychain, and
// service.NewStargzSnapshotterService behind containerd's snapshots gRPC
// API on a unix socket. What the upstream command adds and the benchmark
// does not use is left out: the FUSE manager, CRI and kubeconfig
// keychains, metrics and debug listeners, systemd socket activation.
//
// SIGINT and SIGTERM close the snapshotter, which unmounts its FUSE
// filesystems, and exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/version"
	"github.com/pelletier/go-toml/v2"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "address of the snapshotter's gRPC server")
	configPath := flag.String("config", "/etc/containerd-stargz-grpc/config.toml", "stargz-snapshotter config file (absent: the defaults)")
	logLevel := flag.String("log-level", "info", "log level [trace, debug, info, warn, error]")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "the snapshotter's root directory")
	printVersion := flag.Bool("version", false, "print the stargz-snapshotter version and exit")
	flag.Parse()
	if *printVersion {
		fmt.Println("containerd-stargz-grpc (starlight bench build)", stargzVersion())
		return
	}
	if err := log.SetLevel(*logLevel); err != nil {
		fatal("log level: %v", err)
	}
	if err := run(*address, *configPath, *root); err != nil {
		fatal("%v", err)
	}
}

func run(address, configPath, root string) error {
	ctx := log.WithLogger(context.Background(), log.L)
	var cfg service.Config
	if b, err := os.ReadFile(configPath); err == nil {
		if err := toml.Unmarshal(b, &cfg); err != nil {
			return fmt.Errorf("config %s: %w", configPath, err)
		}
	} else if !os.IsNotExist(err) {
		return fmt.Errorf("config: %w", err)
	}
	rs, err := service.NewStargzSnapshotterService(ctx, root, &cfg,
		service.WithCredsFuncs(dockerconfig.NewDockerconfigKeychain(ctx)))
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	defer func() {
		if err := rs.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the snapshotter")
		}
	}()

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.RemoveAll(address); err != nil {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- rpc.Serve(l) }()
	log.G(ctx).WithField("version", stargzVersion()).Infof("serving on %s", address)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v, closing", s)
		rpc.Stop()
		return nil
	case err := <-served:
		return fmt.Errorf("serve %s: %w", address, err)
	}
}

// stargzVersion is the version of the stargz-snapshotter module this was
// built from (upstream sets version.Version with -ldflags instead).
func stargzVersion() string {
	if version.Version != "" && version.Version != "<unknown>" {
		return version.Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/containerd/stargz-snapshotter" {
				return d.Version
			}
		}
	}
	return "unknown"
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "containerd-stargz-grpc: "+format+"\n", args...)
	os.Exit(1)
}
