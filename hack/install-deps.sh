#!/usr/bin/env bash
# Installs what building and testing Starlight needs on Debian 12, as root.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

# e2fsprogs and mount: the fresh ext4 each benchmark measurement runs on (the
# bench smoke test of make test too).
pkgs=(containerd runc docker.io skopeo fuse3 busybox-static sqlite3 apache2-utils iproute2 e2fsprogs mount gcc make git ca-certificates curl bc)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# PostgreSQL's server binaries for the registry replica tests, which start a
# private cluster of their own (integration/harness/postgres.go); the
# package's system cluster is not used.
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
	echo "installing: postgresql"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
if ! command -v go >/dev/null 2>&1; then
	echo "Go 1.26 is required (https://go.dev/dl); not found on PATH" >&2
	exit 1
fi
go mod download
# containerd 2, which the end-to-end tests build from its own module.
go -C integration/containerd2 mod download
# crictl drives containerd's CRI plugin in integration/cri_test.go. It is
# installed as a binary rather than a go.mod tool: its Kubernetes
# dependencies would otherwise enter this module's graph.
if ! command -v crictl >/dev/null 2>&1; then
	echo "installing crictl"
	GOBIN=/usr/local/bin go install sigs.k8s.io/cri-tools/cmd/crictl@v1.34.0
fi
