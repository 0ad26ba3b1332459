//! Firecracker's API bodies (`../shared/reference/firecracker-api.yaml`),
//! and how they become a [`VmConfig`]. The config file (`--config-file`)
//! is the body of `GET /vm/config`, so both go through [`VmResources`].
//!
//! Unknown fields are refused, as Firecracker refuses them. A field moat
//! has no device for (rate limiters, MTU, huge pages, ...) is refused with
//! a message that says so rather than accepted and ignored.

use std::path::PathBuf;
use std::time::Duration;

use moat_boot::loader::BootProtocol;
use serde::{Deserialize, Serialize};

use crate::config::{
    self, DiskConfig, IoEngine, NetBackendConfig, NetConfig, RngConfig, VmConfig, VsockConfig,
    DISK_ID_MAX,
};

/// A bad request body or a request moat cannot carry out: the fault
/// message of a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault(pub String);

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fault<T>(message: impl Into<String>) -> Result<T, Fault> {
    Err(Fault(message.into()))
}

/// Firecracker's limit on vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// Firecracker's default guest memory.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// `/boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// A token bucket (refused unless empty: moat has no rate limiters on
/// disks and network cards yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Initial extra tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// `RateLimiter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    fn is_unlimited(limiter: &Option<RateLimiter>) -> bool {
        let empty = |b: &Option<TokenBucket>| b.as_ref().is_none_or(|b| b.size == 0);
        limiter
            .as_ref()
            .is_none_or(|l| empty(&l.bandwidth) && empty(&l.ops))
    }
}

/// Refuses a rate limiter that limits anything: moat has none for this device.
pub fn check_no_rate_limiter(what: &str, limiter: &Option<RateLimiter>) -> Result<(), Fault> {
    if RateLimiter::is_unlimited(limiter) {
        Ok(())
    } else {
        fault(format!(
            "{what}: moat has no rate limiter for this device yet"
        ))
    }
}

/// `/drives/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's name.
    pub drive_id: String,
    /// Boot from it (`root=` on the command line).
    pub is_root_device: bool,
    /// With `is_root_device`: `root=PARTUUID=...` instead of `/dev/vda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` or `Writeback`; moat always honours the guest's flushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Refused unless empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// `Sync` (the default) or `Async` (io_uring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// vhost-user: refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl Drive {
    /// Checks what moat can do with this drive.
    pub fn validate(&self) -> Result<(), Fault> {
        let name = format!("drive {}", self.drive_id);
        if self.socket.is_some() {
            return fault(format!("{name}: moat has no vhost-user block devices"));
        }
        let Some(path) = &self.path_on_host else {
            return fault(format!("{name}: path_on_host is required"));
        };
        check_no_rate_limiter(&name, &self.rate_limiter)?;
        match self.io_engine.as_deref() {
            None | Some("Sync") | Some("Async") => {}
            Some(other) => {
                return fault(format!("{name}: io_engine '{other}' is not Sync or Async"))
            }
        }
        match self.cache_type.as_deref() {
            None | Some("Unsafe") | Some("Writeback") => {}
            Some(other) => {
                return fault(format!(
                    "{name}: cache_type '{other}' is not Unsafe or Writeback"
                ))
            }
        }
        if self.partuuid.is_some() && !self.is_root_device {
            return fault(format!("{name}: partuuid needs is_root_device"));
        }
        check_file(&name, "path_on_host", path)
    }

    fn disk(&self) -> DiskConfig {
        let id = (self.drive_id.len() <= DISK_ID_MAX
            && self.drive_id.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| self.drive_id.clone());
        DiskConfig {
            path: PathBuf::from(self.path_on_host.clone().unwrap_or_default()),
            read_only: self.is_read_only.unwrap_or(false),
            id,
            io_engine: match self.io_engine.as_deref() {
                Some("Async") => IoEngine::Async,
                _ => IoEngine::Sync,
            },
        }
    }
}

