//! Results → the report's SVG plots.

use super::{
    results::{Dataplane, E2e, Maglev},
    svg::{Bar, BarChart, LineChart, Series},
};

fn mode_color(mode: &str) -> usize {
    match mode {
        "ipip" => 0,
        "gue" => 1,
        "l2" => 2,
        _ => 3,
    }
}

/// ns/packet per case (whiskers: min–max over rounds), baselines in grey, and for cases
/// with a target a marker at baseline + target.
pub fn dataplane(d: &Dataplane) -> String {
    let mut bars = Vec::new();
    for r in d.baselines.iter().chain(&d.cases) {
        let marker = match (&r.baseline, r.target) {
            (Some((_, base)), Some(t)) => Some(base.median + t),
            _ => None,
        };
        bars.push(Bar {
            label: if r.mode == "-" {
                r.name.clone()
            } else {
                format!("{} [{}]", r.name, r.mode)
            },
            value: r.ns.median,
            lo: r.ns.min,
            hi: r.ns.max,
            color: if r.baseline.is_none() {
                7
            } else {
                mode_color(&r.mode)
            },
            marker,
        });
    }
    BarChart {
        title: format!(
            "lb_xdp, BPF_PROG_TEST_RUN: ns per packet (median of {} rounds, whiskers min–max)",
            d.rounds
        ),
        axis_label: "ns per packet (harness cost subtracted)".into(),
        bars,
        legend: vec![
            ("baseline".into(), 7),
            ("ipip".into(), 0),
            ("gue".into(), 1),
            ("l2".into(), 2),
            ("not balanced".into(), 3),
        ],
        marker_label: Some("target (baseline + allowed ns)".into()),
    }
    .render()
}

/// Fraction of flows moved vs N, against the ideal 1/N.
pub fn disruption(m: &Maglev) -> String {
    let pts = |f: &dyn Fn(&super::results::Disruption) -> f64| -> Vec<(f64, f64)> {
        m.disruption.iter().map(|d| (d.n as f64, f(d))).collect()
    };
    let fixed = m.disruption.first().map_or(0, |d| d.fixed_slots);
    LineChart {
        title: "Maglev disruption when one of N backends leaves or joins".into(),
        x_label: "N (backends before the change)".into(),
        y_label: "fraction of flows that change backend".into(),
        series: vec![
            Series {
                name: "ideal 1/N".into(),
                points: pts(&|d| 1.0 / d.n as f64),
                color: 7,
                dashed: true,
            },
            Series {
                name: format!("remove one ({fixed} slots)"),
                points: pts(&|d| d.removed),
                color: 0,
                dashed: false,
            },
            Series {
                name: format!("add one ({fixed} slots)"),
                points: pts(&|d| d.added),
                color: 1,
                dashed: false,
            },
            Series {
                name: "remove one (size rule)".into(),
                points: pts(&|d| d.rule_removed),
                color: 3,
                dashed: false,
            },
        ],
        log_x: true,
        log_y: true,
    }
    .render()
}

/// Delivered pps per setup and flow count.
pub fn e2e(e: &E2e) -> String {
    let bars = e
        .rows
        .iter()
        .map(|r| {
            // The ceiling delivers nothing by design: show what its XDP_DROP accepted.
            let ceiling = r.setup.starts_with("XDP_DROP");
            let s = if ceiling { &r.accepted } else { &r.delivered };
            Bar {
                label: format!("{} ({} flows)", r.setup, r.flows),
                value: s.median / 1e3,
                lo: s.min / 1e3,
                hi: s.max / 1e3,
                color: if r.setup.starts_with("nft") {
                    3
                } else if ceiling {
                    7
                } else {
                    0
                },
                marker: None,
            }
        })
        .collect();
    BarChart {
        title: "End to end: packets per second delivered to the backends (ceiling: accepted)"
            .into(),
        axis_label: "thousand packets per second (median, whiskers min–max)".into(),
        bars,
        legend: vec![
            ("lb_xdp".into(), 0),
            ("nftables DNAT".into(), 3),
            ("XDP_DROP at the LB ingress".into(), 7),
        ],
        marker_label: None,
    }
    .render()
}
