# svcplane: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo

.DEFAULT_GOAL := help
.PHONY: help setup controlplane lint unit e2e test test-datapath demo bench bench-ipam bench-webhook bench-datapath fmt

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## Install what the build needs and build the pinned control plane (cached)
	@bash scripts/setup.sh --with-kubectl --with-proxy --with-coredns

controlplane: ## Build etcd, kube-apiserver, kube-controller-manager, kubectl, kube-proxy, CoreDNS into the cache
	@bash e2e/controlplane/build.sh --with-kubectl --with-proxy --with-coredns

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## Unit and property tests (no control plane)
	$(CARGO) test --workspace --locked --lib --bins

e2e: setup ## End-to-end tests against a real kube-apiserver + etcd
	$(CARGO) build --locked --bin svcplane
	$(CARGO) test --locked -p svcplane-e2e

test: setup lint ## Everything CI runs: lint, unit, property and e2e tests, the data path
	$(CARGO) build --locked --bin svcplane
	$(CARGO) test --workspace --locked
	@$(MAKE) --no-print-directory test-datapath

test-datapath: setup ## kube-proxy (nftables) + CoreDNS driven by svcplane's slices, traffic through ip netns (root)
	$(CARGO) build --locked --bin svcplane
	$(CARGO) test --locked -p svcplane-e2e --test datapath -- --ignored --show-output

demo: setup ## Real control plane + svcplane + examples/, printing Services, slices and allocations
	$(CARGO) build --locked --bin svcplane
	$(CARGO) run --locked -q -p svcplane-e2e --bin svcplane-demo

bench-ipam: setup ## ipam benchmarks against upstream's allocator, with ratios
	bash ipam/bench.sh

bench-webhook: setup ## Admission webhook latency at a fixed rate, with and without it (ratio)
	$(CARGO) run --locked --release -q -p svcplane-e2e --bin svcplane-webhook-bench -- $(BENCH_WEBHOOK_ARGS)

bench-datapath: setup ## Pod Ready -> first request through the ClusterIP, p50/p99: svcplane vs kube-controller-manager (root)
	$(CARGO) build --locked --release --bin svcplane
	$(CARGO) build --locked --release -p svcplane-e2e --bin echo-server
	SVCPLANE_BIN=$(CURDIR)/target/release/svcplane $(CARGO) run --locked --release -q -p svcplane-e2e --bin svcplane-datapath-bench -- $(BENCH_DATAPATH_ARGS)

bench: bench-ipam bench-webhook ## All benchmarks (not part of make test): ipam, then scenario A vs kube-controller-manager
	$(CARGO) build --locked --release --bin svcplane
	SVCPLANE_BIN=$(CURDIR)/target/release/svcplane $(CARGO) run --locked --release -q -p svcplane-e2e --bin svcplane-bench -- $(BENCH_ARGS)
