# The operator image: a static musl binary on distroless, non-root.
#   docker build -f images/operator.Dockerfile -t switchyard-operator:dev .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same binary `cargo build --release -p switchyard-operator` produces, linked statically.
RUN cargo build --release --locked -p switchyard-operator --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/switchyard-operator /switchyard-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /switchyard-operator /usr/local/bin/switchyard-operator
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/switchyard-operator"]
