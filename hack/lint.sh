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

# The nested modules (the benchmark's peer, the chart's checks), with the
# main module's staticcheck.
staticcheck=$(mktemp -d)/staticcheck
trap 'rm -rf "$(dirname "$staticcheck")"' EXIT
go build -o "$staticcheck" honnef.co/go/tools/cmd/staticcheck
for mod in $(git ls-files "*/go.mod"); do
	dir=$(dirname "$mod")
	step "$dir: go vet" go -C "$dir" vet ./...
	step "$dir: staticcheck" bash -c "cd '$dir' && '$staticcheck' ./..."
	step "$dir: go mod tidy" go -C "$dir" mod tidy -diff
done
step "tracked files" ./hack/check-tree.sh
exit $failed
