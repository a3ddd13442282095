//! The `bgp` section of the static configuration: the raw YAML form ([`RawBgp`]), the
//! checked settings ([`BgpSettings`]) and [`settings`], which turns one into the other and
//! names the offending field when it cannot.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::Deserialize;

/// Hold time when the section names none, in seconds (keepalives every 3 s).
pub const DEFAULT_HOLD_TIME_S: u16 = 9;
/// The BGP port.
pub const DEFAULT_PORT: u16 = 179;
/// Where the agent writes BIRD's configuration (BIRD runs with `-c` this path).
pub const DEFAULT_CONFIG: &str = "/run/xdp-lb/bird.conf";
/// BIRD's control socket (BIRD runs with `-s` this path).
pub const DEFAULT_SOCKET: &str = "/run/xdp-lb/bird.ctl";
/// The BIRD client, looked up on `PATH`.
pub const DEFAULT_BIRDC: &str = "birdc";

/// The longest TCP-MD5 key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`).
const MAX_PASSWORD_LEN: usize = 80;
/// AS 0 and AS 4294967295 are reserved (RFC 7607, RFC 7300); AS_TRANS stands in for a
/// four-byte AS in two-byte-only speakers and is no real AS (RFC 6793).
const MAX_ASN: u64 = 4_294_967_294;
const AS_TRANS: u64 = 23_456;

/// Where BIRD's files are and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BirdPaths {
    /// The configuration file the agent owns and BIRD reads (`bird -c`).
    pub config: PathBuf,
    /// BIRD's control socket (`bird -s`).
    pub socket: PathBuf,
    /// The `birdc` program (a bare name is looked up on `PATH`).
    pub birdc: PathBuf,
}

impl Default for BirdPaths {
    fn default() -> BirdPaths {
        BirdPaths {
            config: PathBuf::from(DEFAULT_CONFIG),
            socket: PathBuf::from(DEFAULT_SOCKET),
            birdc: PathBuf::from(DEFAULT_BIRDC),
        }
    }
}

/// One BGP neighbour (a top-of-rack router, a route reflector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: IpAddr,
    pub asn: u32,
    pub port: u16,
    /// Overrides [`BgpSettings::hold_time_s`].
    pub hold_time_s: Option<u16>,
    /// Overrides [`BgpSettings::bfd`].
    pub bfd: Option<bool>,
    /// TCP-MD5 key (RFC 2385).
    pub password: Option<String>,
    /// The peer is this many hops away (the TTL of the session's packets). `None`: directly
    /// connected, for eBGP and iBGP peers alike.
    pub multihop: Option<u8>,
    /// The local address of the session. `None`: the address of the interface towards the
    /// peer.
    pub source: Option<IpAddr>,
}

impl BgpPeer {
    /// The hold time of this session: its own, or the node's.
    pub fn hold_time(&self, s: &BgpSettings) -> u16 {
        self.hold_time_s.unwrap_or(s.hold_time_s)
    }

    /// Whether this session is watched by BFD: its own choice, or the node's.
    pub fn bfd(&self, s: &BgpSettings) -> bool {
        self.bfd.unwrap_or(s.bfd)
    }
}

/// How this node announces its VIPs over BGP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpSettings {
    pub local_asn: u32,
    /// `None`: the node's IPv4 address (the caller supplies it to [`render`](super::render)).
    pub router_id: Option<Ipv4Addr>,
    /// 0 (no keepalives) or 3..=65535 seconds; keepalives are sent every third of it.
    pub hold_time_s: u16,
    pub bfd: bool,
    /// At least one; addresses unique.
    pub peers: Vec<BgpPeer>,
    /// Attached to every VIP's route (static mode; in Kubernetes mode the defaults).
    pub communities: Vec<(u16, u16)>,
    pub large_communities: Vec<(u32, u32, u32)>,
    pub local_pref: Option<u32>,
    pub bird: BirdPaths,
}

impl BgpSettings {
    /// The node-level route attributes, for a VIP that has none of its own.
    pub fn default_route_attrs(&self) -> RouteAttrs {
        RouteAttrs {
            communities: self.communities.clone(),
            large_communities: self.large_communities.clone(),
            local_pref: self.local_pref,
            weight: None,
        }
    }
}

