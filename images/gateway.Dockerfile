# The gateway image: a static musl binary on distroless, non-root.
#   docker build -f images/gateway.Dockerfile -t switchyard-gateway:dev .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same binary `cargo build --release -p switchyard-gateway` produces, linked statically.
RUN cargo build --release --locked -p switchyard-gateway --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/switchyard-gateway /switchyard-gateway

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /switchyard-gateway /usr/local/bin/switchyard-gateway
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/switchyard-gateway"]
