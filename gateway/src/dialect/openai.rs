//! OpenAI's API, and the servers that speak it (vLLM, llama.cpp, Ollama, TGI, LiteLLM):
//! requests and answers pass through with only the model rewritten.

use super::{Address, Chunk, Dialect, Operation, Prefill, Step, StreamDecoder, Upstream};
use crds::TargetConfig;

/// OpenAI itself, or a server that only speaks its API.
#[derive(Debug)]
pub struct OpenAi {
    /// Whether it continues a final assistant message (vLLM and llama.cpp do, when asked
    /// with `continue_final_message`); OpenAI starts a new answer instead.
    continues: bool,
}

/// api.openai.com.
pub static OPENAI: OpenAi = OpenAi { continues: false };
/// A self-hosted or third-party server speaking OpenAI's API.
pub static COMPATIBLE: OpenAi = OpenAi { continues: true };

impl Dialect for OpenAi {
    fn address(
        &self,
        up: Upstream<'_>,
        _target: &TargetConfig,
        op: Operation,
    ) -> Result<Address, String> {
        Ok(Address {
            url: format!("{}/v1/{}", up.endpoint(), op.suffix()),
            headers: up
                .key_header("authorization", "Bearer ")
                .into_iter()
                .collect(),
        })
    }

    fn stream_decoder(&self, _include_usage: bool) -> Box<dyn StreamDecoder> {
        Box::new(Chunks)
    }

    fn prefill(&self) -> Prefill {
        if self.continues {
            // vLLM's and llama.cpp's way of saying "continue this message".
            Prefill::Continues {
                trims_whitespace: false,
                flags: &[
                    ("continue_final_message", true),
                    ("add_generation_prompt", false),
                ],
            }
        } else {
            Prefill::Unsupported
        }
    }

    fn probe(&self, up: Upstream<'_>) -> Address {
        Address {
            url: format!("{}/v1/models", up.endpoint()),
            headers: up
                .key_header("authorization", "Bearer ")
                .into_iter()
                .collect(),
        }
    }
}

/// OpenAI's stream: each event is a chat-completion chunk, `[DONE]` ends it.
#[derive(Debug)]
pub struct Chunks;

impl StreamDecoder for Chunks {
    fn event(&mut self, data: String) -> Step {
        if data == "[DONE]" {
            return Step::Done(Vec::new());
        }
        // Forwarded as written: only the facts the stream needs are read from it.
        match Chunk::parse(data) {
            Some(chunk) => Step::Chunks(vec![chunk]),
            None => Step::Malformed,
        }
    }
}
