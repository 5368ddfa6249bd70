#!/usr/bin/env bash
# make bench: provisions realistic Debian images (redis, nginx, python3,
# nodejs, a JRE; built once with debootstrap and apt-get, cached under
# integration/bench/cache/) through emulated LAN/WAN/edge links with plain
# containerd, stargz-snapshotter (eStargz) and Starlight, and writes the median time to ready, the
# physical limit, a markdown/CSV table and a plot to
# integration/bench/results/<date>/. Run as root.
#
# Flags go to starlight-bench, e.g.
#   hack/bench.sh -images redis,jre -profiles WAN,edge -runs 5
#   make bench BENCH_FLAGS="-images redis -profiles WAN -runs 1"
#   hack/bench.sh -systems containerd,estargz,estargz-opt,starlight+trace
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $EUID -ne 0 ]]; then
	echo "bench: must run as root (debootstrap, containerd, runc, overlayfs, FUSE)" >&2
	exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
	echo "installing debootstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

export STARLIGHT_BIN="${STARLIGHT_BIN:-$PWD/bin}"
export OTEL_TRACES_EXPORTER=none
if [[ ! -x "$STARLIGHT_BIN/starlight-registry" ]]; then
	make build
fi

tmp="$(mktemp -d /tmp/starlight-bench.XXXXXX)"
bench_pid=
cleanup() {
	# The benchmark stops its daemons on SIGINT/SIGTERM; wait for it.
	if [[ -n "$bench_pid" ]] && kill -0 "$bench_pid" 2>/dev/null; then
		kill -TERM "$bench_pid" 2>/dev/null || true
		wait "$bench_pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A private copy of the binaries: a `make build` elsewhere during the run
# must not change the worker or registry in the middle of the measurements.
mkdir "$tmp/bin"
cp "$STARLIGHT_BIN"/starlight-registry "$STARLIGHT_BIN"/starlight-worker "$STARLIGHT_BIN"/ctr-starlight "$tmp/bin/"
export STARLIGHT_BIN="$tmp/bin"

# The eStargz peer, into the same private bin (integration/bench/README.md,
# "eStargz"): containerd-stargz-grpc built from stargz-snapshotter's Go
# module (pinned in integration/bench/estargz/go.mod), and ctr-remote,
# stargz-snapshotter's image tool, from Debian's stargz-snapshotter package.
# Without them the run leaves the estargz systems out and says so.
stargz_ok=1
if ! command -v ctr-remote >/dev/null 2>&1; then
	echo "installing stargz-snapshotter (ctr-remote)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends stargz-snapshotter >/dev/null ||
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends stargz-snapshotter >/dev/null; } ||
		stargz_ok=0
fi
if ((stargz_ok)); then
	cp "$(command -v ctr-remote)" "$tmp/bin/"
	dpkg-query -W -f='Debian stargz-snapshotter ${Version}\n' stargz-snapshotter >"$tmp/bin/ctr-remote.version" 2>/dev/null || true
	echo "building containerd-stargz-grpc (integration/bench/estargz)"
	(cd integration/bench/estargz && go build -o "$tmp/bin/" ./containerd-stargz-grpc) || stargz_ok=0
fi
if ((stargz_ok)); then
	export STARGZ_BIN="$tmp/bin"
else
	echo "bench: WARNING: no stargz-snapshotter binaries; the estargz systems are left out" >&2
	unset STARGZ_BIN
fi

go build -o "$tmp/starlight-bench" ./integration/bench/cmd/starlight-bench
"$tmp/starlight-bench" "$@" &
bench_pid=$!
wait "$bench_pid"

# Complete layers against overlayfs, inside a container: a metadata walk and
# a read of every file, cold and warm (issue: complete layers leave FUSE).
echo
echo "complete images against overlayfs (integration/cmd/measure-worker):"
go run ./integration/cmd/measure-worker -big-mb 64 -small-files 5000 -rtt 2ms -mbps 1000 -runs 3
