//! Command line (clap derive).

use std::{net::SocketAddr, path::PathBuf};

use clap::{ArgAction, ArgGroup, Args, Parser, Subcommand};

use crate::{
    ipam::DEFAULT_LEASE_NAME,
    k8s::watch::{DEFAULT_CONFIG_MAP, DEFAULT_NAMESPACE},
    loader::{AttachMode, DEFAULT_PIN_PATH},
};

#[derive(Debug, Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "XDP layer-4 load balancer agent (DSR)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the load balancer, keep its maps in sync with the config (a file, or
    /// the Kubernetes API with --kubernetes), run until SIGTERM/SIGINT. SIGHUP re-reads the
    /// config file and applies the difference.
    Run(RunArgs),
    /// Remove the pinned link(s) a `run --keep-attached` left behind (detaches the program).
    Detach(DetachArgs),
    /// Attach the backend-side decapsulation program to an interface until SIGTERM/SIGINT.
    Decap(DecapArgs),
    /// Show services, backends and counters from the pinned maps.
    Status(StatusArgs),
    /// Run the real data plane on one synthesized packet against the live (pinned) maps and
    /// show what it did: action, reason, backend, encapsulation.
    #[command(long_about = TRACE_ABOUT)]
    Trace(TraceArgs),
}

const TRACE_ABOUT: &str = "\
Run the real data plane on one synthesized packet and show what it did.

Loads this binary's lb_xdp program against the maps a running (or kept-attached) agent
pinned under --pin-path, without attaching it, and runs it once with BPF_PROG_TEST_RUN on
an Ethernet frame to the node's MAC: UDP with a short payload, or a TCP ACK (a SYN with
--syn). Prints the action (PASS/DROP/TX), the reason counter that moved, the backend the
frame went to, the encapsulation applied (outer addresses or new MACs) and the output length.

Side effects: the program runs against the live maps, so
  - the synthetic packet is counted in the live counters (reasons, service, backend);
  - for a flow-tracked service a trace without --syn follows the flow entry of its 5-tuple,
    or creates the entry the real first packet of that flow would create;
  - a --syn trace takes a fresh Maglev decision and overwrites the flow entry of that
    5-tuple (a live connection with the same 5-tuple could move): that is why it is opt-in.
