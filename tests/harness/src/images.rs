//! The images the real node runs: the operator and gateway images from
//! `images/build.sh` (the same Dockerfiles users build with Docker), and a test kit
//! (fake provider and load generator) from `tests/node/testkit.Dockerfile`, all built
//! here with buildah and imported into the node's containerd.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::Cluster;
use crate::binaries::{repo_root, run_cmd};

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

/// The test kit, from the binaries `images/build.sh` built alongside the product's,
/// holding that script's lock so a concurrent build cannot swap them underneath.
fn build_testkit(out: &Path) -> anyhow::Result<PathBuf> {
    let archive = out.join("switchyard-testkit.tar");
    let root = repo_root();
    buildah_archive(
        &root,
        &root.join("tests/node/testkit.Dockerfile"),
        TESTKIT,
        &archive,
        Some(&out.join(".lock")),
    )?;
    Ok(archive)
}

/// Builds `dockerfile` in `context` with buildah into the OCI archive `archive`, naming
/// the image `tag`. The store is thrown away afterwards, so nothing outside is used;
/// `lock` (a file `flock` takes) guards the context while buildah reads it.
pub(crate) fn buildah_archive(
    context: &Path,
    dockerfile: &Path,
    tag: &str,
    archive: &Path,
    lock: Option<&Path>,
) -> anyhow::Result<()> {
    let store = tempfile::Builder::new()
        .prefix("switchyard-buildah-")
        .tempdir()
        .context("creating buildah's store")?;
    let buildah = |args: &[&str]| {
        let mut cmd = match lock {
            Some(lock) => {
                let mut cmd = Command::new("flock");
                cmd.arg(lock).arg("buildah");
                cmd
            }
            None => Command::new("buildah"),
        };
        cmd.arg(format!("--root={}", store.path().join("root").display()))
            .arg(format!("--runroot={}", store.path().join("run").display()))
            .arg("--storage-driver=vfs")
            .args(args)
            .current_dir(context);
        cmd
    };
    let dockerfile = dockerfile.display().to_string();
    run_cmd(
        buildah(&[
            "bud",
            "--quiet",
            "--layers=false",
            "--pull=never",
            "-f",
            &dockerfile,
            "-t",
            tag,
            ".",
        ]),
        &format!("building {tag} from {dockerfile} with buildah"),
    )?;
    let _ = std::fs::remove_file(archive);
    run_cmd(
        buildah(&[
            "push",
            "--quiet",
            tag,
            &format!("oci-archive:{}:{tag}", archive.display()),
        ]),
        &format!("exporting {tag}"),
    )
}

/// The compressed size of an OCI archive's layers (what a node downloads), from its
/// manifest.
pub fn layer_bytes(archive: &Path) -> anyhow::Result<u64> {
    let member = |name: &str| -> anyhow::Result<Value> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(name)
            .output()
            .context("running tar")?;
        if !out.status.success() {
            bail!("{} has no {name}", archive.display());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let index = member("index.json")?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .context("the index names no sha256 manifest")?
        .to_owned();
    let manifest = member(&format!("blobs/sha256/{digest}"))?;
    manifest["layers"]
        .as_array()
        .context("the manifest lists no layers")?
        .iter()
        .map(|l| l["size"].as_u64().context("a layer without a size"))
        .sum()
}

/// `helm install`s the chart into `switchyard-system` with the images built here, the
/// operator on the real node and managing the ProviderPools of `namespaces` (created if
/// missing); returns helm's output.
pub fn install_chart(cluster: &Cluster, namespaces: &[&str]) -> anyhow::Result<String> {
    // The chart grants the operator a Role in each namespace it manages, so they exist
    // before the install.
    for ns in namespaces {
        let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        let (ok, _, err) = cluster.kubectl_input(&["apply", "-f", "-"], &manifest)?;
        if !ok {
            bail!("creating namespace {ns}: {err}");
        }
    }
    let out = cluster
        .helm()
        .args(["install", "switchyard"])
        .arg(repo_root().join("charts/switchyard"))
        .args(["-n", "switchyard-system", "--create-namespace"])
        .args(["--wait", "--timeout", "180s"])
        .arg("--set")
        .arg(format!(
            "image.repository={},image.tag={},image.pullPolicy=Never",
            repository(OPERATOR),
            tag(OPERATOR)
        ))
        .arg("--set")
        .arg(format!(
            "gatewayImage.repository={},gatewayImage.tag={}",
            repository(GATEWAY),
            tag(GATEWAY)
        ))
        .args(["--set", "nodeSelector.switchyard\\.dev/node=real"])
        .args([
            "--set",
            &format!("watchNamespaces={{{}}}", namespaces.join(",")),
        ])
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm install failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn repository(image: &str) -> &str {
    image.rsplit_once(':').map_or(image, |(repo, _)| repo)
}

fn tag(image: &str) -> &str {
    image.rsplit_once(':').map_or("latest", |(_, tag)| tag)
}