/// BGP attributes of one announced VIP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteAttrs {
    /// Standard communities (RFC 1997), `(asn, value)`.
    pub communities: Vec<(u16, u16)>,
    /// Large communities (RFC 8092), `(global admin, local 1, local 2)`.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// LOCAL_PREF; sent to iBGP peers, and to eBGP peers too (RFC 7938 style, BIRD's
    /// `allow bgp_local_pref`; a peer that does not allow it ignores it).
    pub local_pref: Option<u32>,
    /// Weight for weighted ECMP (`externalTrafficPolicy: Local`: this node's endpoints),
    /// sent as the link-bandwidth extended community (draft-ietf-idr-link-bandwidth,
    /// non-transitive), one weight unit = 1 Mbit/s, which routers with weighted ECMP
    /// (FRR's `bgp bestpath bandwidth`, Junos, EOS) turn into next-hop weights. `None`:
    /// plain ECMP.
    pub weight: Option<u32>,
}

/// The link-bandwidth extended community for `weight` from AS `asn`: the two 32-bit halves
/// BIRD's `(generic, HI, LO)` takes. Type 0x40, subtype 0x04, a 2-byte AS (AS_TRANS for a
/// 4-byte one), then the bandwidth in bytes per second as an IEEE float.
pub fn link_bandwidth(asn: u32, weight: u32) -> (u32, u32) {
    const AS_TRANS: u32 = 23_456;
    let as16 = if asn > 0xffff { AS_TRANS } else { asn };
    // 1 Mbit/s = 125,000 bytes/s per unit of weight.
    let bytes_per_s = weight as f32 * 125_000.0;
    (0x4004_0000 | as16, bytes_per_s.to_bits())
}

/// The `bgp` section as written. Numbers are read wide so that an out-of-range value is
/// reported by [`settings`] with its field, like every other mistake.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBgp {
    pub local_asn: u64,
    pub router_id: Option<String>,
    pub hold_time: Option<u64>,
    pub bfd: Option<bool>,
    #[serde(default)]
    pub communities: Vec<String>,
    #[serde(default)]
    pub large_communities: Vec<String>,
    pub local_pref: Option<u64>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    pub bird: Option<RawBird>,
}

/// One entry of `bgp.peers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub address: String,
    pub asn: u64,
    pub port: Option<u64>,
    pub hold_time: Option<u64>,
    pub bfd: Option<bool>,
    pub password: Option<String>,
    pub multihop: Option<u64>,
    pub source: Option<String>,
}

/// `bgp.bird`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBird {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub birdc: Option<PathBuf>,
}

/// A rejected field of the `bgp` section: `field` is its path from the section's key
/// (`bgp.peers[1].asn`); the caller adds the file's name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn reject<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// Checks the section and fills in the defaults.
pub fn settings(raw: &RawBgp) -> Result<BgpSettings, FieldError> {
    let local_asn = asn("bgp.local_asn", raw.local_asn)?;
    let router_id = match &raw.router_id {
        None => None,
        Some(s) => Some(router_id("bgp.router_id", s)?),
    };
    let hold_time_s = match raw.hold_time {
        None => DEFAULT_HOLD_TIME_S,
        Some(h) => hold_time("bgp.hold_time", h)?,
    };
    let communities = raw
        .communities
        .iter()
        .enumerate()
        .map(|(i, c)| community(&format!("bgp.communities[{i}]"), c))
        .collect::<Result<Vec<_>, _>>()?;
    let large_communities = raw
        .large_communities
        .iter()
        .enumerate()
        .map(|(i, c)| large_community(&format!("bgp.large_communities[{i}]"), c))
        .collect::<Result<Vec<_>, _>>()?;
    let local_pref = match raw.local_pref {
        None => None,
        Some(p) => Some(u32::try_from(p).or_else(|_| {
            reject(
                "bgp.local_pref",
                format!("{p} is out of range (0..=4294967295)"),
            )
        })?),
    };
    if raw.peers.is_empty() {
        return reject("bgp.peers", "at least one peer is needed");
    }
    let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.iter().enumerate() {
        let peer = peer(i, p, raw.bfd)?;
        if let Some(first) = seen.insert(peer.address, i) {
            return reject(
                format!("bgp.peers[{i}].address"),
                format!("{} is already bgp.peers[{first}]", peer.address),
            );
        }
        peers.push(peer);
    }
    let bird = bird_paths(raw.bird.as_ref())?;
    Ok(BgpSettings {
        local_asn,
        router_id,
        hold_time_s,
        bfd: raw.bfd.unwrap_or(false),
        peers,
        communities,
        large_communities,
        local_pref,
        bird,
    })
}