/// `PATCH /drives/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's name.
    pub drive_id: String,
    /// A new backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Refused unless empty.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `/network-interfaces/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's name.
    pub iface_id: String,
    /// The TAP.
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Refused: moat does not offer VIRTIO_NET_F_MTU yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Refused unless empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Refused unless empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterface {
    /// Checks what moat can do with this interface.
    pub fn validate(&self) -> Result<NetConfig, Fault> {
        let name = format!("network interface {}", self.iface_id);
        if self.host_dev_name.is_empty() || self.host_dev_name.len() >= libc::IFNAMSIZ {
            return fault(format!(
                "{name}: host_dev_name must be 1 to {} bytes",
                libc::IFNAMSIZ - 1
            ));
        }
        if self.mtu.is_some() {
            return fault(format!(
                "{name}: moat does not advertise an MTU yet (VIRTIO_NET_F_MTU); leave mtu out"
            ));
        }
        check_no_rate_limiter(&name, &self.rx_rate_limiter)?;
        check_no_rate_limiter(&name, &self.tx_rate_limiter)?;
        let mac = match &self.guest_mac {
            None => None,
            Some(text) => match config::parse_mac(text) {
                Some(mac) if mac[0] & 1 == 0 => Some(mac),
                Some(_) => {
                    return fault(format!("{name}: guest_mac {text} is a multicast address"))
                }
                None => {
                    return fault(format!(
                        "{name}: guest_mac '{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)"
                    ))
                }
            },
        };
        Ok(NetConfig {
            backend: NetBackendConfig::Tap(self.host_dev_name.clone()),
            mac,
            offload: true,
            id: Some(self.iface_id.clone()),
        })
    }
}

/// `PATCH /network-interfaces/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's name.
    pub iface_id: String,
    /// Refused unless empty.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Refused unless empty.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `/vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Where moat listens for host clients.
    pub uds_path: String,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl Vsock {
    /// Checks the CID and the socket's directory.
    pub fn validate(&self) -> Result<VsockConfig, Fault> {
        if !(moat_devices::virtio::vsock::MIN_GUEST_CID..=config::MAX_GUEST_CID)
            .contains(&self.guest_cid)
        {
            return fault(format!(
                "vsock: guest_cid {} is not 3 to {} (0-2 are reserved)",
                self.guest_cid,
                config::MAX_GUEST_CID
            ));
        }
        if self.uds_path.is_empty() {
            return fault("vsock: uds_path is empty");
        }
        Ok(VsockConfig {
            cid: self.guest_cid,
            socket: PathBuf::from(&self.uds_path),
        })
    }
}

/// `/entropy`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// A bandwidth bucket becomes moat's bytes-per-second limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl EntropyDevice {
    /// The rng moat builds for it.
    pub fn validate(&self) -> Result<RngConfig, Fault> {
        let Some(limiter) = &self.rate_limiter else {
            return Ok(RngConfig::On(None));
        };
        if limiter.ops.as_ref().is_some_and(|b| b.size > 0) {
            return fault(
                "entropy: moat limits the entropy device in bytes; use bandwidth, not ops",
            );
        }
        match &limiter.bandwidth {
            None => Ok(RngConfig::On(None)),
            Some(b) if b.size == 0 => Ok(RngConfig::On(None)),
            Some(b) if b.refill_time == 0 => {
                fault("entropy: rate_limiter.bandwidth.refill_time must be above 0")
            }
            Some(b) => {
                let rate = b.size.saturating_mul(1000) / b.refill_time;
                Ok(RngConfig::On(Some(rate.max(1))))
            }
        }
    }
}

/// `/machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Only false.
    #[serde(default)]
    pub smt: bool,
    /// Only false (moat's snapshots copy all of memory).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// `Transparent` (moat's default) or `None` (Firecracker's default);
    /// not `2M` (hugetlbfs).
    #[serde(default = "transparent_huge_pages")]
    pub huge_pages: String,
    /// Only absent or `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

