//! Address pools: the `IPAddressPool` spec as it is stored in the API server, and its
//! validation into [`Pool`]s the allocator can use. Pure: a list of (name, spec) in, the valid
//! pools and one [`PoolError`] per rejected pool out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector as ApiLabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use serde::{Deserialize, Serialize};

use super::Family;

/// API group and version of the pool resource.
pub const POOL_API_VERSION: &str = "xdp-lb.io/v1alpha1";
/// Kind of the pool resource.
pub const POOL_KIND: &str = "IPAddressPool";

/// An `xdp-lb.io/v1alpha1` `IPAddressPool` object, as the API server returns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressPool {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: IpAddressPoolSpec,
}

impl IpAddressPool {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }
}

/// `spec` of an `xdp-lb.io/v1alpha1` `IPAddressPool` (cluster-scoped). See the module docs of
/// [`crate::ipam`] for an example.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpAddressPoolSpec {
    /// CIDRs (`198.18.10.0/24`) and inclusive ranges (`198.18.20.10-198.18.20.19`) of either
    /// family, as in MetalLB's `addresses`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Like `addresses`, but every entry must be IPv4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv4: Vec<String>,
    /// Like `addresses`, but every entry must be IPv6.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<String>,
    /// Whether Services that ask for no particular address or pool get addresses from this
    /// pool. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Never hand out IPv4 addresses ending in `.0` or `.255` (some clients treat them as
    /// network or broadcast addresses). Default `false`, as in MetalLB.
    #[serde(
        default,
        rename = "avoidBuggyIPs",
        skip_serializing_if = "Option::is_none"
    )]
    pub avoid_buggy_ips: Option<bool>,
    /// Which Services may take addresses from this pool; absent: every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocationSpec>,
    /// How this pool's addresses are announced (MetalLB's L2Advertisement /
    /// BGPAdvertisement, as pool fields); absent: by every announcing node, with the
    /// ConfigMap's BGP attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<PoolAnnounceSpec>,
}

/// `spec.announce`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolAnnounceSpec {
    /// Only Nodes with these labels announce the pool's addresses (L2: may own them; BGP:
    /// announce routes); absent: every announcing Node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<ApiLabelSelector>,
    /// BGP attributes of the pool's routes, instead of the ConfigMap's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<PoolBgpSpec>,
}

/// `spec.announce.bgp`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolBgpSpec {
    /// `ASN:VALUE` communities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// `GLOBAL:LOCAL1:LOCAL2` large communities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

/// `spec.announce`, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolAnnounce {
    /// The Nodes that may announce; `None`: every announcing Node.
    pub node_selector: Option<LabelSelector>,
    /// The pool's BGP attributes; `None`: the ConfigMap's.
    pub route: Option<crate::announce::bgp::RouteAttrs>,
}

impl PoolAnnounce {
    fn from_spec(spec: &PoolAnnounceSpec) -> Result<Self, String> {
        let node_selector = match &spec.node_selector {
            Some(sel) => Some(
                LabelSelector::from_api(sel).map_err(|m| format!("announce.nodeSelector: {m}"))?,
            ),
            None => None,
        };
        let route = match &spec.bgp {
            None => None,
            Some(b) => {
                let mut r = crate::announce::bgp::RouteAttrs {
                    local_pref: b.local_pref,
                    ..Default::default()
                };
                for (i, c) in b.communities.iter().enumerate() {
                    let field = format!("announce.bgp.communities[{i}]");
                    r.communities.push(
                        crate::announce::bgp::community(&field, c).map_err(|e| e.to_string())?,
                    );
                }
                for (i, c) in b.large_communities.iter().enumerate() {
                    let field = format!("announce.bgp.largeCommunities[{i}]");
                    r.large_communities.push(
                        crate::announce::bgp::large_community(&field, c)
                            .map_err(|e| e.to_string())?,
                    );
                }
                Some(r)
            }
        };
        Ok(PoolAnnounce {
            node_selector,
            route,
        })
    }
}

/// `spec.serviceAllocation`: both conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAllocationSpec {
    /// Namespaces whose Services may use the pool; empty or absent: all namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Labels the Service must have; absent: any labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<ApiLabelSelector>,
}

/// Blocks no pool may include: their addresses are not unicast host addresses, so a VIP
/// there could never be reached (`0.0.0.0/0` or `::/0` is refused this way too).
const NOT_ASSIGNABLE: [(&str, &str); 5] = [
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/3", "multicast, reserved and broadcast"),
    ("::/127", "the unspecified and loopback addresses"),
    ("ff00::/8", "multicast"),
];

