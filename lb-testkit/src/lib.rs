//! Test support for the load balancer: network-namespace labs with cleanup guards, echo
//! servers for backends, traffic clients that report where flows landed, and a packet
//! builder for BPF_PROG_TEST_RUN tables.
//!
//! Everything that touches the network stays inside namespaces this crate creates, on
//! 198.18.0.0/15 (and 2001:db8::/32); every guard cleans up on drop, also on panic.

pub mod bgplab;
pub mod bird;
pub mod client;
pub mod echo;
pub mod l2lab;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod pod;
pub mod scenario;
pub mod scrape;

pub use client::{
    BackendCount, Distribution, Reply, TcpSession, tcp_connections, udp_flow_from_port, udp_flows,
};
pub use echo::{EchoServer, EchoStats};
pub use l2lab::{L2Lab, L2LabSpec, L2Node, Membership, Neighbour};
pub use lab::{Backend, Lab, LabSpec};
pub use netns::{ChildGuard, NetNs, list_netns};
pub use packet::{
    PacketBuilder, Tcp, arp_request, ipv4_checksum, l4_checksum_ok, verify_ipv4_header_checksum,
};
pub use pod::Pod;
pub use scenario::{Scenario, ScenarioSpec};

use anyhow::{Result, bail};

/// Fails with a clear message unless running as root (euid 0), which namespace, link and BPF
/// tests need.
pub fn require_root() -> Result<()> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        bail!(
            "this test needs root (euid 0) to create network namespaces; running as euid {euid}. \
             Run it with sudo, e.g. `sudo -E cargo test -p lb-testkit`"
        );
    }
    Ok(())
}
