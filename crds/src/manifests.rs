//! Reading the YAML users `kubectl apply`: one file or a directory, many documents each.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use crate::{ProviderPool, RoutingPolicy};

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not match its kind's schema.
    #[error("{path}, document {index}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based document index in the file.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// The Switchyard-relevant objects found in a set of manifests; other kinds are ignored.
#[derive(Debug, Default, Clone)]
pub struct Manifests {
    /// ProviderPools.
    pub pools: Vec<ProviderPool>,
    /// RoutingPolicies.
    pub policies: Vec<RoutingPolicy>,
    /// Secrets (credentials and client keys).
    pub secrets: Vec<Secret>,
}

/// Splits a multi-document YAML string into JSON values, skipping empty documents.
pub fn documents(yaml: &str) -> Result<Vec<serde_json::Value>, serde_norway::Error> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The `.yaml`/`.yml` files at `path`: the file itself, or a directory's files sorted by
/// name (not recursive).
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every ProviderPool, RoutingPolicy and Secret at `path`. Objects without a
/// namespace get `default_namespace`, as kubectl would give them.
pub fn load(path: &Path, default_namespace: &str) -> Result<Manifests, ManifestError> {
    let mut out = Manifests::default();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Io {
            path: file.clone(),
            source,
        })?;
        let docs = documents(&text).map_err(|e| ManifestError::Invalid {
            path: file.clone(),
            index: 0,
            message: e.to_string(),
        })?;
        for (i, doc) in docs.into_iter().enumerate() {
            let invalid = |message: String| ManifestError::Invalid {
                path: file.clone(),
                index: i + 1,
                message,
            };
            let kind = doc
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            match kind.as_str() {
                "ProviderPool" => {
                    let mut pool: ProviderPool = serde_json::from_value(doc)
                        .map_err(|e| invalid(format!("ProviderPool: {e}")))?;
                    pool.metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_owned());
                    out.pools.push(pool);
                }
                "RoutingPolicy" => {
                    let mut policy: RoutingPolicy = serde_json::from_value(doc)
                        .map_err(|e| invalid(format!("RoutingPolicy: {e}")))?;
                    policy
                        .metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_owned());
                    out.policies.push(policy);
                }
                "Secret" => {
                    let mut secret: Secret =
                        serde_json::from_value(doc).map_err(|e| invalid(format!("Secret: {e}")))?;
                    secret
                        .metadata
                        .namespace
                        .get_or_insert_with(|| default_namespace.to_owned());
                    out.secrets.push(secret);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}
