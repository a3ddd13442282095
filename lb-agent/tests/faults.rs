//! Faults under traffic, in network namespaces with the real agent binary and XDP program
//! (static mode; the Kubernetes-mode outage is in `k8s_watch.rs`): while UDP flows run
//! without pause and TCP connections stay open, the agent is killed with SIGKILL and
//! restarted, and is sent SIGHUP with a broken file. Every UDP flow is counted; no flow and
//! no connection may be lost or moved, and the restarted agent must adopt the maps without a
//! single write. A backend node that disappears (its next hop stops answering ARP) loses its
//! share to the other backends within seconds, and no other flow moves. Needs root.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use lb_testkit::{
    Lab, LabSpec, Scenario, ScenarioSpec, TcpSession, require_root, udp_flow_from_port, udp_flows,
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on every wait for the agent.
const WAIT: Duration = Duration::from_secs(20);

fn spec() -> ScenarioSpec {
    ScenarioSpec::new(env!("CARGO_BIN_EXE_lb-agent"), "ipip")
}

/// Wait until the current agent's log contains `line`.
fn wait_log(sc: &Scenario, line: &str) {
    let deadline = Instant::now() + WAIT;
    while !sc.agent_log_text().contains(line) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {line:?} in the agent log:\n{}",
            sc.agent_log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the current agent's log contains `line` once more than it does now.
fn wait_log_more(sc: &Scenario, line: &str) {
    let count = |sc: &Scenario| sc.agent_log_text().matches(line).count();
    let (was, deadline) = (count(sc), Instant::now() + Duration::from_secs(40));
    while count(sc) == was {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for another {line:?} in the agent log:\n{}",
            sc.agent_log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every connection still reaches the backend it first reached.
fn assert_unmoved(step: &str, sessions: &mut [(TcpSession, String)]) {
    for (s, before) in sessions.iter_mut() {
        let now = s
            .request()
            .unwrap_or_else(|e| panic!("{step}: the connection to {before} broke: {e:#}"));
        assert_eq!(
            &now, before,
            "{step}: connection from port {} moved",
            s.local_port
        );
    }
}

/// The services and their backends as `lb-agent status` shows them (counters left out).
fn programmed(sc: &Scenario) -> Vec<(String, Vec<String>)> {
    let status = sc.status_json().expect("lb-agent status");
    let mut out: Vec<(String, Vec<String>)> = status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|svc| {
            let mut backends: Vec<String> = svc["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["address"].as_str().map(String::from))
                .collect();
            backends.sort();
            (svc["address"].to_string(), backends)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn sigkill_restart_and_a_broken_reload_lose_no_flow_under_traffic() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let mut sc = Scenario::start(&lab, spec()).unwrap();
    let vip = sc.vip();
    let mut sessions = TcpSession::open_many(lab.client(), vip, 30, TIMEOUT).unwrap();
    let before = programmed(&sc);
    assert_eq!(before.len(), 2, "{before:?}");

    let stop = AtomicBool::new(false);
    let (sent, lost) = thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut sent, mut lost) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let replies = udp_flows(lab.client(), vip, 10, TIMEOUT).unwrap();
                sent += replies.len();
                lost += replies.iter().filter(|r| !r.answered()).count();
            }
            (sent, lost)
        });
        thread::sleep(Duration::from_millis(300));

        // 1. SIGKILL: nothing is cleaned up; the pinned link keeps the program forwarding.
        let status = sc.kill_agent().unwrap();
        assert!(!status.success(), "killed: {status}");
        thread::sleep(Duration::from_secs(1));
        assert_unmoved("with no agent after SIGKILL", &mut sessions);
        sc.start_agent(&lab).unwrap();
        wait_log(&sc, "initial sync done");
        let log = sc.agent_log_text();
        assert!(
            log.contains("adopted=true"),
            "adopts the pinned link:\n{log}"
        );
        assert!(
            log.contains("initial sync done writes=0"),
            "the restarted agent adopts the maps without a write:\n{log}"
        );
        assert_unmoved("after the restart", &mut sessions);
        assert_eq!(programmed(&sc), before, "after the restart");

        // 2. SIGHUP with a broken file: rejected, nothing changes.
        let good = std::fs::read_to_string(sc.config_path()).unwrap();
        std::fs::write(sc.config_path(), "services: [\n  - name: half-written\n").unwrap();
        sc.hup_agent().unwrap();
        wait_log(&sc, "reload rejected; nothing changed");
        thread::sleep(Duration::from_millis(500));
        assert_eq!(programmed(&sc), before, "after the broken reload");
        assert_unmoved("after the broken reload", &mut sessions);
        // The file fixed again: the reload finds nothing to write.
        std::fs::write(sc.config_path(), good).unwrap();
        sc.hup_agent().unwrap();
        wait_log(&sc, "config reloaded writes=0");
        assert_unmoved("after the good reload", &mut sessions);

        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        traffic.join().unwrap()
    });
    println!("UDP flows during the faults: {sent} sent, {lost} lost");
    assert!(sent >= 100, "traffic kept flowing: {sent} flows");
    assert_eq!(lost, 0, "{lost} of {sent} UDP flows lost");
}