fn transparent_huge_pages() -> String {
    "Transparent".into()
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: transparent_huge_pages(),
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: any subset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialMachineConfig {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest RAM in MiB.
    pub mem_size_mib: Option<u64>,
    /// SMT.
    pub smt: Option<bool>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    pub huge_pages: Option<String>,
    /// CPU template.
    pub cpu_template: Option<String>,
}

impl MachineConfig {
    /// How the host backs guest RAM: `huge_pages` as Firecracker spells
    /// it, of which moat has `Transparent` and `None`.
    pub fn huge_pages(&self) -> Result<config::HugePages, Fault> {
        match self.huge_pages.as_str() {
            "Transparent" => Ok(config::HugePages::Transparent),
            "None" => Ok(config::HugePages::None),
            other => fault(format!(
                "machine-config: huge_pages '{other}': moat backs guest memory with transparent huge pages (Transparent) or 4 KiB pages (None), not hugetlbfs"
            )),
        }
    }

    /// Applies a PATCH.
    pub fn patched(&self, patch: PartialMachineConfig) -> Self {
        Self {
            vcpu_count: patch.vcpu_count.unwrap_or(self.vcpu_count),
            mem_size_mib: patch.mem_size_mib.unwrap_or(self.mem_size_mib),
            smt: patch.smt.unwrap_or(self.smt),
            track_dirty_pages: patch.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            huge_pages: patch.huge_pages.unwrap_or_else(|| self.huge_pages.clone()),
            cpu_template: patch.cpu_template.or_else(|| self.cpu_template.clone()),
        }
    }

    /// Checks what moat can do.
    pub fn validate(&self) -> Result<(), Fault> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return fault(format!(
                "machine-config: vcpu_count {} is not 1 to {MAX_VCPUS}",
                self.vcpu_count
            ));
        }
        let bytes = self.mem_size_mib.checked_mul(1 << 20);
        match bytes {
            Some(b) if b > 0 => {
                config::check_memory(b, config::host_memory_limit()).map_err(|e| {
                    Fault(format!(
                        "machine-config: mem_size_mib: {}",
                        strip_option(&e.to_string())
                    ))
                })?;
            }
            _ => {
                return fault(format!(
                    "machine-config: mem_size_mib {} is not a usable size",
                    self.mem_size_mib
                ))
            }
        }
        if self.smt {
            return fault("machine-config: moat does not emulate SMT siblings; set smt to false");
        }
        if self.track_dirty_pages {
            return fault("machine-config: moat has no dirty page tracking (its snapshots copy all of memory); set track_dirty_pages to false");
        }
        self.huge_pages()?;
        if self.cpu_template.as_deref().is_some_and(|t| t != "None") {
            return fault("machine-config: moat has no CPU templates; leave cpu_template out");
        }
        Ok(())
    }
}

/// `--memory: size ...` → `size ...`.
fn strip_option(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(_, rest)| rest)
}

/// `/logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Where the log goes (a file or a FIFO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Print the level on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source file and line on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only lines from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where the JSON lines go.
    pub metrics_path: String,
    /// Put the instance id on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    /// Operator's key-value pairs for each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// `InstanceStart`, `SendCtrlAltDel` or `FlushMetrics`.
    pub action_type: ActionType,
}

/// The actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Boot the VM.
    InstanceStart,
    /// Ask the guest to shut down.
    SendCtrlAltDel,
    /// Write a metrics line now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// `Paused` or `Resumed`.
    pub state: VmStateValue,
}

/// The states `PATCH /vm` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateValue {
    /// Stop every vCPU.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Where the VM's state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Full (the default) or Diff.
    pub snapshot_type: Option<String>,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File (moat maps it) or Uffd (not supported).
    pub backend_type: String,
    /// The memory file.
    pub backend_path: String,
}

/// An item of `network_overrides`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The card's iface_id.
    pub iface_id: String,
    /// Its new TAP.
    pub host_dev_name: String,
}

/// `vsock_override` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The vsock device's new host socket.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (deprecated in Firecracker for `mem_backend`).
    pub mem_file_path: Option<String>,
    /// The memory file.
    pub mem_backend: Option<MemoryBackend>,
    /// Resume at once.
    pub resume_vm: Option<bool>,
    /// Dirty-page tracking (not supported).
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty-page tracking (not supported).
    pub track_dirty_pages: Option<bool>,
    /// New TAPs by iface_id.
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// A new vsock socket.
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's clock by the time since the snapshot (not
    /// supported: the clock resumes where it was).
    pub clock_realtime: Option<bool>,
}

impl SnapshotCreate {
    /// Refuses what moat does not do.
    pub fn validate(&self) -> Result<(), Fault> {
        match self.snapshot_type.as_deref() {
            None | Some("Full") => {}
            Some("Diff") => {
                return Err(Fault(
                    "diff snapshots are not supported; take a Full one".into(),
                ))
            }
            Some(other) => {
                return Err(Fault(format!(
                    "snapshot_type '{other}': expected Full or Diff"
                )))
            }
        }
        if self.snapshot_path.is_empty() || self.mem_file_path.is_empty() {
            return Err(Fault(
                "snapshot_path and mem_file_path must name files".into(),
            ));
        }
        Ok(())
    }
}

