//! `moat run --trace-exits[=FILE[,live]]`: what the guest makes moat do.
//!
//! Every VM exit is counted by kind (port read or write, MMIO read or
//! write, HLT, ...) and by the device that owns its port or address (the
//! buses know), with the time moat spent handling it in a histogram. When
//! the VM ends the table goes to stderr and the same figures, as one JSON
//! line `{"summary": ...}`, to FILE; with `live`, FILE first gets a JSON
//! line per exit as it happens (for a short boot: there are many).
//!
//! Each vCPU thread counts into its own [`VcpuTrace`], so tracing shares
//! nothing per exit but the live file; the counts are merged when the
//! thread ends. With tracing off a vCPU pays one branch per exit.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_devices::virtio::mmio::QUEUE_NOTIFY;

/// What `--trace-exits` asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// Where the JSON goes (the table always goes to stderr).
    pub file: Option<PathBuf>,
    /// A JSON line per exit into `file`, as it happens.
    pub live: bool,
}

/// Parses the value of `--trace-exits`: empty, `FILE` or `FILE,live`.
pub fn parse(text: &str) -> Result<TraceConfig, String> {
    let (file, live) = match text.strip_suffix(",live") {
        Some(file) => (file, true),
        None if text == "live" => ("", true),
        None => (text, false),
    };
    if live && file.is_empty() {
        return Err("live needs a FILE (--trace-exits=FILE,live)".into());
    }
    Ok(TraceConfig {
        file: (!file.is_empty()).then(|| PathBuf::from(file)),
        live,
    })
}

/// The kinds of exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ExitKind {
    /// A port read (`in`).
    IoIn,
    /// A port write (`out`).
    IoOut,
    /// A read of an MMIO address no memory backs.
    MmioRead,
    /// A write to one.
    MmioWrite,
    /// HLT (with the in-kernel LAPIC, KVM handles most).
    Hlt,
    /// The guest can take an interrupt now.
    IrqWindowOpen,
    /// KVM_RUN interrupted: a signal (a kick from moat).
    Interrupted,
    /// A triple fault.
    Shutdown,
    /// A power-off, reset or crash reported by KVM.
    SystemEvent,
    /// Anything else (entry failures, internal errors, ...).
    Other,
}

impl ExitKind {
    /// Its name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Hlt => "hlt",
            ExitKind::IrqWindowOpen => "irq_window_open",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system_event",
            ExitKind::Other => "other",
        }
    }
}

/// Histogram buckets: under 1 µs, then [1, 2) µs, [2, 4) µs, ... and the
/// last from 2^(BUCKETS - 2) µs (about 262 ms) up.
pub const BUCKETS: usize = 20;

/// The bucket of a handling time.
pub fn bucket(time: Duration) -> usize {
    let micros = time.as_micros() as u64;
    if micros == 0 {
        return 0;
    }
    (1 + (63 - micros.leading_zeros()) as usize).min(BUCKETS - 1)
}

/// A bucket's upper bound in µs (None for the last, which has none).
pub fn bucket_limit_us(bucket: usize) -> Option<u64> {
    (bucket < BUCKETS - 1).then(|| 1u64 << bucket)
}

/// What the device column says for an exit no bus routes.
const NO_DEVICE: &str = "-";
/// ... and for a port or address no device owns.
const UNCLAIMED: &str = "(unclaimed)";

/// One row: exits of one kind handled by one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// How many.
    pub count: u64,
    /// The time moat spent on them.
    pub handling: Duration,
}

/// Counts, from one vCPU or merged.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// By kind and device.
    pub rows: BTreeMap<(ExitKind, Arc<str>), Row>,
    /// Handling times by kind.
    pub histogram: BTreeMap<ExitKind, [u64; BUCKETS]>,
    /// MMIO writes to a virtio device's QueueNotify that reached moat
    /// (KVM's ioeventfds take the ones it registered), by device.
    pub queue_notify: BTreeMap<Arc<str>, u64>,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        for (key, row) in &other.rows {
            let mine = self.rows.entry(key.clone()).or_default();
            mine.count += row.count;
            mine.handling += row.handling;
        }
        for (kind, buckets) in &other.histogram {
            let mine = self.histogram.entry(*kind).or_insert([0; BUCKETS]);
            for (m, b) in mine.iter_mut().zip(buckets) {
                *m += b;
            }
        }
        for (device, n) in &other.queue_notify {
            *self.queue_notify.entry(device.clone()).or_default() += n;
        }
    }

    /// Every exit counted.
    pub fn total(&self) -> Row {
        self.rows.values().fold(Row::default(), |a, r| Row {
            count: a.count + r.count,
            handling: a.handling + r.handling,
        })
    }
}

