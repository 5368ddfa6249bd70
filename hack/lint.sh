#!/usr/bin/env bash
# The lint half of `make test`: formatting, vet, staticcheck (a go.mod
# tool), a tidy go.mod, and a tree without build outputs. Prints every
# finding and exits non-zero if there was any.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
step() {
	local name=$1
	shift
	local out
	if ! out=$("$@" 2>&1) || [[ -n $out && $name == gofmt ]]; then
		echo "lint: $name:"
		echo "$out" | sed 's/^/    /'
		failed=1
	else
		echo "lint: $name: ok"
	fi
}

step gofmt gofmt -l $(git ls-files "*.go")
step "go vet" go vet ./...
step staticcheck go tool staticcheck ./...
step "go mod tidy" go mod tidy -diff
step "tracked files" ./hack/check-tree.sh
exit $failed
