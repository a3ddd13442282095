//! LoadBalancer IP allocation: pools and the pure allocator, driven by hand-built requests
//! and by real-format objects (`tests/fixtures/ipam/{pools.yaml,services.json}`).

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{List, api::core::v1::Service};
use lb_agent::ipam::{
    AddrRange, AllocError, Allocator, Family, IpAddressPool, IpFamilyPolicy, LabelSelector,
    Operator, Pool, PortSpec, Protocol, Requirement, Revoked, ServiceKey, ServiceRequest,
    ingress_ips, validate_pools,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

fn pool(name: &str, ranges: &[&str]) -> Pool {
    Pool::new(name, ranges.iter().map(|r| AddrRange::parse(r).unwrap()))
}

fn svc(name: &str) -> ServiceRequest {
    ServiceRequest::new("default", name)
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

/// Assign `n` fresh Services `prefix0..` and return their first addresses.
fn fill(a: &mut Allocator, prefix: &str, n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| a.assign(&svc(&format!("{prefix}{i}"))).unwrap()[0])
        .collect()
}

// --- ranges, CIDRs, families -------------------------------------------------------------

#[test]
fn v4_cidr_and_range_in_order() {
    let mut a = Allocator::new(vec![pool(
        "p",
        &["198.18.0.10-198.18.0.11", "198.18.0.0/31"],
    )]);
    assert_eq!(
        fill(&mut a, "s", 4),
        ips(&["198.18.0.0", "198.18.0.1", "198.18.0.10", "198.18.0.11"])
    );
    assert!(matches!(
        a.assign(&svc("x")),
        Err(AllocError::PoolExhausted {
            family: Family::V4,
            ..
        })
    ));
}

#[test]
fn single_address_pools_v4_and_v6() {
    let mut a = Allocator::new(vec![
        pool("four", &["198.18.7.7/32"]),
        pool("six", &["2001:db8::7/128"]),
    ]);
    assert_eq!(a.assign(&svc("a")).unwrap(), ips(&["198.18.7.7"]));
    let mut v6 = svc("b");
    v6.ip_families = vec![Family::V6];
    assert_eq!(a.assign(&v6).unwrap(), ips(&["2001:db8::7"]));
    let e = a.assign(&svc("c")).unwrap_err();
    assert_eq!(e.to_string(), "no free IPv4 address left in pool four");
    let mut v6 = svc("d");
    v6.ip_families = vec![Family::V6];
    assert_eq!(
        a.assign(&v6).unwrap_err().to_string(),
        "no free IPv6 address left in pool six"
    );
}

#[test]
fn v6_range_and_cidr() {
    let mut a = Allocator::new(vec![pool(
        "p",
        &["2001:db8:1::fffe-2001:db8:1::1:1", "2001:db8:2::/127"],
    )]);
    let got: Vec<IpAddr> = (0..6)
        .map(|i| {
            let mut r = svc(&format!("s{i}"));
            r.ip_families = vec![Family::V6];
            a.assign(&r).unwrap()[0]
        })
        .collect();
    assert_eq!(
        got,
        ips(&[
            "2001:db8:1::fffe",
            "2001:db8:1::ffff",
            "2001:db8:1::1:0",
            "2001:db8:1::1:1",
            "2001:db8:2::",
            "2001:db8:2::1",
        ])
    );
}

#[test]
fn network_and_broadcast_addresses_allowed_by_default() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.4.0/24"])]);
    let got = fill(&mut a, "s", 256);
    assert_eq!(got[0], ip("198.18.4.0"));
    assert_eq!(got[255], ip("198.18.4.255"));
    assert!(a.assign(&svc("x")).is_err());
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut p = pool("p", &["198.18.4.254-198.18.5.1"]);
    p.avoid_buggy_ips = true;
    let mut a = Allocator::new(vec![p]);
    assert_eq!(fill(&mut a, "s", 2), ips(&["198.18.4.254", "198.18.5.1"]));
    assert!(matches!(
        a.assign(&svc("x")),
        Err(AllocError::PoolExhausted { .. })
    ));
    // Asking for an excluded address explicitly is refused too.
    let mut r = svc("y");
    r.requested_ips = ips(&["198.18.5.0"]);
    let e = a.assign(&r).unwrap_err();
    assert_eq!(e.reason(), "AddressExcluded");
    assert_eq!(
        e.to_string(),
        "address 198.18.5.0 of pool p is excluded by avoidBuggyIPs"
    );
}