impl SnapshotLoad {
    /// The memory file, checking that exactly one way names it, and
    /// refusing what moat does not do.
    pub fn memory_file(&self) -> Result<&str, Fault> {
        for (flag, name) in [
            (self.enable_diff_snapshots, "enable_diff_snapshots"),
            (self.track_dirty_pages, "track_dirty_pages"),
            (self.clock_realtime, "clock_realtime"),
        ] {
            if flag == Some(true) {
                return Err(Fault(format!("{name} is not supported")));
            }
        }
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(path), None) => Ok(path),
            (None, Some(b)) if b.backend_type == "File" => Ok(&b.backend_path),
            (None, Some(b)) => Err(Fault(format!(
                "mem_backend type '{}' is not supported (moat maps a File)",
                b.backend_type
            ))),
            _ => Err(Fault(
                "give exactly one of mem_file_path and mem_backend".into(),
            )),
        }
    }
}

/// `GET /vm/config`, and the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResources {
    /// The kernel.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Disks, in the order given (the root disk first).
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Network cards.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Refused.
    #[serde(default, skip_serializing)]
    pub balloon: Option<serde_json::Value>,
    /// Refused.
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<serde_json::Value>,
    /// Refused.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<serde_json::Value>,
    /// Refused.
    #[serde(default, skip_serializing)]
    pub pmem: Option<serde_json::Value>,
    /// Refused.
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
    /// Refused.
    #[serde(default, skip_serializing)]
    pub serial: Option<serde_json::Value>,
}

/// Checks that `path` names a readable file (not a directory).
pub fn check_file(what: &str, field: &str, path: &str) -> Result<(), Fault> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => fault(format!("{what}: {field} {path} is a directory")),
        Ok(_) => Ok(()),
        Err(e) => fault(format!("{what}: {field} {path}: {e}")),
    }
}

impl BootSource {
    /// Checks the files.
    pub fn validate(&self) -> Result<(), Fault> {
        check_file("boot-source", "kernel_image_path", &self.kernel_image_path)?;
        if let Some(initrd) = &self.initrd_path {
            check_file("boot-source", "initrd_path", initrd)?;
        }
        Ok(())
    }
}

