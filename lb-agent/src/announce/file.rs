//! The announcement file: which VIPs this node should announce and with which route weight,
//! for the routing daemon (BGP speaker) that announces them. Written atomically (a temporary
//! file renamed over the old one) and only when its content changes.
//!
//! ```json
//! {"node": "node-a", "vips": [{"address": "198.18.0.100", "weight": 3}]}
//! ```

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

#[derive(Serialize)]
struct File<'a> {
    node: &'a str,
    vips: Vec<Vip>,
}

#[derive(Serialize)]
struct Vip {
    address: IpAddr,
    weight: u32,
}

/// The file's content for `weights`.
pub fn render(node: &str, weights: &BTreeMap<IpAddr, u32>) -> String {
    let file = File {
        node,
        vips: weights
            .iter()
            .map(|(address, weight)| Vip {
                address: *address,
                weight: *weight,
            })
            .collect(),
    };
    // Plain data: serialising cannot fail.
    let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
    text.push('\n');
    text
}

/// Keeps one announcement file current.
pub struct Announcer {
    path: PathBuf,
    node: String,
    written: Option<String>,
}

impl Announcer {
    pub fn new(path: PathBuf, node: String) -> Announcer {
        Announcer {
            path,
            node,
            written: None,
        }
    }

    /// Write the file if `weights` changed it; returns whether it was written.
    pub fn update(&mut self, weights: &BTreeMap<IpAddr, u32>) -> io::Result<bool> {
        let text = render(&self.node, weights);
        if self.written.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_atomic(&self.path, &text)?;
        self.written = Some(text);
        Ok(true)
    }
}

fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_rewrites_only_on_change() {
        let dir = std::env::temp_dir().join(format!("lb-announce-{}", std::process::id()));
        let path = dir.join("announce.json");
        let mut a = Announcer::new(path.clone(), "node-a".into());
        let mut w = BTreeMap::from([("198.18.0.100".parse().unwrap(), 3u32)]);
        assert!(a.update(&w).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["vips"][0]["address"], "198.18.0.100");
        assert_eq!(v["vips"][0]["weight"], 3);
        assert!(!a.update(&w).unwrap(), "unchanged: not rewritten");
        w.insert("2001:db8::100".parse().unwrap(), 0);
        assert!(a.update(&w).unwrap());
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["vips"][1]["weight"], 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
