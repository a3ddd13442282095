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
    pub interface_mac: Option<String>,
    pub services: Vec<ServiceStatus>,
    /// Every programmed backend with what the data plane sent it (over all services).
    pub backends: Vec<BackendCounters>,
    pub reasons: BTreeMap<String, CounterPair>,
}

#[derive(Debug, Serialize)]
pub struct BackendCounters {
    pub address: String,
    pub mac: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub address: String,
    pub forwarding: String,
    pub table_size: u32,
    pub flow_tracking: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Maglev decisions (new flows, or every packet when untracked).
    pub new_flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub address: String,
    /// Share of the service's Maglev slots (0..1).
    pub share: f64,
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
        let address = sync::service_addr(key).map_or_else(|| format!("{key:?}"), |a| a.to_string());
        let table = dp.table(value)?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &table {
            *slots.entry(*id).or_default() += 1;
        }
        let backends = slots
            .iter()
            .map(|(id, n)| BackendStatus {
                address: snap
                    .backends
                    .get(id)
                    .and_then(|b| ip_from_bytes(&b.addr_be, b.family))
                    .map_or_else(|| format!("(id {id}, cleared)"), |ip| ip.to_string()),
                share: f64::from(*n) / table.len().max(1) as f64,
            })
            .collect();
        let c = stats.services.get(&value.id).copied().unwrap_or_default();
        services.push(ServiceStatus {
            address,
            forwarding: sync::forwarding_name(value).to_string(),
            table_size: value.table_size,
            flow_tracking: value.flags & lb_common::SERVICE_F_FLOW_TRACKING != 0,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends,
        });
    }
    let backends = snap
        .backends
        .iter()
        .map(|(id, b)| {
            let c = stats.backends.get(id).copied().unwrap_or_default();
            BackendCounters {
                address: ip_from_bytes(&b.addr_be, b.family)
                    .map_or_else(|| format!("(id {id})"), |ip| ip.to_string()),
                mac: format_mac(&b.mac),
                packets: c.packets,
                bytes: c.bytes,
            }
        })
        .collect();
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
    Ok(Status {
        encap_source: snap
            .config
            .map(|c| std::net::Ipv4Addr::from(c.encap_src_v4_be).to_string()),
        interface_mac: snap.config.map(|c| format_mac(&c.mac)),
        services,
        backends,
        reasons,
    })
}

pub fn render(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node: mac {}  encap source {}",
        status.interface_mac.as_deref().unwrap_or("-"),
        status.encap_source.as_deref().unwrap_or("-")
    );
    let _ = writeln!(
        out,
        "{:<28} {:<6} {:>6} {:<7} {:>12} {:>14} {:>10}",
        "SERVICE", "FWD", "SLOTS", "FLOWS", "PACKETS", "BYTES", "NEW FLOWS"
    );
    for s in &status.services {
        let _ = writeln!(
            out,
            "{:<28} {:<6} {:>6} {:<7} {:>12} {:>14} {:>10}",
            s.address,
            s.forwarding,
            s.table_size,
            if s.flow_tracking { "tracked" } else { "maglev" },
            s.packets,
            s.bytes,
            s.new_flows
        );
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  -> {:<23} {:>5.1}% of slots",
                b.address,
                b.share * 100.0
            );
        }
    }
    let _ = writeln!(
        out,
        "{:<28} {:<17} {:>12} {:>14}",
        "BACKEND", "NEXT-HOP MAC", "PACKETS", "BYTES"
    );
    for b in &status.backends {
        let _ = writeln!(
            out,
            "{:<28} {:<17} {:>12} {:>14}",
            b.address, b.mac, b.packets, b.bytes
        );
    }
    let _ = writeln!(out, "{:<28} {:>12} {:>14}", "REASON", "PACKETS", "BYTES");
    for (name, c) in &status.reasons {
        if c.packets > 0 {
            let _ = writeln!(out, "{:<28} {:>12} {:>14}", name, c.packets, c.bytes);
        }
    }
    out
}

pub fn print(args: &StatusArgs) -> Result<(), crate::daemon::AgentError> {
    let dp = Dataplane::open_pinned(&args.pin_path)?;
    let status = collect(&dp)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}