fn peer(i: usize, p: &RawPeer, node_bfd: Option<bool>) -> Result<BgpPeer, FieldError> {
    let field = |f: &str| format!("bgp.peers[{i}].{f}");
    let address = peer_address(&field("address"), &p.address)?;
    let asn = asn(&field("asn"), p.asn)?;
    let port = match p.port {
        None => DEFAULT_PORT,
        Some(0) => return reject(field("port"), "must not be 0"),
        Some(port) => u16::try_from(port)
            .or_else(|_| reject(field("port"), format!("{port} is out of range (1..=65535)")))?,
    };
    let hold_time_s = match p.hold_time {
        None => None,
        Some(h) => Some(hold_time(&field("hold_time"), h)?),
    };
    let password = match &p.password {
        None => None,
        Some(pw) => Some(password(&field("password"), pw)?),
    };
    let multihop = match p.multihop {
        None => None,
        Some(ttl @ 1..=255) => Some(ttl as u8),
        Some(ttl) => {
            return reject(
                field("multihop"),
                format!("{ttl} is out of range (a TTL, 1..=255)"),
            );
        }
    };
    let source = match &p.source {
        None => None,
        Some(s) => {
            let f = field("source");
            let source: IpAddr = s
                .parse()
                .or_else(|_| reject(&f, format!("{s:?} is not an IP address")))?;
            if source.is_ipv4() != address.is_ipv4() {
                return reject(
                    f,
                    format!("{source} is not of the peer's address family ({address})"),
                );
            }
            if source.is_unspecified() || source.is_multicast() {
                return reject(f, format!("{source} is not a unicast address"));
            }
            Some(source)
        }
    };
    if multihop.is_some() && source.is_none() && p.bfd.or(node_bfd) == Some(true) {
        return reject(
            field("source"),
            "BFD on a multihop session needs the local address (`source`)",
        );
    }
    Ok(BgpPeer {
        address,
        asn,
        port,
        hold_time_s,
        bfd: p.bfd,
        password,
        multihop,
        source,
    })
}

fn asn(field: &str, value: u64) -> Result<u32, FieldError> {
    if value == AS_TRANS {
        return reject(field, "23456 is AS_TRANS (RFC 6793), not an AS of its own");
    }
    if !(1..=MAX_ASN).contains(&value) {
        return reject(
            field,
            format!("{value} is out of range (1..=4294967294; 0 and 4294967295 are reserved)"),
        );
    }
    // In range, so it fits.
    Ok(value as u32)
}

fn router_id(field: &str, s: &str) -> Result<Ipv4Addr, FieldError> {
    let id: Ipv4Addr = s
        .parse()
        .or_else(|_| reject(field, format!("{s:?} is not an IPv4 address")))?;
    if id.is_unspecified() {
        return reject(field, "0.0.0.0 is no router id");
    }
    Ok(id)
}

fn hold_time(field: &str, value: u64) -> Result<u16, FieldError> {
    match value {
        0 | 3..=65535 => Ok(value as u16),
        _ => reject(
            field,
            format!("{value} seconds: must be 0 (no keepalives) or 3..=65535 (RFC 4271)"),
        ),
    }
}

