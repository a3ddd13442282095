//! lb-agent: loads the XDP load balancer, keeps its BPF maps equal to the desired state by
//! diff, and reports what the data plane does.

pub mod announce;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod flowtab;
pub mod ipam;
pub mod k8s;
pub mod loader;
pub mod metrics;
pub mod netinfo;
pub mod output;
pub mod state;
pub mod status;
pub mod sync;
pub mod table_cache;
pub mod trace;

pub use loader::EBPF_OBJECT;
