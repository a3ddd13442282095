//! Gratuitous ARP and unsolicited Neighbor Advertisements: when this node takes a VIP over,
//! it tells the segment at once, so switches learn the VIP's new port and neighbours replace
//! the old owner's MAC instead of waiting until their entries go stale.
//!
//! The frames are the forms Linux lets override an existing neighbour entry: for IPv4 a
//! broadcast ARP request with the VIP as both sender and target address (`arp_is_garp`);
//! for IPv6 an NA to all nodes with the Override flag and a Target Link-Layer Address
//! option (RFC 4861 7.2.6). Each is sent several times, spaced ([`ANNOUNCE_SCHEDULE`]),
//! since a single frame may be lost.

use std::{
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// When each copy of an announcement goes out, from the start of the burst.
pub const ANNOUNCE_SCHEDULE: &[Duration] = &[
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ARP_REQUEST: u16 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Override set; Router and Solicited clear (an announcement answers no one).
const NA_FLAGS_OVERRIDE: [u8; 4] = [0x20, 0, 0, 0];
const ND_OPT_TARGET_LLA: u8 = 2;
/// ND messages must arrive with the largest hop limit (RFC 4861 7.1.2).
const ND_HOP_LIMIT: u8 = 255;
/// ff02::1, and its Ethernet group 33:33:00:00:00:01 (RFC 2464 7).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// The NA's ICMPv6 part: type, code, checksum, flags, target, TLLA option.
const NA_LEN: usize = 32;

fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, capacity: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + capacity);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// A gratuitous ARP for `vip` at `mac`: a broadcast request, sender and target address the
/// VIP, target MAC zero. 42 bytes.
pub fn gratuitous_arp(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ETH_P_ARP, 28);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&ARP_REQUEST.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f
}

/// An unsolicited Neighbor Advertisement for `vip` at `mac`, from the VIP to all nodes:
/// Override only, Target Link-Layer Address option. 86 bytes.
pub fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(NA_LEN);
    icmp.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]);
    icmp.extend_from_slice(&NA_FLAGS_OVERRIDE);
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[ND_OPT_TARGET_LLA, 1]);
    icmp.extend_from_slice(&mac);
    let check = icmpv6_checksum(vip, ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());

    let mut f = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6, 40 + NA_LEN);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(NA_LEN as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, ND_HOP_LIMIT]);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum of `msg` (checksum field zero): RFC 1071 over the pseudo-header
/// (addresses, upper-layer length, next header) and the message.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let (src, dst) = (src.octets(), dst.octets());
    let len = (msg.len() as u32).to_be_bytes();
    let next = [0, 0, 0, IPPROTO_ICMPV6];
    let parts: [&[u8]; 5] = [&src, &dst, &len, &next, msg];
    let mut sum = 0u32;
    for part in parts {
        // Every part has an even length.
        for w in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `err` with what was being done in front of its message (the kind is kept).
fn context(err: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// A packet socket (AF_PACKET, SOCK_RAW) bound to one interface, for sending whole Ethernet
/// frames out of it. It receives nothing (protocol 0), and never blocks: a frame the device
/// queue has no room for fails with `WouldBlock`.
#[derive(Debug)]
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: u32,
}

impl FrameSender {
    /// Open the socket on the interface with index `ifindex` (in the caller's network
    /// namespace). Needs CAP_NET_RAW.
    pub fn open(ifindex: u32) -> io::Result<FrameSender> {
        let what = || format!("opening a packet socket on interface index {ifindex}");
        let index = i32::try_from(ifindex)
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not an interface index", what()),
                )
            })?;
        // SAFETY: plain system call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(context(
                    e,
                    format!("{} (denied: needs CAP_NET_RAW)", what()),
                ));
            }
            return Err(context(e, what()));
        }
        // SAFETY: `raw` is a descriptor just returned to us, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid `sockaddr_ll` (plain integers and bytes).
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index;
        // SAFETY: `addr` is a live `sockaddr_ll` and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(context(io::Error::last_os_error(), what()));
        }
        Ok(FrameSender { fd, ifindex })
    }

    /// The interface the frames go out of.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Send one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let what = || {
            format!(
                "sending a {}-byte frame on interface index {}",
                frame.len(),
                self.ifindex
            )
        };
        // SAFETY: the buffer is valid for `frame.len()` bytes; the socket is ours.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(context(io::Error::last_os_error(), what()));
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{}: only {n} bytes went out", what()),
            ));
        }
        Ok(())
    }
}

