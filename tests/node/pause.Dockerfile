# The pod sandbox image of the real node (registry.k8s.io is out of reach here).
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
