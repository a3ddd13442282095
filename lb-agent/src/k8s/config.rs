//! Kubernetes-mode settings: which Services are ours, how they are forwarded, and the node
//! settings. Read from a ConfigMap (key [`CONFIG_KEY`]) in the agent's namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use lb_common::Forwarding;
use serde::Deserialize;

use crate::{
    announce::bgp::RawBgp,
    config::{NodeFields, RawFlowTable, RawMembership, node_spec},
    state::NodeSpec,
};

/// The `spec.loadBalancerClass` this project answers to unless the config names another.
pub const DEFAULT_LOAD_BALANCER_CLASS: &str = "xdp-lb.io/lb";

/// The ConfigMap data key that holds the agent's YAML settings.
pub const CONFIG_KEY: &str = "config.yaml";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct K8sConfig {
    /// Services whose `spec.loadBalancerClass` equals this are ours. Services with another
    /// class are always ignored.
    pub load_balancer_class: Option<String>,
    /// When true, Services without a `spec.loadBalancerClass` are not ours either.
    pub require_class: bool,
    /// Forwarding of Services without the forwarding annotation.
    pub default_forwarding: Forwarding,
    /// Where tunnels to pods on other nodes go.
    pub pod_tunnel: PodTunnel,
    /// The node settings, the same keys and checks as in the static file (`interface`,
    /// `encap_source`, `encap_source_v6`, `gue_port`, `icmp_echo`, `pmtu_icmp`,
    /// `flow_table`, `announce`, `membership`, `bgp`); the announcing nodes are the Nodes,
    /// and every node decapsulates for its pods.
    pub node: NodeSpec,
    /// Only Nodes with these labels announce VIPs (like MetalLB's L2Advertisement
    /// `nodeSelectors`); empty: every Node.
    pub announce_node_selector: BTreeMap<String, String>,
}

impl Default for K8sConfig {
    fn default() -> Self {
        K8sConfig {
            load_balancer_class: Some(DEFAULT_LOAD_BALANCER_CLASS.to_string()),
            require_class: false,
            default_forwarding: Forwarding::Ipip,
            pod_tunnel: PodTunnel::Node,
            node: NodeSpec {
                decap: true,
                ..NodeSpec::default()
            },
            announce_node_selector: BTreeMap::new(),
        }
    }
}

