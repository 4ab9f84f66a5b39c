//! What the caches keep of Deployments and Pods: the fields a reconcile reads, decoded
//! straight from the API's JSON. A k8s-openapi `Deployment` or `Pod` takes 2.4 KB before
//! it holds anything (every optional field of the pod template is inline), and a pool has
//! a Deployment and a Pod per region; these summaries take a fifth of that.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::Deserialize;

/// A Deployment as a reconcile reads it: its metadata (owner, labels, the content hash),
/// the replicas it asks for and how many are ready.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DeploymentSummary {
    /// As on the API server (managed fields dropped in the cache).
    pub metadata: ObjectMeta,
    /// The replicas asked for.
    #[serde(default)]
    pub spec: DeploymentReplicas,
    /// What the rollout achieved.
    #[serde(default)]
    pub status: Option<DeploymentReadiness>,
}

/// `spec` of a [`DeploymentSummary`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DeploymentReplicas {
    /// `spec.replicas`; unset means one.
    pub replicas: Option<i32>,
}

/// `status` of a [`DeploymentSummary`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentReadiness {
    /// `status.readyReplicas`.
    pub ready_replicas: Option<i32>,
}

/// A gateway Pod as a reconcile reads it: enough to say why a region is not ready.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodSummary {
    /// As on the API server (managed fields dropped in the cache).
    pub metadata: ObjectMeta,
    /// The scheduler's and the kubelet's word.
    #[serde(default)]
    pub status: Option<PodHealth>,
}

/// `status` of a [`PodSummary`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodHealth {
    /// `status.conditions` (PodScheduled says why a pod has no node).
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
    /// `status.containerStatuses`, only their waiting state.
    #[serde(default)]
    pub container_statuses: Vec<ContainerWaiting>,
}

/// One `status.containerStatuses[]` entry of a [`PodSummary`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ContainerWaiting {
    /// The container's name.
    pub name: String,
    /// Its state; only `waiting` is kept.
    #[serde(default)]
    pub state: Option<ContainerState>,
}

/// `state` of a [`ContainerWaiting`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ContainerState {
    /// Set while the container does not run.
    pub waiting: Option<Waiting>,
}

/// Why a container is waiting.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Waiting {
    /// A CamelCase reason such as `ImagePullBackOff`.
    pub reason: Option<String>,
    /// The kubelet's message.
    pub message: Option<String>,
}

/// The summaries are read and watched at the same paths as the kinds they summarise.
macro_rules! summarises {
    ($summary:ty, $kind:ty) => {
        impl Resource for $summary {
            const API_VERSION: &'static str = <$kind as Resource>::API_VERSION;
            const GROUP: &'static str = <$kind as Resource>::GROUP;
            const KIND: &'static str = <$kind as Resource>::KIND;
            const VERSION: &'static str = <$kind as Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$kind as Resource>::URL_PATH_SEGMENT;
            type Scope = NamespaceResourceScope;
        }

        impl Metadata for $summary {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

summarises!(DeploymentSummary, Deployment);
summarises!(PodSummary, Pod);

#[cfg(test)]
mod tests {
    use super::{DeploymentSummary, PodSummary};
    use kube::{Resource, ResourceExt};
    use serde_json::json;

    #[test]
    fn summaries_read_what_reconciles_need_from_the_full_objects() {
        let d: DeploymentSummary = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "chat-us-east", "namespace": "team", "annotations": {"h": "1"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "gateway", "image": "gw:1"}]}}},
            "status": {"readyReplicas": 2, "replicas": 3}
        }))
        .expect("deployment");
        assert_eq!(
            (d.spec.replicas, d.status.and_then(|s| s.ready_replicas)),
            (Some(3), Some(2))
        );
        assert_eq!(d.metadata.annotations.unwrap_or_default()["h"], "1");
        assert_eq!(
            DeploymentSummary::url_path(&(), Some("team")),
            "/apis/apps/v1/namespaces/team/deployments"
        );

        let p: PodSummary = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chat-us-east-1", "namespace": "team"},
            "spec": {"containers": [{"name": "gateway", "image": "gw:1"}]},
            "status": {"phase": "Pending",
                       "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "gateway", "ready": false, "restartCount": 0, "image": "gw:1", "imageID": "",
                                              "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}
        }))
        .expect("pod");
        assert_eq!(p.name_any(), "chat-us-east-1");
        let status = p.status.expect("status");
        assert_eq!(status.conditions[0].type_, "PodScheduled");
        let waiting = status.container_statuses[0]
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .expect("waiting");
        assert_eq!(waiting.reason.as_deref(), Some("ImagePullBackOff"));
        assert_eq!(
            PodSummary::url_path(&(), Some("team")),
            "/api/v1/namespaces/team/pods"
        );
    }
}
