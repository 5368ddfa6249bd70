#!/usr/bin/env bash
# Runs every test (unit, end-to-end and the Helm chart's) once through gotestsum (pinned in
# go.mod as a tool): go test's line per package, then every skipped test
# with its reason and every failure with its output, then the totals. The full
# go test -json stream is kept in test.json. Then the linters (hack/lint.sh).
# Fails if either does.
set -uo pipefail
cd "$(dirname "$0")/.."

# The main module, then the chart's checks (deploy/helm/check, a module of
# its own to keep helm's dependencies out of go.mod), in one summary.
go tool gotestsum \
	--format standard-quiet \
	--jsonfile test.json \
	--raw-command -- bash -c '
		go test -json -count=1 -timeout 75m "$@" ./...; main=$?
		go -C deploy/helm/check test -json -count=1 ./...; chart=$?
		exit $((main != 0 || chart != 0))' _ "$@"
tests=$?
./hack/lint.sh
lint=$?
if ((tests != 0)); then
	echo "tests failed" >&2
fi
if ((lint != 0)); then
	echo "lint failed" >&2
fi
exit $((tests != 0 || lint != 0))
