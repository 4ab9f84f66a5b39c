//! Client API keys.

use std::collections::BTreeMap;
use std::fmt;

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

/// The keys one route accepts, with the client name each key belongs to. Only their
/// SHA-256 digests are kept: equal-length values compare in constant time, so neither
/// how much of a key was right nor its length shows in the response time.
pub struct ClientKeys {
    keys: Vec<(String, [u8; 32])>,
}

fn fingerprint(key: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, key.as_bytes()).as_ref());
    out
}

impl fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|(client, _)| client))
            .finish()
    }
}

impl ClientKeys {
    /// From a Secret's entries: data key = client name, value = API key.
    pub fn new(entries: &BTreeMap<String, String>) -> Self {
        Self {
            keys: entries
                .iter()
                .filter(|(_, v)| !v.trim().is_empty())
                .map(|(client, key)| (client.clone(), fingerprint(key.trim())))
                .collect(),
        }
    }

    /// The client presenting `key`, compared against every key (never stopping at the
    /// first match) in constant time.
    pub fn identify(&self, key: &str) -> Option<&str> {
        let presented = fingerprint(key);
        let mut found = None;
        for (client, expected) in &self.keys {
            if bool::from(presented.ct_eq(expected)) && found.is_none() {
                found = Some(client.as_str());
            }
        }
        found
    }
}

/// The key from `Authorization: Bearer <key>` or `api-key: <key>`.
pub fn presented_key(headers: &hyper::HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_the_client_by_its_key_and_nothing_else() {
        let keys = ClientKeys::new(&BTreeMap::from([
            ("billing".to_owned(), "k-123".to_owned()),
            ("search".to_owned(), "k-456".to_owned()),
        ]));
        assert_eq!(keys.identify("k-456"), Some("search"));
        assert_eq!(keys.identify("k-45"), None);
        assert_eq!(keys.identify("k-4567"), None);
        assert_eq!(keys.identify(""), None);
        assert!(!format!("{keys:?}").contains("k-123"));
    }
}