impl VmResources {
    /// Parses and checks a config file's text.
    pub fn from_json(text: &str) -> Result<Self, Fault> {
        let mut resources: VmResources =
            serde_json::from_str(text).map_err(|e| Fault(e.to_string()))?;
        for (present, name) in [
            (resources.balloon.is_some(), "balloon"),
            (resources.mmds_config.is_some(), "mmds-config"),
            (resources.cpu_config.is_some(), "cpu-config"),
            (resources.pmem.is_some(), "pmem"),
            (resources.memory_hotplug.is_some(), "memory-hotplug"),
            (resources.serial.is_some(), "serial"),
        ] {
            if present {
                return fault(format!("{name}: {}", unsupported(name)));
            }
        }
        resources.machine_config.validate()?;
        resources.drives.sort_by_key(|d| !d.is_root_device);
        if let Some(boot) = &resources.boot_source {
            boot.validate()?;
        }
        let mut ids = std::collections::HashSet::new();
        for drive in &resources.drives {
            drive.validate()?;
            if !ids.insert(&drive.drive_id) {
                return fault(format!("drive {} is given twice", drive.drive_id));
            }
        }
        if resources.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return fault("only one drive can be the root device");
        }
        let mut ids = std::collections::HashSet::new();
        for net in &resources.network_interfaces {
            net.validate()?;
            if !ids.insert(&net.iface_id) {
                return fault(format!("network interface {} is given twice", net.iface_id));
            }
        }
        if let Some(vsock) = &resources.vsock {
            vsock.validate()?;
        }
        if let Some(entropy) = &resources.entropy {
            entropy.validate()?;
        }
        Ok(resources)
    }

    /// Puts `drive` in (replacing one of the same id), keeping a root
    /// drive first as Firecracker does.
    pub fn insert_drive(&mut self, drive: Drive) -> Result<(), Fault> {
        drive.validate()?;
        if drive.is_root_device
            && self
                .drives
                .iter()
                .any(|d| d.is_root_device && d.drive_id != drive.drive_id)
        {
            return fault(
                "a root device is already configured; only one drive can be the root device",
            );
        }
        if let Some(existing) = self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            *existing = drive;
        } else {
            self.drives.push(drive);
        }
        self.drives.sort_by_key(|d| !d.is_root_device);
        Ok(())
    }

    /// Puts `net` in, replacing one of the same id; two interfaces may not
    /// share a TAP or a MAC.
    pub fn insert_net(&mut self, net: NetworkInterface) -> Result<(), Fault> {
        net.validate()?;
        for other in self
            .network_interfaces
            .iter()
            .filter(|o| o.iface_id != net.iface_id)
        {
            if other.host_dev_name == net.host_dev_name {
                return fault(format!(
                    "network interface {}: TAP {} is already used by {}",
                    net.iface_id, net.host_dev_name, other.iface_id
                ));
            }
            if net.guest_mac.is_some() && other.guest_mac == net.guest_mac {
                return fault(format!(
                    "network interface {}: MAC {} is already used by {}",
                    net.iface_id,
                    net.guest_mac.as_deref().unwrap_or(""),
                    other.iface_id
                ));
            }
        }
        if let Some(existing) = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == net.iface_id)
        {
            *existing = net;
        } else {
            self.network_interfaces.push(net);
        }
        Ok(())
    }

    /// The VM these resources describe, or why there is none.
    pub fn vm_config(
        &self,
        kvm_device: PathBuf,
        boot_timer: bool,
        seccomp: bool,
        transport: config::Transport,
    ) -> Result<VmConfig, Fault> {
        let Some(boot) = &self.boot_source else {
            return fault("cannot start the microVM without a boot source (PUT /boot-source)");
        };
        self.machine_config.validate()?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| config::default_cmdline(transport));
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            match &root.partuuid {
                Some(uuid) => cmdline.push_str(&format!(" root=PARTUUID={uuid} {mode}")),
                None => cmdline.push_str(&format!(" root=/dev/vda {mode}")),
            }
        }
        Ok(VmConfig {
            kvm_device,
            kernel: PathBuf::from(&boot.kernel_image_path),
            initramfs: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline,
            cpus: self.machine_config.vcpu_count,
            memory: self.machine_config.mem_size_mib << 20,
            huge_pages: self.machine_config.huge_pages()?,
            boot_protocol: BootProtocol::Auto,
            disks: self.drives.iter().map(Drive::disk).collect(),
            nets: self
                .network_interfaces
                .iter()
                .map(NetworkInterface::validate)
                .collect::<Result<_, _>>()?,
            vsock: self.vsock.as_ref().map(Vsock::validate).transpose()?,
            forwards: Vec::new(),
            rng: self
                .entropy
                .as_ref()
                .map_or(Ok(RngConfig::Off), EntropyDevice::validate)?,
            boot_timer,
            shutdown_timeout: Duration::from_secs(10),
            seccomp,
            nested: false,
            trace_exits: None,
            transport,
        })
    }
}

