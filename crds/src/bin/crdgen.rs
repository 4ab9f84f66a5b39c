//! Writes the Switchyard CRDs into the Helm chart (`charts/switchyard/crds/`), or checks
//! that the committed files match the code.
//!
//! ```text
//! cargo run -p crds --bin crdgen            # write
//! cargo run -p crds --bin crdgen -- --check # fail if the committed CRDs drifted
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/switchyard/crds");
    let mut drifted = Vec::new();
    for crd in crds::crds() {
        let path = dir.join(crds::crd_file_name(&crd));
        let yaml = match crds::crd_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(e) => {
                eprintln!("crdgen: cannot render {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                drifted.push(path);
            }
        } else if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, yaml))
        {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if drifted.is_empty() {
        return ExitCode::SUCCESS;
    }
    for path in drifted {
        eprintln!(
            "crdgen: {} differs from the API types; run `cargo run -p crds --bin crdgen`",
            path.display()
        );
    }
    ExitCode::FAILURE
}
