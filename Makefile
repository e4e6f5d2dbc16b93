# svcplane: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
CARGO ?= cargo
# Every build goes through the whole workspace with tests selected, so Cargo
# resolves one feature set and builds each dependency once. Selecting one
# package (`-p svcplane-e2e`, or the root package by default) resolves other
# features and compiles a second copy of most of the tree.
BUILD := $(CARGO) build --workspace --locked --bins --tests
# The bench harnesses (release), and the svcplane they measure as users run it (dist).
BUILD_RELEASE := $(CARGO) build --workspace --locked --release --bins && $(CARGO) build --locked --profile dist --bin svcplane
DIST_BIN := $(abspath $(TARGET_DIR))/dist/svcplane
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# Seconds each fuzz target runs in `make fuzz`.
FUZZ_SECONDS ?= 60

.DEFAULT_GOAL := help
.PHONY: help setup controlplane lint unit e2e test test-datapath test-cluster cluster cluster-down cluster-images demo bench bench-ipam bench-webhook bench-datapath fmt fuzz
# The static svcplane in the cluster's image (as the Dockerfile builds it).
MUSL_TARGET := x86_64-unknown-linux-musl
IMAGE_BIN := $(TARGET_DIR)/$(MUSL_TARGET)/dist/svcplane
CLUSTER_BIN := $(TARGET_DIR)/debug/svcplane-cluster

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## Install what the build needs and build the pinned control plane and node binaries (cached)
	@bash scripts/setup.sh --all

controlplane: ## Build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl, kube-proxy, CoreDNS into the cache
	@bash e2e/controlplane/build.sh --all

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## Unit and property tests (no control plane)
	$(CARGO) test --workspace --locked --lib --bins

fuzz: ## Fuzz the webhook's request path and the three planners, FUZZ_SECONDS (60) each; prints inputs per target (not in make test)
	SVCPLANE_FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test --workspace --locked --lib fuzz_ -- --nocapture --test-threads=1

e2e: setup ## End-to-end tests against a real kube-apiserver + etcd
	$(BUILD)
	$(CARGO) test --workspace --locked --test '*'

test: setup lint ## Everything CI runs: lint, unit, property and e2e tests, the data path, the real cluster
	$(BUILD)
	$(CARGO) test --workspace --locked
	@$(MAKE) --no-print-directory test-datapath
	@$(MAKE) --no-print-directory test-cluster

test-datapath: setup ## kube-proxy (nftables) + CoreDNS driven by svcplane's slices, traffic through ip netns (root)
	$(BUILD)
	$(CARGO) test --workspace --locked --test datapath -- --ignored --show-output

test-cluster: cluster-images ## In-cluster suite on a real 2-node cluster (kubelet, containerd, kube-proxy; root)
	$(BUILD)
	$(CARGO) test --workspace --locked --test cluster -- --ignored --show-output

cluster-images: setup ## svcplane (static musl) and the test images, built without Docker into target/cluster-images
	CC_$(subst -,_,$(MUSL_TARGET))=musl-gcc $(CARGO) build --locked --profile dist --bin svcplane --target $(MUSL_TARGET)
	bash e2e/cluster/images.sh $(IMAGE_BIN) $(TARGET_DIR)/cluster-images

cluster: cluster-images ## Start a real 2-node cluster with svcplane deployed in it, and leave it running
	$(BUILD)
	$(CLUSTER_BIN) up

cluster-down: ## Stop the cluster of `make cluster`: no process, mount, namespace or route left
	@[ -x $(CLUSTER_BIN) ] || $(BUILD)
	$(CLUSTER_BIN) down

demo: cluster-images ## A real cluster: the examples' Pods, their Services through svcplane, requests through ClusterIP, NodePort, DNS
	$(BUILD)
	$(TARGET_DIR)/debug/svcplane-demo

bench-ipam: setup ## ipam benchmarks against upstream's allocator, with ratios
	bash ipam/bench.sh

bench-webhook: setup ## Issue #19 item 4: webhook latency at 50/s, 500/s over 3 replicas (one SIGKILLed) vs plain apiserver, duplicates
	$(BUILD_RELEASE)
	SVCPLANE_BIN=$(DIST_BIN) $(TARGET_DIR)/release/svcplane-webhook-bench $(BENCH_WEBHOOK_ARGS)

bench-datapath: setup ## Pod Ready -> first request through the ClusterIP, p50/p99: svcplane vs kube-controller-manager (root)
	$(BUILD_RELEASE)
	SVCPLANE_BIN=$(DIST_BIN) $(TARGET_DIR)/release/svcplane-datapath-bench $(BENCH_DATAPATH_ARGS)

bench: bench-ipam bench-webhook ## All benchmarks (not part of make test): ipam, then scenario A vs kube-controller-manager
	$(BUILD_RELEASE)
	SVCPLANE_BIN=$(DIST_BIN) $(TARGET_DIR)/release/svcplane-bench $(BENCH_ARGS)
