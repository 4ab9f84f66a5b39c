//! The Switchyard operator: reconciles ProviderPools and RoutingPolicies into regional
//! gateway Deployments, Services, ConfigMaps and RBAC, and reports the truth in status.
//!
//! - [`render`]: pure functions from a pool and its compiled configs to desired objects.
//! - [`status`] and [`conditions`]: pure status math.
//! - [`controller`]: the I/O that applies them (server-side apply, one field manager).
//! - [`cache`] and [`watches`]: what the reconciles read, and what wakes them;
//!   [`views`]: the slim forms of Deployments and Pods those caches keep.
//! - [`events`]: Events for condition transitions, with bounded memory.
//! - [`leader`]: Lease-based leader election, so two replicas are safe.

pub mod cache;
pub mod conditions;
pub mod controller;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod status;
pub mod views;
pub mod watches;
