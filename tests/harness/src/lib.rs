//! A real Kubernetes control plane on loopback, for tests and the demo.
//!
//! [`Cluster::start`] builds (or reuses from the cache) etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubectl, kwok and helm through
//! `tests/controlplane/build.sh`, generates a CA, serving and client certificates and a
//! kubeconfig, starts every component as a child process on free loopback ports, waits
//! for `/readyz`, and registers kwok nodes in three regions. Pods scheduled onto those
//! nodes are driven to Running by kwok; nothing runs in them.
//!
//! Teardown: dropping the [`Cluster`] stops every component and removes its directory.
//! A reaper process started alongside does the same if the test process dies without
//! dropping it (a panic in a shared cluster, `kill -9`, Ctrl-C), so no process or temp
//! directory outlives a run. The directory (with every component's log) is kept when a
//! test fails; [`TestNamespace`] prints where.

mod binaries;
mod cluster;
pub mod images;
pub mod node;
mod pki;

pub use binaries::{Binaries, cargo, log_details_to, monitoring_crds, repo_root, workspace_binary};
pub use cluster::{Cluster, Options, REGIONS, TestNamespace};
