//! Client API keys.

use std::collections::BTreeMap;
use std::fmt;

/// The keys one route accepts, with the client name each key belongs to.
pub struct ClientKeys {
    keys: Vec<(String, Vec<u8>)>,
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
                .map(|(client, key)| (client.clone(), key.trim().as_bytes().to_vec()))
                .collect(),
        }
    }

    /// The client presenting `key`, comparing against every key in constant time so the
    /// response time does not reveal how much of a key was right.
    pub fn identify(&self, key: &str) -> Option<&str> {
        let presented = key.as_bytes();
        let mut found = None;
        for (client, expected) in &self.keys {
            if constant_time_eq(presented, expected) && found.is_none() {
                found = Some(client.as_str());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
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
