//! `cargo xtask demo`: the load balancer on real traffic, in network namespaces, no cluster.
//!
//! A client, a load-balancer node and three backends share a bridge (198.18.0.0/24). The
//! backends run the decap program and an echo server that answers with its name and the
//! client address it saw; the client sends 300 UDP flows and 100 TCP connections to the VIP,
//! once with IPIP and once with L2 forwarding. The client has no route to the VIP: the LB
//! announces it (answers ARP from XDP; `--announce route` uses a static route instead).
//! Everything is removed at the end, on failure,
//! and on Ctrl-C.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use lb_ebpf_build::workspace_root;
use lb_testkit::{Distribution, Lab, LabSpec, Scenario, ScenarioSpec, tcp_connections, udp_flows};

use crate::util::{cargo, require_root, sh};

#[derive(clap::Args)]
pub struct Options {
    /// UDP flows (distinct source ports) per mode.
    #[arg(long, default_value_t = 300)]
    flows: usize,
    /// TCP connections per mode.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// XDP attach mode for the load balancer and decap programs.
    #[arg(long, default_value = "skb")]
    xdp_mode: String,
    /// How the client reaches the VIP: `l2` (the LB answers ARP for it from XDP; the client
    /// has no route) or `route` (a static route via the LB, no announcement).
    #[arg(long, default_value = "l2", value_parser = ["l2", "route"])]
    announce: String,
}

fn check(stop: &AtomicBool) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("cargo xtask demo")?;
    crate::setup::ensure()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    // Every resource lives in a guard inside `demo`, so it is gone when this returns.
    let result = demo(opts, &stop);
    if result.is_err() && stop.load(Ordering::SeqCst) {
        bail!("interrupted; namespaces, programs and pins were removed");
    }
    result
}

fn demo(opts: &Options, stop: &AtomicBool) -> anyhow::Result<()> {
    eprintln!("demo: building lb-agent (and the XDP object)");
    sh(cargo().args(["build", "--package", "lb-agent"]))?;
    let agent_bin: PathBuf = workspace_root().join("target/debug/lb-agent");

    let l2 = opts.announce == "l2";
    let lab = Lab::new(LabSpec {
        vip_route: !l2,
        ..LabSpec::default()
    })
    .context("creating the network namespaces")?;
    println!(
        "\nlab: client {} -> VIP {} on LB {} -> backends {}",
        lab.client_addr(),
        lab.vip(),
        lab.lb_addr(),
        lab.backends()
            .iter()
            .map(|b| format!("{} ({})", b.name, b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut all_ok = true;
    for forwarding in ["ipip", "l2"] {
        check(stop)?;
        let spec = ScenarioSpec {
            xdp_mode: opts.xdp_mode.clone(),
            announce: l2.then(|| "l2".to_string()),
            ..ScenarioSpec::new(agent_bin.clone(), forwarding)
        };
        let mut sc = Scenario::start(&lab, spec)
            .with_context(|| format!("starting the {forwarding} load balancer"))?;
        check(stop)?;
        let udp = udp_flows(lab.client(), sc.vip(), opts.flows, Duration::from_secs(2))?;
        check(stop)?;
        let tcp = tcp_connections(
            lab.client(),
            sc.vip(),
            opts.connections,
            Duration::from_secs(2),
        )?;
        let d = Distribution::new(&udp, &tcp, sc.vip(), lab.client_addr().into());
        println!(
            "\n== forwarding: {forwarding} ({} UDP flows, {} TCP connections to {}) ==",
            opts.flows,
            opts.connections,
            sc.vip()
        );
        println!("{}", d.table());
        if l2 {
            let neigh = lab
                .client()
                .ip(&["neigh", "show", &sc.vip().ip().to_string(), "dev", "eth0"])
                .unwrap_or_default();
            println!(
                "client reached the VIP by ARP (no route): neighbour entry {} (the LB's MAC is {})",
                neigh.trim(),
                lb_testkit::lab::fmt_mac(lab.lb_mac())
            );
        }
        let ok = d.timeouts() == 0
            && d.backends_hit() == lab.backends().len()
            && d.all_from_vip
            && d.all_saw_client_ip;
        println!(
            "every backend used: {}   replies straight from the VIP (DSR): {}   real client IP seen by every backend: {}",
            yes(d.backends_hit() == lab.backends().len()),
            yes(d.all_from_vip),
            yes(d.all_saw_client_ip)
        );
        let status = std::process::Command::new(&agent_bin)
            .args(["status", "--pin-path"])
            .arg(sc.pin_dir())
            .output()
            .context("running lb-agent status")?;
        println!(
            "\n$ lb-agent status\n{}",
            String::from_utf8_lossy(&status.stdout)
        );
        if !ok {
            all_ok = false;
            eprintln!("agent log:\n{}", sc.agent_log_text());
        }
        sc.stop_agent()?;
    }
    drop(lab);
    println!("cleaned up: namespaces, programs and pins removed");
    if !all_ok {
        bail!("the demo did not balance every flow as expected (see above)");
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}
