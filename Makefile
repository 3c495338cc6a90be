# vmshadow. `make demo` and `make test` install their own dependencies.
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
export PATH := $(PATH):/usr/local/go/bin:$(shell $(GO) env GOPATH 2>/dev/null)/bin

.PHONY: all build package test unit lint demo bench bench-s3 bench-server deps fuzz clean

include guest/guest.mk

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/vmshadow ./cmd/vmshadow

# The Debian package, DIST/vmshadow_VERSION_ARCH.deb: a static binary, the
# systemd unit of vmshadow server, a sample config, completions, man pages.
DIST ?= dist
DEB_COMPRESS ?= xz
package:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS) -s -w' -o $(DIST)/vmshadow ./cmd/vmshadow
	GO='$(GO)' DEB_COMPRESS='$(DEB_COMPRESS)' scripts/package-deb.sh $(DIST)/vmshadow '$(VERSION)' $(DIST)

deps:
	scripts/deps.sh test

# Every test: unit, protocol, and end to end against real QEMU.
test: deps
	$(GO) vet ./...
	GO=$(GO) scripts/test.sh
	# every microbenchmark once, so a broken one fails here, not in make bench
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x ./internal/...

# The main job end to end: a throwaway Linux guest backed up (full, then
# incremental, application-consistent) while its workload writes, then
# restored and checked.
demo: deps build
	$(GO) run ./demo -vmshadow bin/vmshadow

# Benchmarks side by side with the tools users would pick instead: writes
# bench/results.md and bench/throughput.png (root: it drops the page cache
# and starts libvirtd). BENCHFLAGS e.g. "-rounds 5 -size-gib 8".
bench: build
	scripts/deps.sh bench
	$(GO) run ./bench/harness -vmshadow bin/vmshadow $(BENCHFLAGS)

# The server's benchmarks alone: its incremental next to the CLI's, one job
# with 1, 2 and 4 VMs (also part of make bench).
bench-server:
	scripts/deps.sh test
	$(GO) test -run '^$$' -bench . -benchtime 5x ./internal/server/

# S3 repository against a local directory, side by side.
bench-s3: build
	scripts/deps.sh bench
	bench/s3-vs-local.sh

# Only the tests that need no QEMU.
unit:
	$(GO) test -count=1 -short ./...

lint:
	$(GO) vet ./...
	test -z "$$(gofmt -l .)" || (gofmt -l . && false)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.7.0 ./...

clean:
	rm -rf bin dist
