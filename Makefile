# The two commands of the README: `make demo` and `make test`. Everything they need is installed
# by scripts/deps.sh (as root, on a fresh Debian machine).
GO      ?= go
BIN     := bin/nstarget
TIMEOUT ?= 14m

.PHONY: all build deps vet test demo bench clean

all: build

# `nstarget version` and the startup line show this; without git, the binary falls back to the
# VCS revision Go stamps into it.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null)

# The rbd volume backend links librbd through cgo: built in when its headers are installed
# (scripts/deps.sh installs them; `nstarget version` lists the backends a binary has).
RBD_TAGS = $$(test -f /usr/include/rbd/librbd.h && echo rbd)

build:
	$(GO) build -tags "$(RBD_TAGS)" -ldflags "-X main.buildVersion=$(VERSION)" -o $(BIN) ./cmd/nstarget

deps:
	bash scripts/deps.sh

vet:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags "$(RBD_TAGS)" ./...
	GOOS=darwin $(GO) vet ./...

# Suites whose verbose output is the report: libiscsi's pass/skip/fail table, each VM guest's result.
REPORTING := ./tests/conformance/ ./tests/e2e/vm/

# Unit, conformance and end-to-end tests: real namespaces, real sockets, real initiators.
# deps has installed librbd's headers: the rbd backend and its tests are always part of it.
test: deps vet
	$(GO) test -race -count=1 -tags rbd -timeout $(TIMEOUT) $$($(GO) list ./... | grep -v -e /tests/conformance -e /tests/e2e/vm)
	$(GO) test -race -count=1 -tags rbd -timeout $(TIMEOUT) -v $(REPORTING)
	# The raw-syscall data path (socket I/O, RWF_NOWAIT reads) exists only in non-race builds.
	$(GO) test -count=1 -timeout $(TIMEOUT) ./target/ ./backend/

demo: deps build
	./$(BIN) demo

# Benchmarks print tables (peer vs nstarget, same run, medians); they assert nothing.
bench: deps build
	$(GO) test -run '^$$' -tags rbd -bench . -benchmem ./...
	@for s in scripts/bench/*.sh; do [ -f "$$s" ] || continue; echo "== $$s"; bash "$$s" || exit 1; done

clean:
	rm -rf bin
