# svcplane: a static musl binary on distroless/static (no libc, no shell).
# Build: docker build -t svcplane:dev .
# Not exercised on the development machine (no Docker engine); see manifests/README.md.

# ---- builder --------------------------------------------------------------
# The toolchain pinned in rust-toolchain.toml.
FROM rust:1.95.0-bookworm AS builder
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY rust-toolchain.toml ./
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl > /target ;; \
      arm64) echo aarch64-unknown-linux-musl > /target ;; \
      *) echo "unsupported arch ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /target)"
COPY . .
# ring (rustls) compiles C: musl-gcc is the C compiler for the musl targets.
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CC_aarch64_unknown_linux_musl=musl-gcc
# --locked: the image builds exactly Cargo.lock. Only the binary is built
# (not benches, tests or the e2e harness), with the dist profile (LTO, see
# Cargo.toml). Cache mounts keep the registry and
# target dir between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist --bin svcplane --target "$(cat /target)" \
 && cp "target/$(cat /target)/dist/svcplane" /svcplane

# ---- runtime --------------------------------------------------------------
# nonroot = uid/gid 65532, the Deployment's runAsUser.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /svcplane /usr/local/bin/svcplane
USER 65532:65532
EXPOSE 8080 8081 9443
ENTRYPOINT ["/usr/local/bin/svcplane"]
CMD ["run", "--roles=controller,webhook,repair", "--leader-elect"]
