//! End to end: packets per second through a load-balancer network namespace, for `lb_xdp`
//! (via the real agent, native and generic XDP), nftables DNAT with conntrack doing the same
//! balancing (what kube-proxy's nftables mode does), and an XDP_DROP ceiling at the LB's
//! ingress; interleaved, several runs.
//!
//! ```text
//!  gen ns                                   lb ns
//!  lbb-gen 198.18.10.1  ══ veth pair ══  lbb-in 198.18.10.2   (LB program / nft here)
//!  bench_gen (live frames, CPU 0) ──────▶  ingress NAPI thread pinned to CPU 1
//!  bench_sink (native, counts per backend) ◀── forwarded frames (XDP_TX / routed out lbb-in)
//! ```
//!
//! `lb_xdp` forwards with `XDP_TX`, back out of the link a packet came in on, as on a real
//! L2 segment; the three backends (198.18.40.1-3, MACs given) are therefore behind that same
//! link, and the generator's end of it is where the sink counts per backend and drops. The
//! nftables setup routes the backends out of the same link (static neighbours with the
//! backends' MACs), so both do one receive and one transmit on the same veth pair. Only
//! 198.18.0.0/15 is used, only inside the two namespaces, and every window is bounded.

use std::{
    io::Write as _,
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLink},
};
use lb_agent::dataplane::Dataplane;
use lb_common::bench::{
    self, GEN_FRAME_MAX, GenFrame, SINK_BACKEND0, SINK_MALFORMED, SINK_OTHER, SINK_TOTAL,
    SinkConfig,
};
use lb_testkit::{ChildGuard, NetNs, packet::PacketBuilder};

use super::{
    harness::PinDir,
    results::{E2e, E2eRow},
    rss::services_in,
    stats::Summary,
    system,
};

const GEN_IF: &str = "lbb-gen";
const LB_IF: &str = "lbb-in";
const GEN_MAC: [u8; 6] = [0x02, 0, 0, 0x10, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0x10, 0, 0x02];
const CLIENT: [u8; 4] = [198, 18, 20, 1];
const VIP: [u8; 4] = [198, 18, 30, 1];
const PORT: u16 = 5000;
const BACKENDS: usize = 3;
const SPORT_BASE: u16 = 1024;
/// Flow counts: few flows (nftables' best case) and ~64k (distinct source ports).
pub const FLOWS: [u32; 2] = [256, 64_512];
const GEN_CPU: usize = 0;
const LB_CPU: usize = 1;

fn backend_ip(k: usize) -> [u8; 4] {
    [198, 18, 40, 1 + k as u8]
}

fn backend_mac(k: usize) -> [u8; 6] {
    [0x02, 0, 0, 0x40, 0, 1 + k as u8]
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn fmt_ip(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub runs: usize,
    pub warmup: Duration,
    pub window: Duration,
    /// Frames per BPF_PROG_TEST_RUN call of the generator.
    pub repeat: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Ceiling,
    LbNative,
    LbGeneric,
    Nft,
}

impl Setup {
    const ALL: [Setup; 4] = [
        Setup::Ceiling,
        Setup::LbNative,
        Setup::LbGeneric,
        Setup::Nft,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Ceiling => "XDP_DROP ceiling (LB ingress)",
            Setup::LbNative => "lb_xdp (l2), native XDP",
            Setup::LbGeneric => "lb_xdp (l2), generic XDP",
            Setup::Nft => "nftables DNAT, conntrack",
        }
    }
}

/// What is attached to the LB's ingress for one window; dropping it detaches.
enum Attached {
    Ceiling { _link: XdpLink },
    Agent { _child: ChildGuard, pins: PinDir },
    Nft { _link: XdpLink },
}

/// Counter readings at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    at: Option<Instant>,
    sent: u64,
    total: u64,
    other: u64,
    malformed: u64,
    backends: [u64; BACKENDS],
    accepted: u64,
}

struct Lab {
    harness: Ebpf,
    gen_map: Array<MapData, GenFrame>,
    sink: PerCpuArray<MapData, u64>,
    frame: Vec<u8>,
    agent: std::path::PathBuf,
    config: std::path::PathBuf,
    // Dropped last: deleting the namespaces removes the veths and every attachment left.
    _gen_link: XdpLink,
    lb: NetNs,
    generator: NetNs,
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?)
}

