//! BIRD 2's configuration for this node: the VIPs as blackhole host routes of two static
//! protocols, exported to the peers; nothing imported, nothing installed in the kernel.
//!
//! Route attributes (communities, large communities, local preference) are set in each
//! static route's own attribute block, so they travel with the VIP and the export filters
//! stay the same whatever is announced: a changed route set reconfigures only the static
//! protocols, and BIRD keeps every BGP session up.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr},
};

use super::settings::{BgpPeer, BgpSettings, RouteAttrs};

/// The static protocol holding the IPv4 VIPs.
pub const STATIC4: &str = "lb_vips4";
/// The static protocol holding the IPv6 VIPs.
pub const STATIC6: &str = "lb_vips6";

/// Seconds between the start of a session's protocol and its first connection attempt
/// (BIRD's default 5 s would delay every new peer and every restart).
const CONNECT_DELAY_S: u32 = 1;
/// Seconds between connection attempts while the peer does not answer (default 120 s: a
/// rebooted router would wait that long for this node's routes).
const CONNECT_RETRY_S: u32 = 5;
/// Back-off after a session error, first and longest (default 60 s and 300 s).
const ERROR_WAIT_S: (u32, u32) = (1, 30);

/// The name of the BGP protocol for `peer`: derived from its address only, so the same peer
/// keeps the same protocol (and BIRD its session) across reloads, whatever else changes.
/// `198.18.2.254` → `lb_peer4_198_18_2_254`, `2001:db8::fe` → `lb_peer6_2001_db8__fe`.
pub fn protocol_name(peer: &IpAddr) -> String {
    // The canonical text forms differ between any two addresses, and an IPv6 one has eight
    // groups or a `::`, so no two addresses share a name once '.' and ':' become '_'.
    let family = if peer.is_ipv4() { 4 } else { 6 };
    let text: String = peer
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("lb_peer{family}_{text}")
}

/// The whole configuration file: deterministic for equal inputs (routes in address order,
/// peers in the settings' order).
pub fn render(
    s: &BgpSettings,
    router_id: Ipv4Addr,
    routes: &BTreeMap<IpAddr, RouteAttrs>,
) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_config(&mut out, s, router_id, routes);
    out
}

fn write_config(
    out: &mut String,
    s: &BgpSettings,
    router_id: Ipv4Addr,
    routes: &BTreeMap<IpAddr, RouteAttrs>,
) -> fmt::Result {
    out.push_str(concat!(
        "# BIRD 2 configuration of this load-balancer node, written by lb-agent from its BGP\n",
        "# settings and the VIPs the node serves. The agent owns this file and rewrites it on\n",
        "# every change. Each VIP is a blackhole host route of a static protocol; there is no\n",
        "# kernel protocol, so none reaches this node's own routing table. The BGP sessions\n",
        "# import nothing and export only these routes.\n",
        "\n",
        "log stderr { info, remote, warning, error, auth, fatal, bug };\n",
    ));
    writeln!(out, "router id {router_id};")?;
    out.push_str("\nprotocol device lb_device {\n}\n");
    if s.peers.iter().any(|p| p.bfd(s)) {
        out.push_str("\nprotocol bfd lb_bfd {\n}\n");
    }
    for (name, channel, v4) in [(STATIC4, "ipv4", true), (STATIC6, "ipv6", false)] {
        writeln!(out, "\nprotocol static {name} {{")?;
        writeln!(out, "  {channel};")?;
        for (vip, attrs) in routes.iter().filter(|(vip, _)| vip.is_ipv4() == v4) {
            write_route(out, s.local_asn, vip, attrs)?;
        }
        out.push_str("}\n");
    }
    for peer in &s.peers {
        write_peer(out, s, peer)?;
    }
    Ok(())
}

