//! A chat-completion chunk on its way to the client.
//!
//! An OpenAI-shaped provider's chunks are forwarded as the provider wrote them: the
//! stream only needs a few facts about each (does it carry a token, does it finish the
//! answer, what text does it add), so those are read into borrowed fields in one pass and
//! nothing is built as a tree or encoded again. A chunk becomes a tree only when it must
//! be rewritten (a resumed answer's first chunks).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Usage;

/// One chunk: its JSON text (an object) and what the stream reads from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    json: String,
    facts: Facts,
}

/// What a chunk says, for the stream's bookkeeping.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// It carries part of the answer (text, a tool call, a finish, usage or an error)
    /// rather than only opening the message.
    pub token: bool,
    /// A choice finished.
    pub finished: bool,
    /// Some choice's delta names a role (a continuation's copy would restart the message).
    pub role: bool,
    /// The text its choices add, in order.
    pub content: String,
    /// Its `usage`, when present.
    pub usage: Option<Usage>,
    /// Its `id` and `model` as JSON text, when present.
    pub id: Option<String>,
    /// See `id`.
    pub model: Option<String>,
}

impl Chunk {
    /// A chunk as a provider sent it; `None` unless it is one well-formed JSON object.
    pub fn parse(json: String) -> Option<Self> {
        if !json.trim_start().starts_with('{') {
            return None;
        }
        let view: View<'_> = serde_json::from_str(&json).ok()?;
        let facts = view.facts();
        Some(Self { json, facts })
    }

    /// A chunk the gateway built (a translated dialect's, or a usage summary).
    pub fn built(value: &Value) -> Self {
        let json = value.to_string();
        let facts = serde_json::from_str::<View<'_>>(&json)
            .map(|v| v.facts())
            .unwrap_or_default();
        Self { json, facts }
    }

    /// Its JSON text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// What it says.
    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// As a tree, to be rewritten.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }

    /// Rewrites it through `edit` (the facts are read again from the result).
    pub fn rewrite(&mut self, edit: impl FnOnce(&mut Value)) {
        let mut value = self.to_value();
        edit(&mut value);
        *self = Self::built(&value);
    }
}

/// The members of a chunk the stream reads; everything else is only checked to be JSON.
#[derive(Deserialize)]
struct View<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    finish_reason: Option<IgnoredAny>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Text<'a>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    role: Option<IgnoredAny>,
}

impl View<'_> {
    fn facts(self) -> Facts {
        let mut facts = Facts {
            token: self.error.is_some(),
            id: self.id.map(|v| v.get().to_owned()),
            model: self.model.map(|v| v.get().to_owned()),
            ..Facts::default()
        };
        if let Some(usage) = self.usage.filter(|u| !u.is_null()) {
            facts.token = true;
            facts.usage = Some(Usage::of(&usage));
        }
        for choice in self.choices.into_iter().flatten() {
            if choice.finish_reason.is_some() {
                facts.finished = true;
                facts.token = true;
            }
            let Some(delta) = choice.delta else { continue };
            facts.role |= delta.role.is_some();
            if delta.tool_calls.is_some() {
                facts.token = true;
            }
            if let Text(Some(text)) = delta.content {
                facts.token |= !text.is_empty();
                facts.content.push_str(&text);
            }
        }
        facts
    }
}

/// A member that is text when it is a string and ignored otherwise (a provider that
/// sends `content: null`, or something odd, does not make the chunk malformed).
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(v))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(TextVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(v: Value) -> Facts {
        Chunk::parse(v.to_string()).expect("a chunk").facts
    }

    #[test]
    fn forwarded_text_is_the_providers_own() {
        let text = r#"{"id":"c1", "choices":[{"delta":{"content":"a\u00e9"}}],  "x": [1,2]}"#;
        let chunk = Chunk::parse(text.to_owned()).expect("a chunk");
        assert_eq!(chunk.json(), text, "spacing and escapes are kept");
        assert_eq!(chunk.facts().content, "aé");
        assert_eq!(chunk.facts().id.as_deref(), Some("\"c1\""));
    }

    #[test]
    fn only_a_well_formed_object_is_a_chunk() {
        for bad in ["[1]", "{\"a\":", "5", "{} x", "\"s\"", "{\"choices\": 5}"] {
            assert_eq!(Chunk::parse(bad.to_owned()), None, "{bad}");
        }
        assert!(Chunk::parse("  {}".to_owned()).is_some());
    }

    #[test]
    fn the_opening_role_chunk_carries_no_token_and_content_does() {
        let opening = facts(json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}));
        assert!(!opening.token);
        assert!(opening.role);
        let text = facts(json!({"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}));
        assert!(text.token);
        assert!(!text.finished);
        assert_eq!(text.content, "Hi");
        assert!(!facts(json!({"choices": [{"delta": {"content": null}}]})).token);
        assert!(!facts(json!({"choices": [{"delta": {"content": ["odd"]}}]})).token);
    }

    #[test]
    fn finishes_tool_calls_usage_and_errors_are_tokens() {
        let done = facts(json!({"choices": [{"delta": {}, "finish_reason": "stop"}]}));
        assert!(done.token && done.finished);
        assert!(facts(json!({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})).token);
        let usage = facts(json!({"choices": [], "usage": {"total_tokens": 7}}));
        assert!(usage.token);
        assert_eq!(usage.usage.map(|u| u.total), Some(7));
        assert_eq!(facts(json!({"usage": null})).usage, None);
        assert!(facts(json!({"error": {"message": "x"}})).token);
    }

    #[test]
    fn content_of_every_choice_counts_in_order() {
        let f =
            facts(json!({"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]}));
        assert_eq!(f.content, "ab");
    }

    #[test]
    fn a_rewrite_reads_its_facts_again() {
        let mut chunk =
            Chunk::built(&json!({"choices": [{"delta": {"role": "assistant", "content": " x"}}]}));
        assert!(chunk.facts().role);
        chunk.rewrite(|v| {
            v["choices"][0]["delta"]
                .as_object_mut()
                .expect("delta")
                .remove("role");
        });
        assert!(!chunk.facts().role);
        assert_eq!(chunk.json(), r#"{"choices":[{"delta":{"content":" x"}}]}"#);
    }
}