/// An inclusive range of addresses of one family, `first <= last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    first: IpAddr,
    last: IpAddr,
}

impl AddrRange {
    /// A range from `first` to `last` inclusive; `None` if the families differ or
    /// `first > last`.
    pub fn new(first: IpAddr, last: IpAddr) -> Option<Self> {
        (Family::of(first) == Family::of(last) && first <= last).then_some(Self { first, last })
    }

    pub fn first(&self) -> IpAddr {
        self.first
    }

    pub fn last(&self) -> IpAddr {
        self.last
    }

    pub fn family(&self) -> Family {
        Family::of(self.first)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && self.first <= ip && ip <= self.last
    }

    pub fn overlaps(&self, other: &AddrRange) -> bool {
        self.family() == other.family() && self.first <= other.last && other.first <= self.last
    }

    /// Number of addresses, saturating at `u128::MAX` (only `::/0` saturates).
    pub fn len(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }

    /// Never true: a range holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Parse one pool entry: a CIDR (no host bits set) or `first-last`.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let s = entry.trim();
        if let Some((a, b)) = s.split_once('-') {
            let first: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: {:?} is not an IP address", a.trim()))?;
            let last: IpAddr = b
                .trim()
                .parse()
                .map_err(|_| format!("{entry:?}: {:?} is not an IP address", b.trim()))?;
            if Family::of(first) != Family::of(last) {
                return Err(format!(
                    "{entry:?}: range mixes an {} and an {} address",
                    Family::of(first),
                    Family::of(last)
                ));
            }
            return AddrRange::new(first, last)
                .ok_or_else(|| format!("{entry:?}: range start {first} is after its end {last}"));
        }
        if s.contains('/') {
            let net: ipnet::IpNet = s
                .parse()
                .map_err(|_| format!("{entry:?} is not a valid CIDR"))?;
            if net.trunc() != net {
                return Err(format!(
                    "{entry:?} has host bits set (did you mean {}?)",
                    net.trunc()
                ));
            }
            return Ok(Self {
                first: net.network(),
                last: net.broadcast(),
            });
        }
        Err(match s.parse::<IpAddr>() {
            Ok(ip) => format!(
                "{entry:?} is a single address; write it as a CIDR ({ip}/{})",
                Family::of(ip).max_prefix()
            ),
            Err(_) => format!("{entry:?} is neither a CIDR nor a first-last range"),
        })
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `ip + 1` within its family; `None` past the last address.
pub(crate) fn next_ip(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(v6) => u128::from(v6).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// A label selector with the Kubernetes semantics: every `matchLabels` pair and every
/// expression must hold. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match &r.operator {
                    Operator::In(values) => value.is_some_and(|v| values.contains(v)),
                    Operator::NotIn(values) => !value.is_some_and(|v| values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// Validate an API `LabelSelector`: known operators, values only with `In`/`NotIn` and
    /// at least one there.
    pub fn from_api(sel: &ApiLabelSelector) -> Result<Self, String> {
        let match_expressions = sel
            .match_expressions
            .iter()
            .flatten()
            .map(requirement)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            match_labels: sel.match_labels.clone().unwrap_or_default(),
            match_expressions,
        })
    }
}

fn requirement(r: &LabelSelectorRequirement) -> Result<Requirement, String> {
    let values: BTreeSet<String> = r.values.iter().flatten().cloned().collect();
    let operator = match r.operator.as_str() {
        "In" | "NotIn" if values.is_empty() => {
            return Err(format!(
                "serviceSelector: operator {} on key {:?} needs at least one value",
                r.operator, r.key
            ));
        }
        "Exists" | "DoesNotExist" if !values.is_empty() => {
            return Err(format!(
                "serviceSelector: operator {} on key {:?} takes no values",
                r.operator, r.key
            ));
        }
        "In" => Operator::In(values),
        "NotIn" => Operator::NotIn(values),
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            return Err(format!(
                "serviceSelector: unknown operator {other:?} on key {:?} (In, NotIn, Exists, DoesNotExist)",
                r.key
            ));
        }
    };
    Ok(Requirement {
        key: r.key.clone(),
        operator,
    })
}

