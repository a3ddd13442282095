//! Generated configurations of many services for the control-plane bench, in the agent's
//! own YAML format. Addresses are in 198.18.0.0/15 and never used on a network: backends
//! from 198.18.4.0 up, VIPs 198.19.240.0/24 with 100 ports each.

use std::{fmt::Write, net::Ipv4Addr};

use lb_agent::state::{Protocol, ServiceAddr};

pub const ENCAP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PORTS_PER_VIP: usize = 100;
/// Services a generated config can hold (VIPs × ports).
pub const MAX_SERVICES: usize = 256 * PORTS_PER_VIP;
/// Backends over all services: 198.18.4.0 + 120,000 stays below the VIPs.
pub const MAX_ENDPOINTS: usize = 120_000;

/// The address of service `i`.
pub fn service_addr(i: usize) -> ServiceAddr {
    ServiceAddr {
        vip: Ipv4Addr::new(198, 19, 240, (i / PORTS_PER_VIP) as u8).into(),
        port: 1000 + (i % PORTS_PER_VIP) as u16,
        protocol: Protocol::Tcp,
    }
}

/// Backend `j` of service `i` (every service has its own backends, like pods).
pub fn backend_addr(i: usize, j: usize, per_service: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 4, 0)) + (i * per_service + j) as u32)
}

fn mac_of(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// `services` services with `per_service` backends each (MACs given, so nothing is resolved).
pub fn config_yaml(services: usize, per_service: usize, interface: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        services <= MAX_SERVICES && services * per_service <= MAX_ENDPOINTS,
        "{services} services × {per_service} backends do not fit the generated address plan"
    );
    let mut y = String::with_capacity(services * (120 + per_service * 60));
    let _ = write!(
        y,
        "interface: {interface}\nencap_source: {ENCAP}\nicmp_echo: false\nservices:\n"
    );
    for i in 0..services {
        let a = service_addr(i);
        let _ = write!(
            y,
            "  - name: svc-{i}\n    vip: \"{}\"\n    port: {}\n    protocol: tcp\n    backends:\n",
            a.vip, a.port
        );
        for j in 0..per_service {
            let b = backend_addr(i, j, per_service);
            let _ = writeln!(y, "      - {{address: \"{b}\", mac: \"{}\"}}", mac_of(b));
        }
    }
    Ok(y)
}
