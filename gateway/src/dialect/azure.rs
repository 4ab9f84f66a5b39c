//! Azure OpenAI: OpenAI's bodies and errors, addressed by deployment with an
//! `api-version` and an `api-key` header.

use crds::TargetConfig;

use super::openai::Chunks;
use super::{Address, Dialect, Operation, Prefill, StreamDecoder, Upstream};

/// The API version used when a pool names none (the CRD requires one; older compiled
/// configurations may lack it).
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// Azure OpenAI.
#[derive(Debug)]
pub struct AzureOpenAi;

fn version(up: Upstream<'_>) -> &str {
    up.provider
        .azure_api_version
        .as_deref()
        .unwrap_or(DEFAULT_API_VERSION)
}

impl Dialect for AzureOpenAi {
    fn address(
        &self,
        up: Upstream<'_>,
        target: &TargetConfig,
        op: Operation,
    ) -> Result<Address, String> {
        let deployment = target
            .deployment
            .as_deref()
            .ok_or_else(|| format!("target {} has no Azure deployment", target.provider))?;
        Ok(Address {
            url: format!(
                "{}/openai/deployments/{deployment}/{}?api-version={}",
                up.endpoint(),
                op.suffix(),
                version(up)
            ),
            headers: up.key_header("api-key", "").into_iter().collect(),
        })
    }

    fn stream_decoder(&self, _include_usage: bool) -> Box<dyn StreamDecoder> {
        Box::new(Chunks)
    }

    fn prefill(&self) -> Prefill {
        Prefill::Unsupported
    }

    fn probe(&self, up: Upstream<'_>) -> Address {
        Address {
            url: format!(
                "{}/openai/models?api-version={}",
                up.endpoint(),
                version(up)
            ),
            headers: up.key_header("api-key", "").into_iter().collect(),
        }
    }
}
