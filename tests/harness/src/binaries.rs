//! Where the control-plane binaries come from.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The directory holding etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
/// kubectl, kwok and helm.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Binaries {
    /// Builds the binaries if the cache lacks them (minutes, once) and returns their
    /// directory. `SWITCHYARD_CONTROLPLANE_BIN` points at a ready directory instead.
    pub fn ensure() -> anyhow::Result<Self> {
        if let Some(dir) = std::env::var_os("SWITCHYARD_CONTROLPLANE_BIN") {
            return Self::at(PathBuf::from(dir));
        }
        Self::at(run_build_script("tests/controlplane/build.sh", &[])?)
    }

    fn at(dir: PathBuf) -> anyhow::Result<Self> {
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
            "kwok",
            "helm",
        ] {
            if !dir.join(name).is_file() {
                bail!(
                    "{} has no {name}; run tests/controlplane/build.sh",
                    dir.display()
                );
            }
        }
        Ok(Self { dir })
    }

    /// The path of one binary.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What cargo tells the program it runs about that program's own package. A cargo started
/// from a test or the demo must not inherit it: cargo compares such variables with their
/// last values for build scripts that watch them (ring's reads `CARGO_PKG_NAME`), so a
/// build from inside `cargo test -p harness` and the user's next plain `cargo build` would
/// each rebuild ring and everything above it (rustls, kube, crds, both binaries).
fn is_package_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// `command` without the package variables of the cargo that started this process.
fn without_package_env(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_env) {
            command.env_remove(name);
        }
    }
    command
}

/// A `cargo` command for building this workspace from a test, the demo or the bench: the
/// cargo that started this process, without its package variables.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    without_package_env(&mut command);
    command
}

static DETAILS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sends what builds and installs print (cargo, Go, apt, buildah: hundreds of lines on a
/// fresh machine) to the file `path` instead of this process's stderr.
pub fn log_details_to(path: PathBuf) {
    let _ = DETAILS.set(path);
}

/// Where a build's progress goes: the details file when one is set, else stderr.
pub(crate) fn details() -> Stdio {
    DETAILS
        .get()
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        })
        .map_or_else(Stdio::inherit, Stdio::from)
}

/// Runs one of the repository's build scripts (`script` relative to the root, with `env`),
/// which print progress on stderr and the directory they built into on their last line
/// of stdout, and returns that directory.
pub fn run_build_script(script: &str, env: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let path = repo_root().join(script);
    let mut bash = Command::new("bash");
    // The scripts run cargo.
    without_package_env(&mut bash);
    let out = bash
        .arg(&path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(details())
        .output()
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        let where_ = DETAILS
            .get()
            .map_or_else(|| "above".to_owned(), |p| format!("in {}", p.display()));
        bail!(
            "{script} failed ({}); its messages are {where_}",
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .with_context(|| format!("{script} printed no directory"))?;
    Ok(PathBuf::from(dir.trim()))
}

/// The directory holding the Prometheus Operator's CRDs, with promtool installed
/// (`tests/monitoring/build.sh`).
pub fn monitoring_crds() -> anyhow::Result<PathBuf> {
    run_build_script("tests/monitoring/build.sh", &[])
}

/// Runs `cmd` to completion; an error says `what` failed, with the command's stderr.
pub(crate) fn run_cmd(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A binary of this workspace, built (debug) if needed: `switchyard-operator`,
/// `switchyard-gateway`, `fake-provider`.
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let status = cargo()
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(repo_root())
        .stderr(details())
        .status()
        .with_context(|| format!("building {bin}"))?;
    if !status.success() {
        bail!("cargo build -p {package} failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    Ok(target.join("debug").join(bin))
}