fn peer_address(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    let address: IpAddr = s
        .parse()
        .or_else(|_| reject(field, format!("{s:?} is not an IP address")))?;
    if address.is_unspecified() || address.is_multicast() {
        return reject(field, format!("{address} is not a unicast address"));
    }
    if let IpAddr::V6(v6) = address {
        if v6.to_ipv4_mapped().is_some() {
            return reject(
                field,
                format!("{address} is IPv4-mapped: write the IPv4 address itself"),
            );
        }
        if v6.is_unicast_link_local() {
            return reject(
                field,
                format!("{address} is link-local: peers need a global or unique-local address"),
            );
        }
    }
    Ok(address)
}

/// `ASN:VALUE`, both 0..=65535.
pub(crate) fn community(field: &str, s: &str) -> Result<(u16, u16), FieldError> {
    let bad = || {
        reject(
            field,
            format!("{s:?} is not a community (ASN:VALUE, each 0..=65535)"),
        )
    };
    let Some((a, b)) = s.split_once(':') else {
        return bad();
    };
    match (number::<u16>(a), number::<u16>(b)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bad(),
    }
}

/// `GLOBAL:LOCAL1:LOCAL2`, each 0..=4294967295.
pub(crate) fn large_community(field: &str, s: &str) -> Result<(u32, u32, u32), FieldError> {
    let bad = || {
        reject(
            field,
            format!("{s:?} is not a large community (GLOBAL:LOCAL1:LOCAL2, each 0..=4294967295)"),
        )
    };
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [a, b, c] => match (number::<u32>(a), number::<u32>(b), number::<u32>(c)) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            _ => bad(),
        },
        _ => bad(),
    }
}

