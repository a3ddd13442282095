//! Reading an agent's HTTP endpoints from inside its network namespace: a plain HTTP/1.1
//! GET, and the metrics text parsed into series.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::NetNs;

/// `GET path` on `addr` from inside `ns`: the status code and body.
pub fn http_get(
    ns: &NetNs,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.enter(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("no HTTP header end in {text:?}");
        };
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {head:?}"))?;
        // `Transfer-Encoding: chunked` is not expected: hyper sends a full body with a length.
        Ok((status, body.to_string()))
    })?
}

/// One sample of the text exposition: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a Prometheus/OpenMetrics text exposition (comments skipped). Label
/// values with escaped quotes are not expected (ours have none).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .with_context(|| format!("unclosed labels in {line:?}"))?;
                let mut labels = BTreeMap::new();
                for pair in inner.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .with_context(|| format!("bad label {pair:?} in {line:?}"))?;
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// The sum of the samples named `name` whose labels include all of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_their_labels() {
        let text = "# HELP x_total a\n# TYPE x counter\nx_total{a=\"1\",b=\"two words\"} 5\nx_total{a=\"2\",b=\"\"} 3\ny 1.5\n# EOF\n";
        let s = parse_metrics(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels["b"], "two words");
        assert_eq!(s[1].labels["b"], "");
        assert_eq!(sum(&s, "x_total", &[]), 8.0);
        assert_eq!(sum(&s, "x_total", &[("a", "2")]), 3.0);
        assert_eq!(sum(&s, "y", &[]), 1.5);
        assert!(parse_metrics("z{a=\"1\" 3\n").is_err());
    }
}