/// A validated pool. Its ranges are sorted and do not overlap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<AddrRange>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// Namespaces allowed to use the pool; empty: all.
    pub namespaces: BTreeSet<String>,
    pub selector: LabelSelector,
    pub announce: PoolAnnounce,
}

impl Pool {
    /// A pool over `ranges` with the defaults: auto-assign, every address usable, every
    /// Service allowed. The ranges are sorted; use [`Pool::from_spec`] to validate input.
    pub fn new(name: impl Into<String>, ranges: impl IntoIterator<Item = AddrRange>) -> Self {
        let mut ranges: Vec<AddrRange> = ranges.into_iter().collect();
        ranges.sort();
        Self {
            name: name.into(),
            ranges,
            auto_assign: true,
            avoid_buggy_ips: false,
            namespaces: BTreeSet::new(),
            selector: LabelSelector::default(),
            announce: PoolAnnounce::default(),
        }
    }

    /// Validate one pool spec on its own (overlaps with other pools: [`validate_pools`]).
    pub fn from_spec(name: &str, spec: &IpAddressPoolSpec) -> Result<Self, PoolError> {
        let err = |message: String| PoolError {
            pool: name.to_owned(),
            message,
        };
        let mut ranges = Vec::new();
        for (field, want, entries) in [
            ("addresses", None, &spec.addresses),
            ("ipv4", Some(Family::V4), &spec.ipv4),
            ("ipv6", Some(Family::V6), &spec.ipv6),
        ] {
            for entry in entries {
                let range = AddrRange::parse(entry).map_err(|m| err(format!("{field}: {m}")))?;
                if let Some(want) = want
                    && range.family() != want
                {
                    return Err(err(format!(
                        "{field}: {entry:?} is an {} range in the {want} field",
                        range.family()
                    )));
                }
                if let Some((block, what)) = NOT_ASSIGNABLE
                    .iter()
                    .find(|(block, _)| AddrRange::parse(block).is_ok_and(|b| b.overlaps(&range)))
                {
                    return Err(err(format!(
                        "{field}: {entry:?} includes {block} ({what}), which cannot be a VIP"
                    )));
                }
                ranges.push(range);
            }
        }
        if ranges.is_empty() {
            return Err(err("no addresses (set addresses, ipv4 or ipv6)".into()));
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            if pair[0].overlaps(&pair[1]) {
                return Err(err(format!(
                    "ranges {} and {} overlap within the pool",
                    pair[0], pair[1]
                )));
            }
        }
        let alloc = spec.service_allocation.clone().unwrap_or_default();
        let selector = match &alloc.service_selector {
            Some(sel) => LabelSelector::from_api(sel).map_err(err)?,
            None => LabelSelector::default(),
        };
        let announce = match &spec.announce {
            Some(a) => PoolAnnounce::from_spec(a).map_err(err)?,
            None => PoolAnnounce::default(),
        };
        Ok(Self {
            name: name.to_owned(),
            ranges,
            auto_assign: spec.auto_assign.unwrap_or(true),
            avoid_buggy_ips: spec.avoid_buggy_ips.unwrap_or(false),
            namespaces: alloc.namespaces.into_iter().collect(),
            selector,
            announce,
        })
    }

    /// Is `ip` inside one of the ranges (whether or not it may be handed out)?
    pub fn in_range(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// May `ip` be handed out from this pool: inside a range and not excluded by
    /// `avoidBuggyIPs`.
    pub fn usable(&self, ip: IpAddr) -> bool {
        self.in_range(ip) && !(self.avoid_buggy_ips && is_buggy(ip))
    }

    /// May a Service in `namespace` with `labels` take addresses from this pool?
    pub fn allows(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(namespace))
            && self.selector.matches(labels)
    }

    pub fn has_family(&self, family: Family) -> bool {
        self.ranges.iter().any(|r| r.family() == family)
    }
}

/// An IPv4 address ending in `.0` or `.255`.
pub fn is_buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if matches!(v4.octets()[3], 0 | 255))
}

/// A pool that was rejected, and why. The message is written for a status condition or an
/// Event on the pool.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("IPAddressPool {pool}: {message}")]
pub struct PoolError {
    pub pool: String,
    pub message: String,
}

impl PoolError {
    /// Event / condition reason.
    pub const REASON: &'static str = "InvalidPool";
}