/// The VM's trace: the merged counts and the live file.
pub struct ExitTrace {
    config: TraceConfig,
    start: Instant,
    file: Option<Mutex<BufWriter<File>>>,
    merged: Mutex<Counts>,
}

impl ExitTrace {
    /// Opens the trace file (truncated) if there is one; `virtio_devices`
    /// are the names whose trapped queue notifications are reported (as 0
    /// when there are none).
    pub fn new(
        config: &TraceConfig,
        virtio_devices: &[Arc<str>],
    ) -> Result<ExitTrace, crate::config::ConfigError> {
        let file = match &config.file {
            Some(path) => Some(Mutex::new(BufWriter::new(File::create(path).map_err(
                |e| crate::config::ConfigError::File {
                    option: "--trace-exits",
                    path: path.clone(),
                    reason: e.to_string(),
                },
            )?))),
            None => None,
        };
        let mut merged = Counts::default();
        for name in virtio_devices {
            merged.queue_notify.insert(name.clone(), 0);
        }
        Ok(ExitTrace {
            config: config.clone(),
            start: Instant::now(),
            file,
            merged: Mutex::new(merged),
        })
    }

    /// The counts merged so far (every vCPU's, once they have ended).
    pub fn counts(&self) -> Counts {
        self.merged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The table for stderr.
    pub fn table(&self) -> String {
        table(&self.counts())
    }

    /// Writes the summary line to the file, if there is one.
    pub fn write_summary(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(file, "{}", summary_json(&self.counts()))?;
        file.flush()
    }
}

/// One exit, described before it is handled.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    /// Its kind.
    pub kind: ExitKind,
    /// The port or address, for I/O and MMIO exits.
    pub addr: Option<u64>,
    /// The access's width in bytes.
    pub len: usize,
}

/// A vCPU thread's counts, merged into the VM's when it is dropped.
pub struct VcpuTrace {
    trace: Arc<ExitTrace>,
    cpu: u8,
    counts: Counts,
    no_device: Arc<str>,
    unclaimed: Arc<str>,
}

impl VcpuTrace {
    /// Counts for vCPU `cpu` of `trace`.
    pub fn new(trace: Arc<ExitTrace>, cpu: u8) -> VcpuTrace {
        VcpuTrace {
            trace,
            cpu,
            counts: Counts::default(),
            no_device: Arc::from(NO_DEVICE),
            unclaimed: Arc::from(UNCLAIMED),
        }
    }

    /// Records `exit`, handled by `owner` (the device's name and the
    /// offset into its window, from the bus) in `handling`.
    pub fn record(&mut self, exit: Exit, owner: Option<(Arc<str>, u64)>, handling: Duration) {
        let (device, offset) = match (exit.addr, owner) {
            (None, _) => (self.no_device.clone(), None),
            (Some(_), None) => (self.unclaimed.clone(), None),
            (Some(_), Some((name, offset))) => (name, Some(offset)),
        };
        // Every MMIO device moat has is a virtio-mmio window.
        if exit.kind == ExitKind::MmioWrite && offset == Some(QUEUE_NOTIFY) {
            *self.counts.queue_notify.entry(device.clone()).or_default() += 1;
        }
        if let Some(file) = self.trace.file.as_ref().filter(|_| self.trace.config.live) {
            let line = format!(
                "{{\"t_us\":{},\"vcpu\":{},\"exit\":\"{}\",\"device\":\"{}\",\"addr\":{},\"len\":{},\"handling_ns\":{}}}\n",
                self.trace.start.elapsed().as_micros(),
                self.cpu,
                exit.kind.name(),
                device,
                exit.addr.map_or("null".to_string(), |a| a.to_string()),
                exit.len,
                handling.as_nanos()
            );
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            let _ = file.write_all(line.as_bytes());
        }
        let row = self.counts.rows.entry((exit.kind, device)).or_default();
        row.count += 1;
        row.handling += handling;
        self.counts
            .histogram
            .entry(exit.kind)
            .or_insert([0; BUCKETS])[bucket(handling)] += 1;
    }
}