// --- exhaustion, release, reuse ----------------------------------------------------------

#[test]
fn release_and_reuse_lowest_first() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.0.0/30"])]);
    fill(&mut a, "s", 4);
    let e = a.assign(&svc("late")).unwrap_err();
    assert_eq!(e.reason(), "PoolExhausted");
    assert_eq!(a.release(&key("s2")), ips(&["198.18.0.2"]));
    assert_eq!(a.release(&key("s1")), ips(&["198.18.0.1"]));
    assert_eq!(a.assign(&svc("late")).unwrap(), ips(&["198.18.0.1"]));
    assert_eq!(a.assign(&svc("later")).unwrap(), ips(&["198.18.0.2"]));
    assert_eq!(a.in_use("p"), 4);
}

// --- sharing -----------------------------------------------------------------------------

fn dns(name: &str, key: &str, ports: &[PortSpec]) -> ServiceRequest {
    let mut r = svc(name);
    r.sharing_key = Some(key.into());
    r.ports = ports.to_vec();
    r
}

#[test]
fn tcp_and_udp_53_share_with_the_same_key() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.53.0/29"])]);
    a.assign(&svc("other")).unwrap();
    let udp = a
        .assign(&dns("dns-udp", "dns", &[PortSpec::udp(53)]))
        .unwrap();
    let tcp = a
        .assign(&dns("dns-tcp", "dns", &[PortSpec::tcp(53)]))
        .unwrap();
    assert_eq!(udp, ips(&["198.18.53.1"]));
    assert_eq!(tcp, udp, "joins the address it may share");
    let holders: Vec<&ServiceKey> = a.holders(udp[0]).collect();
    assert_eq!(holders, [&key("dns-tcp"), &key("dns-udp")]);
    // Releasing one keeps the address for the other.
    a.release(&key("dns-udp"));
    assert_eq!(a.holders(udp[0]).count(), 1);
    assert_eq!(a.assign(&svc("next")).unwrap(), ips(&["198.18.53.2"]));
}

#[test]
fn requested_shared_address_with_different_key_or_no_key_is_refused() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.53.0/29"])]);
    let mut first = dns("dns-udp", "dns", &[PortSpec::udp(53)]);
    first.requested_ips = ips(&["198.18.53.5"]);
    a.assign(&first).unwrap();

    let mut other = dns("ntp", "time", &[PortSpec::udp(123)]);
    other.requested_ips = ips(&["198.18.53.5"]);
    let e = a.assign(&other).unwrap_err();
    assert_eq!(
        e,
        AllocError::AddressInUse {
            ip: ip("198.18.53.5"),
            owner: key("dns-udp")
        }
    );
    assert_eq!(
        e.to_string(),
        "address 198.18.53.5 is already used by service default/dns-udp (services share an \
         address only when they have the same allow-shared-ip key)"
    );
    other.sharing_key = None;
    assert_eq!(a.assign(&other).unwrap_err().reason(), "AddressInUse");
    // Without a request, a different key gets its own address.
    other.requested_ips.clear();
    other.sharing_key = Some("time".into());
    assert_eq!(a.assign(&other).unwrap(), ips(&["198.18.53.0"]));
}

