//! Lab topology tests. They need root (network namespaces); without it they fail with a
//! clear message rather than skip.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lb_testkit::{
    Distribution, EchoServer, Lab, LabSpec, list_netns, require_root, tcp_connections,
    udp_flow_from_port, udp_flows,
};

const ECHO_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_secs(2);

fn root() {
    require_root().expect("lab tests need root");
}

/// Starts an echo server on every backend, bound to the backend's own address.
fn echo_on_own_addrs(lab: &Lab) -> Vec<EchoServer> {
    lab.backends()
        .iter()
        .map(|b| {
            EchoServer::start(&b.ns, &b.name, SocketAddr::new(b.addr.into(), ECHO_PORT))
                .expect("starting echo server")
        })
        .collect()
}

fn assert_gone(names: &[String]) {
    let listed = list_netns().expect("ip netns list");
    for name in names {
        assert!(
            !listed.contains(name),
            "namespace {name} left behind: {listed:?}"
        );
    }
}

#[test]
fn direct_traffic_reaches_backend_with_real_client_ip() {
    root();
    let lab = Lab::new(LabSpec::default()).expect("building lab");
    let names = lab.netns_names();
    let listed = list_netns().unwrap();
    for name in &names {
        assert!(listed.contains(name), "{name} missing from {listed:?}");
    }
    assert_eq!(lab.backends().len(), 3);

    let servers = echo_on_own_addrs(&lab);
    let b1 = &lab.backends()[0];
    let target = SocketAddr::new(b1.addr.into(), ECHO_PORT);
    let client_ip = IpAddr::V4(lab.client_addr());

    let udp = udp_flows(lab.client(), target, 120, TIMEOUT).expect("UDP flows");
    let tcp = tcp_connections(lab.client(), target, 60, TIMEOUT).expect("TCP connections");
    assert_eq!(udp.len(), 120);
    assert_eq!(tcp.len(), 60);

    let dist = Distribution::new(&udp, &tcp, target, client_ip);
    println!("{}", dist.table());
    assert_eq!(dist.timeouts(), 0, "{}", dist.table());
    assert!(dist.all_from_vip, "replies must come from {target}");
    assert!(dist.all_saw_client_ip);
    assert!(dist.all_saw_client_port);
    assert_eq!(dist.backends_hit(), 1);
    assert_eq!(dist.per_backend["b1"].udp, 120);
    assert_eq!(dist.per_backend["b1"].tcp, 60);

    // Every UDP flow had its own source port.
    let mut ports: Vec<u16> = udp.iter().map(|r| r.local_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 120);

    // The same flow again, from the same source port.
    let again = udp_flow_from_port(lab.client(), target, udp[0].local_port, TIMEOUT).unwrap();
    assert_eq!(again.backend.as_deref(), Some("b1"));
    assert_eq!(again.local_port, udp[0].local_port);
    assert_eq!(
        again.seen_client,
        Some(SocketAddr::new(client_ip, udp[0].local_port))
    );

    // The server counts a request after it answered it: give the last count a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut stats = servers[0].stats();
    while (stats.udp_requests, stats.tcp_requests) != (121, 60)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        stats = servers[0].stats();
    }
    assert_eq!(stats.udp_requests, 121);
    assert_eq!(stats.tcp_requests, 60);
    assert_eq!(
        stats.clients.iter().copied().collect::<Vec<_>>(),
        [client_ip]
    );
    assert_eq!(servers[1].stats().requests(), 0);

    drop(servers);
    drop(lab);
    assert_gone(&names);
}