/// Attach `prog` to `iface` inside `ns` and take ownership of the link.
fn attach_in(ns: &NetNs, prog: &mut Xdp, iface: &str, mode: XdpMode) -> anyhow::Result<XdpLink> {
    let id = ns
        .enter(|| prog.attach(iface, mode))?
        .with_context(|| format!("attaching to {iface} in {}", ns.name()))?;
    Ok(prog.take_link(id)?)
}

fn template() -> Vec<u8> {
    let payload = [0u8; 64 - 42];
    let mut f = PacketBuilder::new()
        .eth(GEN_MAC, LB_MAC)
        .ipv4(CLIENT.into(), VIP.into())
        .udp(SPORT_BASE, PORT, &payload)
        .build();
    // No UDP checksum (allowed for IPv4): the generator changes the source port per frame.
    f[40] = 0;
    f[41] = 0;
    f
}

impl Lab {
    fn new(harness_object: &Path, agent: &Path) -> anyhow::Result<Lab> {
        let generator = NetNs::new("lbbg").context("creating the generator namespace")?;
        let lb = NetNs::new("lbbl").context("creating the LB namespace")?;
        // No IPv6 on these links: its neighbour discovery would reach the sink.
        for ns in [&generator, &lb] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        generator.ip(&[
            "link",
            "add",
            GEN_IF,
            "address",
            &fmt_mac(GEN_MAC),
            "type",
            "veth",
            "peer",
            "name",
            LB_IF,
            "address",
            &fmt_mac(LB_MAC),
            "netns",
            lb.name(),
        ])?;
        generator.ip(&["addr", "add", "198.18.10.1/24", "dev", GEN_IF])?;
        generator.ip(&["link", "set", GEN_IF, "up"])?;
        lb.ip(&["addr", "add", "198.18.10.2/24", "dev", LB_IF])?;
        lb.ip(&["link", "set", LB_IF, "up"])?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        for dev in ["all", "default", LB_IF] {
            lb.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            lb.sysctl(&format!("net.ipv4.conf.{dev}.send_redirects"), "0")?;
        }
        lb.ip(&["route", "add", "198.18.20.0/24", "via", "198.18.10.1"])?;
        lb.ip(&["route", "add", "198.18.40.0/24", "dev", LB_IF])?;
        for k in 0..BACKENDS {
            lb.ip(&[
                "neigh",
                "add",
                &fmt_ip(backend_ip(k)),
                "lladdr",
                &fmt_mac(backend_mac(k)),
                "dev",
                LB_IF,
                "nud",
                "permanent",
            ])?;
        }
        // Frames sent into a veth need NAPI on the receiving side; with a native program it
        // is there anyway, with generic XDP only through GRO.
        lb.exec(&["ethtool", "-K", LB_IF, "gro", "on"])?;
        lb.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{LB_IF}/threaded"),
        ])?;

        let mut harness = EbpfLoader::new()
            .load_file(harness_object)
            .with_context(|| format!("loading {}", harness_object.display()))?;
        for name in [bench::PROG_GEN, bench::PROG_SINK, bench::PROG_PASS] {
            xdp(&mut harness, name)?.load()?;
        }
        let mut cfg = Array::<MapData, SinkConfig>::try_from(
            harness
                .take_map(bench::SINK_CFG)
                .context("sink config map")?,
        )?;
        let mut sc = SinkConfig {
            vip_be: VIP,
            port_be: PORT.to_be(),
            backends: BACKENDS as u8,
            ..SinkConfig::default()
        };
        for k in 0..BACKENDS {
            sc.backend_ip_be[k] = backend_ip(k);
            sc.backend_mac[k] = backend_mac(k);
        }
        cfg.set(0, sc, 0)?;
        let gen_map = Array::try_from(harness.take_map(bench::GEN).context("generator map")?)?;
        let sink = PerCpuArray::try_from(harness.take_map(bench::SINK).context("sink map")?)?;
        let gen_link = attach_in(
            &generator,
            xdp(&mut harness, bench::PROG_SINK)?,
            GEN_IF,
            XdpMode::Driver,
        )
        .context("the sink (native XDP on the generator's veth)")?;

        let config = std::env::temp_dir().join(format!("lb-bench-e2e-{}.yaml", std::process::id()));
        let mut y = format!(
            "interface: {LB_IF}\nicmp_echo: false\nservices:\n  - name: e2e\n    vip: \"{}\"\n    \
             port: {PORT}\n    protocol: udp\n    forwarding: l2\n    backends:\n",
            fmt_ip(VIP)
        );
        for k in 0..BACKENDS {
            y.push_str(&format!(
                "      - {{address: \"{}\", mac: \"{}\"}}\n",
                fmt_ip(backend_ip(k)),
                fmt_mac(backend_mac(k))
            ));
        }
        std::fs::write(&config, y)?;
        Ok(Lab {
            harness,
            gen_map,
            sink,
            frame: template(),
            agent: agent.to_path_buf(),
            config,
            _gen_link: gen_link,
            lb,
            generator,
        })
    }

    fn attach(&mut self, setup: Setup) -> anyhow::Result<Attached> {
        let attached = match setup {
            Setup::Ceiling => Attached::Ceiling {
                _link: attach_in(
                    &self.lb,
                    xdp(&mut self.harness, bench::PROG_SINK)?,
                    LB_IF,
                    XdpMode::Driver,
                )?,
            },
            Setup::Nft => {
                let rules = nft_rules();
                let mut child = self
                    .lb
                    .command("nft")
                    .args(["-f", "-"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .context("running nft")?;
                child
                    .stdin
                    .take()
                    .context("nft stdin")?
                    .write_all(rules.as_bytes())?;
                ensure!(child.wait()?.success(), "nft -f failed on:\n{rules}");
                Attached::Nft {
                    _link: attach_in(
                        &self.lb,
                        xdp(&mut self.harness, bench::PROG_PASS)?,
                        LB_IF,
                        XdpMode::Driver,
                    )?,
                }
            }
            Setup::LbNative | Setup::LbGeneric => {
                let pins = PinDir::new("e2e");
                let mode = if setup == Setup::LbNative {
                    "native"
                } else {
                    "skb"
                };
                let mut child = ChildGuard::spawn(
                    self.lb
                        .command(&self.agent)
                        .args(["run", "--config"])
                        .arg(&self.config)
                        .args(["--interface", LB_IF, "--xdp-mode", mode, "--pin-path"])
                        .arg(pins.path())
                        .args(["--flow-table-size", "65536", "--maglev-slots", "65537"])
                        .env("RUST_LOG", "warn")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                )?;
                let start = Instant::now();
                while services_in(pins.path()) != Some(1) {
                    if let Some(status) = child.try_wait()? {
                        bail!("lb-agent exited ({status})");
                    }
                    ensure!(
                        start.elapsed() < Duration::from_secs(30),
                        "lb-agent did not program its service within 30 s"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Attached::Agent {
                    _child: child,
                    pins,
                }
            }
        };
        pin_napi_threads(LB_IF, LB_CPU)?;
        Ok(attached)
    }

    fn read(&self, attached: &Attached) -> anyhow::Result<Counters> {
        let sum =
            |slot: u32| -> anyhow::Result<u64> { Ok(self.sink.get(&slot, 0)?.iter().sum::<u64>()) };
        let mut c = Counters {
            at: Some(Instant::now()),
            sent: self.gen_map.get(&0, 0)?.sent,
            total: sum(SINK_TOTAL)?,
            other: sum(SINK_OTHER)?,
            malformed: sum(SINK_MALFORMED)?,
            ..Counters::default()
        };
        for k in 0..BACKENDS {
            c.backends[k] = sum(SINK_BACKEND0 + k as u32)?;
        }
        c.accepted = match attached {
            Attached::Ceiling { .. } => c.total,
            Attached::Agent { pins, .. } => {
                let stats = Dataplane::open_pinned(pins.path())?.stats([], [])?;
                stats.reasons.iter().map(|(_, n)| n.packets).sum()
            }
            Attached::Nft { .. } => nft_counter(&self.lb)?,
        };
        Ok(c)
    }

    /// One measurement window: generator running on CPU 0, counters read after the warm-up
    /// and at the end of the window.
    fn window(
        &mut self,
        setup: Setup,
        flows: u32,
        s: &Settings,
    ) -> anyhow::Result<(Counters, Counters)> {
        let mut g = GenFrame {
            len: self.frame.len() as u32,
            flows,
            sport_base: SPORT_BASE,
            _pad: [0; 6],
            sent: 0,
            bytes: [0; GEN_FRAME_MAX],
        };
        g.bytes[..self.frame.len()].copy_from_slice(&self.frame);
        self.gen_map.set(0, g, 0)?;
        let attached = self.attach(setup)?;
        let stop = AtomicBool::new(false);
        let gen_prog: &Xdp = self
            .harness
            .program(bench::PROG_GEN)
            .context("generator program")?
            .try_into()?;
        let netns = std::fs::File::open(self.generator.path())?;
        let frame = self.frame.clone();
        let result = std::thread::scope(|scope| {
            let generator = scope.spawn(|| generate(gen_prog, &netns, &frame, s.repeat, &stop));
            let measured = (|| {
                std::thread::sleep(s.warmup);
                let a = self.read(&attached)?;
                std::thread::sleep(s.window);
                let b = self.read(&attached)?;
                Ok::<_, anyhow::Error>((a, b))
            })();
            stop.store(true, Ordering::SeqCst);
            let generated = generator
                .join()
                .map_err(|_| anyhow::anyhow!("generator thread panicked"))?;
            generated?;
            measured
        });
        drop(attached);
        result
    }
}

/// The generator thread: enter the generator's namespace, pin to CPU 0, and send frames in
/// long live-frames calls until told to stop.
fn generate(
    prog: &Xdp,
    netns: &std::fs::File,
    frame: &[u8],
    repeat: u32,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    // SAFETY: setns on an open namespace file affects only this thread.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("entering the generator namespace");
    }
    system::pin_to_cpu(GEN_CPU)?;
    let name = std::ffi::CString::new(GEN_IF)?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(
        ifindex != 0,
        "{GEN_IF} not found in the generator namespace"
    );
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
        prog.test_run(opts)
            .context("live-frames BPF_PROG_TEST_RUN")?;
    }
    Ok(())
}

fn nft_rules() -> String {
    let map: Vec<String> = (0..BACKENDS)
        .map(|k| format!("{k} : {}", fmt_ip(backend_ip(k))))
        .collect();
    format!(
        "table ip lbbench {{\n\
         \x20 chain count {{ type filter hook prerouting priority raw; policy accept;\n\
         \x20   ip daddr {vip} udp dport {PORT} counter\n  }}\n\
         \x20 chain balance {{ type nat hook prerouting priority dstnat; policy accept;\n\
         \x20   ip daddr {vip} udp dport {PORT} dnat to numgen random mod {BACKENDS} map {{ {} }}\n  }}\n\
         }}\n",
        map.join(", "),
        vip = fmt_ip(VIP)
    )
}

/// Packets the nftables counter (prerouting, before conntrack) has seen.
fn nft_counter(lb: &NetNs) -> anyhow::Result<u64> {
    let out = lb.exec(&["nft", "list", "chain", "ip", "lbbench", "count"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no counter in `nft list chain ip lbbench count`")
}

/// Pin every NAPI kthread of `iface` (`napi/IFACE-ID`) to `cpu`.
fn pin_napi_threads(iface: &str, cpu: usize) -> anyhow::Result<()> {
    let prefix = format!("napi/{iface}-");
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(&prefix[..prefix.len().min(15)]) {
            continue;
        }
        let status = Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "taskset on NAPI thread {pid}");
        pinned += 1;
    }
    ensure!(
        pinned > 0,
        "no NAPI thread for {iface} (threaded NAPI not active)"
    );
    Ok(())
}

/// Rates of one window.
struct Window {
    run: usize,
    setup: Setup,
    flows: u32,
    offered: f64,
    accepted: f64,
    delivered: f64,
    per_backend: [u64; BACKENDS],
    bad: u64,
}

fn rates(run: usize, setup: Setup, flows: u32, a: &Counters, b: &Counters) -> Window {
    let secs = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64().max(1e-9),
        _ => f64::NAN,
    };
    let per_backend: [u64; BACKENDS] = std::array::from_fn(|k| b.backends[k] - a.backends[k]);
    Window {
        run,
        setup,
        flows,
        offered: (b.sent - a.sent) as f64 / secs,
        accepted: (b.accepted - a.accepted) as f64 / secs,
        delivered: per_backend.iter().sum::<u64>() as f64 / secs,
        per_backend,
        bad: (b.malformed - a.malformed) + (b.other - a.other),
    }
}

