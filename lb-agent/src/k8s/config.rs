//! Kubernetes-mode settings: which Services are ours, how they are forwarded, and the node
//! settings. Read from a ConfigMap (key [`CONFIG_KEY`]) in the agent's namespace.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::ConfigMap;
use lb_common::Forwarding;
use serde::Deserialize;

use crate::{
    announce::{AnnounceSpec, bgp::RawBgp},
    config::{RawMembership, announce_spec},
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
    /// → `DesiredState.node.interface`.
    pub interface: Option<String>,
    /// → `DesiredState.node.encap_source`.
    pub encap_source: Option<Ipv4Addr>,
    /// `announce`, `membership`, `bgp`: as in the static file; the nodes are the Nodes.
    pub announce: AnnounceSpec,
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
            interface: None,
            encap_source: None,
            announce: AnnounceSpec::default(),
            announce_node_selector: BTreeMap::new(),
        }
    }
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
    interface: Option<String>,
    encap_source: Option<String>,
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
                    format!("unknown forwarding {s:?} (ipip or l2)"),
                )
            })?,
        };
        if raw.interface.as_deref() == Some("") {
            return Err(err("interface", "must not be empty".into()));
        }
        let encap_source = match raw.encap_source {
            None => None,
            Some(s) => Some(
                s.parse::<Ipv4Addr>()
                    .map_err(|_| err("encap_source", format!("{s:?} is not an IPv4 address")))?,
            ),
        };
        let announce = announce_spec(
            raw.announce.as_deref(),
            None,
            &[],
            &raw.membership,
            raw.bgp.as_ref(),
        )
        .map_err(|(field, message)| err(&field, message))?;
        Ok(K8sConfig {
            load_balancer_class,
            require_class: raw.require_class,
            default_forwarding,
            interface: raw.interface,
            encap_source,
            announce,
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

/// `ipip` or `l2`, as in the static config and the forwarding annotation.
pub fn parse_forwarding(s: &str) -> Option<Forwarding> {
    match s {
        "ipip" => Some(Forwarding::Ipip),
        "l2" => Some(Forwarding::L2),
        _ => None,
    }
}

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
    use super::*;

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
                interface: Some("eth1".into()),
                encap_source: Some(Ipv4Addr::new(198, 18, 0, 2)),
                announce,
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