/// The backend answering a UDP flow from each of `ports` (`None`: no answer).
fn udp_backends(lab: &Lab, sc: &Scenario, ports: &[u16]) -> Vec<Option<String>> {
    ports
        .iter()
        .map(|&p| {
            udp_flow_from_port(lab.client(), sc.vip(), p, TIMEOUT)
                .unwrap()
                .backend
        })
        .collect()
}

fn fallback_count(sc: &Scenario) -> u64 {
    let status = sc.status_json().expect("lb-agent status");
    status["reasons"]["fallback_unreachable"]["packets"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_backend_node_that_disappears_loses_its_flows_to_the_others_and_no_other_flow_moves() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    // Short neighbour timers on the load balancer, so a silent next hop fails in seconds
    // (the kernel's defaults: 15-45 s reachable, 5 s before the first probe, 3 probes 1 s
    // apart). The agent re-verifies stale next hops at every sync (2 s here).
    let iface = lab.lb_iface();
    for (key, value) in [
        ("base_reachable_time_ms", "1000"),
        ("delay_first_probe_time", "1"),
        ("retrans_time_ms", "300"),
    ] {
        lab.lb()
            .sysctl(&format!("net.ipv4.neigh.{iface}.{key}"), value)
            .unwrap();
    }
    let sc = Scenario::start(&lab, spec()).unwrap();
    let vip = sc.vip();
    let gone = &lab.backends()[1];

    let ports: Vec<u16> = (41000..41090).collect();
    let before = udp_backends(&lab, &sc, &ports);
    assert!(
        before.iter().all(Option::is_some),
        "every flow answered: {before:?}"
    );
    let on_gone = before
        .iter()
        .filter(|b| b.as_deref() == Some(gone.name.as_str()))
        .count();
    assert!(
        on_gone >= 10,
        "{on_gone} of {} flows on {}",
        ports.len(),
        gone.name
    );
    let mut sessions = TcpSession::open_many(lab.client(), vip, 30, TIMEOUT).unwrap();
    // The connections to the node that goes cannot survive; all others must.
    sessions.retain(|(_, b)| b != &gone.name);
    assert!(
        sessions.len() >= 10,
        "{} connections elsewhere",
        sessions.len()
    );
    let fallback_before = fallback_count(&sc);

    // The node goes: its port on the segment is down, nothing answers for it any more.
    let staying: Vec<u16> = ports
        .iter()
        .zip(&before)
        .filter(|(_, b)| b.as_deref() != Some(gone.name.as_str()))
        .map(|(p, _)| *p)
        .collect();
    let stop = AtomicBool::new(false);
    let (sent, lost, detected) = thread::scope(|s| {
        let traffic = s.spawn(|| {
            // The flows of the remaining backends, again and again: none may be lost.
            let (mut sent, mut lost) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                for &p in &staying {
                    let r = udp_flow_from_port(lab.client(), vip, p, TIMEOUT).unwrap();
                    sent += 1;
                    lost += usize::from(!r.answered());
                }
            }
            (sent, lost)
        });
        let t0 = Instant::now();
        lab.bridge_ns()
            .ip(&["link", "set", &gone.peer, "down"])
            .unwrap();
        wait_log_more(&sc, "backend next hop unreachable");
        let detected = t0.elapsed();
        stop.store(true, Ordering::SeqCst);
        let (sent, lost) = traffic.join().unwrap();
        (sent, lost, detected)
    });
    println!(
        "backend node gone: detected in {:.1} s; meanwhile {sent} UDP flows to the other \
         backends, {lost} lost",
        detected.as_secs_f64()
    );
    assert!(sent >= 100, "traffic kept flowing: {sent}");
    assert_eq!(lost, 0, "{lost} of {sent} flows to the other backends lost");

    let after = udp_backends(&lab, &sc, &ports);
    for ((port, was), now) in ports.iter().zip(&before).zip(&after) {
        let now = now
            .as_deref()
            .unwrap_or_else(|| panic!("flow from port {port} unanswered after the node went"));
        if was.as_deref() == Some(gone.name.as_str()) {
            assert_ne!(now, gone.name, "port {port}");
        } else {
            assert_eq!(Some(now), was.as_deref(), "flow from port {port} moved");
        }
    }
    assert_unmoved("after the node went", &mut sessions);
    let fell_back = fallback_count(&sc) - fallback_before;
    assert!(
        fell_back >= on_gone as u64,
        "fallback_unreachable counted {fell_back}, at least {on_gone} expected"
    );

    // It comes back: its flows return to it (UDP is not remembered), the others stay.
    lab.bridge_ns()
        .ip(&["link", "set", &gone.peer, "up"])
        .unwrap();
    wait_log_more(&sc, "backend next hop resolved");
    lb_testkit::lab::wait_ports_forwarding(lab.bridge_ns(), &[gone.peer.as_str()]).unwrap();
    assert_eq!(udp_backends(&lab, &sc, &ports), before, "back as before");
    assert_unmoved("after the node came back", &mut sessions);
}
