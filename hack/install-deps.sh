#!/usr/bin/env bash
# Installs what building and testing Starlight needs on Debian 12, as root.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

pkgs=(containerd runc docker.io skopeo fuse3 busybox-static sqlite3 apache2-utils iproute2 gcc make git ca-certificates curl bc)
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
if ! command -v go >/dev/null 2>&1; then
	echo "Go 1.26 is required (https://go.dev/dl); not found on PATH" >&2
	exit 1
fi
go mod download
