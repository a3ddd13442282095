//! What a Service asks of the allocator, read from the `Service` object: requested addresses,
//! pool, sharing key, ports, families, backend identity.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

use super::{AllocError, Family, Protocol, ServiceKey};

/// Annotation prefixes, in precedence order: ours, then MetalLB's.
pub const ANNOTATION_PREFIXES: [&str; 2] = ["xdp-lb.io/", "metallb.universe.tf/"];

/// Annotation (after a prefix): comma-separated requested addresses.
pub const LOAD_BALANCER_IPS: &str = "loadBalancerIPs";
/// Annotation (after a prefix): the pool to allocate from.
pub const ADDRESS_POOL: &str = "address-pool";
/// Annotation (after a prefix): the sharing key.
pub const ALLOW_SHARED_IP: &str = "allow-shared-ip";

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IpFamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// One Service port, for the sharing check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

impl PortSpec {
    pub const fn tcp(port: u16) -> Self {
        Self {
            port,
            protocol: Protocol::Tcp,
        }
    }

    pub const fn udp(port: u16) -> Self {
        Self {
            port,
            protocol: Protocol::Udp,
        }
    }
}

/// Everything the allocator needs to know about a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRequest {
    pub key: ServiceKey,
    pub labels: BTreeMap<String, String>,
    /// Requested addresses (`loadBalancerIPs` annotation or `spec.loadBalancerIP`); empty:
    /// any address.
    pub requested_ips: Vec<IpAddr>,
    /// Requested pool (`address-pool` annotation).
    pub pool: Option<String>,
    /// Sharing key (`allow-shared-ip` annotation).
    pub sharing_key: Option<String>,
    pub ports: Vec<PortSpec>,
    /// `spec.ipFamilies`, primary first; empty means IPv4.
    pub ip_families: Vec<Family>,
    pub ip_family_policy: IpFamilyPolicy,
    /// Services sharing an address must have equal backend identities: the selector for
    /// `externalTrafficPolicy: Local`, `None` otherwise (see the module docs).
    pub backend: Option<String>,
}

