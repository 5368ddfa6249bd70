#!/usr/bin/env bash
# Runs every test (unit and end-to-end) once through gotestsum (pinned in
# go.mod as a tool): go test's line per package, then every skipped test
# with its reason and every failure with its output, then the totals. The full
# go test -json stream is kept in test.json. Then the linters (hack/lint.sh).
# Fails if either does.
set -uo pipefail
cd "$(dirname "$0")/.."

go tool gotestsum \
	--format standard-quiet \
	--jsonfile test.json \
	-- -count=1 -timeout 75m "$@" ./...
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
