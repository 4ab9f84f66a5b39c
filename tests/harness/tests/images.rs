//! The container images: `images/build.sh` builds both without a Docker daemon, and each
//! OCI archive is opened and checked for what a cluster relies on — a non-root user, one
//! static binary and nothing else, the labels, the name it is imported under, its size.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use harness::repo_root;
use serde_json::Value;
use tempfile::TempDir;

const IMAGES: [&str; 2] = ["operator", "gateway"];
const MB: u64 = 1_000_000;

/// The directory `images/build.sh` wrote the archives to; built once per test binary
/// (minutes cold, seconds warm) the way the real-node tier builds them, so the two share
/// one cargo build.
fn image_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let built = harness::images::build().expect("images/build.sh builds the images");
        built
            .operator
            .parent()
            .expect("archives live in a directory")
            .to_path_buf()
    })
}

/// One image archive, unpacked: the OCI layout and, beside it, the layers applied in order.
struct Image {
    name: &'static str,
    dir: TempDir,
    index: Value,
    manifest: Value,
    config: Value,
    /// Every path in the layers, as the layer tars name them.
    entries: Vec<String>,
}

impl Image {
    fn open(name: &'static str) -> Self {
        let archive = image_dir().join(format!("switchyard-{name}.tar"));
        let dir = TempDir::new().expect("temporary directory");
        let (layout, rootfs) = (dir.path().join("oci"), dir.path().join("rootfs"));
        std::fs::create_dir_all(&layout).expect("layout directory");
        std::fs::create_dir_all(&rootfs).expect("rootfs directory");
        tar(&[
            "-xf",
            &archive.display().to_string(),
            "-C",
            &layout.display().to_string(),
        ]);

        let index = json(&layout.join("index.json"));
        let manifests = index["manifests"]
            .as_array()
            .expect("index lists manifests");
        assert_eq!(manifests.len(), 1, "{name}: one manifest in {index}");
        let manifest = json(&blob(&layout, &manifests[0]));
        let config = json(&blob(&layout, &manifest["config"]));

        let mut entries = Vec::new();
        for layer in manifest["layers"]
            .as_array()
            .expect("manifest lists layers")
        {
            let path = blob(&layout, layer);
            let size = std::fs::metadata(&path).expect("layer blob").len();
            assert_eq!(Some(size), layer["size"].as_u64(), "{name}: layer size");
            let path = path.display().to_string();
            entries.extend(tar(&["-tzf", &path]).lines().map(str::to_owned));
            tar(&["-xzf", &path, "-C", &rootfs.display().to_string()]);
        }
        Image {
            name,
            dir,
            index,
            manifest,
            config,
            entries,
        }
    }

    fn binary(&self) -> String {
        format!("switchyard-{}", self.name)
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.config["config"]["Labels"][format!("org.opencontainers.image.{key}")].as_str()
    }

    /// The sum of the compressed layers: what a node downloads.
    fn compressed_bytes(&self) -> u64 {
        self.manifest["layers"]
            .as_array()
            .expect("manifest lists layers")
            .iter()
            .map(|l| l["size"].as_u64().expect("layer size"))
            .sum()
    }
}

fn tar(args: &[&str]) -> String {
    let out = Command::new("tar").args(args).output().expect("tar runs");
    assert!(
        out.status.success(),
        "tar {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tar lists UTF-8 names")
}

fn json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where a descriptor's blob lives in an OCI layout.
fn blob(layout: &Path, descriptor: &Value) -> PathBuf {
    let digest = descriptor["digest"].as_str().expect("descriptor digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    layout.join("blobs/sha256").join(hex)
}

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;

/// The program header types of a 64-bit little-endian ELF file. A program that names no
/// interpreter (PT_INTERP) is started by the kernel alone: it loads no shared library.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!(elf[4], 2, "64-bit ELF");
    assert_eq!(elf[5], 1, "little-endian ELF");
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes"));
    let phoff = usize::try_from(phoff).expect("program headers within the file");
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count)
        .map(|i| {
            let at = phoff + i * entry_size;
            u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes"))
        })
        .collect()
}