impl Drop for VcpuTrace {
    fn drop(&mut self) {
        self.trace
            .merged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&self.counts);
    }
}

fn bucket_label(bucket: usize) -> String {
    match (bucket, bucket_limit_us(bucket)) {
        (0, _) => "<1µs".into(),
        (b, Some(limit)) => format!("{}-{limit}µs", 1u64 << (b - 1)),
        (b, None) => format!(">={}µs", 1u64 << (b - 1)),
    }
}

/// The table: a row per kind and device, the total, the histogram and the
/// trapped queue notifications.
pub fn table(counts: &Counts) -> String {
    let total = counts.total();
    let mut out = String::from("VM exits (moat --trace-exits)\n");
    out.push_str(&format!(
        "{:<16} {:<14} {:>10} {:>7} {:>14} {:>10}\n",
        "exit", "device", "count", "share", "handling ms", "mean µs"
    ));
    let share = |n: u64| 100.0 * n as f64 / total.count.max(1) as f64;
    let mean = |row: &Row| row.handling.as_secs_f64() * 1e6 / row.count.max(1) as f64;
    for ((kind, device), row) in &counts.rows {
        out.push_str(&format!(
            "{:<16} {:<14} {:>10} {:>6.1}% {:>14.3} {:>10.2}\n",
            kind.name(),
            device,
            row.count,
            share(row.count),
            row.handling.as_secs_f64() * 1e3,
            mean(row)
        ));
    }
    out.push_str(&format!(
        "{:<16} {:<14} {:>10} {:>6.1}% {:>14.3} {:>10.2}\n",
        "total",
        "",
        total.count,
        share(total.count),
        total.handling.as_secs_f64() * 1e3,
        mean(&total)
    ));
    out.push_str("handling time per exit (all kinds):\n");
    let mut all = [0u64; BUCKETS];
    for buckets in counts.histogram.values() {
        for (a, b) in all.iter_mut().zip(buckets) {
            *a += b;
        }
    }
    let last = all.iter().rposition(|n| *n > 0).unwrap_or(0);
    for (bucket, n) in all.iter().enumerate().take(last + 1) {
        out.push_str(&format!("  {:>12} {:>10}\n", bucket_label(bucket), n));
    }
    if !counts.queue_notify.is_empty() {
        let list: Vec<String> = counts
            .queue_notify
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        out.push_str(&format!(
            "queue notifications that exited to moat (KVM's ioeventfds take them): {}\n",
            list.join(", ")
        ));
    }
    out
}