/// Where the tunnel to a pod on another node goes (`pod_tunnel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodTunnel {
    /// To the pod's node (its InternalIP of the pod's family), as GUE carrying the pod's
    /// address; the node translates. Works on any pod network, overlays included.
    #[default]
    Node,
    /// To the pod's address itself: needs routes to the pods on every node (a routed pod
    /// network, e.g. Calico BGP without encapsulation); keeps `ipip` as IP-in-IP.
    Pod,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum K8sConfigError {
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: {field}: {message}")]
    Field {
        origin: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawK8sConfig {
    /// `None`: the default class; `Some("")`: no class of our own.
    load_balancer_class: Option<String>,
    #[serde(default)]
    require_class: bool,
    default_forwarding: Option<String>,
    pod_tunnel: Option<String>,
    // The node settings: the static file's keys (see `config::NodeFields`).
    interface: Option<String>,
    encap_source: Option<String>,
    encap_source_v6: Option<String>,
    gue_port: Option<u16>,
    icmp_echo: Option<bool>,
    pmtu_icmp: Option<bool>,
    #[serde(default)]
    flow_table: RawFlowTable,
    announce: Option<String>,
    #[serde(default)]
    membership: RawMembership,
    bgp: Option<RawBgp>,
    #[serde(default)]
    announce_node_selector: BTreeMap<String, String>,
}

impl K8sConfig {
    /// Parse and validate the YAML settings; `origin` names the source in messages
    /// (`ConfigMap lb-system/lb-agent`).
    pub fn parse(origin: &str, text: &str) -> Result<K8sConfig, K8sConfigError> {
        let raw: RawK8sConfig = if text.trim().is_empty() {
            RawK8sConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| K8sConfigError::Syntax {
                origin: origin.to_string(),
                message: e.to_string(),
            })?
        };
        let err = |field: &str, message: String| K8sConfigError::Field {
            origin: origin.to_string(),
            field: field.to_string(),
            message,
        };
        let load_balancer_class = match raw.load_balancer_class {
            None => Some(DEFAULT_LOAD_BALANCER_CLASS.to_string()),
            Some(class) if class.is_empty() => None,
            Some(class) => {
                if !is_qualified_class(&class) {
                    return Err(err(
                        "load_balancer_class",
                        format!(
                            "{class:?} must look like DOMAIN/NAME, e.g. {DEFAULT_LOAD_BALANCER_CLASS:?}"
                        ),
                    ));
                }
                Some(class)
            }
        };
        if raw.require_class && load_balancer_class.is_none() {
            return Err(err(
                "require_class",
                "is true but load_balancer_class is empty: no Service could be ours".into(),
            ));
        }
        let default_forwarding = match raw.default_forwarding.as_deref() {
            None => Forwarding::Ipip,
            Some(s) => parse_forwarding(s).ok_or_else(|| {
                err(
                    "default_forwarding",
                    format!("unknown forwarding {s:?} (ipip, gue or l2)"),
                )
            })?,
        };
        let pod_tunnel = match raw.pod_tunnel.as_deref() {
            None | Some("node") => PodTunnel::Node,
            Some("pod") => PodTunnel::Pod,
            Some(other) => {
                return Err(err(
                    "pod_tunnel",
                    format!("unknown pod_tunnel {other:?} (node or pod)"),
                ));
            }
        };
        let mut node = node_spec(NodeFields {
            interface: raw.interface.as_deref(),
            encap_source: raw.encap_source.as_deref(),
            encap_source_v6: raw.encap_source_v6.as_deref(),
            gue_port: raw.gue_port,
            icmp_echo: raw.icmp_echo,
            pmtu_icmp: raw.pmtu_icmp,
            flow_table: &raw.flow_table,
            announce: raw.announce.as_deref(),
            node_name: None,
            nodes: &[],
            membership: &raw.membership,
            bgp: raw.bgp.as_ref(),
        })
        .map_err(|(field, message)| err(&field, message))?;
        // Pods on this node receive tunnelled packets from every other node.
        node.decap = true;
        Ok(K8sConfig {
            load_balancer_class,
            require_class: raw.require_class,
            default_forwarding,
            pod_tunnel,
            node,
            announce_node_selector: raw.announce_node_selector,
        })
    }

    /// The settings in a ConfigMap's [`CONFIG_KEY`]; a ConfigMap without that key is an error.
    pub fn from_config_map(cm: &ConfigMap) -> Result<K8sConfig, K8sConfigError> {
        let origin = format!(
            "ConfigMap {}/{}",
            cm.metadata.namespace.as_deref().unwrap_or_default(),
            cm.metadata.name.as_deref().unwrap_or_default()
        );
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .ok_or_else(|| K8sConfigError::Syntax {
                origin: origin.clone(),
                message: format!("no data key {CONFIG_KEY:?}"),
            })?;
        K8sConfig::parse(&origin, text)
    }
}

pub use crate::config::parse_forwarding;

/// Kubernetes requires a class to be a label-style key with a DNS prefix.
fn is_qualified_class(class: &str) -> bool {
    let Some((prefix, name)) = class.split_once('/') else {
        return false;
    };
    let dns_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    dns_ok(prefix) && name_ok
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::announce::AnnounceSpec;

    /// Every node setting of the static file, with values other than the defaults.
    const NODE_SETTINGS: &str = "\
interface: eth1
encap_source: 198.18.0.2
encap_source_v6: 2001:db8::2
gue_port: 6081
icmp_echo: false
pmtu_icmp: false
flow_table:
  size: 65536
  tcp_idle_seconds: 600
  udp_idle_seconds: 30
  new_flows_per_cpu_per_second: 5000
announce: bgp
membership: {port: 7001, interval_ms: 500, dead_after_ms: 2000}
bgp:
  local_asn: 64512
  peers: [{address: 198.18.0.1, asn: 64513}]
";

    #[test]
    fn node_settings_are_the_static_file_s_with_the_same_values_and_checks() {
        let cfg = K8sConfig::parse("cm", NODE_SETTINGS).unwrap();
        let file = crate::config::parse(
            std::path::Path::new("lb.yaml"),
            &format!("{NODE_SETTINGS}node_name: node-a\n"),
        )
        .unwrap();
        let mut from_file = file.node.clone();
        from_file.decap = true;
        from_file.announce.node_name = None;
        assert_eq!(cfg.node, from_file);
        assert_eq!(cfg.node.gue_port, 6081);
        assert_eq!(
            cfg.node.encap_source_v6,
            Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2))
        );
        assert!(!cfg.node.icmp_echo && !cfg.node.pmtu_icmp);
        assert_eq!(cfg.node.flows.size, 65536);
        assert_eq!(cfg.node.flows.tcp_idle_s, 600);
        assert_eq!(cfg.node.flows.udp_idle_s, 30);
        assert_eq!(cfg.node.flows.new_flows_per_cpu_s, 5000);
        // The same bad values are refused by both, with the same field and message.
        for bad in [
            "gue_port: 0\n",
            "encap_source_v6: 198.18.0.2\n",
            "flow_table: {size: 0}\n",
            "flow_table: {tcp_idle_seconds: 99999999}\n",
            "interface: \"\"\n",
            "announce: carrier-pigeon\n",
        ] {
            let cm = K8sConfig::parse("cm", bad).unwrap_err().to_string();
            let file = crate::config::parse(std::path::Path::new("cm"), bad)
                .unwrap_err()
                .to_string();
            assert_eq!(cm, file, "{bad:?}");
        }
    }

    #[test]
    fn parses_every_field_and_defaults() {
        let cfg = K8sConfig::parse(
            "cm",
            "load_balancer_class: example.org/fast\nrequire_class: true\ndefault_forwarding: l2\ninterface: eth1\nencap_source: 198.18.0.2\nannounce: l2\nmembership: {port: 7000}\nannounce_node_selector: {edge: \"true\"}\n",
        )
        .unwrap();
        let mut announce = AnnounceSpec {
            mode: crate::announce::AnnounceMode::L2,
            ..AnnounceSpec::default()
        };
        announce.membership.port = 7000;
        assert_eq!(
            cfg,
            K8sConfig {
                load_balancer_class: Some("example.org/fast".into()),
                require_class: true,
                default_forwarding: Forwarding::L2,
                pod_tunnel: PodTunnel::Node,
                node: NodeSpec {
                    interface: Some("eth1".into()),
                    encap_source: Some(Ipv4Addr::new(198, 18, 0, 2)),
                    announce,
                    decap: true,
                    ..NodeSpec::default()
                },
                announce_node_selector: BTreeMap::from([("edge".into(), "true".into())]),
            }
        );
        // The same validation as the static file, naming the ConfigMap.
        assert_eq!(
            K8sConfig::parse("cm", "announce: bgp\n")
                .unwrap_err()
                .to_string(),
            "cm: bgp: `announce: bgp` needs a `bgp` section (local_asn, peers)"
        );
        assert!(
            K8sConfig::parse("cm", "announce: l2\nnodes: []\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field `nodes`"),
            "nodes come from the Node objects"
        );
        assert_eq!(K8sConfig::parse("cm", "").unwrap(), K8sConfig::default());
        let no_class = K8sConfig::parse("cm", "load_balancer_class: \"\"\n").unwrap();
        assert_eq!(no_class.load_balancer_class, None);
    }

    #[test]
    fn rejects_bad_input_naming_origin_and_field() {
        let cases = [
            (
                "default_forwarding: gre\n",
                "cm: default_forwarding: unknown forwarding \"gre\"",
            ),
            (
                "encap_source: 2001:db8::1\n",
                "cm: encap_source: \"2001:db8::1\" is not an IPv4",
            ),
            (
                "load_balancer_class: fast\n",
                "cm: load_balancer_class: \"fast\" must look like",
            ),
            (
                "load_balancer_class: Example.org/x\n",
                "load_balancer_class: \"Example.org/x\"",
            ),
            (
                "load_balancer_class: \"\"\nrequire_class: true\n",
                "cm: require_class: is true",
            ),
            ("interface: \"\"\n", "cm: interface: must not be empty"),
            ("lb_class: x\n", "unknown field `lb_class`"),
        ];
        for (text, expected) in cases {
            let msg = K8sConfig::parse("cm", text).unwrap_err().to_string();
            assert!(
                msg.contains(expected),
                "{text:?}: expected {expected:?} in {msg:?}"
            );
        }
    }

    #[test]
    fn reads_a_config_map() {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "lb-agent", "namespace": "lb-system"},
            "data": {"config.yaml": "default_forwarding: l2\n"}
        }))
        .unwrap();
        let cfg = K8sConfig::from_config_map(&cm).unwrap();
        assert_eq!(cfg.default_forwarding, Forwarding::L2);
        let empty = ConfigMap {
            metadata: cm.metadata.clone(),
            ..ConfigMap::default()
        };
        assert_eq!(
            K8sConfig::from_config_map(&empty).unwrap_err().to_string(),
            "ConfigMap lb-system/lb-agent: no data key \"config.yaml\""
        );
    }
}
