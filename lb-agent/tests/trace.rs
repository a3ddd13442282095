//! `lb-agent trace` end to end: maps pinned in a private directory under /sys/fs/bpf and
//! programmed the way the agent does it (`loader::load`, `sync::plan`, `Dataplane::apply`),
//! then the trace library function runs the real program against those pins.
//! Needs root (loading BPF).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::Ebpf;
use lb_agent::{
    config::format_mac,
    dataplane::Dataplane,
    loader,
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync::{self, MapSnapshot},
    trace::{self, Encapsulation, Probe, TraceError, TraceReport, XdpAction},
};
use lb_common::{
    Forwarding,
    hash::{flow_hash_v4, flow_hash_v6},
    maps,
};

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORT_IPIP: u16 = 53;
const PORT_L2: u16 = 54;
const PORT_TCP: u16 = 80;
const ENCAP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

fn backend_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + u16::from(i))
}

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

fn backend_mac(ip: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, ip.octets()[3]]
}

/// A pin directory of its own under /sys/fs/bpf, removed with everything in it on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/lb-trace-test-{}-{tag}-{nanos}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A node as a running agent leaves it: maps pinned under `pin` and programmed.
struct Node {
    pin: PinDir,
    _ebpf: Ebpf,
    dataplane: Dataplane,
    snapshot: MapSnapshot,
}

fn service(forwarding: Forwarding, flow_tracking: bool) -> ServiceSpec {
    ServiceSpec {
        name: format!("svc-{}", forwarding.name()),
        forwarding,
        table_size: None,
        flow_tracking,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: (1..=3)
            .map(backend_ip)
            .map(|ip| {
                (
                    IpAddr::V4(ip),
                    BackendSpec {
                        weight: 1,
                        mac: Some(backend_mac(ip)),
                    },
                )
            })
            .collect(),
    }
}

fn addr(port: u16, protocol: Protocol) -> ServiceAddr {
    ServiceAddr {
        vip: IpAddr::V4(VIP),
        port,
        protocol,
    }
}

fn node(tag: &str) -> Node {
    assert!(
        nix::unistd::geteuid().is_root(),
        "trace tests load BPF programs and pin maps: run them as root (cargo xtask test does)"
    );
    let pin = PinDir::new(tag);
    let mut ebpf = loader::load(&pin.0, 1 << 16, 1 << 12).expect("load and pin");
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();
    let mut desired = DesiredState::default();
    desired.services.insert(
        addr(PORT_IPIP, Protocol::Udp),
        service(Forwarding::Ipip, false),
    );
    desired
        .services
        .insert(addr(PORT_L2, Protocol::Udp), service(Forwarding::L2, false));
    desired.services.insert(
        addr(PORT_TCP, Protocol::Tcp),
        service(Forwarding::Ipip, true),
    );
    // IP6IP6 to three IPv6 backends.
    let mut v6 = service(Forwarding::Ipip, false);
    v6.backends = (1..=3)
        .map(|i| {
            let mac = [0x02, 0, 0, 0, 6, i];
            (
                IpAddr::V6(backend_v6(i)),
                BackendSpec {
                    weight: 1,
                    mac: Some(mac),
                },
            )
        })
        .collect();
    desired.services.insert(
        ServiceAddr {
            vip: IpAddr::V6(VIP_V6),
            port: PORT_IPIP,
            protocol: Protocol::Udp,
        },
        v6,
    );
    let loaded = lb_agent::loader::loaded(&mut ebpf).unwrap();
    let cfg = sync::node_config(&desired, LB_MAC, Some(ENCAP_SRC), Some(ENCAP_V6), loaded);
    let snapshot = dataplane.snapshot().unwrap();
    let plan = sync::plan(&desired, cfg, &BTreeMap::new(), &snapshot).unwrap();
    dataplane.apply(&plan.ops).unwrap();
    let snapshot = dataplane.snapshot().unwrap();
    Node {
        pin,
        _ebpf: ebpf,
        dataplane,
        snapshot,
    }
}

impl Node {
    fn dir(&self) -> &Path {
        &self.pin.0
    }

