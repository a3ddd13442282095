//! Which backends the data plane cannot send to because of their next hop, logged once per
//! change rather than at every sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{state::ServiceAddr, sync::Plan};

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

    /// Take the problems of `plan` and log what changed: each new or changed problem as a
    /// warning, each one gone as information.
    pub fn report(&mut self, plan: &Plan) {
        for change in self.update(plan) {
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
struct HopChange {
    service: ServiceAddr,
    backend: IpAddr,
    now: Option<HopProblem>,
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
