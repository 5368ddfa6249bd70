// Package containerd2 holds no code: its module pins containerd 2
// (github.com/containerd/containerd/v2) and lists, as `tool` directives,
// the three binaries the end-to-end tests run against it: containerd,
// containerd-shim-runc-v2 and ctr. integration/harness builds them
// (`go build -tags no_btrfs -o DIR/ tool` in this directory) once per
// test process; see harness.Containerd2Binaries.
package containerd2
