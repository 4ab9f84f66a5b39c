//! The Switchyard operator. The controllers land with the operator issue; until then the
//! binary refuses to start rather than pretend to reconcile.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "switchyard-operator {}: the controllers are not implemented yet; \
         only the API (crds) and the local control plane exist in this release",
        env!("CARGO_PKG_VERSION")
    )
}
