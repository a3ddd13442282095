//! A "pod" behind a lab host: its own namespace joined to the host by a veth pair, routed by
//! the host (as a CNI with routed pod networks does), its default route via the host.
//!
//! ```text
//!   host ns (a node)                   pod ns
//!   p<idx> 198.18.<subnet>.1/24  ───   eth0 198.18.<subnet>.11/24, default via .1
//! ```
//!
//! The host forwards IPv4. The pod's namespace (and with it the veth pair) is removed when
//! the [`Pod`] is dropped.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};

use crate::netns::NetNs;

/// A pod namespace attached to a host namespace.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: NetNs,
    /// The pod's address.
    pub addr: Ipv4Addr,
    /// The host side's address (the pod's gateway).
    pub gateway: Ipv4Addr,
}

impl Pod {
    /// Create a pod on 198.18.`subnet`.11/24 behind `host`, routed by it. `subnet` must not
    /// be the lab's own subnet (0).
    pub fn attach(host: &NetNs, name: &str, subnet: u8) -> Result<Pod> {
        ensure!(subnet != 0, "subnet 198.18.0.0/24 is the lab's own");
        let ns = NetNs::new("lbtpod").with_context(|| format!("creating pod namespace {name}"))?;
        let gateway = Ipv4Addr::new(198, 18, subnet, 1);
        let addr = Ipv4Addr::new(198, 18, subnet, 11);
        let host_if = format!("p{subnet}");
        host.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])
        .with_context(|| format!("creating the veth pair of pod {name}"))?;
        host.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &host_if])?;
        host.ip(&["link", "set", &host_if, "up"])?;
        host.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])
            .with_context(|| format!("default route of pod {name}"))?;
        Ok(Pod {
            name: name.to_string(),
            ns,
            addr,
            gateway,
        })
    }
}
