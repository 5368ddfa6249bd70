# Starlight. `make demo` and `make test` install what they need themselves
# (Debian packages, Go modules) on a fresh Debian 12 machine, as root.

SHELL := /bin/bash

GO       ?= go
BIN      := $(CURDIR)/bin
GOFLAGS  ?=
export OTEL_TRACES_EXPORTER := none
export CGO_ENABLED := 1

BINARIES := starlight-registry starlight-worker ctr-starlight

# `--version` of the binaries (package api/version).
VERSION_PKG := github.com/starlight-project/starlight/api/version
VERSION     ?= $(shell git describe --always --dirty 2>/dev/null)
COMMIT      ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS     := -X $(VERSION_PKG).Version=$(VERSION) -X $(VERSION_PKG).Commit=$(COMMIT)

.PHONY: all build deps test unit lint demo bench clean

all: build

deps:
	./hack/install-deps.sh

build:
	$(GO) build $(GOFLAGS) -ldflags "$(LDFLAGS)" -o $(BIN)/ ./registry-ext/cmd/starlight-registry ./worker/cmd/starlight-worker ./worker/cmd/ctr-starlight

# Unit and end-to-end tests in one run; end-to-end tests use the binaries
# built here (STARLIGHT_BIN) and start private daemons.
test: deps build
	STARLIGHT_BIN=$(BIN) ./hack/test.sh

unit:
	$(GO) test -count=1 -short ./...

# The linters make test runs after the tests (hack/lint.sh).
lint:
	./hack/lint.sh

demo: deps build
	./hack/demo.sh

# The benchmark (see integration/bench): BENCH_FLAGS="-images redis,jre
# -profiles WAN -runs 3" narrows it.
bench: deps build
	STARLIGHT_BIN=$(BIN) ./hack/bench.sh $(BENCH_FLAGS)

clean:
	rm -rf $(BIN) test.log