#[test]
fn same_key_with_a_port_clash_is_refused_or_gets_another_address() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.53.0/29"])]);
    let first = a
        .assign(&dns("a", "k", &[PortSpec::udp(53), PortSpec::tcp(53)]))
        .unwrap();
    let mut clash = dns("b", "k", &[PortSpec::tcp(80), PortSpec::tcp(53)]);
    clash.requested_ips = first.clone();
    let e = a.assign(&clash).unwrap_err();
    assert_eq!(
        e,
        AllocError::PortConflict {
            ip: first[0],
            owner: key("a"),
            port: 53,
            protocol: Protocol::Tcp
        }
    );
    assert_eq!(
        e.to_string(),
        "address 198.18.53.0 is shared with service default/a, which already uses port 53/TCP"
    );
    clash.requested_ips.clear();
    assert_eq!(a.assign(&clash).unwrap(), ips(&["198.18.53.1"]));
    // A third with the same key and free ports joins the first compatible address.
    let third = a.assign(&dns("c", "k", &[PortSpec::udp(123)])).unwrap();
    assert_eq!(third, first);
}

#[test]
fn sharing_needs_the_same_backend_identity() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.53.0/29"])]);
    let mut local = dns("a", "k", &[PortSpec::udp(53)]);
    local.backend = Some("app=dns".into());
    let shared = a.assign(&local).unwrap();
    let mut other = dns("b", "k", &[PortSpec::tcp(53)]);
    other.backend = Some("app=other".into());
    other.requested_ips = shared.clone();
    let e = a.assign(&other).unwrap_err();
    assert_eq!(e.reason(), "SharedAddressBackendMismatch");
    other.backend = None; // externalTrafficPolicy: Cluster vs Local
    assert_eq!(
        a.assign(&other).unwrap_err().reason(),
        "SharedAddressBackendMismatch"
    );
    other.backend = Some("app=dns".into());
    assert_eq!(a.assign(&other).unwrap(), shared);
}

// --- requested addresses and pools -------------------------------------------------------

#[test]
fn requested_address_taken_outside_or_free() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.0.0/28"])]);
    let mut r = svc("a");
    r.requested_ips = ips(&["198.18.0.9"]);
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.0.9"]));
    // Auto allocation goes around it.
    assert_eq!(fill(&mut a, "auto", 10)[9], ip("198.18.0.10"));

    let mut taken = svc("b");
    taken.requested_ips = ips(&["198.18.0.9"]);
    assert_eq!(a.assign(&taken).unwrap_err().reason(), "AddressInUse");

    let mut outside = svc("c");
    outside.requested_ips = ips(&["198.19.0.1"]);
    let e = a.assign(&outside).unwrap_err();
    assert_eq!(
        e.to_string(),
        "address 198.19.0.1 is not in any address pool"
    );
    assert_eq!(e.reason(), "AddressNotInPool");
    assert_eq!(a.addresses_of(&key("c")), None);
}

#[test]
fn requested_addresses_must_fit_the_family_policy() {
    let mut a = Allocator::new(vec![pool("p", &["198.18.0.0/28", "2001:db8::/124"])]);
    let mut r = svc("a");
    r.requested_ips = ips(&["198.18.0.1", "198.18.0.2"]);
    r.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    assert!(a.assign(&r).unwrap_err().to_string().contains("both IPv4"));
    r.requested_ips = ips(&["198.18.0.1"]);
    assert!(
        a.assign(&r)
            .unwrap_err()
            .to_string()
            .contains("RequireDualStack needs one requested address per family")
    );
    r.ip_family_policy = IpFamilyPolicy::SingleStack;
    r.ip_families = vec![Family::V6];
    assert_eq!(
        a.assign(&r).unwrap_err().to_string(),
        "requested address 198.18.0.1 is IPv4 but the service is single-stack IPv6"
    );
    r.ip_families = vec![Family::V6, Family::V4];
    r.ip_family_policy = IpFamilyPolicy::RequireDualStack;
    r.requested_ips = ips(&["198.18.0.1", "2001:db8::1"]);
    assert_eq!(a.assign(&r).unwrap(), ips(&["2001:db8::1", "198.18.0.1"]));
}

