//! The Switchyard gateway. The data plane lands with the gateway issues; until then the
//! binary refuses to start rather than pretend to serve.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "switchyard-gateway {}: the data plane is not implemented yet; \
         only the API (crds) and the local control plane exist in this release",
        env!("CARGO_PKG_VERSION")
    )
}
