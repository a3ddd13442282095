//! Counter indices for `LB_REASONS`: why a packet was passed, dropped or transmitted.

/// One reason per counter slot. The discriminant is the index into `LB_REASONS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IP (ARP, LLDP, ...): passed untouched.
    PassNotIp = 0,
    /// IP but not TCP/UDP to a configured VIP and port: passed untouched.
    PassNotVip = 1,
    /// IP fragment to an address that is not a VIP: passed to the stack.
    PassFragment = 2,
    /// Header shorter than it claims to be, cut off by the end of the frame, or otherwise
    /// not parseable: the stack decides what to do with it.
    PassMalformed = 3,
    /// VIP matched but the service has no usable backend.
    DropNoBackend = 4,
    /// `bpf_xdp_adjust_head` / `bpf_xdp_adjust_tail` failed (no room to grow the frame).
    DropNoHeadroom = 5,
    /// The node configuration (own MAC, encapsulation source) is not written yet.
    DropNoConfig = 6,
    /// Forwarded with an outer IPv4 header (IPIP).
    TxIpip = 7,
    /// Forwarded by rewriting MAC addresses.
    TxL2 = 8,
    /// Decap program: outer header removed, inner packet passed to the stack.
    DecapPass = 9,
    /// The service names a forwarding mode this program does not know.
    DropBadForwarding = 10,
    /// A new flow was remembered. (Packets that followed a remembered flow are the
    /// service's packets minus its new flows.)
    FlowCreated = 11,
    /// The flood guard declined to remember a new flow (it was still forwarded).
    FlowGuarded = 12,
    /// A remembered flow's backend left its service: the flow was decided afresh.
    FlowRerouted = 13,
    /// Forwarded with an outer IP and UDP header (GUE).
    TxGue = 14,
    /// The encapsulated packet would not fit the MTU (or the largest IP packet), and no ICMP
    /// error could be sent for it.
    DropTooBig = 15,
    /// An ICMP/ICMPv6 error about a VIP flow was sent to the backend owning the flow (counted
    /// besides the packet's tx reason).
    IcmpToBackend = 16,
    /// An echo request to a VIP was answered.
    TxEchoReply = 17,
    /// A packet too big for the encapsulation was answered with ICMP fragmentation needed /
    /// ICMPv6 packet too big.
    TxIcmpTooBig = 18,
    /// The client is not in the service's source ranges.
    DropSourceRange = 19,
    /// A fragment to a VIP whose services do not take fragments.
    DropFragment = 20,
    /// Backend side of DSR to pods: a decapsulated packet for a local endpoint was
    /// translated to the endpoint's address and target port (`LB_DNAT`) and passed to the
    /// stack, which routes it to the pod.
    DecapDnat = 21,
    /// Egress: a reply of a translated flow got its VIP and service port back (`LB_REVNAT`).
    RevNat = 22,
    /// The chosen backend is on this node: the packet is handed to the node's own decap and
    /// translation instead of leaving the interface.
    LocalBackend = 23,
    /// A local backend was chosen but the decap program is not installed (`LB_PROGS`).
    DropNoDecap = 24,
    /// A client of a `sessionAffinity: ClientIP` service went to its remembered backend.
    AffinityHit = 25,
    /// An ARP request for a VIP this node owns (`VIP_F_ANSWER`) was answered.
    TxArpReply = 26,
    /// A Neighbor Solicitation for a VIP this node owns (`VIP_F_ANSWER`) was answered with a
    /// Neighbor Advertisement.
    TxNeighborAdvert = 27,
    /// Decap program: a tunnel packet whose outer source is not an allowed sender
    /// (`LB_DECAP_SRC`) or whose outer destination is not this node's (`LB_DECAP_DST`):
    /// passed untouched, so the stack sees the tunnel packet (and drops it without tunnel
    /// modules).
    PassDecapNotAllowed = 28,
    /// The chosen backend's next-hop MAC address is not known yet (`BACKEND_F_NO_NEIGH`):
    /// dropped, and no flow is remembered, so the client's retransmission after the agent
    /// learned the MAC goes to the same backend and starts the flow normally.
    DropNoNeighbor = 29,
    /// The Maglev choice was a backend whose next hop failed to resolve
    /// (`BACKEND_F_UNREACHABLE`): the packet went to the backend of a following slot.
    FallbackUnreachable = 30,
}

impl Reason {
    pub const COUNT: u32 = 31;

    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassFragment,
        Reason::PassMalformed,
        Reason::DropNoBackend,
        Reason::DropNoHeadroom,
        Reason::DropNoConfig,
        Reason::TxIpip,
        Reason::TxL2,
        Reason::DecapPass,
        Reason::DropBadForwarding,
        Reason::FlowCreated,
        Reason::FlowGuarded,
        Reason::FlowRerouted,
        Reason::TxGue,
        Reason::DropTooBig,
        Reason::IcmpToBackend,
        Reason::TxEchoReply,
        Reason::TxIcmpTooBig,
        Reason::DropSourceRange,
        Reason::DropFragment,
        Reason::DecapDnat,
        Reason::RevNat,
        Reason::LocalBackend,
        Reason::DropNoDecap,
        Reason::AffinityHit,
        Reason::TxArpReply,
        Reason::TxNeighborAdvert,
        Reason::PassDecapNotAllowed,
        Reason::DropNoNeighbor,
        Reason::FallbackUnreachable,
    ];

    /// Stable snake_case name, used by `lb-agent status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassFragment => "pass_fragment",
            Reason::PassMalformed => "pass_malformed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoHeadroom => "drop_no_headroom",
            Reason::DropNoConfig => "drop_no_config",
            Reason::TxIpip => "tx_ipip",
            Reason::TxL2 => "tx_l2",
            Reason::DecapPass => "decap_pass",
            Reason::DropBadForwarding => "drop_bad_forwarding",
            Reason::FlowCreated => "flow_created",
            Reason::FlowGuarded => "flow_guarded",
            Reason::FlowRerouted => "flow_rerouted",
            Reason::TxGue => "tx_gue",
            Reason::DropTooBig => "drop_too_big",
            Reason::IcmpToBackend => "icmp_to_backend",
            Reason::TxEchoReply => "tx_echo_reply",
            Reason::TxIcmpTooBig => "tx_icmp_too_big",
            Reason::DropSourceRange => "drop_source_range",
            Reason::DropFragment => "drop_fragment",
            Reason::DecapDnat => "decap_dnat",
            Reason::RevNat => "egress_revnat",
            Reason::LocalBackend => "local_backend",
            Reason::DropNoDecap => "drop_no_decap",
            Reason::AffinityHit => "affinity_hit",
            Reason::TxArpReply => "tx_arp_reply",
            Reason::TxNeighborAdvert => "tx_neighbor_advert",
            Reason::PassDecapNotAllowed => "pass_decap_not_allowed",
            Reason::DropNoNeighbor => "drop_no_neighbor",
            Reason::FallbackUnreachable => "fallback_unreachable",
        }
    }
}