#[test]
fn requested_pool() {
    let mut manual = pool("manual", &["198.18.2.0/30"]);
    manual.auto_assign = false;
    let mut a = Allocator::new(vec![pool("auto", &["198.18.1.0/30"]), manual]);
    let mut r = svc("a");
    r.pool = Some("manual".into());
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.2.0"]));

    r.pool = Some("nope".into());
    let e = a.assign(&r).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the requested address pool \"nope\" does not exist (or is invalid)"
    );
    assert_eq!(a.addresses_of(&key("a")), Some(&ips(&["198.18.2.0"])[..]));

    // Changing the requested pool moves the Service; that is what was asked.
    r.pool = Some("auto".into());
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.1.0"]));

    let mut b = svc("b");
    b.pool = Some("manual".into());
    b.requested_ips = ips(&["198.18.1.3"]);
    assert_eq!(
        a.assign(&b).unwrap_err().to_string(),
        "address 198.18.1.3 is not in the requested address pool manual"
    );
    b.ip_families = vec![Family::V6];
    b.requested_ips.clear();
    assert_eq!(
        a.assign(&b).unwrap_err().to_string(),
        "the requested address pool manual has no IPv6 addresses"
    );
}

#[test]
fn auto_assign_false_only_on_request() {
    let mut manual = pool("a-manual", &["198.18.2.0/30"]);
    manual.auto_assign = false;
    let mut a = Allocator::new(vec![manual.clone()]);
    let e = a.assign(&svc("a")).unwrap_err();
    assert_eq!(e.reason(), "NoEligiblePool");
    assert!(e.to_string().contains("autoAssign"), "{e}");

    let mut a = Allocator::new(vec![manual, pool("b-auto", &["198.18.1.0/30"])]);
    assert_eq!(a.assign(&svc("a")).unwrap(), ips(&["198.18.1.0"]));
    let mut r = svc("b");
    r.requested_ips = ips(&["198.18.2.3"]);
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.2.3"]));
}

// --- selectors ---------------------------------------------------------------------------

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn namespace_and_label_selectors() {
    let mut infra = pool("a-infra", &["198.18.1.0/30"]);
    infra.namespaces = ["infra".to_string()].into();
    let mut public = pool("b-public", &["198.18.2.0/30"]);
    public.selector = LabelSelector {
        match_labels: labels(&[("exposure", "public")]),
        match_expressions: vec![Requirement {
            key: "tier".into(),
            operator: Operator::NotIn(["internal".to_string()].into()),
        }],
    };
    let mut a = Allocator::new(vec![infra, public]);

    let in_infra = ServiceRequest::new("infra", "dns");
    assert_eq!(a.assign(&in_infra).unwrap(), ips(&["198.18.1.0"]));

    let mut web = ServiceRequest::new("shop", "web");
    web.labels = labels(&[("exposure", "public")]);
    assert_eq!(a.assign(&web).unwrap(), ips(&["198.18.2.0"]));

    let mut internal = ServiceRequest::new("shop", "db");
    internal.labels = labels(&[("exposure", "public"), ("tier", "internal")]);
    assert_eq!(
        a.assign(&internal).unwrap_err(),
        AllocError::NoEligiblePool { family: Family::V4 }
    );

    let mut pinned = ServiceRequest::new("shop", "pinned");
    pinned.requested_ips = ips(&["198.18.1.3"]);
    let e = a.assign(&pinned).unwrap_err();
    assert_eq!(e.reason(), "PoolNotAllowed");
    assert!(
        e.to_string()
            .contains("address pool a-infra does not allow")
    );
    pinned.requested_ips.clear();
    pinned.pool = Some("a-infra".into());
    assert_eq!(a.assign(&pinned).unwrap_err().reason(), "PoolNotAllowed");
}

// --- dual stack --------------------------------------------------------------------------

fn dual(name: &str, policy: IpFamilyPolicy, families: &[Family]) -> ServiceRequest {
    let mut r = svc(name);
    r.ip_family_policy = policy;
    r.ip_families = families.to_vec();
    r
}