pub fn run(
    harness_object: &Path,
    agent: &Path,
    s: Settings,
    stop: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<E2e> {
    let mut lab = Lab::new(harness_object, agent)?;
    let result = measure(&mut lab, &s, stop);
    let _ = std::fs::remove_file(&lab.config);
    let windows = result?;
    let mut out = E2e {
        method: METHOD.into(),
        ..E2e::default()
    };
    for flows in FLOWS {
        for setup in Setup::ALL {
            let ws: Vec<&Window> = windows
                .iter()
                .filter(|w| w.setup == setup && w.flows == flows)
                .collect();
            // Ratio to nftables within each run (the two windows ran minutes apart at most),
            // then the median over runs.
            let ratios: Vec<f64> = ws
                .iter()
                .filter_map(|w| {
                    let nft = windows
                        .iter()
                        .find(|n| n.setup == Setup::Nft && n.flows == flows && n.run == w.run)?;
                    (nft.delivered > 0.0).then(|| w.delivered / nft.delivered)
                })
                .collect();
            let col = |f: &dyn Fn(&Window) -> f64| {
                Summary::of(&ws.iter().map(|w| f(w)).collect::<Vec<_>>())
            };
            let (Some(offered), Some(accepted), Some(delivered)) = (
                col(&|w| w.offered),
                col(&|w| w.accepted),
                col(&|w| w.delivered),
            ) else {
                continue;
            };
            let ceiling = setup == Setup::Ceiling;
            let sinks_hit = (0..BACKENDS)
                .filter(|&k| ws.iter().all(|w| w.per_backend[k] > 0))
                .count();
            let bad: u64 = ws.iter().map(|w| w.bad).sum();
            let checks = if ceiling {
                "dropped at the LB ingress by design".to_string()
            } else if sinks_hit == BACKENDS && bad == 0 {
                "every backend got traffic in every run; no malformed or unbalanced frame".into()
            } else {
                format!(
                    "{sinks_hit}/{BACKENDS} backends hit in every run; {bad} malformed or unbalanced frames"
                )
            };
            out.rows.push(E2eRow {
                setup: setup.name().into(),
                flows: flows as usize,
                offered,
                accepted,
                delivered,
                vs_nft: if ceiling {
                    None
                } else {
                    Summary::of(&ratios).map(|r| r.median)
                },
                checks,
            });
        }
    }
    Ok(out)
}

fn measure(
    lab: &mut Lab,
    s: &Settings,
    stop: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Window>> {
    let mut windows = Vec::new();
    for run in 0..s.runs {
        for flows in FLOWS {
            for setup in Setup::ALL {
                stop()?;
                let (a, b) = lab
                    .window(setup, flows, s)
                    .with_context(|| format!("{} with {flows} flows", setup.name()))?;
                let w = rates(run, setup, flows, &a, &b);
                eprintln!(
                    "e2e: run {}/{} {:<36} {flows:>6} flows: offered {:>9.0} accepted {:>9.0} delivered {:>9.0} pps, frames per backend {:?}",
                    run + 1,
                    s.runs,
                    setup.name(),
                    w.offered,
                    w.accepted,
                    w.delivered,
                    w.per_backend
                );
                windows.push(w);
            }
        }
    }
    Ok(windows)
}

const METHOD: &str = "Two namespaces joined by one veth pair (no bridge): the generator's end \
runs `bench_gen` with BPF_PROG_TEST_RUN live frames (XDP_TX out of its veth) on CPU 0, in long \
calls, rewriting the whole 64-byte UDP frame each time (recycled pages keep what the LB wrote) \
and cycling the source port over the flow count; the LB's ingress veth uses threaded NAPI, its \
thread pinned to CPU 1. `lb_xdp` runs through the real agent (`lb-agent run`, L2 forwarding, 3 \
backends with given MACs) and sends with XDP_TX back out of the same link, as on an L2 segment; \
nftables (`numgen random mod 3` DNAT in prerouting, conntrack, forwarding) routes the backends \
out of the same link too (static neighbours), with an XDP_PASS program on the ingress so the \
veth receives the generator's frames. The generator's veth carries `bench_sink` (native): it \
counts frames per backend (by destination address for NAT, by destination MAC with the VIP still \
as destination for L2 DSR), counts malformed or unbalanced frames, and drops. Offered = frames \
generated, accepted = frames the LB saw (lb_xdp's reason counters, an nftables counter before \
conntrack, the ceiling's own count), delivered = well-formed frames at a backend. Rates over a \
steady window after a warm-up; setups and flow counts interleaved, median over runs; *vs \
nftables* is the median over runs of the ratio to nftables within the same run. IPv6 is off \
on both links. The generator offers more than one CPU can forward, so the frames the LB \
cannot take are dropped at its veth's receive ring: *delivered* is the saturation rate. On a \
2-vCPU VM shared with other work, and with softirq work of both veths landing on CPU 1, these \
are relative figures for this machine only.";