    /// The backend Maglev must pick, from the table in the map and the shared hash.
    fn expected_backend(&self, protocol: Protocol, sport: u16, dport: u16) -> Ipv4Addr {
        let svc = self.snapshot.services[&sync::service_key(&addr(dport, protocol))];
        let table = self.dataplane.table(&svc).unwrap();
        let h = flow_hash_v4(
            u32::from_ne_bytes(CLIENT.octets()),
            u32::from_ne_bytes(VIP.octets()),
            sport.to_be(),
            dport.to_be(),
            protocol.number(),
        );
        let b = self.snapshot.backends[&table[lb_common::hash::slot(h, svc.table_size) as usize]];
        Ipv4Addr::new(b.addr_be[0], b.addr_be[1], b.addr_be[2], b.addr_be[3])
    }
}

fn probe(protocol: Protocol, sport: u16, dst: Ipv4Addr, dport: u16, syn: bool) -> Probe {
    Probe {
        protocol,
        src: SocketAddr::new(CLIENT.into(), sport),
        dst: SocketAddr::new(dst.into(), dport),
        syn,
    }
}

fn moved(report: &TraceReport, reason: &str) -> u64 {
    report
        .reasons
        .iter()
        .find(|r| r.reason == reason)
        .map_or(0, |r| r.packets)
}

fn backend_addr(report: &TraceReport) -> Option<IpAddr> {
    report.backend.as_ref().map(|b| b.address)
}

#[test]
fn ipip_trace_names_the_maglev_backend_and_the_outer_header() {
    let n = node("ipip");
    let mut seen = BTreeMap::new();
    for sport in 40000..40012u16 {
        let r = trace::trace(n.dir(), &probe(Protocol::Udp, sport, VIP, PORT_IPIP, false))
            .expect("trace");
        let expected = n.expected_backend(Protocol::Udp, sport, PORT_IPIP);
        assert_eq!(r.action, XdpAction::Tx, "{}", trace::render(&r));
        assert_eq!(backend_addr(&r), Some(expected.into()));
        assert_eq!(
            r.maglev_choice.as_ref().map(|b| b.address),
            Some(expected.into())
        );
        assert_eq!(r.decision, Some("maglev"));
        assert_eq!(moved(&r, "tx_ipip"), 1, "{:?}", r.reasons);
        assert_eq!(r.output_len, r.packet.len + 20);
        assert_eq!(
            r.encapsulation,
            Encapsulation::Ipip {
                outer_src: ENCAP_SRC.into(),
                outer_dst: expected.into(),
                eth_src: format_mac(&LB_MAC),
                eth_dst: format_mac(&backend_mac(expected)),
            }
        );
        *seen.entry(expected).or_insert(0) += 1;
        if sport == 40000 {
            println!("{}", trace::render(&r));
            println!("{}", serde_json::to_string_pretty(&r).unwrap());
        }
    }
    assert!(seen.len() > 1, "12 flows over 3 backends: {seen:?}");
}

#[test]
fn l2_trace_finds_the_backend_by_mac() {
    let n = node("l2");
    for sport in 41000..41006u16 {
        let r = trace::trace(n.dir(), &probe(Protocol::Udp, sport, VIP, PORT_L2, false))
            .expect("trace");
        let expected = n.expected_backend(Protocol::Udp, sport, PORT_L2);
        assert_eq!(r.action, XdpAction::Tx);
        assert_eq!(backend_addr(&r), Some(expected.into()));
        assert_eq!(
            r.encapsulation,
            Encapsulation::L2 {
                eth_src: format_mac(&LB_MAC),
                eth_dst: format_mac(&backend_mac(expected)),
            }
        );
        assert_eq!(r.output_len, r.packet.len);
        assert_eq!(moved(&r, "tx_l2"), 1);
    }
}