#[test]
fn require_dual_stack_gets_both_or_nothing() {
    let mut a = Allocator::new(vec![pool("v4", &["198.18.0.0/30"])]);
    let r = dual(
        "a",
        IpFamilyPolicy::RequireDualStack,
        &[Family::V4, Family::V6],
    );
    assert_eq!(
        a.assign(&r).unwrap_err(),
        AllocError::NoEligiblePool { family: Family::V6 }
    );
    assert_eq!(a.addresses_of(&r.key), None, "no half allocation");
    assert_eq!(a.in_use("v4"), 0);

    let mut a = Allocator::new(vec![
        pool("v4", &["198.18.0.0/30"]),
        pool("v6", &["2001:db8::/126"]),
    ]);
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.0.0", "2001:db8::"]));
    let v6_first = dual(
        "b",
        IpFamilyPolicy::RequireDualStack,
        &[Family::V6, Family::V4],
    );
    assert_eq!(
        a.assign(&v6_first).unwrap(),
        ips(&["2001:db8::1", "198.18.0.1"])
    );
}

#[test]
fn prefer_dual_stack_falls_back_to_one_family() {
    let mut a = Allocator::new(vec![
        pool("v4", &["198.18.0.0/31"]),
        pool("v6", &["2001:db8::/128"]),
    ]);
    let both = [Family::V4, Family::V6];
    let p = |n: &str| dual(n, IpFamilyPolicy::PreferDualStack, &both);
    assert_eq!(
        a.assign(&p("a")).unwrap(),
        ips(&["198.18.0.0", "2001:db8::"])
    );
    // IPv6 exhausted: IPv4 only.
    assert_eq!(a.assign(&p("b")).unwrap(), ips(&["198.18.0.1"]));
    // Both exhausted: the first family's error.
    assert_eq!(
        a.assign(&p("c")).unwrap_err().to_string(),
        "no free IPv4 address left in pool v4"
    );
    // A single-stack cluster lists one family: no IPv6 even if a pool has some.
    a.release(&key("a"));
    let single = dual("d", IpFamilyPolicy::PreferDualStack, &[Family::V4]);
    assert_eq!(a.assign(&single).unwrap(), ips(&["198.18.0.0"]));
    // Once IPv6 is free again, "b" gains it on its next sync and keeps its IPv4.
    assert_eq!(
        a.assign(&p("b")).unwrap(),
        ips(&["198.18.0.1", "2001:db8::"])
    );
}

// --- restart -----------------------------------------------------------------------------

#[test]
fn restore_rebuilds_without_moving_addresses() {
    let pools = || vec![pool("p", &["198.18.0.0/29"])];
    let mut a = Allocator::new(pools());
    // Status from before the restart: not the lowest addresses.
    assert!(a.restore(&svc("x"), &ips(&["198.18.0.5"])).is_empty());
    let shared_udp = dns("dns-udp", "dns", &[PortSpec::udp(53)]);
    let shared_tcp = dns("dns-tcp", "dns", &[PortSpec::tcp(53)]);
    assert!(a.restore(&shared_udp, &ips(&["198.18.0.3"])).is_empty());
    assert!(a.restore(&shared_tcp, &ips(&["198.18.0.3"])).is_empty());

    // Syncing the restored Services confirms their addresses.
    assert_eq!(a.assign(&svc("x")).unwrap(), ips(&["198.18.0.5"]));
    assert_eq!(a.assign(&shared_tcp).unwrap(), ips(&["198.18.0.3"]));
    // New Services get the lowest free ones around them.
    assert_eq!(
        fill(&mut a, "new", 3),
        ips(&["198.18.0.0", "198.18.0.1", "198.18.0.2"])
    );
    assert_eq!(a.assign(&svc("new3")).unwrap(), ips(&["198.18.0.4"]));
}