#[test]
fn lab_is_configured_for_dsr() {
    root();
    let lab = Lab::new(LabSpec {
        backends: 2,
        ..LabSpec::default()
    })
    .unwrap();
    let vip = lab.vip().to_string();

    let route = lab.client().ip(&["route", "get", &vip]).unwrap();
    assert!(route.contains(&format!("via {}", lab.lb_addr())), "{route}");
    for b in lab.backends() {
        let lo = b.ns.ip(&["-o", "addr", "show", "dev", "lo"]).unwrap();
        assert!(lo.contains(&format!("{vip}/32")), "{lo}");
        assert_eq!(
            b.ns.read_sysctl("net.ipv4.conf.all.arp_ignore").unwrap(),
            "1"
        );
        assert_eq!(
            b.ns.read_sysctl("net.ipv4.conf.all.arp_announce").unwrap(),
            "2"
        );
        assert_eq!(
            b.ns.read_sysctl("net.ipv4.conf.eth0.rp_filter").unwrap(),
            "0"
        );
        let link = b.ns.ip(&["-o", "link", "show", "dev", "eth0"]).unwrap();
        assert!(link.contains(&lb_testkit::lab::fmt_mac(b.mac)), "{link}");
    }
    let lb_link = lab
        .lb()
        .ip(&["-o", "link", "show", "dev", lab.lb_iface()])
        .unwrap();
    assert!(lb_link.contains("02:00:00:00:00:02"), "{lb_link}");
    assert_eq!(lab.lb_mac(), [2, 0, 0, 0, 0, 2]);
    assert_eq!(lab.bridge_peers(), ["c0", "lb0", "b1", "b2"]);
    for peer in lab.bridge_peers() {
        let out = lab
            .bridge_ns()
            .ip(&["-o", "link", "show", "dev", peer])
            .unwrap();
        assert!(out.contains("master br0"), "{out}");
    }

    // The LB forwards nothing by itself, so VIP traffic times out without a data plane.
    let servers: Vec<_> = lab
        .backends()
        .iter()
        .map(|b| EchoServer::start(&b.ns, &b.name, SocketAddr::new(lab.vip().into(), 80)).unwrap())
        .collect();
    let vip_sock = SocketAddr::new(lab.vip().into(), 80);
    let replies = udp_flows(lab.client(), vip_sock, 5, Duration::from_millis(300)).unwrap();
    assert!(replies.iter().all(|r| !r.answered()), "{replies:?}");
    assert!(servers.iter().all(|s| s.stats().requests() == 0));
}

#[test]
fn two_labs_at_once() {
    root();
    let a = Lab::new(LabSpec::default()).unwrap();
    let b = Lab::new(LabSpec {
        backends: 1,
        ..LabSpec::default()
    })
    .unwrap();
    let (names_a, names_b) = (a.netns_names(), b.netns_names());
    assert!(names_a.iter().all(|n| !names_b.contains(n)));

    for lab in [&a, &b] {
        let _servers = echo_on_own_addrs(lab);
        let target = SocketAddr::new(lab.backends()[0].addr.into(), ECHO_PORT);
        let udp = udp_flows(lab.client(), target, 20, TIMEOUT).unwrap();
        let tcp = tcp_connections(lab.client(), target, 5, TIMEOUT).unwrap();
        let dist = Distribution::new(&udp, &tcp, target, lab.client_addr().into());
        assert_eq!(dist.timeouts(), 0, "{}", dist.table());
        assert!(
            dist.all_from_vip && dist.all_saw_client_ip,
            "{}",
            dist.table()
        );
    }
    drop(a);
    assert_gone(&names_a);
    let listed = list_netns().unwrap();
    assert!(
        names_b.iter().all(|n| listed.contains(n)),
        "second lab must survive"
    );
    drop(b);
    assert_gone(&names_b);
}

#[test]
fn lab_is_removed_on_panic() {
    root();
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new(LabSpec {
            backends: 1,
            ..LabSpec::default()
        })
        .unwrap();
        *names.lock().unwrap() = lab.netns_names();
        panic!("test failure while the lab is up");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    assert_gone(&names);
}

#[test]
fn rejects_bad_specs() {
    root();
    for spec in [
        LabSpec {
            backends: 0,
            ..LabSpec::default()
        },
        LabSpec {
            vip: "10.0.0.1".parse().unwrap(),
            ..LabSpec::default()
        },
        LabSpec {
            vip: "198.18.0.11".parse().unwrap(),
            ..LabSpec::default()
        },
    ] {
        assert!(Lab::new(spec.clone()).is_err(), "{spec:?} accepted");
    }
}