/// Send `frame` at every offset of [`ANNOUNCE_SCHEDULE`]. See [`announce_with`].
pub async fn announce(sender: &FrameSender, frame: &[u8]) -> io::Result<()> {
    announce_with(sender, frame, ANNOUNCE_SCHEDULE).await
}

/// Send `frame` at each offset of `schedule` (from now, in increasing order), sleeping on
/// the tokio timer in between, so other tasks run meanwhile; dropping the future stops the
/// burst. A failed copy does not stop the later ones; the first failure is returned at the
/// end, with which copy it was.
pub async fn announce_with(
    sender: &FrameSender,
    frame: &[u8],
    schedule: &[Duration],
) -> io::Result<()> {
    let start = tokio::time::Instant::now();
    let mut first_error = None;
    for (i, offset) in schedule.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        if let Err(e) = sender.send(frame) {
            tracing::debug!(copy = i + 1, of = schedule.len(), error = %e, "announcement not sent");
            first_error
                .get_or_insert_with(|| context(e, format!("copy {} of {}", i + 1, schedule.len())));
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use lb_testkit::{NetNs, packet::l4_checksum_ok};

    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
    /// The MAC the neighbours knew the VIP at before (the old owner).
    const OLD_MAC: &str = "02:00:00:00:00:bb";
    const NEW_MAC: &str = "02:00:00:00:00:aa";
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn gratuitous_arp_bytes() {
        let f = gratuitous_arp(MAC, VIP);
        assert_eq!(
            f,
            hex("ffffffffffff 0200000000aa 0806
                 0001 0800 06 04 0001
                 0200000000aa c6120064
                 000000000000 c6120064")
        );
    }

    #[test]
    fn unsolicited_na_bytes() {
        let f = unsolicited_na(MAC, VIP6);
        // The checksum (f683) computed separately (Python, RFC 1071 over the pseudo-header).
        assert_eq!(
            f,
            hex("333300000001 0200000000aa 86dd
                 60000000 0020 3a ff
                 20010db8000000000000000000000100 ff020000000000000000000000000001
                 88 00 f683 20000000 20010db8000000000000000000000100
                 02 01 0200000000aa")
        );
        // And verified by the test kit's checksum code.
        assert!(l4_checksum_ok(&f[14..]));
    }

    #[test]
    fn open_rejects_index_zero() {
        let e = FrameSender::open(0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("interface index 0"), "{e}");
    }

    /// Two namespaces joined by a veth pair: the load-balancer node (`lb0`, MAC `NEW_MAC`,
    /// no addresses and no IPv6, so it sends nothing of its own) and a client (`cl0`,
    /// 198.18.0.1/24 and 2001:db8::1/64) whose neighbour table knows the VIPs at `OLD_MAC`.
    /// Dropping it deletes both namespaces, and with them the link and the entries.
    struct Segment {
        node: NetNs,
        client: NetNs,
    }

    impl Segment {
        fn new() -> Segment {
            lb_testkit::require_root().unwrap();
            let node = NetNs::new("lbgarp").unwrap();
            let client = NetNs::new("lbgarpc").unwrap();
            let s = Segment { node, client };
            s.node
                .ip(&[
                    "link",
                    "add",
                    "lb0",
                    "address",
                    NEW_MAC,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "cl0",
                    "netns",
                    s.client.name(),
                ])
                .unwrap();
            s.node
                .sysctl("net.ipv6.conf.lb0.disable_ipv6", "1")
                .unwrap();
            s.node.ip(&["link", "set", "lb0", "up"]).unwrap();
            let c = &s.client;
            c.ip(&["addr", "add", "198.18.0.1/24", "dev", "cl0"])
                .unwrap();
            c.ip(&["addr", "add", "2001:db8::1/64", "dev", "cl0", "nodad"])
                .unwrap();
            c.ip(&["link", "set", "cl0", "up"]).unwrap();
            s.wait_ipv6_ready();
            s
        }

        /// Until the kernel has configured IPv6 on the client's link (after the link watch
        /// saw the carrier, up to a second after `up`), multicast to ff02::1 has no route and
        /// is dropped (`Ip6InNoRoutes`).
        fn wait_ipv6_ready(&self) {
            for _ in 0..100 {
                let routes = self
                    .client
                    .ip(&["-6", "route", "show", "table", "local", "dev", "cl0"])
                    .unwrap();
                if routes.contains("ff00::/8") {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("IPv6 on cl0 in {} not ready after 5 s", self.client.name());
        }

        fn sender(&self) -> FrameSender {
            self.node
                .enter(|| {
                    // SAFETY: a NUL-terminated name.
                    let index = unsafe { libc::if_nametoindex(c"lb0".as_ptr()) };
                    FrameSender::open(index)
                })
                .unwrap()
                .unwrap()
        }

        /// Make the client's entry for `vip` point at `OLD_MAC`, in `state`.
        fn old_entry(&self, vip: &str, state: &str) {
            self.client
                .ip(&[
                    "neigh", "replace", vip, "lladdr", OLD_MAC, "dev", "cl0", "nud", state,
                ])
                .unwrap();
            assert_eq!(self.lladdr(vip).as_deref(), Some(OLD_MAC));
        }

        /// The MAC of the client's entry for `vip`.
        fn lladdr(&self, vip: &str) -> Option<String> {
            let out = self
                .client
                .ip(&["neigh", "show", vip, "dev", "cl0"])
                .unwrap();
            let mut words = out.split_whitespace();
            words.find(|w| *w == "lladdr")?;
            words.next().map(str::to_string)
        }

        /// Frames the client's end received so far.
        fn client_rx_packets(&self) -> u64 {
            let out = self
                .client
                .ip(&["-s", "-j", "link", "show", "cl0"])
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
        }
    }

    /// Run `burst` while polling the client's entry for `vip`; the entry must show `NEW_MAC`
    /// before the burst ends (the first copy goes out at once, and the burst does not block
    /// the runtime), and the burst must succeed.
    async fn moved_during(
        seg: &Segment,
        vip: &str,
        burst: impl std::future::Future<Output = io::Result<()>>,
    ) {
        let mut burst = std::pin::pin!(burst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut moved = false;
        let mut done = None;
        while tokio::time::Instant::now() < deadline && done.is_none() {
            tokio::select! {
                r = &mut burst => done = Some(r),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            moved |= seg.lladdr(vip).as_deref() == Some(NEW_MAC);
        }
        let result = done.expect("the burst ends within 5 s");
        result.unwrap();
        moved |= seg.lladdr(vip).as_deref() == Some(NEW_MAC);
        assert!(moved, "{vip}: entry still {:?}", seg.lladdr(vip));
    }

    /// Every initial state an entry of the old owner may be in is overridden, for both
    /// families.
    #[tokio::test]
    async fn announcements_move_the_neighbour_entries() {
        let seg = Segment::new();
        let sender = seg.sender();
        let quick = [Duration::ZERO, Duration::from_millis(50)];
        let cases: [(&str, Vec<u8>); 2] = [
            ("198.18.0.100", gratuitous_arp(MAC, VIP)),
            ("2001:db8::100", unsolicited_na(MAC, VIP6)),
        ];
        for (vip, frame) in &cases {
            for state in ["stale", "reachable"] {
                seg.old_entry(vip, state);
                moved_during(&seg, vip, announce_with(&sender, frame, &quick)).await;
            }
        }
    }

    /// The real schedule: four copies, the last one 2 s after the first, and the neighbour
    /// moved by the first.
    #[tokio::test]
    async fn announce_sends_the_whole_schedule() {
        let seg = Segment::new();
        let sender = seg.sender();
        for (vip, frame) in [
            ("198.18.0.100", gratuitous_arp(MAC, VIP)),
            ("2001:db8::100", unsolicited_na(MAC, VIP6)),
        ] {
            seg.old_entry(vip, "stale");
            let before = seg.client_rx_packets();
            let start = Instant::now();
            moved_during(&seg, vip, announce(&sender, &frame)).await;
            let took = start.elapsed();
            let last = *ANNOUNCE_SCHEDULE.last().unwrap();
            assert!(
                took >= last && took < last + Duration::from_secs(2),
                "{took:?}"
            );
            assert_eq!(
                seg.client_rx_packets() - before,
                ANNOUNCE_SCHEDULE.len() as u64,
                "{vip}: frames received"
            );
        }
    }
}