#[test]
fn restore_reports_conflicts_and_keeps_the_rest() {
    let mut a = Allocator::new(vec![
        pool("v4", &["198.18.0.0/29"]),
        pool("v6", &["2001:db8::/125"]),
    ]);
    assert!(a.restore(&svc("old"), &ips(&["198.18.0.1"])).is_empty());
    let mut r = dual(
        "young",
        IpFamilyPolicy::RequireDualStack,
        &[Family::V4, Family::V6],
    );
    let rejected = a.restore(&r, &ips(&["198.18.0.1", "2001:db8::3"]));
    assert_eq!(
        rejected,
        [AllocError::AddressInUse {
            ip: ip("198.18.0.1"),
            owner: key("old")
        }]
    );
    assert_eq!(a.addresses_of(&r.key), Some(&ips(&["2001:db8::3"])[..]));
    // The controller then syncs it: IPv6 stays, IPv4 is a fresh one.
    assert_eq!(a.assign(&r).unwrap(), ips(&["198.18.0.0", "2001:db8::3"]));

    r.key = key("stray");
    let rejected = a.restore(&r, &ips(&["198.19.9.9", "198.18.0.7", "198.18.0.6"]));
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].reason(), "AddressNotInPool");
    assert!(rejected[1].to_string().contains("two IPv4 addresses"));
    assert_eq!(a.addresses_of(&r.key), Some(&ips(&["198.18.0.7"])[..]));
}

#[test]
fn restored_address_survives_a_selector_that_no_longer_admits_it() {
    let mut p = pool("p", &["198.18.0.0/29"]);
    p.namespaces = ["infra".to_string()].into();
    let mut a = Allocator::new(vec![p]);
    assert!(a.restore(&svc("legacy"), &ips(&["198.18.0.4"])).is_empty());
    assert_eq!(a.assign(&svc("legacy")).unwrap(), ips(&["198.18.0.4"]));
    // But nothing new for it.
    assert_eq!(
        a.assign(&svc("fresh")).unwrap_err().reason(),
        "NoEligiblePool"
    );
}

// --- pool updates ------------------------------------------------------------------------

#[test]
fn pool_update_keeps_assignments_and_revokes_only_addresses_outside_every_pool() {
    let mut a = Allocator::new(vec![
        pool("v4", &["198.18.0.0/29"]),
        pool("v6", &["2001:db8::/126"]),
    ]);
    let both = [Family::V4, Family::V6];
    let d = |n: &str| dual(n, IpFamilyPolicy::RequireDualStack, &both);
    assert_eq!(
        a.assign(&d("d0")).unwrap(),
        ips(&["198.18.0.0", "2001:db8::"])
    );
    assert_eq!(
        a.assign(&d("d1")).unwrap(),
        ips(&["198.18.0.1", "2001:db8::1"])
    );
    let s2 = a.assign(&svc("s2")).unwrap();
    let s3 = a.assign(&svc("s3")).unwrap();
    let (s2, s3) = (s2[0], s3[0]);

    // The IPv4 pool shrinks to .1-.3 and gains a selector nobody matches; .0 moves to a
    // new pool; the IPv6 pool loses ::1.
    let mut shrunk = pool("v4", &["198.18.0.1-198.18.0.2"]);
    shrunk.namespaces = ["elsewhere".to_string()].into();
    let revoked = a.update_pools(vec![
        shrunk,
        pool("moved", &["198.18.0.0/32"]),
        pool("v6", &["2001:db8::/128", "2001:db8::2/127"]),
    ]);
    assert_eq!(
        revoked,
        [
            Revoked {
                service: key("d1"),
                ip: ip("2001:db8::1")
            },
            Revoked {
                service: key("s3"),
                ip: s3
            },
        ]
    );
    assert_eq!(
        revoked[1].to_string(),
        "address 198.18.0.3 is no longer in any address pool and was released"
    );
    assert_eq!(
        a.addresses_of(&key("d0")),
        Some(&ips(&["198.18.0.0", "2001:db8::"])[..])
    );
    assert_eq!(a.addresses_of(&key("d1")), Some(&ips(&["198.18.0.1"])[..]));
    assert_eq!(a.addresses_of(&key("s2")), Some(&[s2][..]));
    assert_eq!(a.addresses_of(&key("s3")), None);
    assert_eq!(a.holders(s3).count(), 0);
    // Syncing keeps everything that is left; d1 gets a new IPv6 address, keeps its IPv4.
    assert_eq!(
        a.assign(&d("d0")).unwrap(),
        ips(&["198.18.0.0", "2001:db8::"])
    );
    assert_eq!(
        a.assign(&d("d1")).unwrap(),
        ips(&["198.18.0.1", "2001:db8::2"])
    );
    assert_eq!(a.assign(&svc("s2")).unwrap(), [s2]);
    // s3 finds nothing: "v4" no longer admits it, "moved" is full.
    assert_eq!(a.assign(&svc("s3")).unwrap_err().reason(), "PoolExhausted");
}