/// The summary as one JSON line.
pub fn summary_json(counts: &Counts) -> String {
    use serde_json::{json, Value};
    let total = counts.total();
    let rows: Vec<Value> = counts
        .rows
        .iter()
        .map(|((kind, device), row)| {
            json!({
                "exit": kind.name(),
                "device": device.as_ref(),
                "count": row.count,
                "handling_ns": row.handling.as_nanos() as u64,
            })
        })
        .collect();
    let histogram: Vec<Value> = counts
        .histogram
        .iter()
        .map(|(kind, buckets)| {
            let buckets: Vec<Value> = buckets
                .iter()
                .enumerate()
                .map(|(b, n)| json!({"below_us": bucket_limit_us(b), "count": n}))
                .collect();
            json!({"exit": kind.name(), "buckets": buckets})
        })
        .collect();
    let notify: serde_json::Map<String, Value> = counts
        .queue_notify
        .iter()
        .map(|(d, n)| (d.to_string(), Value::from(*n)))
        .collect();
    json!({"summary": {
        "exits": total.count,
        "handling_ns": total.handling.as_nanos() as u64,
        "rows": rows,
        "histogram": histogram,
        "queue_notify_exits": notify,
    }})
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_takes_nothing_a_file_or_a_file_and_live() {
        assert_eq!(parse("").unwrap(), TraceConfig::default());
        assert_eq!(
            parse("/tmp/t.json").unwrap(),
            TraceConfig {
                file: Some("/tmp/t.json".into()),
                live: false
            }
        );
        assert_eq!(
            parse("t.json,live").unwrap(),
            TraceConfig {
                file: Some("t.json".into()),
                live: true
            }
        );
        assert!(parse("live").unwrap_err().contains("live needs a FILE"));
        assert!(parse(",live").is_err());
    }

    #[test]
    fn buckets_double_from_one_microsecond() {
        let us = Duration::from_micros;
        assert_eq!(bucket(Duration::from_nanos(999)), 0);
        assert_eq!(bucket(us(1)), 1);
        assert_eq!(bucket(us(3)), 2);
        assert_eq!(bucket(us(4)), 3);
        assert_eq!(bucket(us(1023)), 10);
        assert_eq!(bucket(Duration::from_secs(100)), BUCKETS - 1);
        assert_eq!(bucket_limit_us(0), Some(1));
        assert_eq!(bucket_limit_us(3), Some(8));
        assert_eq!(bucket_limit_us(BUCKETS - 1), None);
        assert_eq!(bucket_label(0), "<1µs");
        assert_eq!(bucket_label(3), "4-8µs");
    }

    #[test]
    fn exits_are_counted_by_kind_and_device_and_merged_when_a_vcpu_ends() {
        let dir = std::env::temp_dir().join(format!("moat-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        let config = TraceConfig {
            file: Some(path.clone()),
            live: true,
        };
        let block: Arc<str> = Arc::from("block0");
        let trace = Arc::new(ExitTrace::new(&config, std::slice::from_ref(&block)).unwrap());
        let serial: Arc<str> = Arc::from("serial");
        let out = |addr| Exit {
            kind: ExitKind::IoOut,
            addr: Some(addr),
            len: 1,
        };
        for cpu in 0..2 {
            let mut vcpu = VcpuTrace::new(trace.clone(), cpu);
            vcpu.record(
                out(0x3f8),
                Some((serial.clone(), 0)),
                Duration::from_micros(3),
            );
            vcpu.record(out(0x80), None, Duration::from_nanos(100));
            let notify = Exit {
                kind: ExitKind::MmioWrite,
                addr: Some(0xd000_0050),
                len: 4,
            };
            vcpu.record(
                notify,
                Some((block.clone(), QUEUE_NOTIFY)),
                Duration::from_micros(1),
            );
            let hlt = Exit {
                kind: ExitKind::Hlt,
                addr: None,
                len: 0,
            };
            vcpu.record(hlt, None, Duration::ZERO);
        }
        let counts = trace.counts();
        let row = |kind, device: &str| counts.rows[&(kind, Arc::from(device))];
        assert_eq!(row(ExitKind::IoOut, "serial").count, 2);
        assert_eq!(
            row(ExitKind::IoOut, "serial").handling,
            Duration::from_micros(6)
        );
        assert_eq!(row(ExitKind::IoOut, UNCLAIMED).count, 2);
        assert_eq!(row(ExitKind::MmioWrite, "block0").count, 2);
        assert_eq!(row(ExitKind::Hlt, NO_DEVICE).count, 2);
        assert_eq!(counts.total().count, 8);
        assert_eq!(counts.queue_notify[&block], 2);
        assert_eq!(counts.histogram[&ExitKind::IoOut][2], 2);
        assert_eq!(counts.histogram[&ExitKind::IoOut][0], 2);

        let table = trace.table();
        assert!(table.contains("io_out"), "{table}");
        assert!(table.contains("serial"), "{table}");
        assert!(table.contains("block0 2"), "{table}");
        trace.write_summary().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 9, "8 live lines and the summary:\n{text}");
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["exit"], "io_out");
        assert_eq!(first["device"], "serial");
        assert_eq!(first["addr"], 0x3f8);
        let summary: serde_json::Value = serde_json::from_str(lines[8]).unwrap();
        assert_eq!(summary["summary"]["exits"], 8);
        assert_eq!(summary["summary"]["queue_notify_exits"]["block0"], 2);
        let rows = summary["summary"]["rows"].as_array().unwrap();
        let sum: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        assert_eq!(sum, 8);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