Use a source address and port no real client uses.";

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("source")
        .required(true)
        .multiple(false)
        .args(["config", "kubernetes"])
))]
pub struct RunArgs {
    /// Static configuration file (YAML); SIGHUP re-reads it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Take the desired state from the Kubernetes API instead: Services, EndpointSlices,
    /// Nodes and the agent's ConfigMap, applied as they change.
    #[arg(long)]
    pub kubernetes: bool,
    #[command(flatten)]
    pub cluster: KubernetesArgs,
    /// Interface to attach to (overrides `interface` in the config).
    #[arg(long, short)]
    pub interface: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: AttachMode,
    /// Directory on bpffs for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// On exit, leave program, link and maps in place for the next agent to adopt.
    #[arg(long)]
    pub keep_attached: bool,
    /// Capacity of the Maglev slot array when it is created (8 bytes per slot in the kernel).
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_MAGLEV_SLOTS)]
    pub maglev_slots: u32,
    /// IPv4 flow-table entries (all CPUs together) when the table is created, the IPv6 table
    /// a quarter of it; overrides `flow_table.size` in the config (default 1048576).
    #[arg(long)]
    pub flow_table_size: Option<u32>,
    /// Seconds between re-resolving backend MAC addresses.
    #[arg(long, default_value_t = 10)]
    pub resync_interval: u64,
    /// Keep this JSON file equal to the VIPs this node should announce and their route
    /// weights (the number of local endpoints for `externalTrafficPolicy: Local`), for the
    /// routing daemon that announces them with weighted ECMP (README: "Announcing VIPs").
    #[arg(long)]
    pub announce_file: Option<PathBuf>,
    /// On a clean stop with `announce: l2` or `bgp`: after handing the VIPs over (L2) or
    /// withdrawing the routes (BGP), keep forwarding this long (milliseconds) while clients
    /// and routers move to the other nodes, then detach.
    #[arg(long, default_value_t = 2000)]
    pub handover_ms: u64,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`) over
    /// HTTP on this address, e.g. `127.0.0.1:9740` (default: not served).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_address: Option<SocketAddr>,
}

/// Settings of `run --kubernetes`. The API server and credentials come from `KUBECONFIG`
/// (or `~/.kube/config`), else from the pod's service account.
#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// This node's name, as in its Node object (`externalTrafficPolicy: Local` keeps only
    /// this node's endpoints).
    #[arg(
        long,
        env = "NODE_NAME",
        required_if_eq("kubernetes", "true"),
        help_heading = "Kubernetes mode"
    )]
    pub node_name: Option<String>,
    /// Namespace of the agent's ConfigMap and of the IPAM Lease.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = DEFAULT_NAMESPACE,
        help_heading = "Kubernetes mode"
    )]
    pub namespace: String,
    /// The agent's ConfigMap (key `config.yaml`); when it does not exist, the defaults apply.
    #[arg(
        long,
        default_value = DEFAULT_CONFIG_MAP,
        help_heading = "Kubernetes mode"
    )]
    pub config_map: String,
    /// Also run the IPAM controller: give `type: LoadBalancer` Services of our class addresses
    /// from the IPAddressPool resources and write `status.loadBalancer.ingress` (one agent,
    /// elected with a Lease, writes). `--ipam=false` leaves addresses to another controller.
    #[arg(
        long,
        default_value_t = true,
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_name = "BOOL",
        help_heading = "Kubernetes mode"
    )]
    pub ipam: bool,
    /// The Lease (in --namespace) the agents elect the IPAM writer with; holderIdentity is
    /// the node name.
    #[arg(
        long,
        default_value = DEFAULT_LEASE_NAME,
        help_heading = "Kubernetes mode"
    )]
    pub ipam_lease: String,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Only this interface's link (default: every link under the pin path).
    #[arg(long, short)]
    pub interface: Option<String>,
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Also remove the pinned maps (counters and state are lost).
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Args)]
pub struct DecapArgs {
    #[arg(long, short)]
    pub interface: String,
    /// UDP port of GUE packets to decapsulate (the load balancer's `gue_port`).
    #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
    pub gue_port: u16,
    /// An outer source tunnel packets are accepted from: a load balancer's encapsulation
    /// source, as an address or CIDR (repeatable). Tunnel packets from anyone else, or to an
    /// address that is not the interface's, pass untouched. None given: nothing is
    /// decapsulated.
    #[arg(long, value_name = "ADDR/CIDR", value_parser = parse_net)]
    pub allow_source: Vec<ipnet::IpNet>,
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: AttachMode,
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    crate::config::parse_net(s).ok_or_else(|| format!("{s:?} is not an address or CIDR"))
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Transport protocol of a traced packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceProtocol {
    Udp,
    Tcp,
}

impl From<TraceProtocol> for crate::state::Protocol {
    fn from(p: TraceProtocol) -> Self {
        match p {
            TraceProtocol::Udp => crate::state::Protocol::Udp,
            TraceProtocol::Tcp => crate::state::Protocol::Tcp,
        }
    }
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[arg(long, value_enum)]
    pub proto: TraceProtocol,
    /// Client address and port, e.g. `198.18.1.1:40000` or `[2001:db8::1]:40000`.
    #[arg(long, value_name = "IP:PORT")]
    pub src: SocketAddr,
    /// VIP and port, e.g. 198.18.0.100:53.
    #[arg(long, value_name = "VIP:PORT")]
    pub dst: SocketAddr,
    #[arg(long, default_value = DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// TCP only: send a SYN, which takes a fresh Maglev decision and overwrites the flow
    /// entry of this 5-tuple (default: an ACK, which follows or creates it).
    #[arg(long)]
    pub syn: bool,
}
