//! Kubernetes mode: Services, EndpointSlices and Nodes → `DesiredState`. No map handles
//! here; the daemon applies the result through `sync` like a static config.
//!
//! - `config`: the agent's settings, from its ConfigMap.
//! - `desired`: the pure translation of API objects into a `DesiredState`.
//! - `watch`: the live part: watchers and reflector stores, recomputation on change.

pub mod config;
pub mod desired;
pub mod watch;

pub use config::{CONFIG_KEY, DEFAULT_LOAD_BALANCER_CLASS, K8sConfig, K8sConfigError};
pub use desired::{
    FORWARDING_ANNOTATION, SERVICE_NAME_LABEL, Warning, WarningReason, desired_state,
    desired_state_with_pools, is_ours,
};
pub use watch::{ClusterWatch, WatchError, WatchOptions};
