//! The metrics and health endpoints of a running agent, scraped over HTTP from the client's
//! namespace before and after real traffic: the counters move with the traffic, per service,
//! per backend and per reason, the flow table shows the tracked TCP flows, and the health
//! endpoints answer. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_testkit::{
    Distribution, Lab, LabSpec, Scenario, ScenarioSpec, require_root,
    scrape::{Sample, http_get, parse_metrics, sum},
    tcp_connections, udp_flows,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const METRICS_PORT: u16 = 9740;

fn scrape(lab: &Lab, addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http_get(lab.client(), addr, "/metrics", TIMEOUT).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF:\n{body}"
    );
    parse_metrics(&body).unwrap()
}

#[test]
fn metrics_follow_real_traffic_and_health_endpoints_answer() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let addr = SocketAddr::new(IpAddr::V4(lab.lb_addr()), METRICS_PORT);
    let sc = Scenario::start(
        &lab,
        ScenarioSpec {
            agent_args: vec!["--metrics-address".into(), addr.to_string()],
            ..ScenarioSpec::new(env!("CARGO_BIN_EXE_lb-agent"), "ipip")
        },
    )
    .unwrap();
    let log = || sc.agent_log_text();

    // Attached and synced: ready (bounded wait: the first sync may still be recorded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(lab.client(), addr, "/readyz", TIMEOUT).unwrap();
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz: {status} {body}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        http_get(lab.client(), addr, "/healthz", TIMEOUT).unwrap(),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http_get(lab.client(), addr, "/nothing", TIMEOUT).unwrap().0,
        404
    );

    let vip = sc.vip();
    let port = vip.port().to_string();
    let vip_text = vip.ip().to_string();
    let udp_svc = [
        ("vip", vip_text.as_str()),
        ("port", port.as_str()),
        ("protocol", "udp"),
    ];
    let tcp_svc = [
        ("vip", vip_text.as_str()),
        ("port", port.as_str()),
        ("protocol", "tcp"),
    ];
    let before = scrape(&lab, addr);
    assert_eq!(sum(&before, "xdplb_dataplane_up", &[]), 1.0, "{}", log());
    assert!(sum(&before, "xdplb_syncs_total", &[("result", "ok")]) >= 1.0);
    assert!(sum(&before, "xdplb_sync_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        sum(&before, "xdplb_announce_mode", &[("mode", "none")]),
        1.0
    );
    assert_eq!(
        sum(
            &before,
            "xdplb_backends_next_hop",
            &[("state", "unresolved")]
        ),
        0.0
    );
    let capacity = sum(&before, "xdplb_flow_table_capacity", &[("family", "ipv4")]);
    assert!(capacity >= 1024.0, "flow table capacity {capacity}");

    let udp = udp_flows(lab.client(), vip, 300, TIMEOUT).unwrap();
    let tcp = tcp_connections(lab.client(), vip, 30, TIMEOUT).unwrap();
    let d = Distribution::new(&udp, &tcp, vip, lab.client_addr().into());
    assert_eq!(d.timeouts(), 0, "{}", d.table());
    let after = scrape(&lab, addr);
    let delta =
        |name: &str, with: &[(&str, &str)]| sum(&after, name, with) - sum(&before, name, with);

    // UDP is untracked: each of the 300 one-packet flows is a packet and a Maglev decision.
    let udp_packets = delta("xdplb_service_packets_total", &udp_svc);
    assert!(
        (300.0..310.0).contains(&udp_packets),
        "UDP service packets moved by {udp_packets}"
    );
    assert_eq!(
        delta("xdplb_service_new_flows_total", &udp_svc),
        udp_packets
    );
    assert!(delta("xdplb_service_bytes_total", &udp_svc) >= udp_packets * 42.0);
    // Per backend: the service's packets, split as the backends answered.
    assert_eq!(delta("xdplb_backend_packets_total", &udp_svc), udp_packets);
    for b in lab.backends() {
        let ip = b.addr.to_string();
        let mut with = udp_svc.to_vec();
        with.push(("backend", ip.as_str()));
        let answered = d.per_backend.get(&b.name).map_or(0, |c| c.udp) as f64;
        let counted = delta("xdplb_backend_packets_total", &with);
        assert!(
            counted >= answered && counted > 0.0,
            "backend {ip}: counted {counted}, answered {answered}"
        );
    }
    // TCP: 30 connections, each at least SYN, request, FIN/ACKs. Two Maglev decisions per
    // connection: the SYN's, and the next packet's, which misses and is remembered.
    let tcp_packets = delta("xdplb_service_packets_total", &tcp_svc);
    assert!(
        tcp_packets >= 30.0 * 3.0,
        "TCP packets moved by {tcp_packets}"
    );
    let tcp_new = delta("xdplb_service_new_flows_total", &tcp_svc);
    assert!(
        (60.0..=70.0).contains(&tcp_new),
        "TCP Maglev decisions {tcp_new}"
    );
    assert_eq!(
        delta("xdplb_packets_total", &[("reason", "flow_created")]),
        30.0
    );
    // Every forwarded packet was counted under its reason, and nothing else moved much.
    let tx = delta("xdplb_packets_total", &[("reason", "tx_ipip")]);
    assert!(tx >= udp_packets + tcp_packets, "tx_ipip moved by {tx}");
    // The tracked TCP flows are remembered.
    let flows = sum(&after, "xdplb_flow_table_entries", &[("family", "ipv4")]);
    assert!(
        (30.0..=capacity).contains(&flows),
        "flow-table entries {flows} of {capacity}"
    );
}