#[test]
fn tracked_tcp_trace_creates_then_follows_the_flow_and_syn_decides_afresh() {
    let n = node("tcp");
    let sport = 42000;
    let expected = IpAddr::from(n.expected_backend(Protocol::Tcp, sport, PORT_TCP));
    let ack = probe(Protocol::Tcp, sport, VIP, PORT_TCP, false);
    let first = trace::trace(n.dir(), &ack).unwrap();
    assert_eq!(first.action, XdpAction::Tx);
    assert_eq!(backend_addr(&first), Some(expected));
    assert_eq!(first.decision, Some("maglev"));
    assert_eq!(moved(&first, "flow_created"), 1, "{:?}", first.reasons);
    assert!(first.notes.iter().any(|n| n.contains("flow entry")));
    let again = trace::trace(n.dir(), &ack).unwrap();
    assert_eq!(again.decision, Some("flow_table"));
    assert_eq!(again.backend, first.backend);
    assert_eq!(moved(&again, "flow_created"), 0);
    let syn = trace::trace(n.dir(), &probe(Protocol::Tcp, sport, VIP, PORT_TCP, true)).unwrap();
    assert_eq!(syn.decision, Some("maglev"));
    assert_eq!(syn.packet.tcp_flags, Some("SYN"));
    assert_eq!(backend_addr(&syn), Some(expected));
    assert!(syn.notes.iter().any(|n| n.contains("overwrote")));
}

#[test]
fn ipv6_trace_decodes_the_outer_ipv6_header() {
    let n = node("ipv6");
    let key = sync::service_key(&ServiceAddr {
        vip: IpAddr::V6(VIP_V6),
        port: PORT_IPIP,
        protocol: Protocol::Udp,
    });
    let svc = n.snapshot.services[&key];
    let table = n.dataplane.table(&svc).unwrap();
    for sport in 44000..44006u16 {
        let p = Probe {
            protocol: Protocol::Udp,
            src: SocketAddr::new(CLIENT_V6.into(), sport),
            dst: SocketAddr::new(VIP_V6.into(), PORT_IPIP),
            syn: false,
        };
        let r = trace::trace(n.dir(), &p).expect("trace");
        let h = flow_hash_v6(
            &CLIENT_V6.octets(),
            &VIP_V6.octets(),
            sport.to_be(),
            PORT_IPIP.to_be(),
            Protocol::Udp.number(),
        );
        let b = n.snapshot.backends[&table[lb_common::hash::slot(h, svc.table_size) as usize]];
        let expected = IpAddr::from(b.addr_be);
        assert_eq!(r.action, XdpAction::Tx, "{}", trace::render(&r));
        assert_eq!(backend_addr(&r), Some(expected));
        assert_eq!(r.output_len, r.packet.len + 40);
        assert_eq!(
            r.encapsulation,
            Encapsulation::Ipip {
                outer_src: ENCAP_V6.into(),
                outer_dst: expected,
                eth_src: format_mac(&LB_MAC),
                eth_dst: format_mac(&b.mac),
            }
        );
    }
}

#[test]
fn non_vip_destinations_pass_untouched() {
    let n = node("pass");
    for (dst, dport, protocol) in [
        (Ipv4Addr::new(198, 18, 0, 200), PORT_IPIP, Protocol::Udp),
        (VIP, 9999, Protocol::Udp),
        (VIP, PORT_IPIP, Protocol::Tcp), // the VIP, but no TCP service on that port
    ] {
        let r = trace::trace(n.dir(), &probe(protocol, 43000, dst, dport, false)).unwrap();
        assert_eq!(r.action, XdpAction::Pass, "{}", trace::render(&r));
        assert!(r.service.is_none());
        assert!(r.backend.is_none());
        assert_eq!(r.encapsulation, Encapsulation::Unchanged);
        assert_eq!(r.output_len, r.packet.len);
        assert_eq!(moved(&r, "pass_not_vip"), 1);
    }
}

#[test]
fn missing_pins_are_reported_and_nothing_is_created() {
    let pin = PinDir::new("missing");
    let p = probe(Protocol::Udp, 1, VIP, PORT_IPIP, false);
    let err = trace::trace(&pin.0, &p).unwrap_err();
    assert!(matches!(err, TraceError::NoAgentState { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "no agent state under {}: is lb-agent running?",
            pin.0.display()
        )),
        "{msg}"
    );
    assert!(!pin.0.exists(), "trace must not create the pin directory");
    // Some pins but not all (a partial purge): still refused, and no map is created.
    std::fs::create_dir_all(&pin.0).unwrap();
    let err = trace::trace(&pin.0, &p).unwrap_err();
    assert!(matches!(err, TraceError::NoAgentState { .. }), "{err}");
    assert!(err.to_string().contains(maps::SERVICES), "{err}");
    assert_eq!(std::fs::read_dir(&pin.0).unwrap().count(), 0);
}