// --- real-format objects -----------------------------------------------------------------

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ipam")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_pools() -> (Vec<Pool>, Vec<String>) {
    let text = fixture("pools.yaml");
    let objects: Vec<IpAddressPool> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    for o in &objects {
        assert_eq!(
            (o.api_version.as_str(), o.kind.as_str()),
            ("xdp-lb.io/v1alpha1", "IPAddressPool")
        );
    }
    let (pools, errors) = validate_pools(objects.iter().map(|o| (o.name(), &o.spec)));
    (pools, errors.iter().map(ToString::to_string).collect())
}

fn fixture_services() -> Vec<Service> {
    let list: List<Service> = serde_json::from_str(&fixture("services.json")).unwrap();
    list.items
}

#[test]
fn fixture_pools_validate() {
    let (pools, errors) = fixture_pools();
    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["dns", "public"]);
    assert_eq!(
        errors,
        [
            "IPAddressPool shadow: range 198.18.10.128-198.18.10.255 overlaps range \
             198.18.10.0-198.18.10.255 of pool public; this pool is ignored",
            "IPAddressPool typo: ipv4: \"2001:db8:99::/120\" is an IPv6 range in the IPv4 field",
        ]
    );
}

#[test]
fn fixture_services_assign_and_restart() {
    let (pools, _) = fixture_pools();
    let services = fixture_services();
    let reqs: Vec<ServiceRequest> = services
        .iter()
        .map(|s| ServiceRequest::from_service(s).unwrap())
        .collect();

    // First start: "web" already has 198.18.10.7 in its status.
    let mut a = Allocator::new(pools.clone());
    for (svc, req) in services.iter().zip(&reqs) {
        let status = ingress_ips(svc);
        if !status.is_empty() {
            assert!(a.restore(req, &status).is_empty());
        }
    }
    let mut got = BTreeMap::new();
    for req in &reqs {
        got.insert(req.key.to_string(), a.assign(req).unwrap());
    }
    let want = BTreeMap::from([
        // TCP and UDP DNS share one address per family, from the autoAssign: false pool.
        (
            "infra/dns-tcp".to_string(),
            ips(&["198.18.53.0", "2001:db8:53::"]),
        ),
        (
            "infra/dns-udp".to_string(),
            ips(&["198.18.53.0", "2001:db8:53::"]),
        ),
        // avoidBuggyIPs: .0 skipped; a single-stack cluster for this PreferDualStack one.
        ("shop/api".to_string(), ips(&["198.18.10.1"])),
        ("shop/web".to_string(), ips(&["198.18.10.7"])),
    ]);
    assert_eq!(got, want);

    // Restart: a fresh allocator rebuilt from the statuses written, in reverse order this
    // time, gives every Service the same addresses.
    let mut b = Allocator::new(pools);
    for req in reqs.iter().rev() {
        assert!(b.restore(req, &got[&req.key.to_string()]).is_empty());
    }
    for req in &reqs {
        assert_eq!(
            b.assign(req).unwrap(),
            got[&req.key.to_string()],
            "{}",
            req.key
        );
    }
}
