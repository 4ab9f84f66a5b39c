//! The images the real node runs: the operator and gateway images from
//! `images/build.sh` (the same Dockerfiles users build with Docker), and a test kit
//! (fake provider and load generator) from `tests/node/testkit.Dockerfile`, all built
//! here with buildah and imported into the node's containerd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::binaries::repo_root;

/// The operator image as the chart names it.
pub const OPERATOR: &str = "localhost/switchyard-operator:dev";
/// The gateway image as the operator puts it in gateway Deployments.
pub const GATEWAY: &str = "localhost/switchyard-gateway:dev";
/// The test kit: `/loadgen` (entrypoint) and `/fake-provider`.
pub const TESTKIT: &str = "localhost/switchyard-testkit:dev";

/// The archives of one build.
#[derive(Debug, Clone)]
pub struct Images {
    pub operator: PathBuf,
    pub gateway: PathBuf,
    pub testkit: PathBuf,
}

impl Images {
    /// Every archive, for importing.
    pub fn all(&self) -> [&Path; 3] {
        [&self.operator, &self.gateway, &self.testkit]
    }
}

/// Builds the three images (incrementally: cargo and buildah redo only what changed).
pub fn build() -> anyhow::Result<Images> {
    // IMAGE_TAG is left at its default so the names below hold.
    let dir = crate::binaries::run_build_script(
        "images/build.sh",
        &[
            ("EXTRA_BINARIES", "fake-provider loadgen"),
            ("IMAGE_TAG", "dev"),
        ],
    )?;
    let testkit = build_testkit(&dir)?;
    Ok(Images {
        operator: dir.join("switchyard-operator.tar"),
        gateway: dir.join("switchyard-gateway.tar"),
        testkit,
    })
}

/// The test kit, from the binaries `images/build.sh` built alongside the product's.
fn build_testkit(out: &Path) -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let store = out.join(".buildah-testkit");
    let _ = std::fs::remove_dir_all(&store);
    let archive = out.join("switchyard-testkit.tar");
    let bh = |args: &[&str]| -> anyhow::Result<()> {
        let o = Command::new("buildah")
            .arg(format!("--root={}", store.join("root").display()))
            .arg(format!("--runroot={}", store.join("run").display()))
            .arg("--storage-driver=vfs")
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .context("running buildah")?;
        if !o.status.success() {
            bail!(
                "buildah {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    };
    bh(&[
        "bud",
        "--quiet",
        "--layers=false",
        "--pull=never",
        "-f",
        "tests/node/testkit.Dockerfile",
        "-t",
        TESTKIT,
        ".",
    ])?;
    let _ = std::fs::remove_file(&archive);
    bh(&[
        "push",
        "--quiet",
        TESTKIT,
        &format!("oci-archive:{}:{TESTKIT}", archive.display()),
    ])?;
    let _ = std::fs::remove_dir_all(&store);
    Ok(archive)
}
