//! The client's JSON body, read once and kept as received.
//!
//! Routing needs only a few top-level members (`model`, `stream`, `stream_options`), and
//! an OpenAI-shaped upstream needs the body back with `model` replaced. So the body is
//! checked to be one JSON object and the span of each top-level member's value is noted;
//! the upstream body is then written by copying those spans. Building a tree of every
//! message and encoding it again is left to the paths that change the content (dialect
//! translation, continuing a cut stream).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::budget::Reservation;

/// Why a body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON at all.
    #[error("the request body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    /// JSON, but not an object.
    #[error("the request body must be a JSON object")]
    NotObject,
}

/// A JSON object as the client sent it. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct RequestBody {
    raw: Bytes,
    /// Top-level members; a key given twice appears once, where it was last given and
    /// with that value, as a JSON parser that builds a map would keep it.
    members: Arc<[(String, Range<usize>)]>,
    /// `model`, decoded once: routing reads it, and so does every try.
    model: Option<String>,
    /// The bytes' share of the memory budget, given back when the last clone is dropped
    /// (a stream keeps the body to resume elsewhere).
    _held: Option<Arc<Reservation>>,
}

impl RequestBody {
    /// Checks that `raw` is one JSON object and notes where its members are.
    pub fn parse(raw: Bytes) -> Result<Self, BodyError> {
        let found: Members<'_> = serde_json::from_slice(&raw).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                BodyError::NotObject
            } else {
                BodyError::NotJson(e)
            }
        })?;
        // Keep each key's last occurrence. A usual request has a handful of members,
        // compared pairwise; beyond that a set keeps this linear in the member count,
        // which the client chooses.
        let keys = &found.0;
        let mut last = vec![false; keys.len()];
        if keys.len() <= 16 {
            for (i, (key, _)) in keys.iter().enumerate() {
                last[i] = !keys[i + 1..].iter().any(|(later, _)| later == key);
            }
        } else {
            let mut seen = HashSet::with_capacity(keys.len());
            for (i, (key, _)) in keys.iter().enumerate().rev() {
                last[i] = seen.insert(key.as_str());
            }
        }
        let base = raw.as_ptr() as usize;
        let members: Arc<[(String, Range<usize>)]> = found
            .0
            .into_iter()
            .zip(last)
            .filter(|(_, last)| *last)
            .map(|((key, value), _)| {
                // The value borrows from `raw`, so its offset is where it starts in `raw`.
                let start = value.get().as_ptr() as usize - base;
                (key, start..start + value.get().len())
            })
            .collect();
        let mut body = Self {
            raw,
            members,
            model: None,
            _held: None,
        };
        body.model = body.get::<String>("model");
        Ok(body)
    }

    /// The body, holding `held` (the reservation its bytes were read under).
    pub fn holding(mut self, held: Reservation) -> Self {
        self._held = Some(Arc::new(held));
        self
    }

    /// A body made from a JSON object built in the gateway.
    pub fn from_value(value: &Value) -> Result<Self, BodyError> {
        let raw = serde_json::to_vec(value).map_err(BodyError::NotJson)?;
        Self::parse(Bytes::from(raw))
    }

    /// The JSON text of the member `key`, if present.
    pub fn member(&self, key: &str) -> Option<&str> {
        let (_, span) = self.members.iter().find(|(k, _)| k == key)?;
        // Spans come from a parse of these very bytes, which serde_json checked as UTF-8.
        std::str::from_utf8(&self.raw[span.clone()]).ok()
    }

    /// `model`, if it is a string.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The member `key` decoded as `T`, or `None` if absent or of another type.
    pub fn get<'a, T: Deserialize<'a>>(&'a self, key: &str) -> Option<T> {
        serde_json::from_str(self.member(key)?).ok()
    }

    /// The whole body as a tree, for the paths that rewrite its content. Fails only where
    /// a tree cannot be built at all (nesting deeper than serde_json's limit of 128).
    pub fn to_value(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.raw)
            .map_err(|e| format!("the request body cannot be translated: {e}"))
    }

    /// The body with `model` set to `model` and every other member copied byte for byte.
    /// A key the client repeated is written once, with the value the gateway routed by.
    pub fn with_model(&self, model: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + model.len() + 8);
        out.push(b'{');
        for (i, (key, span)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(&mut out, key);
            out.push(b':');
            if key == "model" {
                write_json_str(&mut out, model);
            } else {
                out.extend_from_slice(&self.raw[span.clone()]);
            }
        }
        out.push(b'}');
        out
    }

    /// The bytes as received.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The top-level members of an object, values left unparsed.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<String>()? {
                    members.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str) -> RequestBody {
        RequestBody::parse(Bytes::copy_from_slice(text.as_bytes())).expect("a JSON object")
    }

    #[test]
    fn reads_the_members_routing_needs() {
        let b = body(
            r#" {"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]} "#,
        );
        assert_eq!(b.model(), Some("gpt-4o"));
        assert_eq!(b.get::<bool>("stream"), Some(true));
        assert_eq!(
            b.get::<Value>("stream_options"),
            Some(serde_json::json!({"include_usage": true}))
        );
        assert_eq!(b.get::<bool>("model"), None, "a string is not a bool");
        assert_eq!(b.member("absent"), None);
        assert_eq!(
            body(r#"{"model": 4}"#).model(),
            None,
            "a model must be a string"
        );
    }

    #[test]
    fn replaces_the_model_and_copies_everything_else_exactly() {
        let b = body(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"caf\u00e9 \"q\""}],"temperature":0.70,"x":null}"#,
        );
        let out = b.with_model("gpt-4o-2024-08-06");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"model":"gpt-4o-2024-08-06","messages":[{"role":"user","content":"caf\u00e9 \"q\""}],"temperature":0.70,"x":null}"#,
            "values keep their exact spelling, escapes and number formats included"
        );
    }

    #[test]
    fn a_repeated_key_is_written_once_with_the_value_routed_by() {
        let b = body(r#"{"model":"cheap","stream":false,"model":"expensive"}"#);
        assert_eq!(b.model(), Some("expensive"));
        let out: Value = serde_json::from_slice(&b.with_model("upstream")).expect("json");
        assert_eq!(
            out,
            serde_json::json!({"model": "upstream", "stream": false})
        );
        let text = String::from_utf8(b.with_model("upstream")).expect("utf-8");
        assert_eq!(text.matches("\"model\"").count(), 1);
    }

    #[test]
    fn names_what_is_wrong_with_a_bad_body() {
        for (text, not_object) in [
            ("[1,2]", true),
            ("\"text\"", true),
            ("{\"model\": ", false),
            ("{\"a\":1} trailing", false),
            ("", false),
        ] {
            match RequestBody::parse(Bytes::copy_from_slice(text.as_bytes())) {
                Err(BodyError::NotObject) => assert!(not_object, "{text:?}"),
                Err(BodyError::NotJson(_)) => assert!(!not_object, "{text:?}"),
                Ok(_) => panic!("{text:?} was accepted"),
            }
        }
        let invalid_utf8 = RequestBody::parse(Bytes::from_static(b"{\"a\":\"\xff\"}"));
        assert!(invalid_utf8.is_err());
    }

    #[test]
    fn the_tree_matches_the_bytes() {
        let b = body(r#"{"model":"m","n":2}"#);
        let tree = b.to_value().expect("a tree");
        assert_eq!(tree, serde_json::json!({"model": "m", "n": 2}));
        let again = RequestBody::from_value(&tree).expect("object");
        assert_eq!(again.get::<u32>("n"), Some(2));
    }

    #[test]
    fn a_body_too_deep_for_a_tree_is_still_forwarded_but_not_translated() {
        let deep = format!(
            "{{\"model\":\"m\",\"x\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let b = body(&deep);
        assert_eq!(b.model(), Some("m"));
        let err = b.to_value().expect_err("deeper than a tree may go");
        assert!(err.contains("cannot be translated"), "{err}");
        let out = String::from_utf8(b.with_model("u")).expect("utf-8");
        assert!(out.starts_with("{\"model\":\"u\",\"x\":[[["), "{out}");
    }
}