/// Plain decimal digits only (no sign, no spaces), within `T`.
fn number<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Printable ASCII without `"` and `\`: BIRD's string literals have no escapes, and the key
/// is written into its configuration as one.
fn password(field: &str, pw: &str) -> Result<String, FieldError> {
    if pw.is_empty() || pw.len() > MAX_PASSWORD_LEN {
        return reject(
            field,
            format!(
                "must be 1..={MAX_PASSWORD_LEN} characters (a TCP-MD5 key), not {}",
                pw.len()
            ),
        );
    }
    if let Some(c) = pw
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ') || *c == '"' || *c == '\\')
    {
        return reject(
            field,
            format!("must be printable ASCII without '\"' and '\\' (found {c:?})"),
        );
    }
    Ok(pw.to_owned())
}

fn bird_paths(raw: Option<&RawBird>) -> Result<BirdPaths, FieldError> {
    let defaults = BirdPaths::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let path = |f: &str, value: &Option<PathBuf>, default: PathBuf| match value {
        None => Ok(default),
        Some(p) if p.as_os_str().is_empty() => reject(format!("bgp.bird.{f}"), "must not be empty"),
        Some(p) => Ok(p.clone()),
    };
    Ok(BirdPaths {
        config: path("config", &raw.config, defaults.config)?,
        socket: path("socket", &raw.socket, defaults.socket)?,
        birdc: path("birdc", &raw.birdc, defaults.birdc)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
local_asn: 64512
router_id: 198.18.2.1
hold_time: 30
bfd: true
communities: ["64512:100", "65535:65281"]
large_communities: ["64512:1:2"]
local_pref: 200
peers:
  - address: 198.18.2.254
    asn: 64500
    port: 1179
    hold_time: 3
    bfd: false
    password: "s3cret pass"
    multihop: 2
    source: 198.18.2.1
  - address: 2001:db8:2::254
    asn: 4200000000
bird:
  config: /tmp/b.conf
  socket: /tmp/b.ctl
  birdc: /usr/sbin/birdc
"#;

    fn raw(yaml: &str) -> RawBgp {
        serde_yaml_ng::from_str(yaml).expect("test YAML parses")
    }

    fn minimal() -> RawBgp {
        raw("local_asn: 64512\npeers: [{address: 198.18.2.254, asn: 64500}]\n")
    }

    #[test]
    fn full_section() {
        let s = settings(&raw(FULL)).unwrap();
        assert_eq!(
            s,
            BgpSettings {
                local_asn: 64512,
                router_id: Some(Ipv4Addr::new(198, 18, 2, 1)),
                hold_time_s: 30,
                bfd: true,
                peers: vec![
                    BgpPeer {
                        address: "198.18.2.254".parse().unwrap(),
                        asn: 64500,
                        port: 1179,
                        hold_time_s: Some(3),
                        bfd: Some(false),
                        password: Some("s3cret pass".into()),
                        multihop: Some(2),
                        source: Some("198.18.2.1".parse().unwrap()),
                    },
                    BgpPeer {
                        address: "2001:db8:2::254".parse().unwrap(),
                        asn: 4_200_000_000,
                        port: 179,
                        hold_time_s: None,
                        bfd: None,
                        password: None,
                        multihop: None,
                        source: None,
                    },
                ],
                communities: vec![(64512, 100), (65535, 65281)],
                large_communities: vec![(64512, 1, 2)],
                local_pref: Some(200),
                bird: BirdPaths {
                    config: "/tmp/b.conf".into(),
                    socket: "/tmp/b.ctl".into(),
                    birdc: "/usr/sbin/birdc".into(),
                },
            }
        );
        assert_eq!(s.peers[0].hold_time(&s), 3);
        assert_eq!(s.peers[1].hold_time(&s), 30);
        assert!(!s.peers[0].bfd(&s));
        assert!(s.peers[1].bfd(&s));
    }

    #[test]
    fn defaults() {
        let s = settings(&minimal()).unwrap();
        assert_eq!(s.router_id, None);
        assert_eq!(s.hold_time_s, DEFAULT_HOLD_TIME_S);
        assert!(!s.bfd);
        assert_eq!(s.bird, BirdPaths::default());
        assert_eq!(s.bird.config, PathBuf::from("/run/xdp-lb/bird.conf"));
        assert_eq!(s.bird.socket, PathBuf::from("/run/xdp-lb/bird.ctl"));
        assert_eq!(s.bird.birdc, PathBuf::from("birdc"));
        assert_eq!(s.peers[0].port, 179);
        assert_eq!(s.default_route_attrs(), RouteAttrs::default());
        // Edges that are allowed.
        let mut r = minimal();
        r.local_asn = 4_294_967_294;
        r.hold_time = Some(0);
        r.peers[0].hold_time = Some(3);
        r.peers[0].multihop = Some(255);
        r.peers[0].port = Some(65535);
        r.communities = vec!["0:0".into(), "65535:65535".into()];
        r.large_communities = vec!["4294967295:0:4294967295".into()];
        r.local_pref = Some(4_294_967_295);
        r.peers[0].password = Some("x".repeat(80));
        let s = settings(&r).unwrap();
        assert_eq!(s.hold_time_s, 0);
        assert_eq!(s.peers[0].hold_time(&s), 3);
    }

    #[test]
    fn rejections() {
        type Edit = fn(&mut RawBgp);
        let cases: &[(&str, Edit, &str, &str)] = &[
            (
                "asn 0",
                |r| r.local_asn = 0,
                "bgp.local_asn",
                "out of range",
            ),
            (
                "asn 2^32-1",
                |r| r.local_asn = 4_294_967_295,
                "bgp.local_asn",
                "reserved",
            ),
            (
                "asn 2^32",
                |r| r.local_asn = 1 << 32,
                "bgp.local_asn",
                "out of range",
            ),
            (
                "AS_TRANS",
                |r| r.local_asn = 23456,
                "bgp.local_asn",
                "AS_TRANS",
            ),
            (
                "router id v6",
                |r| r.router_id = Some("2001:db8::1".into()),
                "bgp.router_id",
                "not an IPv4",
            ),
            (
                "router id 0",
                |r| r.router_id = Some("0.0.0.0".into()),
                "bgp.router_id",
                "no router id",
            ),
            (
                "hold 1",
                |r| r.hold_time = Some(1),
                "bgp.hold_time",
                "0 (no keepalives) or 3..=65535",
            ),
            (
                "hold 2",
                |r| r.hold_time = Some(2),
                "bgp.hold_time",
                "3..=65535",
            ),
            (
                "hold 65536",
                |r| r.hold_time = Some(65536),
                "bgp.hold_time",
                "3..=65535",
            ),
            (
                "community no colon",
                |r| r.communities = vec!["64512".into()],
                "bgp.communities[0]",
                "not a community",
            ),
            (
                "community too big",
                |r| r.communities = vec!["1:1".into(), "65536:1".into()],
                "bgp.communities[1]",
                "ASN:VALUE",
            ),
            (
                "community three parts",
                |r| r.communities = vec!["1:2:3".into()],
                "bgp.communities[0]",
                "not a community",
            ),
            (
                "community sign",
                |r| r.communities = vec!["+1:2".into()],
                "bgp.communities[0]",
                "not a community",
            ),
            (
                "community empty part",
                |r| r.communities = vec![":2".into()],
                "bgp.communities[0]",
                "not a community",
            ),
            (
                "community spaces",
                |r| r.communities = vec!["1: 2".into()],
                "bgp.communities[0]",
                "not a community",
            ),
            (
                "large two parts",
                |r| r.large_communities = vec!["1:2".into()],
                "bgp.large_communities[0]",
                "not a large community",
            ),
            (
                "large too big",
                |r| r.large_communities = vec!["4294967296:1:2".into()],
                "bgp.large_communities[0]",
                "GLOBAL:LOCAL1:LOCAL2",
            ),
            (
                "large four parts",
                |r| r.large_communities = vec!["1:2:3:4".into()],
                "bgp.large_communities[0]",
                "not a large community",
            ),
            (
                "local pref",
                |r| r.local_pref = Some(1 << 32),
                "bgp.local_pref",
                "out of range",
            ),
            (
                "no peers",
                |r| r.peers.clear(),
                "bgp.peers",
                "at least one peer",
            ),
            (
                "peer address",
                |r| r.peers[0].address = "router".into(),
                "bgp.peers[0].address",
                "not an IP address",
            ),
            (
                "peer unspecified",
                |r| r.peers[0].address = "0.0.0.0".into(),
                "bgp.peers[0].address",
                "not a unicast",
            ),
            (
                "peer multicast",
                |r| r.peers[0].address = "ff02::5".into(),
                "bgp.peers[0].address",
                "not a unicast",
            ),
            (
                "peer link-local",
                |r| r.peers[0].address = "fe80::1".into(),
                "bgp.peers[0].address",
                "link-local",
            ),
            (
                "peer v4-mapped",
                |r| r.peers[0].address = "::ffff:198.18.2.254".into(),
                "bgp.peers[0].address",
                "IPv4-mapped",
            ),
            (
                "peer asn 0",
                |r| r.peers[0].asn = 0,
                "bgp.peers[0].asn",
                "out of range",
            ),
            (
                "peer asn big",
                |r| r.peers[0].asn = 4_294_967_295,
                "bgp.peers[0].asn",
                "reserved",
            ),
            (
                "peer port 0",
                |r| r.peers[0].port = Some(0),
                "bgp.peers[0].port",
                "must not be 0",
            ),
            (
                "peer port big",
                |r| r.peers[0].port = Some(65536),
                "bgp.peers[0].port",
                "1..=65535",
            ),
            (
                "peer hold 2",
                |r| r.peers[0].hold_time = Some(2),
                "bgp.peers[0].hold_time",
                "3..=65535",
            ),
            (
                "multihop 0",
                |r| r.peers[0].multihop = Some(0),
                "bgp.peers[0].multihop",
                "1..=255",
            ),
            (
                "multihop 256",
                |r| r.peers[0].multihop = Some(256),
                "bgp.peers[0].multihop",
                "1..=255",
            ),
            (
                "source garbage",
                |r| r.peers[0].source = Some("eth0".into()),
                "bgp.peers[0].source",
                "not an IP address",
            ),
            (
                "source family",
                |r| r.peers[0].source = Some("2001:db8:2::1".into()),
                "bgp.peers[0].source",
                "address family",
            ),
            (
                "source unspecified",
                |r| r.peers[0].source = Some("0.0.0.0".into()),
                "bgp.peers[0].source",
                "not a unicast",
            ),
            (
                "bfd multihop",
                |r| {
                    r.peers[0].multihop = Some(2);
                    r.peers[0].bfd = Some(true);
                },
                "bgp.peers[0].source",
                "BFD on a multihop session",
            ),
            (
                "node bfd multihop",
                |r| {
                    r.peers[0].multihop = Some(2);
                    r.bfd = Some(true);
                },
                "bgp.peers[0].source",
                "needs the local address",
            ),
            (
                "password empty",
                |r| r.peers[0].password = Some(String::new()),
                "bgp.peers[0].password",
                "1..=80",
            ),
            (
                "password long",
                |r| r.peers[0].password = Some("x".repeat(81)),
                "bgp.peers[0].password",
                "1..=80",
            ),
            (
                "password quote",
                |r| r.peers[0].password = Some("a\"b".into()),
                "bgp.peers[0].password",
                "printable ASCII",
            ),
            (
                "password backslash",
                |r| r.peers[0].password = Some("a\\b".into()),
                "bgp.peers[0].password",
                "printable ASCII",
            ),
            (
                "password newline",
                |r| r.peers[0].password = Some("a\nb".into()),
                "bgp.peers[0].password",
                "printable ASCII",
            ),
            (
                "password non-ASCII",
                |r| r.peers[0].password = Some("päss".into()),
                "bgp.peers[0].password",
                "printable ASCII",
            ),
            (
                "duplicate peer",
                |r| {
                    let mut p = r.peers[0].clone();
                    p.asn = 64501;
                    r.peers.push(RawPeer {
                        address: "2001:db8:2::254".into(),
                        asn: 64500,
                        ..RawPeer::default()
                    });
                    r.peers.push(p);
                },
                "bgp.peers[2].address",
                "already bgp.peers[0]",
            ),
            (
                "duplicate peer, other spelling",
                |r| {
                    r.peers.push(RawPeer {
                        address: "2001:db8:2:0::fe".into(),
                        asn: 1,
                        ..RawPeer::default()
                    });
                    r.peers.push(RawPeer {
                        address: "2001:db8:2::00fe".into(),
                        asn: 1,
                        ..RawPeer::default()
                    });
                },
                "bgp.peers[2].address",
                "2001:db8:2::fe is already bgp.peers[1]",
            ),
            (
                "bird config empty",
                |r| {
                    r.bird = Some(RawBird {
                        config: Some(PathBuf::new()),
                        ..RawBird::default()
                    })
                },
                "bgp.bird.config",
                "must not be empty",
            ),
            (
                "bird socket empty",
                |r| {
                    r.bird = Some(RawBird {
                        socket: Some(PathBuf::new()),
                        ..RawBird::default()
                    })
                },
                "bgp.bird.socket",
                "must not be empty",
            ),
            (
                "birdc empty",
                |r| {
                    r.bird = Some(RawBird {
                        birdc: Some(PathBuf::new()),
                        ..RawBird::default()
                    })
                },
                "bgp.bird.birdc",
                "must not be empty",
            ),
        ];
        for (name, edit, field, message) in cases {
            let mut r = minimal();
            edit(&mut r);
            match settings(&r) {
                Ok(s) => panic!("{name}: accepted: {s:?}"),
                Err(e) => {
                    assert_eq!(e.field, *field, "{name}: {e}");
                    assert!(
                        e.message.contains(message),
                        "{name}: {e:?} lacks {message:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn yaml_shape() {
        // Unknown fields are refused, at both levels; numbers must be numbers.
        for (yaml, needle) in [
            ("local_asn: 1\npeers: []\nhold: 9\n", "unknown field `hold`"),
            (
                "local_asn: 1\npeers: [{address: 198.18.2.254, asn: 2, ttl: 2}]\n",
                "unknown field `ttl`",
            ),
            (
                "local_asn: 1\npeers: []\nbird: {path: /x}\n",
                "unknown field `path`",
            ),
            ("peers: []\n", "missing field `local_asn`"),
            ("local_asn: -1\npeers: []\n", "local_asn"),
        ] {
            let e = serde_yaml_ng::from_str::<RawBgp>(yaml)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{yaml:?}: {e}");
        }
    }
}
