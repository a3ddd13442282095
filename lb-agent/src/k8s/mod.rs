//! Kubernetes mode: Services, EndpointSlices and Nodes → `DesiredState`. No map handles
//! here; the daemon applies the result through `sync` like a static config.

pub mod config;
pub mod desired;

pub use config::{CONFIG_KEY, DEFAULT_LOAD_BALANCER_CLASS, K8sConfig, K8sConfigError};
pub use desired::{
    FORWARDING_ANNOTATION, SERVICE_NAME_LABEL, Warning, WarningReason, desired_state, is_ours,
};