/// Validate every pool and reject the ones that overlap. Pools are considered by name; a pool
/// that overlaps an earlier *valid* pool (or has the name of one) is rejected, so an invalid or
/// overlapping pool never takes anything away from the valid ones. Returns the valid pools,
/// sorted by name, and one error per rejected pool.
pub fn validate_pools<'a>(
    specs: impl IntoIterator<Item = (&'a str, &'a IpAddressPoolSpec)>,
) -> (Vec<Pool>, Vec<PoolError>) {
    let mut specs: Vec<_> = specs.into_iter().collect();
    specs.sort_by_key(|(name, _)| *name);
    let mut pools: Vec<Pool> = Vec::new();
    let mut errors = Vec::new();
    for (name, spec) in specs {
        if pools.iter().any(|p| p.name == name) {
            errors.push(PoolError {
                pool: name.to_owned(),
                message: "a pool with this name is already defined".into(),
            });
            continue;
        }
        let pool = match Pool::from_spec(name, spec) {
            Ok(pool) => pool,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let clash = pools.iter().find_map(|other| {
            pool.ranges.iter().find_map(|r| {
                other
                    .ranges
                    .iter()
                    .find(|o| o.overlaps(r))
                    .map(|o| (other, r, o))
            })
        });
        match clash {
            Some((other, r, o)) => errors.push(PoolError {
                pool: name.to_owned(),
                message: format!(
                    "range {r} overlaps range {o} of pool {}; this pool is ignored",
                    other.name
                ),
            }),
            None => pools.push(pool),
        }
    }
    (pools, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn range(s: &str) -> AddrRange {
        AddrRange::parse(s).unwrap()
    }

    #[test]
    fn parses_cidrs_and_ranges() {
        let r = range("198.18.0.0/30");
        assert_eq!((r.first(), r.last()), (ip("198.18.0.0"), ip("198.18.0.3")));
        assert_eq!(r.len(), 4);
        assert_eq!(range("198.18.0.7/32").len(), 1);
        assert_eq!(range("2001:db8::5/128").len(), 1);
        assert_eq!(range("2001:db8::/64").len(), 1 << 64);
        let r = range(" 198.18.1.10 - 198.18.1.19 ");
        assert_eq!((r.first(), r.len()), (ip("198.18.1.10"), 10));
        assert_eq!(range("2001:db8::1-2001:db8::1").len(), 1);
        assert_eq!(range("::/0").len(), u128::MAX);
    }

    #[test]
    fn rejects_bad_entries_with_reasons() {
        for (entry, needle) in [
            ("198.18.0.0/33", "not a valid CIDR"),
            ("198.18.0.300/24", "not a valid CIDR"),
            (
                "198.18.0.5/24",
                "host bits set (did you mean 198.18.0.0/24?)",
            ),
            (
                "198.18.0.9-198.18.0.1",
                "start 198.18.0.9 is after its end 198.18.0.1",
            ),
            (
                "198.18.0.1-2001:db8::1",
                "mixes an IPv4 and an IPv6 address",
            ),
            ("198.18.0.1-x", "\"x\" is not an IP address"),
            ("198.18.0.1", "write it as a CIDR (198.18.0.1/32)"),
            ("2001:db8::1", "(2001:db8::1/128)"),
            ("pool", "neither a CIDR nor a first-last range"),
        ] {
            let e = AddrRange::parse(entry).unwrap_err();
            assert!(e.contains(needle), "{entry}: {e}");
        }
    }

    #[test]
    fn family_fields_are_checked() {
        let spec = IpAddressPoolSpec {
            ipv4: vec!["2001:db8::/120".into()],
            ..Default::default()
        };
        let e = Pool::from_spec("p", &spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "IPAddressPool p: ipv4: \"2001:db8::/120\" is an IPv6 range in the IPv4 field"
        );
        let spec = IpAddressPoolSpec {
            ipv6: vec!["198.18.0.0-198.18.0.9".into()],
            ..Default::default()
        };
        assert!(
            Pool::from_spec("p", &spec)
                .unwrap_err()
                .message
                .contains("IPv4 range in the IPv6 field")
        );
        let e = Pool::from_spec("p", &IpAddressPoolSpec::default()).unwrap_err();
        assert!(e.message.contains("no addresses"));
    }

    #[test]
    fn pools_with_addresses_that_cannot_be_vips_are_rejected() {
        for (entry, needle) in [
            ("0.0.0.0/0", "includes 0.0.0.0/8 (this network)"),
            (
                "::/0",
                "includes ::/127 (the unspecified and loopback addresses)",
            ),
            ("127.0.0.0/30", "includes 127.0.0.0/8 (loopback)"),
            (
                "239.0.0.0/24",
                "includes 224.0.0.0/3 (multicast, reserved and broadcast)",
            ),
            ("255.255.255.255/32", "includes 224.0.0.0/3"),
            ("223.255.255.0-224.0.0.3", "includes 224.0.0.0/3"),
            ("ff02::/120", "includes ff00::/8 (multicast)"),
        ] {
            let spec = IpAddressPoolSpec {
                addresses: vec![entry.into()],
                ..Default::default()
            };
            let e = Pool::from_spec("p", &spec).unwrap_err().to_string();
            let start = format!("IPAddressPool p: addresses: {entry:?} {needle}");
            assert!(e.starts_with(&start), "{e}");
            assert!(e.ends_with(", which cannot be a VIP"), "{e}");
        }
        // Right next to them is fine.
        let spec = IpAddressPoolSpec {
            addresses: vec![
                "1.0.0.0/8".into(),
                "223.255.255.0/24".into(),
                "::2/128".into(),
            ],
            ..Default::default()
        };
        assert!(Pool::from_spec("p", &spec).is_ok());
    }

    #[test]
    fn overlap_within_a_pool_is_rejected() {
        let spec = IpAddressPoolSpec {
            addresses: vec!["198.18.0.0/24".into(), "198.18.0.200-198.18.1.5".into()],
            ..Default::default()
        };
        let e = Pool::from_spec("p", &spec).unwrap_err();
        assert!(e.message.contains("overlap within the pool"), "{e}");
    }

    #[test]
    fn buggy_ips() {
        assert!(is_buggy(ip("198.18.1.0")));
        assert!(is_buggy(ip("198.18.1.255")));
        assert!(!is_buggy(ip("198.18.1.1")));
        assert!(!is_buggy(ip("2001:db8::ff")));
        let mut pool = Pool::new("p", [range("198.18.1.0/24")]);
        assert!(pool.usable(ip("198.18.1.0")));
        pool.avoid_buggy_ips = true;
        assert!(!pool.usable(ip("198.18.1.0")));
        assert!(!pool.usable(ip("198.18.1.255")));
        assert!(pool.usable(ip("198.18.1.1")));
        assert!(pool.in_range(ip("198.18.1.255")));
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn api_selector(yaml: &str) -> ApiLabelSelector {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn label_selector_semantics() {
        let sel = LabelSelector::from_api(&api_selector(
            "matchLabels: {tier: edge}\n\
             matchExpressions:\n\
             - {key: env, operator: In, values: [prod, staging]}\n\
             - {key: legacy, operator: DoesNotExist}\n\
             - {key: team, operator: Exists}\n\
             - {key: zone, operator: NotIn, values: [z9]}\n",
        ))
        .unwrap();
        let ok = labels(&[("tier", "edge"), ("env", "prod"), ("team", "a")]);
        assert!(sel.matches(&ok));
        let mut l = ok.clone();
        l.insert("zone".into(), "z1".into());
        assert!(sel.matches(&l), "NotIn with another value");
        l.insert("zone".into(), "z9".into());
        assert!(!sel.matches(&l), "NotIn value");
        let mut l = ok.clone();
        l.insert("legacy".into(), "".into());
        assert!(!sel.matches(&l), "DoesNotExist");
        let mut l = ok.clone();
        l.remove("team");
        assert!(!sel.matches(&l), "Exists");
        let mut l = ok.clone();
        l.insert("env".into(), "dev".into());
        assert!(!sel.matches(&l), "In");
        let mut l = ok;
        l.remove("tier");
        assert!(!sel.matches(&l), "matchLabels");
        assert!(LabelSelector::default().matches(&BTreeMap::new()));
    }

    #[test]
    fn label_selector_validation() {
        for (yaml, needle) in [
            (
                "matchExpressions: [{key: a, operator: In}]",
                "needs at least one value",
            ),
            (
                "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
                "takes no values",
            ),
            (
                "matchExpressions: [{key: a, operator: Gt, values: [\"1\"]}]",
                "unknown operator \"Gt\"",
            ),
        ] {
            let e = LabelSelector::from_api(&api_selector(yaml)).unwrap_err();
            assert!(e.contains(needle), "{yaml}: {e}");
        }
    }

    fn spec(addresses: &[&str]) -> IpAddressPoolSpec {
        IpAddressPoolSpec {
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn overlapping_pools_reject_the_later_one_by_name() {
        let a = spec(&["198.18.0.0/24"]);
        let b = spec(&["198.18.0.128-198.18.1.10"]);
        let bad = spec(&["198.18.9.0/33"]);
        let c = spec(&["198.18.2.0/24", "2001:db8::/120"]);
        // Input order does not matter: "a" < "b" by name, so "b" is rejected.
        let (pools, errors) = validate_pools([("c", &c), ("b", &b), ("bad", &bad), ("a", &a)]);
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].pool, "b");
        assert_eq!(
            errors[0].message,
            "range 198.18.0.128-198.18.1.10 overlaps range 198.18.0.0-198.18.0.255 of pool a; \
             this pool is ignored"
        );
        assert_eq!(errors[1].pool, "bad");
    }

    #[test]
    fn an_invalid_pool_does_not_block_a_later_one() {
        // "a" is invalid (host bits in its second entry), so "b" may use its first range.
        let a = spec(&["198.18.0.0/24", "198.18.5.1/24"]);
        let b = spec(&["198.18.0.0/25"]);
        let (pools, errors) = validate_pools([("a", &a), ("b", &b)]);
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "b");
        assert_eq!(errors[0].pool, "a");
    }

    #[test]
    fn spec_from_yaml_with_defaults() {
        let spec: IpAddressPoolSpec = serde_yaml_ng::from_str(
            "addresses: [198.18.10.0/24]\n\
             ipv6: ['2001:db8:10::/120']\n\
             avoidBuggyIPs: true\n\
             serviceAllocation:\n  namespaces: [dns]\n  serviceSelector:\n    matchLabels: {exposed: 'yes'}\n",
        )
        .unwrap();
        let pool = Pool::from_spec("public", &spec).unwrap();
        assert!(pool.auto_assign);
        assert!(pool.avoid_buggy_ips);
        assert!(pool.has_family(Family::V4) && pool.has_family(Family::V6));
        assert!(pool.allows("dns", &labels(&[("exposed", "yes")])));
        assert!(!pool.allows("web", &labels(&[("exposed", "yes")])));
        assert!(!pool.allows("dns", &labels(&[])));
        let e = serde_yaml_ng::from_str::<IpAddressPoolSpec>("adresses: []").unwrap_err();
        assert!(e.to_string().contains("unknown field `adresses`"), "{e}");
    }

    #[test]
    fn announce_settings_are_validated() {
        let mut ok = spec(&["198.18.0.0/24"]);
        ok.announce = Some(PoolAnnounceSpec {
            node_selector: Some(ApiLabelSelector {
                match_labels: Some([("edge".to_string(), "true".to_string())].into()),
                ..Default::default()
            }),
            bgp: Some(PoolBgpSpec {
                communities: vec!["64512:100".into()],
                large_communities: vec!["64512:1:2".into()],
                local_pref: Some(200),
            }),
        });
        let pool = Pool::from_spec("edge", &ok).unwrap();
        let sel = pool.announce.node_selector.as_ref().unwrap();
        assert!(sel.matches(&[("edge".to_string(), "true".to_string())].into()));
        assert!(!sel.matches(&BTreeMap::new()));
        let route = pool.announce.route.unwrap();
        assert_eq!(route.communities, [(64512, 100)]);
        assert_eq!(route.large_communities, [(64512, 1, 2)]);
        assert_eq!(route.local_pref, Some(200));
        assert_eq!(
            Pool::from_spec("plain", &spec(&["198.18.0.0/24"]))
                .unwrap()
                .announce,
            PoolAnnounce::default()
        );

        let mut bad = ok.clone();
        bad.announce
            .as_mut()
            .unwrap()
            .bgp
            .as_mut()
            .unwrap()
            .communities = vec!["64512".into()];
        let e = Pool::from_spec("edge", &bad).unwrap_err().to_string();
        assert!(
            e.contains("announce.bgp.communities[0]") && e.contains("\"64512\""),
            "{e}"
        );
        let mut bad = ok;
        bad.announce.as_mut().unwrap().node_selector = Some(ApiLabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "Near".into(),
                values: None,
            }]),
            ..Default::default()
        });
        let e = Pool::from_spec("edge", &bad).unwrap_err().to_string();
        assert!(e.contains("announce.nodeSelector"), "{e}");
    }
}
