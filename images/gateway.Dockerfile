# The gateway image: one static binary on an empty filesystem, non-root.
#   docker build -f images/gateway.Dockerfile -t switchyard-gateway:dev \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# images/build.sh builds the same image without a Docker daemon (buildah, target
# `prebuilt`, with the binary built on the host by the same cargo command).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# glibc linked statically (crt-static): no musl target needed, nothing to load at run time;
# its built-in NSS still resolves names from /etc/hosts and DNS without nsswitch.conf.
# --target keeps build scripts and proc-macros (which the compiler loads) dynamic.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p switchyard-gateway --target "$target" \
 && mkdir /out && cp "target/$target/release/switchyard-gateway" /out/

FROM scratch AS runtime-base
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="switchyard-gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/switchyard-dev/switchyard" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so no /etc/passwd is needed (the distroless "nonroot" user).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/switchyard-gateway"]

# The binary images/build.sh built on this machine.
FROM runtime-base AS prebuilt
COPY target/image/bin/switchyard-gateway /switchyard-gateway

# The default target: the binary built above from source.
FROM runtime-base AS runtime
COPY --from=build /out/switchyard-gateway /switchyard-gateway