fn write_route(out: &mut String, asn: u32, vip: &IpAddr, attrs: &RouteAttrs) -> fmt::Result {
    let len = if vip.is_ipv4() { 32 } else { 128 };
    if attrs.communities.is_empty()
        && attrs.large_communities.is_empty()
        && attrs.local_pref.is_none()
        && attrs.weight.is_none()
    {
        return writeln!(out, "  route {vip}/{len} blackhole;");
    }
    writeln!(out, "  route {vip}/{len} blackhole {{")?;
    for (a, b) in &attrs.communities {
        writeln!(out, "    bgp_community.add(({a}, {b}));")?;
    }
    for (a, b, c) in &attrs.large_communities {
        writeln!(out, "    bgp_large_community.add(({a}, {b}, {c}));")?;
    }
    if let Some(pref) = attrs.local_pref {
        writeln!(out, "    bgp_local_pref = {pref};")?;
    }
    if let Some(w) = attrs.weight {
        let (hi, lo) = super::settings::link_bandwidth(asn, w);
        writeln!(
            out,
            "    bgp_ext_community.add((generic, {hi:#010x}, {lo:#010x})); # link bandwidth: weight {w}"
        )?;
    }
    out.push_str("  };\n");
    Ok(())
}

fn write_peer(out: &mut String, s: &BgpSettings, peer: &BgpPeer) -> fmt::Result {
    let address = peer.address;
    writeln!(out, "\nprotocol bgp {} {{", protocol_name(&address))?;
    writeln!(out, "  description \"{address} AS{}\";", peer.asn)?;
    writeln!(out, "  local as {};", s.local_asn)?;
    writeln!(
        out,
        "  neighbor {address} port {} as {};",
        peer.port, peer.asn
    )?;
    if let Some(source) = peer.source {
        writeln!(out, "  source address {source};")?;
    }
    match peer.multihop {
        Some(ttl) => writeln!(out, "  multihop {ttl};")?,
        // BIRD takes an iBGP peer for multihop unless told; ours are direct unless the
        // settings say `multihop`, for iBGP as for eBGP.
        None if peer.asn == s.local_asn => writeln!(out, "  direct;")?,
        None => {}
    }
    if let Some(pw) = &peer.password {
        // Validated: printable ASCII without '"' and '\'.
        writeln!(out, "  password \"{pw}\";")?;
    }
    let hold = peer.hold_time(s);
    writeln!(out, "  hold time {hold};")?;
    if hold > 0 {
        // BIRD refuses keepalive 0; with hold time 0 it sends none by itself.
        writeln!(out, "  keepalive time {};", hold / 3)?;
    }
    if peer.bfd(s) {
        writeln!(out, "  bfd on;")?;
    }
    // A BIRD that dies takes its routes with it at once: no peer keeps them as stale.
    writeln!(out, "  graceful restart off;")?;
    if peer.asn != s.local_asn {
        // LOCAL_PREF of a VIP that sets it reaches eBGP peers too (RFC 7938 style); a peer
        // that does not allow it ignores it.
        writeln!(out, "  allow bgp_local_pref on;")?;
    }
    writeln!(out, "  connect delay time {CONNECT_DELAY_S};")?;
    writeln!(out, "  connect retry time {CONNECT_RETRY_S};")?;
    writeln!(
        out,
        "  error wait time {}, {};",
        ERROR_WAIT_S.0, ERROR_WAIT_S.1
    )?;
    let (channel, table) = if address.is_ipv4() {
        ("ipv4", STATIC4)
    } else {
        ("ipv6", STATIC6)
    };
    writeln!(out, "  {channel} {{")?;
    writeln!(out, "    import none;")?;
    writeln!(out, "    export where proto = \"{table}\";")?;
    // The routes are blackholes: the next hop this node sends is its own address.
    writeln!(out, "    next hop self;")?;
    out.push_str("  };\n}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, process::Command};

    use super::super::settings::{BirdPaths, DEFAULT_HOLD_TIME_S};
    use super::*;

    fn peer(address: &str, asn: u32) -> BgpPeer {
        BgpPeer {
            address: address.parse().unwrap(),
            asn,
            port: 179,
            hold_time_s: None,
            bfd: None,
            password: None,
            multihop: None,
            source: None,
        }
    }

    fn node() -> BgpSettings {
        BgpSettings {
            local_asn: 64512,
            router_id: None,
            hold_time_s: DEFAULT_HOLD_TIME_S,
            bfd: false,
            peers: vec![peer("198.18.2.254", 64500), peer("2001:db8:2::254", 64500)],
            communities: vec![(64512, 100)],
            large_communities: vec![(64512, 1, 2)],
            local_pref: Some(200),
            bird: BirdPaths::default(),
        }
    }

    fn routes(s: &BgpSettings, vips: &[&str]) -> BTreeMap<IpAddr, RouteAttrs> {
        vips.iter()
            .map(|v| (v.parse().unwrap(), s.default_route_attrs()))
            .collect()
    }

    const ROUTER_ID: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

    /// The example of the module docs and the report, exactly.
    #[test]
    fn golden() {
        let mut s = node();
        s.peers[0] = BgpPeer {
            hold_time_s: Some(3),
            bfd: Some(true),
            password: Some("s3cret".into()),
            multihop: Some(2),
            source: Some("198.18.2.1".parse().unwrap()),
            port: 1179,
            ..peer("198.18.2.254", 64500)
        };
        s.peers.push(peer("198.18.3.1", 64512));
        let mut r = routes(&s, &["198.18.100.1", "2001:db8:100::1"]);
        r.insert("198.18.100.2".parse().unwrap(), RouteAttrs::default());
        let text = render(&s, ROUTER_ID, &r);
        let expected = r#"# BIRD 2 configuration of this load-balancer node, written by lb-agent from its BGP
# settings and the VIPs the node serves. The agent owns this file and rewrites it on
# every change. Each VIP is a blackhole host route of a static protocol; there is no
# kernel protocol, so none reaches this node's own routing table. The BGP sessions
# import nothing and export only these routes.

log stderr { info, remote, warning, error, auth, fatal, bug };
router id 198.18.2.1;

protocol device lb_device {
}

protocol bfd lb_bfd {
}

protocol static lb_vips4 {
  ipv4;
  route 198.18.100.1/32 blackhole {
    bgp_community.add((64512, 100));
    bgp_large_community.add((64512, 1, 2));
    bgp_local_pref = 200;
  };
  route 198.18.100.2/32 blackhole;
}

protocol static lb_vips6 {
  ipv6;
  route 2001:db8:100::1/128 blackhole {
    bgp_community.add((64512, 100));
    bgp_large_community.add((64512, 1, 2));
    bgp_local_pref = 200;
  };
}

protocol bgp lb_peer4_198_18_2_254 {
  description "198.18.2.254 AS64500";
  local as 64512;
  neighbor 198.18.2.254 port 1179 as 64500;
  source address 198.18.2.1;
  multihop 2;
  password "s3cret";
  hold time 3;
  keepalive time 1;
  bfd on;
  graceful restart off;
  allow bgp_local_pref on;
  connect delay time 1;
  connect retry time 5;
  error wait time 1, 30;
  ipv4 {
    import none;
    export where proto = "lb_vips4";
    next hop self;
  };
}

protocol bgp lb_peer6_2001_db8_2__254 {
  description "2001:db8:2::254 AS64500";
  local as 64512;
  neighbor 2001:db8:2::254 port 179 as 64500;
  hold time 9;
  keepalive time 3;
  graceful restart off;
  allow bgp_local_pref on;
  connect delay time 1;
  connect retry time 5;
  error wait time 1, 30;
  ipv6 {
    import none;
    export where proto = "lb_vips6";
    next hop self;
  };
}

protocol bgp lb_peer4_198_18_3_1 {
  description "198.18.3.1 AS64512";
  local as 64512;
  neighbor 198.18.3.1 port 179 as 64512;
  direct;
  hold time 9;
  keepalive time 3;
  graceful restart off;
  connect delay time 1;
  connect retry time 5;
  error wait time 1, 30;
  ipv4 {
    import none;
    export where proto = "lb_vips4";
    next hop self;
  };
}
"#;
        assert_eq!(text, expected, "rendered:\n{text}");
        bird_parses(&text);
    }

    #[test]
    fn names_follow_the_address_only() {
        assert_eq!(
            protocol_name(&"198.18.2.254".parse().unwrap()),
            "lb_peer4_198_18_2_254"
        );
        assert_eq!(
            protocol_name(&"2001:db8::fe".parse().unwrap()),
            "lb_peer6_2001_db8__fe"
        );
        assert_eq!(
            protocol_name(&"2001:0db8:0::00fe".parse().unwrap()),
            "lb_peer6_2001_db8__fe",
            "canonical form"
        );
        assert_ne!(
            protocol_name(&"1:2:3:4::".parse().unwrap()),
            protocol_name(&"1.2.3.4".parse().unwrap())
        );
    }

    /// The text of every `protocol bgp` block.
    fn bgp_blocks(text: &str) -> Vec<&str> {
        text.split("\nprotocol ")
            .filter(|b| b.starts_with("bgp "))
            .collect()
    }

    fn block<'a>(text: &'a str, name: &str) -> &'a str {
        let start = text
            .find(&format!("protocol {name} {{"))
            .unwrap_or_else(|| panic!("no protocol {name} in:\n{text}"));
        let end = text[start..]
            .find("\n}\n")
            .map_or(text.len(), |e| start + e + 3);
        &text[start..end]
    }

    #[test]
    fn routes_change_only_the_static_protocols() {
        let s = node();
        let none = render(&s, ROUTER_ID, &BTreeMap::new());
        let one = render(&s, ROUTER_ID, &routes(&s, &["198.18.100.1"]));
        let many = render(
            &s,
            ROUTER_ID,
            &routes(&s, &["198.18.100.3", "2001:db8:100::1", "198.18.100.1"]),
        );
        assert_eq!(bgp_blocks(&none), bgp_blocks(&one));
        assert_eq!(bgp_blocks(&none), bgp_blocks(&many));
        assert_eq!(bgp_blocks(&none).len(), 2);
        // Deterministic, in address order.
        assert_eq!(
            many,
            render(
                &s,
                ROUTER_ID,
                &routes(&s, &["2001:db8:100::1", "198.18.100.1", "198.18.100.3"])
            )
        );
        let v4 = block(&many, "static lb_vips4");
        let first = v4.find("198.18.100.1/32").unwrap();
        let third = v4.find("198.18.100.3/32").unwrap();
        assert!(first < third, "{v4}");
        assert!(!v4.contains("2001:db8"), "{v4}");
        let v6 = block(&many, "static lb_vips6");
        assert!(v6.contains("route 2001:db8:100::1/128 blackhole {"), "{v6}");
        assert!(!v6.contains("198.18."), "{v6}");
        // The empty configuration still has both static protocols: a withdrawal.
        assert!(!block(&none, "static lb_vips4").contains("route"));
        assert!(!block(&none, "static lb_vips6").contains("route"));
    }

    #[test]
    fn sessions_per_family() {
        let s = node();
        let text = render(
            &s,
            ROUTER_ID,
            &routes(&s, &["198.18.100.1", "2001:db8:100::1"]),
        );
        let v4 = block(&text, "bgp lb_peer4_198_18_2_254");
        assert!(v4.contains("  ipv4 {\n    import none;\n    export where proto = \"lb_vips4\";"));
        assert!(!v4.contains("ipv6"), "{v4}");
        let v6 = block(&text, "bgp lb_peer6_2001_db8_2__254");
        assert!(v6.contains("  ipv6 {\n    import none;\n    export where proto = \"lb_vips6\";"));
        assert!(!v6.contains("ipv4"), "{v6}");
        assert!(!text.contains("protocol kernel"), "never a kernel protocol");
        assert!(!text.contains("protocol bfd"), "no BFD asked for");
        assert!(!text.contains("bfd on"));
        assert!(!text.contains("password"));
        assert!(!text.contains("multihop"));
        assert!(!text.contains("source address"));
    }

    #[test]
    fn timers_bfd_and_ibgp() {
        let mut s = node();
        s.hold_time_s = 0;
        s.bfd = true;
        s.local_asn = 64500; // iBGP with both peers
        s.peers[1].bfd = Some(false);
        s.peers[1].hold_time_s = Some(240);
        let text = render(&s, ROUTER_ID, &BTreeMap::new());
        let v4 = block(&text, "bgp lb_peer4_198_18_2_254");
        assert!(v4.contains("  hold time 0;\n"), "{v4}");
        assert!(!v4.contains("keepalive"), "{v4}");
        assert!(v4.contains("  bfd on;\n"), "{v4}");
        assert!(
            !v4.contains("allow bgp_local_pref"),
            "iBGP carries it anyway: {v4}"
        );
        let v6 = block(&text, "bgp lb_peer6_2001_db8_2__254");
        assert!(
            v6.contains("  hold time 240;\n  keepalive time 80;\n"),
            "{v6}"
        );
        assert!(!v6.contains("bfd"), "{v6}");
        assert!(text.contains("\nprotocol bfd lb_bfd {\n}\n"));
        bird_parses(&text);
    }

    /// BIRD itself parses what `render` writes, for every kind of option.
    #[test]
    fn bird_accepts_rendered_configs() {
        let full = node();
        let mut options = node();
        options.peers[0].password = Some("a b~!@#$%^&*()_+{}|:<>?`-=[];',./".into());
        options.peers[0].multihop = Some(255);
        options.peers[0].source = Some("198.18.2.1".parse().unwrap());
        options.peers[1].source = Some("2001:db8:2::1".parse().unwrap());
        options.peers[1].port = 65535;
        options.peers[1].bfd = Some(true);
        options.hold_time_s = 65535;
        let mut big_numbers = node();
        big_numbers.local_asn = 4_294_967_294;
        big_numbers.peers[0].asn = 4_200_000_000;
        let v6_only = BgpSettings {
            peers: vec![peer("2001:db8:2::254", 64512)],
            ..node()
        };
        let mut attrs = RouteAttrs {
            communities: vec![(0, 0), (65535, 65535), (65535, 65281)],
            large_communities: vec![(4_294_967_295, 0, 4_294_967_295)],
            local_pref: Some(4_294_967_295),
            weight: Some(3),
        };
        let mut r = routes(&full, &["198.18.100.1", "2001:db8:100::1"]);
        r.insert("198.18.100.2".parse().unwrap(), attrs.clone());
        attrs.local_pref = None;
        r.insert("2001:db8:100::2".parse().unwrap(), attrs);
        for (name, s) in [
            ("full", &full),
            ("options", &options),
            ("big numbers", &big_numbers),
            ("v6 only", &v6_only),
        ] {
            for (what, routes) in [("no routes", BTreeMap::new()), ("routes", r.clone())] {
                let text = render(s, ROUTER_ID, &routes);
                eprintln!("checking {name}, {what}");
                bird_parses(&text);
            }
        }
    }

    /// `bird -p -c FILE` (parse only) accepts `text`; fails clearly when BIRD is missing.
    fn bird_parses(text: &str) {
        let bird = find_bird();
        let dir = std::env::temp_dir().join(format!(
            "lb-bgp-render-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let _guard = RemoveDir(dir.clone());
        let file = dir.join("bird.conf");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(&bird)
            .arg("-p")
            .arg("-c")
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("running {} -p: {e}", bird.display()));
        assert!(
            out.status.success(),
            "bird -p rejected the rendered config: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    struct RemoveDir(PathBuf);

    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn find_bird() -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join("bird"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "this test needs BIRD 2's `bird` (Debian package bird2) to check the \
                     rendered configuration: run `cargo xtask setup` or `apt-get install bird2`"
                )
            })
    }

    #[test]
    fn weights_become_link_bandwidth() {
        // Type 0x40, subtype 0x04, AS 64512, 3 Mbit/s = 375,000 bytes/s as an f32.
        assert_eq!(
            crate::announce::bgp::link_bandwidth(64512, 3),
            (0x4004_fc00, 375_000f32.to_bits())
        );
        // A 4-byte AS is carried as AS_TRANS.
        assert_eq!(
            crate::announce::bgp::link_bandwidth(4_200_000_000, 1).0,
            0x4004_5ba0
        );
        let s = node();
        let mut r = routes(&s, &["198.18.100.1"]);
        r.values_mut().next().unwrap().weight = Some(2);
        let text = render(&s, ROUTER_ID, &r);
        assert!(
            text.contains(&format!(
                "bgp_ext_community.add((generic, 0x4004fc00, {:#010x})); # link bandwidth: weight 2",
                250_000f32.to_bits()
            )),
            "{text}"
        );
    }
}
