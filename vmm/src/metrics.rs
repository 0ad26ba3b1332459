//! Metrics: Firecracker-style JSON lines, one per flush (`FlushMetrics`,
//! and every [`PERIOD`] while the VM runs), to `--metrics-path` or the
//! path `PUT /metrics` gave.
//!
//! Each line has `utc_timestamp_ms` and one object per group: `vcpu`
//! (exits by kind), `api_server`, and one per device (`block_<drive id>`,
//! `net_<iface id>`, `vsock`, `entropy`). As in Firecracker, counters are
//! what happened since the previous line, so a reader sums them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

/// How often a running VM writes a line.
pub const PERIOD: Duration = Duration::from_secs(60);

/// A group of counters: its name and (counter, cumulative value) pairs.
pub type Group = (String, Vec<(&'static str, u64)>);

/// Where metrics go, and what was last written.
pub struct MetricsSink {
    file: File,
    id: Option<String>,
    properties: BTreeMap<String, String>,
    last: HashMap<String, u64>,
}

impl MetricsSink {
    /// Opens `path` (a file, created if missing, or a FIFO).
    pub fn open(
        path: &Path,
        id: Option<String>,
        properties: BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Self {
            file,
            id,
            properties,
            last: HashMap::new(),
        })
    }

    /// The line for `groups` (cumulative values) and `notes` (text per
    /// group, such as the reason a device needs a reset); remembers the
    /// values so the next line has the differences.
    pub fn line(&mut self, groups: &[Group], notes: &[(String, &'static str, String)]) -> String {
        let mut root = Map::new();
        root.insert(
            "utc_timestamp_ms".into(),
            Value::from(crate::logger::now_ms() as u64),
        );
        if let Some(id) = &self.id {
            root.insert("id".into(), Value::from(id.clone()));
        }
        if !self.properties.is_empty() {
            root.insert(
                "properties".into(),
                serde_json::to_value(&self.properties).unwrap_or_default(),
            );
        }
        for (group, counters) in groups {
            let mut object = Map::new();
            for (name, value) in counters {
                let key = format!("{group}.{name}");
                let before = self.last.insert(key, *value).unwrap_or(0);
                object.insert((*name).into(), Value::from(value.saturating_sub(before)));
            }
            for (g, name, text) in notes {
                if g == group {
                    object.insert((*name).into(), Value::from(text.clone()));
                }
            }
            root.insert(group.clone(), Value::Object(object));
        }
        Value::Object(root).to_string()
    }

    /// Writes the line for `groups`.
    pub fn write(
        &mut self,
        groups: &[Group],
        notes: &[(String, &'static str, String)],
    ) -> std::io::Result<()> {
        let mut line = self.line(groups, notes);
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_differences_since_the_last_one() {
        let path = std::env::temp_dir().join(format!("moat-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut props = BTreeMap::new();
        props.insert("team".to_string(), "a".to_string());
        let mut sink = MetricsSink::open(&path, Some("vm1".into()), props).unwrap();
        let groups = |reads: u64| -> Vec<Group> {
            vec![(
                "block_rootfs".to_string(),
                vec![("read_count", reads), ("write_count", 7)],
            )]
        };
        sink.write(&groups(10), &[]).unwrap();
        let notes = vec![(
            "block_rootfs".to_string(),
            "needs_reset_reason",
            "loop".to_string(),
        )];
        sink.write(&groups(25), &notes).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["block_rootfs"]["read_count"], 10);
        assert_eq!(lines[1]["block_rootfs"]["read_count"], 15);
        assert_eq!(lines[1]["block_rootfs"]["write_count"], 0);
        assert_eq!(lines[1]["block_rootfs"]["needs_reset_reason"], "loop");
        assert_eq!(lines[0]["id"], "vm1");
        assert_eq!(lines[0]["properties"]["team"], "a");
        assert!(lines[0]["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        let _ = std::fs::remove_file(&path);
    }
}
