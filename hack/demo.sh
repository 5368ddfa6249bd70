#!/usr/bin/env bash
# Runs Starlight's main job end to end on this machine (as root): a private
# starlight-registry on the embedded defaults, dockerd, containerd and a
# starlight-worker; docker push, conversion, ctr-starlight pull, ctr run.
# Everything it starts is stopped on exit, including on Ctrl-C.
# Flags are passed to the demo program (see: hack/demo.sh -h).
set -euo pipefail
cd "$(dirname "$0")/.."

export STARLIGHT_BIN="${STARLIGHT_BIN:-$PWD/bin}"
export OTEL_TRACES_EXPORTER=none
if [[ ! -x "$STARLIGHT_BIN/starlight-registry" ]]; then
	make build
fi

tmp="$(mktemp -d /tmp/starlight-demo.XXXXXX)"
demo_pid=
cleanup() {
	# The demo stops its daemons on SIGINT/SIGTERM; wait for it to finish.
	if [[ -n "$demo_pid" ]] && kill -0 "$demo_pid" 2>/dev/null; then
		kill -TERM "$demo_pid" 2>/dev/null || true
		wait "$demo_pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

go build -o "$tmp/demo" ./integration/cmd/demo
"$tmp/demo" "$@" &
demo_pid=$!
wait "$demo_pid"