impl ServiceRequest {
    /// A single-stack IPv4 request with no ports, labels or annotations.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            key: ServiceKey::new(namespace, name),
            ..Self::default()
        }
    }

    /// The primary family: the first of `ip_families`, IPv4 if there is none.
    pub fn primary_family(&self) -> Family {
        self.ip_families.first().copied().unwrap_or(Family::V4)
    }

    /// Read a Service object. Fails on annotations or fields that cannot be understood
    /// (an address that does not parse, conflicting requests, unknown families), with a
    /// message for an Event.
    pub fn from_service(svc: &Service) -> Result<Self, AllocError> {
        let meta = &svc.metadata;
        let key = service_key(svc);
        let no_annotations = BTreeMap::new();
        let annotations = meta.annotations.as_ref().unwrap_or(&no_annotations);
        let annotation = |suffix: &str| {
            ANNOTATION_PREFIXES.iter().find_map(|prefix| {
                let k = format!("{prefix}{suffix}");
                annotations.get(&k).map(|v| (k, v.trim()))
            })
        };
        let invalid = |message: String| AllocError::InvalidRequest { message };
        let spec = svc.spec.clone().unwrap_or_default();

        let mut requested_ips = Vec::new();
        if let Some((k, value)) = annotation(LOAD_BALANCER_IPS) {
            for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let ip: IpAddr = item.parse().map_err(|_| {
                    invalid(format!("annotation {k}: {item:?} is not an IP address"))
                })?;
                if !requested_ips.contains(&ip) {
                    requested_ips.push(ip);
                }
            }
        }
        if let Some(lb_ip) = spec
            .load_balancer_ip
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let ip: IpAddr = lb_ip.parse().map_err(|_| {
                invalid(format!(
                    "spec.loadBalancerIP {lb_ip:?} is not an IP address"
                ))
            })?;
            if requested_ips.is_empty() {
                requested_ips.push(ip);
            } else if requested_ips != [ip] {
                return Err(invalid(format!(
                    "spec.loadBalancerIP {ip} and the loadBalancerIPs annotation disagree; set only one"
                )));
            }
        }

        let non_empty = |suffix: &str| {
            annotation(suffix)
                .map(|(_, v)| v.to_owned())
                .filter(|v| !v.is_empty())
        };

        let ip_families = spec
            .ip_families
            .iter()
            .flatten()
            .map(|f| match f.as_str() {
                "IPv4" => Ok(Family::V4),
                "IPv6" => Ok(Family::V6),
                other => Err(invalid(format!(
                    "spec.ipFamilies: unknown family {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ip_family_policy = match spec.ip_family_policy.as_deref() {
            None | Some("SingleStack") => IpFamilyPolicy::SingleStack,
            Some("PreferDualStack") => IpFamilyPolicy::PreferDualStack,
            Some("RequireDualStack") => IpFamilyPolicy::RequireDualStack,
            Some(other) => {
                return Err(invalid(format!(
                    "spec.ipFamilyPolicy: unknown policy {other:?}"
                )));
            }
        };

        let ports = spec
            .ports
            .iter()
            .flatten()
            .map(|p| {
                let protocol = match p.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    Some(other) => {
                        return Err(invalid(format!(
                            "port {}: unknown protocol {other:?}",
                            p.port
                        )));
                    }
                };
                let port = u16::try_from(p.port)
                    .ok()
                    .filter(|&n| n != 0)
                    .ok_or_else(|| invalid(format!("port {} is out of range", p.port)))?;
                Ok(PortSpec { port, protocol })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let backend = (spec.external_traffic_policy.as_deref() == Some("Local")).then(|| {
            spec.selector
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        });

        Ok(Self {
            key,
            labels: meta.labels.clone().unwrap_or_default(),
            requested_ips,
            pool: non_empty(ADDRESS_POOL),
            sharing_key: non_empty(ALLOW_SHARED_IP),
            ports,
            ip_families,
            ip_family_policy,
            backend,
        })
    }
}

/// Namespace and name of a Service (empty strings if missing).
pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// The addresses in `status.loadBalancer.ingress`, for [`super::Allocator::restore`].
/// Hostnames and entries that do not parse are skipped.
pub fn ingress_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(json: serde_json::Value) -> Service {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn reads_our_annotations_before_metallb() {
        let s = svc(serde_json::json!({
            "metadata": {
                "name": "dns", "namespace": "infra", "labels": {"app": "dns"},
                "annotations": {
                    "metallb.universe.tf/loadBalancerIPs": "198.18.0.1",
                    "xdp-lb.io/loadBalancerIPs": "198.18.0.53, 2001:db8::53",
                    "metallb.universe.tf/address-pool": "public",
                    "metallb.universe.tf/allow-shared-ip": " dns ",
                }
            },
            "spec": {
                "type": "LoadBalancer",
                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "externalTrafficPolicy": "Local",
                "selector": {"b": "2", "a": "1"}
            }
        }));
        let r = ServiceRequest::from_service(&s).unwrap();
        assert_eq!(r.key, ServiceKey::new("infra", "dns"));
        assert_eq!(
            r.requested_ips,
            [
                "198.18.0.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert_eq!(r.pool.as_deref(), Some("public"));
        assert_eq!(r.sharing_key.as_deref(), Some("dns"));
        assert_eq!(r.ports, [PortSpec::udp(53), PortSpec::tcp(53)]);
        assert_eq!(r.ip_families, [Family::V4, Family::V6]);
        assert_eq!(r.ip_family_policy, IpFamilyPolicy::RequireDualStack);
        assert_eq!(r.backend.as_deref(), Some("a=1,b=2"));
        assert_eq!(r.labels["app"], "dns");
    }

    #[test]
    fn load_balancer_ip_field_and_conflicts() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"loadBalancerIP": "198.18.0.7", "externalTrafficPolicy": "Cluster"}
        }));
        let r = ServiceRequest::from_service(&s).unwrap();
        assert_eq!(r.requested_ips, ["198.18.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.backend, None);
        assert_eq!(r.ip_family_policy, IpFamilyPolicy::SingleStack);

        let s = svc(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n",
                "annotations": {"xdp-lb.io/loadBalancerIPs": "198.18.0.8"}},
            "spec": {"loadBalancerIP": "198.18.0.7"}
        }));
        let e = ServiceRequest::from_service(&s).unwrap_err();
        assert_eq!(e.reason(), "InvalidRequest");
        assert!(e.to_string().contains("disagree"), "{e}");

        let s = svc(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n",
                "annotations": {"metallb.universe.tf/loadBalancerIPs": "198.18.0.8,nope"}},
        }));
        let e = ServiceRequest::from_service(&s).unwrap_err();
        assert!(
            e.to_string().contains("\"nope\" is not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn ingress_ips_from_status() {
        let s = svc(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.18.0.7", "ipMode": "VIP"},
                {"hostname": "lb.example"},
                {"ip": "2001:db8::7"}
            ]}}
        }));
        assert_eq!(
            ingress_ips(&s),
            [
                "198.18.0.7".parse::<IpAddr>().unwrap(),
                "2001:db8::7".parse().unwrap()
            ]
        );
    }
}