/// The fault message for a resource moat does not have.
pub fn unsupported(resource: &str) -> String {
    let what = match resource {
        "balloon" => "a balloon device",
        "mmds-config" | "mmds" => "a metadata service (MMDS)",
        "cpu-config" => "CPU templates or custom CPU configuration",
        "pmem" => "virtio-pmem devices",
        "memory-hotplug" | "hotplug" => "memory hot-plug (virtio-mem)",
        "serial" => "serial console redirection (the console is moat's stdout)",
        "snapshot" => "snapshots",
        _ => "this resource",
    };
    format!("moat does not support {what} yet")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn a_firecracker_config_file_becomes_a_vm_config() {
        let text = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{k}", "boot_args": "console=ttyS0"}},
              "drives": [
                {{"drive_id": "data", "path_on_host": "{k}", "is_root_device": false, "is_read_only": true, "io_engine": "Async"}},
                {{"drive_id": "rootfs", "path_on_host": "{k}", "is_root_device": true, "is_read_only": false}}
              ],
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}},
              "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}}],
              "vsock": {{"guest_cid": 3, "uds_path": "/tmp/v.sock"}},
              "entropy": {{"rate_limiter": {{"bandwidth": {{"size": 1000, "refill_time": 100}}}}}}
            }}"#,
            k = kernel()
        );
        let resources = VmResources::from_json(&text).unwrap();
        // The root drive goes first, as with PUT /drives.
        let config = resources
            .vm_config("/dev/kvm".into(), false, true, config::Transport::Mmio)
            .unwrap();
        assert_eq!((config.cpus, config.memory), (2, 256 << 20));
        assert_eq!(config.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(config.disks[0].id.as_deref(), Some("rootfs"));
        assert!(config.disks[1].read_only);
        assert_eq!(config.disks[1].io_engine, IoEngine::Async);
        assert_eq!(config.disks[0].io_engine, IoEngine::Sync);
        assert_eq!(config.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        assert_eq!(config.vsock.unwrap().cid, 3);
        assert_eq!(config.rng, RngConfig::On(Some(10_000)));
        // And it reads back as it came in.
        let again: VmResources =
            serde_json::from_str(&serde_json::to_string(&resources).unwrap()).unwrap();
        assert_eq!(again, resources);
    }

    #[test]
    fn huge_pages_are_transparent_unless_the_machine_config_says_none() {
        let config = |machine: &str| {
            let text = format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {machine}}}"#,
                k = kernel()
            );
            VmResources::from_json(&text)
                .unwrap()
                .vm_config("/dev/kvm".into(), false, true, config::Transport::Mmio)
                .unwrap()
                .huge_pages
        };
        let plain = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
        assert_eq!(config(plain), config::HugePages::Transparent);
        let none = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "None"}"#;
        assert_eq!(config(none), config::HugePages::None);
        let named = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "Transparent"}"#;
        assert_eq!(config(named), config::HugePages::Transparent);
    }

    #[test]
    fn what_moat_lacks_is_refused_by_name() {
        let k = kernel();
        for (text, want) in [
            (r#"{"balloon": {"amount_mib": 1}}"#.to_string(), "balloon device"),
            (r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": true}}"#.into(), "SMT"),
            (r#"{"machine-config": {"vcpu_count": 33, "mem_size_mib": 128}}"#.into(), "vcpu_count 33"),
            (r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 0}}"#.into(), "mem_size_mib 0"),
            (r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}}"#.into(), "huge_pages '2M'"),
            (format!(r#"{{"drives": [{{"drive_id": "a", "is_root_device": false, "path_on_host": "{k}", "io_engine": "Uring"}}]}}"#), "io_engine 'Uring' is not Sync or Async"),
            (format!(r#"{{"drives": [{{"drive_id": "a", "is_root_device": false, "path_on_host": "{k}", "rate_limiter": {{"ops": {{"size": 10, "refill_time": 10}}}}}}]}}"#), "rate limiter"),
            (r#"{"drives": [{"drive_id": "a", "is_root_device": false, "path_on_host": "/nonexistent"}]}"#.into(), "No such file"),
            (r#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "mtu": 9000}]}"#.into(), "MTU"),
            (r#"{"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "guest_mac": "nope"}]}"#.into(), "not a MAC"),
            (r#"{"vsock": {"guest_cid": 2, "uds_path": "/x"}}"#.into(), "guest_cid 2"),
            (r#"{"frobnicate": 1}"#.into(), "unknown field `frobnicate`"),
            (r#"{"machine-config": {"vcpu_count": "two", "mem_size_mib": 128}}"#.into(), "invalid type"),
            (r#"{"boot-source": {"kernel_image_path": "/nonexistent"}}"#.into(), "kernel_image_path /nonexistent"),
        ] {
            let err = VmResources::from_json(&text).unwrap_err().0;
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn two_root_drives_and_shared_taps_are_refused() {
        let k = kernel();
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            is_root_device: root,
            partuuid: None,
            cache_type: None,
            is_read_only: Some(false),
            path_on_host: Some(k.clone()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        };
        let mut r = VmResources::default();
        r.insert_drive(drive("a", true)).unwrap();
        assert!(r
            .insert_drive(drive("b", true))
            .unwrap_err()
            .0
            .contains("root device"));
        // Replacing the root drive itself is fine.
        r.insert_drive(drive("a", true)).unwrap();
        assert_eq!(r.drives.len(), 1);
        let net = |id: &str, tap: &str| NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        r.insert_net(net("eth0", "tap0")).unwrap();
        assert!(r
            .insert_net(net("eth1", "tap0"))
            .unwrap_err()
            .0
            .contains("already used"));
        r.insert_net(net("eth0", "tap1")).unwrap();
        assert_eq!(r.network_interfaces.len(), 1);
    }

    #[test]
    fn starting_without_a_kernel_says_so() {
        let err = VmResources::default()
            .vm_config("/dev/kvm".into(), false, true, config::Transport::Mmio)
            .unwrap_err();
        assert!(err.0.contains("boot source"), "{err}");
    }
}
