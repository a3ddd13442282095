//! `lb-agent status`: what the pinned maps hold and what the data plane counted.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    cli::StatusArgs,
    config::format_mac,
    dataplane::{Dataplane, DataplaneError},
    sync::{self, ip_from_bytes},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub encap_source: Option<String>,
    pub encap_source_v6: Option<String>,
    pub interface_mac: Option<String>,
    pub gue_port: Option<u16>,
    pub services: Vec<ServiceStatus>,
    pub reasons: BTreeMap<String, CounterPair>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub address: String,
    pub forwarding: String,
    pub table_size: u32,
    pub flow_tracking: bool,
    /// It takes the IP fragments of its VIP and protocol.
    pub fragments: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Maglev decisions (new flows, or every packet when untracked).
    pub new_flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    /// Next-hop MAC the frames to it carry.
    pub mac: String,
    /// The node it is tunnelled through (a pod behind its node), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Share of the service's Maglev slots (0..1).
    pub share: f64,
    /// What this service sent to this backend.
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct CounterPair {
    pub packets: u64,
    pub bytes: u64,
}

/// Collect the status from an open data plane.
pub fn collect(dp: &Dataplane) -> Result<Status, DataplaneError> {
    let snap = dp.snapshot()?;
    let stats = dp.stats(
        snap.services.values().map(|v| v.id),
        snap.backends.keys().copied(),
    )?;
    let mut services = Vec::new();
    for (key, value) in &snap.services {
        let addr = sync::service_addr(key);
        let address = addr
            .as_ref()
            .map_or_else(|| format!("{key:?}"), |a| a.to_string());
        let table = dp.table(value)?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &table {
            *slots.entry(*id).or_default() += 1;
        }
        let backends = snap
            .backends
            .iter()
            .filter(|(_, b)| b.service_id == value.id)
            .map(|(id, b)| {
                let c = stats.backends.get(id).copied().unwrap_or_default();
                BackendStatus {
                    address: ip_from_bytes(&b.addr_be, b.family)
                        .map_or_else(|| format!("(id {id})"), |ip| ip.to_string()),
                    mac: format_mac(&b.mac),
                    via: (b.flags & lb_common::BACKEND_F_VIA_NODE != 0)
                        .then(|| ip_from_bytes(&b.via_be, b.family))
                        .flatten()
                        .map(|ip| ip.to_string()),
                    share: f64::from(slots.get(id).copied().unwrap_or(0))
                        / table.len().max(1) as f64,
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let c = stats.services.get(&value.id).copied().unwrap_or_default();
        let fragments = addr.is_some_and(|a| takes_fragments(&snap, &a));
        services.push(ServiceStatus {
            address,
            forwarding: sync::forwarding_name(value).to_string(),
            table_size: value.table_size,
            flow_tracking: value.flags & lb_common::SERVICE_F_FLOW_TRACKING != 0,
            fragments,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends,
        });
    }
    let reasons = stats
        .reasons
        .iter()
        .map(|(r, c)| {
            (
                r.name().to_string(),
                CounterPair {
                    packets: c.packets,
                    bytes: c.bytes,
                },
            )
        })
        .collect();
    let cfg = snap.config;
    Ok(Status {
        encap_source: cfg
            .filter(|c| c.encap_src_v4_be != [0; 4])
            .map(|c| std::net::Ipv4Addr::from(c.encap_src_v4_be).to_string()),
        encap_source_v6: cfg
            .filter(|c| c.encap_src_v6_be != [0; 16])
            .map(|c| std::net::Ipv6Addr::from(c.encap_src_v6_be).to_string()),
        interface_mac: cfg.map(|c| format_mac(&c.mac)),
        gue_port: cfg.map(|c| u16::from_be(c.gue_port_be)),
        services,
        reasons,
    })
}

/// Is `addr` the service its VIP's fragments of its protocol go to?
fn takes_fragments(snap: &sync::MapSnapshot, addr: &crate::state::ServiceAddr) -> bool {
    let (addr_be, family) = sync::ip_bytes(addr.vip);
    snap.vips
        .get(&lb_common::VipKey::new(addr_be, family))
        .is_some_and(|v| {
            let port = match addr.protocol {
                crate::state::Protocol::Udp => v.frag_port_udp_be,
                crate::state::Protocol::Tcp => v.frag_port_tcp_be,
            };
            port != 0 && port == addr.port.to_be()
        })
}

pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node: mac {}  encap source {} / {}  gue port {}",
        status.interface_mac.as_deref().unwrap_or("-"),
        status.encap_source.as_deref().unwrap_or("-"),
        status.encap_source_v6.as_deref().unwrap_or("-"),
        status
            .gue_port
            .map_or_else(|| "-".to_string(), |p| p.to_string()),
    );
    let _ = writeln!(
        out,
        "{:<34} {:<5} {:>6} {:<12} {:>12} {:>14} {:>10}",
        "SERVICE", "FWD", "SLOTS", "FLOWS", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for s in &status.services {
        let _ = writeln!(
            out,
            "{:<34} {:<5} {:>6} {:<12} {:>12} {:>14} {:>10}",
            s.address,
            s.forwarding,
            s.table_size,
            match (s.flow_tracking, s.fragments) {
                (true, false) => "tracked",
                (false, false) => "maglev",
                (true, true) => "tracked+frag",
                (false, true) => "maglev+frag",
            },
            s.packets,
            s.bytes,
            s.new_flows
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  -> {:<29} {:<17} {:>5.1}% {:>12} {:>14}",
                b.address,
                b.mac,
                b.share * 100.0,
                b.packets,
                b.bytes
            );
            if let Some(via) = &b.via {
                let _ = writeln!(out, "     through node {via}");
            }
        }
    }
    let _ = writeln!(out, "{:<34} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
    for (name, c) in &status.reasons {
        if c.packets > 0 {
            let _ = writeln!(out, "{:<34} {:>12} {:>14}", name, c.packets, c.bytes);
        }
    }
    out
}

pub fn print(args: &StatusArgs) -> Result<(), crate::daemon::AgentError> {
    let dp = Dataplane::open_pinned(&args.pin_path)?;
    crate::output::print(&collect(&dp)?, args.json, render);
    Ok(())
}
