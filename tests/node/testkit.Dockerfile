# The test kit of the real-node tier: the fake provider and the load generator, static
# binaries on an empty filesystem, for client and provider pods (built by the harness
# with buildah from binaries built on the host; nothing is pulled).
FROM scratch
COPY target/image/bin/fake-provider /fake-provider
COPY target/image/bin/loadgen /loadgen
USER 65532:65532
ENTRYPOINT ["/loadgen"]