#[test]
fn images_run_their_binary_as_the_non_root_user() {
    for name in IMAGES {
        let image = Image::open(name);
        let config = &image.config["config"];
        assert_eq!(config["User"], "65532:65532", "{name}: {config}");
        let entrypoint = format!("/{}", image.binary());
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!([entrypoint]),
            "{name}"
        );
        assert_eq!(image.config["os"], "linux", "{name}");
    }
}

#[test]
fn images_hold_only_their_static_binary() {
    for name in IMAGES {
        let image = Image::open(name);
        let binary = image.binary();
        let entries: Vec<&str> = image
            .entries
            .iter()
            .map(|e| e.trim_start_matches("./").trim_end_matches('/'))
            .filter(|e| !e.is_empty())
            .collect();
        // No shell, no libraries, no CA bundle: nothing but the binary.
        assert_eq!(entries, [binary.as_str()], "{name}: the image filesystem");

        let path = image.rootfs().join(&binary);
        let bytes = std::fs::read(&path).expect("the binary in the image");
        let types = program_header_types(&bytes);
        assert!(types.contains(&PT_LOAD), "{name}: loadable segments");
        assert!(!types.contains(&PT_INTERP), "{name}: statically linked");
        // Owned by root, so the non-root user needs the "other" execute bit.
        let mode = std::fs::metadata(&path)
            .expect("binary")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o005,
            0o005,
            "{name}: readable and executable by all"
        );
        let built = std::fs::read(image_dir().join("bin").join(&binary)).expect("built binary");
        assert!(
            bytes == built,
            "{name}: the image holds what build.sh built"
        );
    }
}

#[test]
fn gateway_binary_runs_as_the_non_root_user_with_nothing_beside_it() {
    let image = Image::open("gateway");
    // The image's filesystem as the root, the image's user: what the container runtime does.
    let out = Command::new("chroot")
        .arg("--userspec=65532:65532")
        .arg(image.rootfs())
        .args(["/switchyard-gateway", "--help"])
        .output()
        .expect("chroot runs (needs root, like images/build.sh's buildah)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Usage: switchyard-gateway") && stdout.contains("--region <REGION>"),
        "{stdout}"
    );
}

#[test]
fn images_are_labelled_with_the_workspace_version_and_source() {
    // The harness takes its version from the workspace, like the operator and gateway.
    let version = env!("CARGO_PKG_VERSION");
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    for name in IMAGES {
        let image = Image::open(name);
        assert_eq!(image.label("version"), Some(version), "{name}");
        assert_eq!(
            image.label("title"),
            Some(image.binary().as_str()),
            "{name}"
        );
        assert_eq!(
            image.label("source"),
            Some("https://github.com/switchyard-dev/switchyard"),
            "{name}"
        );
        assert_eq!(image.label("licenses"), Some("Apache-2.0"), "{name}");
        let revision = image.label("revision").expect("revision label");
        if let Some(head) = &head {
            assert_eq!(revision, head, "{name}: the commit built");
        }
    }
}

#[test]
fn images_are_named_for_import_into_containerd() {
    // The names the real-node tier and the demo give the chart.
    for (name, expected) in [
        ("operator", harness::images::OPERATOR),
        ("gateway", harness::images::GATEWAY),
    ] {
        let image = Image::open(name);
        let reference =
            &image.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"];
        assert_eq!(reference, expected, "{name}");
    }
}

#[test]
fn gateway_image_is_at_most_20_mb_and_operator_image_at_most_40_mb() {
    for (name, limit) in [("gateway", 20 * MB), ("operator", 40 * MB)] {
        let bytes = Image::open(name).compressed_bytes();
        eprintln!("{name}: {bytes} bytes of compressed layers");
        assert!(bytes <= limit, "{name}: {bytes} bytes > {limit}");
    }
}
