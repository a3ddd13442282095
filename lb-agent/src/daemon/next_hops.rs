//! Which backends the data plane cannot send to because of their next hop, logged once per
//! change rather than at every sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    ipam::Notice,
    state::{DesiredState, ServiceAddr, ServiceRef},
    sync::Plan,
};

/// Why a backend gets nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopProblem {
    /// Its next hop's MAC is still being resolved: its packets are dropped meanwhile.
    Unresolved,
    /// Its next hop failed to resolve: its share goes to the backends of following slots.
    Unreachable,
}

/// The backends with a next-hop problem as of the last plan.
#[derive(Debug, Default)]
pub struct NextHopReport {
    problems: BTreeMap<(ServiceAddr, IpAddr), HopProblem>,
    unreachable: BTreeSet<IpAddr>,
}

impl NextHopReport {
    /// The backend addresses whose next hop was unreachable in the last plan.
    pub fn unreachable(&self) -> &BTreeSet<IpAddr> {
        &self.unreachable
    }

    /// How many backends are unresolved and unreachable as of the last plan.
    pub fn counts(&self) -> (usize, usize) {
        let unresolved = self
            .problems
            .values()
            .filter(|p| **p == HopProblem::Unresolved)
            .count();
        (unresolved, self.problems.len() - unresolved)
    }

    /// Take the problems of `plan` and log what changed: each new or changed problem as a
    /// warning, each one gone as information. Returns the changes (for Events).
    pub fn report(&mut self, plan: &Plan) -> Vec<HopChange> {
        let changes = self.update(plan);
        for &change in &changes {
            let HopChange {
                service, backend, ..
            } = change;
            match change.now {
                Some(HopProblem::Unresolved) => tracing::warn!(
                    %service, %backend,
                    "backend MAC unknown: packets for it are dropped until it resolves"
                ),
                Some(HopProblem::Unreachable) => tracing::warn!(
                    %service, %backend,
                    "backend next hop unreachable (no ARP/ND answer): its share goes to the other backends"
                ),
                None => tracing::info!(%service, %backend, "backend next hop resolved"),
            }
        }
        changes
    }

    /// Take the problems of `plan`; what changed since the previous one.
    fn update(&mut self, plan: &Plan) -> Vec<HopChange> {
        let now = problems_of(plan);
        let mut changes: Vec<HopChange> = now
            .iter()
            .filter(|(k, p)| self.problems.get(k) != Some(p))
            .map(|(&(service, backend), &p)| HopChange {
                service,
                backend,
                now: Some(p),
            })
            .collect();
        changes.extend(self.problems.keys().filter(|k| !now.contains_key(k)).map(
            |&(service, backend)| HopChange {
                service,
                backend,
                now: None,
            },
        ));
        self.unreachable = plan.unreachable.iter().map(|(_, ip)| *ip).collect();
        self.problems = now;
        changes
    }
}

/// A backend whose next-hop problem began, changed or ended (`now: None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HopChange {
    pub service: ServiceAddr,
    pub backend: IpAddr,
    pub now: Option<HopProblem>,
}

/// Reasons of the Events about a backend's next hop, on its Service.
pub const REASON_UNRESOLVED: &str = "BackendMACUnresolved";
pub const REASON_UNREACHABLE: &str = "BackendUnreachable";
pub const REASON_REACHABLE: &str = "BackendReachable";

/// The Event a change makes, seen from node `node`.
pub fn notice(change: &HopChange, node: &str) -> Notice {
    let HopChange {
        service, backend, ..
    } = change;
    match change.now {
        Some(HopProblem::Unresolved) => Notice::warning(
            REASON_UNRESOLVED,
            "Forward",
            format!(
                "node {node}: no MAC for backend {backend} of {service} yet; packets balanced to it are dropped until its next hop resolves"
            ),
        ),
        Some(HopProblem::Unreachable) => Notice::warning(
            REASON_UNREACHABLE,
            "Forward",
            format!(
                "node {node}: backend {backend} of {service} does not answer ARP/ND; its share goes to the other backends"
            ),
        ),
        None => Notice::normal(
            REASON_REACHABLE,
            "Forward",
            format!("node {node}: backend {backend} of {service} is reachable again"),
        ),
    }
}

/// The Service object a data-plane service belongs to (Kubernetes mode): the one behind its
/// VIP whose `namespace/name` the service's name (`namespace/name:port`) starts with.
pub fn service_ref<'a>(desired: &'a DesiredState, service: &ServiceAddr) -> Option<&'a ServiceRef> {
    let spec = desired.services.get(service)?;
    let owner = spec
        .name
        .split_once(':')
        .map_or(spec.name.as_str(), |(o, _)| o);
    desired
        .vip_services
        .get(&service.vip)?
        .iter()
        .find(|r| format!("{}/{}", r.namespace, r.name) == owner)
}

fn problems_of(plan: &Plan) -> BTreeMap<(ServiceAddr, IpAddr), HopProblem> {
    let unresolved = plan.unresolved.iter().map(|k| (*k, HopProblem::Unresolved));
    let unreachable = plan
        .unreachable
        .iter()
        .map(|k| (*k, HopProblem::Unreachable));
    unresolved.chain(unreachable).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Protocol;

    #[test]
    fn each_problem_is_reported_once_when_it_begins_changes_and_ends() {
        let svc = ServiceAddr {
            vip: "198.18.0.100".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let b: IpAddr = "198.18.0.12".parse().unwrap();
        let plan = |unresolved: bool, unreachable: bool| Plan {
            unresolved: if unresolved { vec![(svc, b)] } else { vec![] },
            unreachable: if unreachable { vec![(svc, b)] } else { vec![] },
            ..Plan::default()
        };
        let change = |now| {
            vec![HopChange {
                service: svc,
                backend: b,
                now,
            }]
        };
        let mut r = NextHopReport::default();
        assert_eq!(
            r.update(&plan(true, false)),
            change(Some(HopProblem::Unresolved))
        );
        assert_eq!(
            r.update(&plan(true, false)),
            vec![],
            "not again at the next sync"
        );
        assert!(r.unreachable().is_empty());
        assert_eq!(
            r.update(&plan(false, true)),
            change(Some(HopProblem::Unreachable))
        );
        assert_eq!(r.unreachable(), &BTreeSet::from([b]));
        assert_eq!(r.update(&plan(false, true)), vec![]);
        assert_eq!(r.update(&plan(false, false)), change(None));
        assert!(r.unreachable().is_empty());
        assert_eq!(r.update(&plan(false, false)), vec![]);
    }
}
