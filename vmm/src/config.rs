//! What a VM is made of, as the user asked for it, and the checks that can
//! be made before touching KVM.

use std::path::PathBuf;
use std::time::Duration;

use moat_boot::loader::BootProtocol;

/// The kernel command line used when the user gives none: console on the
/// first UART, reboot through the i8042 (which ends moat), reboot on panic,
/// no probing for a keyboard or mouse that is not there, and no PCI (moat
/// has none; a kernel with PCI would otherwise complain that it found no
/// way to reach its configuration space).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nokbd";

/// How the guest reaches the virtio devices.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio: windows the ACPI tables and the command line name.
    #[default]
    Mmio,
    /// virtio-pci with MSI-X, on a PCI bus the ACPI tables describe:
    /// interrupts the guest need not acknowledge.
    Pci,
}

/// How the host backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages only: the host commits no more than the guest touches,
    /// page by page.
    None,
    /// Transparent huge pages (madvise(MADV_HUGEPAGE)) where the host has
    /// them: 2 MiB host pages and 2 MiB nested page table entries, so a
    /// booting kernel takes one exit per 2 MiB it touches instead of one
    /// per 4 KiB, for some more resident memory ([`crate::ram`]).
    #[default]
    Transparent,
}

impl HugePages {
    /// Parses `--memory`'s `huge_pages=` value (the API's names, in any
    /// case).
    pub fn parse(option: &'static str, text: &str) -> Result<HugePages, ConfigError> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Ok(HugePages::None),
            "transparent" => Ok(HugePages::Transparent),
            _ => Err(ConfigError::Syntax {
                option,
                problem: format!("huge_pages={text}: expected transparent or none"),
            }),
        }
    }
}

/// The default command line for `transport`: without `pci=off` when the
/// devices are on PCI.
pub fn default_cmdline(transport: Transport) -> String {
    match transport {
        Transport::Mmio => DEFAULT_CMDLINE.to_string(),
        Transport::Pci => DEFAULT_CMDLINE.replace(" pci=off", ""),
    }
}
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default vCPU count.
pub const DEFAULT_CPUS: u8 = 1;

/// A bad value in the configuration. Each message names the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `key=value` list did not parse.
    #[error("{option}: {problem}")]
    Syntax {
        /// The option, e.g. `--cpus`.
        option: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Memory size of zero.
    #[error("--memory: size must be greater than 0")]
    MemoryZero,
    /// Memory size not a whole number of pages.
    #[error("--memory: size must be a multiple of 4 KiB")]
    MemoryUnaligned,
    /// More memory than the host has.
    #[error("--memory: {requested} is more than this host's {available} of RAM and swap")]
    MemoryTooLarge {
        /// The size asked for, formatted.
        requested: String,
        /// What the host has, formatted.
        available: String,
    },
    /// vCPU count of zero.
    #[error("--cpus: boot must be at least 1")]
    CpusZero,
    /// More vCPUs than KVM or the MP table allow.
    #[error("--cpus: boot={requested} is above the maximum of {max} vCPUs on this host")]
    CpusTooMany {
        /// The count asked for.
        requested: u64,
        /// The limit.
        max: u64,
    },
    /// A network backend cannot be used.
    #[error("--net: {0}")]
    Net(String),
    /// The vsock device's socket cannot be used.
    #[error("--vsock: {0}")]
    Vsock(String),
    /// A forward's socket cannot be used.
    #[error("--forward: {0}")]
    Forward(String),
    /// More virtio devices than interrupt lines.
    #[error("at most {max} virtio devices (disks, network cards, vsock, rng), not {count}")]
    TooManyDevices {
        /// The limit.
        max: usize,
        /// How many were asked for.
        count: usize,
    },
    /// A disk asks for io_uring and the host has none for moat.
    #[error("--disk {path}: io_engine=async needs io_uring, which this host does not give moat ({reason})")]
    NoIoUring {
        /// The disk's path.
        path: PathBuf,
        /// What io_uring_setup said.
        reason: String,
    },
    /// A file named in the configuration cannot be used.
    #[error("{option}: cannot open {path}: {reason}")]
    File {
        /// The option, e.g. `--kernel`.
        option: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Serial number the guest reads (GET_ID), up to 20 bytes.
    pub id: Option<String>,
    /// How its requests reach the host.
    pub io_engine: IoEngine,
}

pub use moat_devices::virtio::block::IoEngine;

/// Longest disk id virtio-blk can report (VIRTIO_BLK_ID_BYTES).
pub const DISK_ID_MAX: usize = 20;

/// Parses `path=FILE[,readonly=on|off][,id=NAME][,io_engine=sync|async]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax {
        option: "--disk",
        problem,
    };
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        id: None,
        io_engine: IoEngine::Sync,
    };
    let keys = ["path", "readonly", "id", "io_engine"];
    for (key, value) in parse_key_values("--disk", text, &keys)? {
        match key.as_str() {
            "path" => disk.path = PathBuf::from(value),
            "readonly" => {
                disk.read_only = match value.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(syntax(format!("readonly={value}: expected on or off"))),
                }
            }
            "io_engine" => {
                disk.io_engine = match value.to_ascii_lowercase().as_str() {
                    "sync" => IoEngine::Sync,
                    "async" => IoEngine::Async,
                    _ => return Err(syntax(format!("io_engine={value}: expected sync or async"))),
                }
            }
            _ => {
                if value.len() > DISK_ID_MAX || !value.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(syntax(format!(
                        "id={value}: expected up to {DISK_ID_MAX} printable ASCII characters"
                    )));
                }
                disk.id = Some(value);
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(syntax("path=FILE is required".into()));
    }
    Ok(disk)
}

/// Where a network card's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// A TAP opened (or created) by name.
    Tap(String),
    /// A TAP descriptor inherited from the parent process.
    Fd(i32),
}

/// A virtio-net card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host end.
    pub backend: NetBackendConfig,
    /// The guest's MAC address; derived from the backend and index if unset.
    pub mac: Option<[u8; 6]>,
    /// Offer checksum and TSO offloads when the TAP supports them.
    pub offload: bool,
    /// The card's name in metrics (the API's iface_id).
    pub id: Option<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// Parses `tap=NAME|fd=N[,mac=MAC][,offload=on|off]`.
pub fn parse_net(text: &str) -> Result<NetConfig, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax {
        option: "--net",
        problem,
    };
    let mut backend = None;
    let mut mac = None;
    let mut offload = true;
    for (key, value) in parse_key_values("--net", text, &["tap", "fd", "mac", "offload"])? {
        match key.as_str() {
            "tap" if backend.is_none() => backend = Some(NetBackendConfig::Tap(value)),
            "fd" if backend.is_none() => {
                let fd =
                    value.parse().ok().filter(|fd| *fd >= 0).ok_or_else(|| {
                        syntax(format!("fd={value} is not a file descriptor number"))
                    })?;
                backend = Some(NetBackendConfig::Fd(fd));
            }
            "mac" => {
                let parsed = parse_mac(&value).ok_or_else(|| {
                    syntax(format!(
                        "mac={value} is not a MAC address (aa:bb:cc:dd:ee:ff)"
                    ))
                })?;
                if parsed[0] & 1 != 0 {
                    return Err(syntax(format!("mac={value} is a multicast address")));
                }
                mac = Some(parsed);
            }
            "offload" => {
                offload = match value.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(syntax(format!("offload={value}: expected on or off"))),
                }
            }
            _ => return Err(syntax("give either tap=NAME or fd=N, not both".into())),
        }
    }
    let backend = backend.ok_or_else(|| syntax("tap=NAME or fd=N is required".into()))?;
    Ok(NetConfig {
        backend,
        mac,
        offload,
        id: None,
    })
}

/// Refuses two cards on one TAP: a descriptor given twice would have two
/// owners (each closing it), a name twice is refused by the kernel later.
pub fn check_net_backends(nets: &[NetConfig]) -> Result<(), ConfigError> {
    for (i, net) in nets.iter().enumerate() {
        if nets[..i].iter().any(|other| other.backend == net.backend) {
            let what = match &net.backend {
                NetBackendConfig::Tap(name) => format!("tap={name}"),
                NetBackendConfig::Fd(fd) => format!("fd={fd}"),
            };
            return Err(ConfigError::Syntax {
                option: "--net",
                problem: format!("{what} is given twice; each card needs its own TAP"),
            });
        }
    }
    Ok(())
}

/// A virtio-vsock device: the guest's CID and the host's Unix socket
/// (Firecracker's hybrid protocol; the guest reaches `SOCKET_<port>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// Where moat listens for host clients.
    pub socket: PathBuf,
}

/// A host Unix socket whose clients are connected to a guest vsock port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Where moat listens.
    pub host: PathBuf,
    /// The guest's vsock port.
    pub port: u32,
}

/// The virtio-rng device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngConfig {
    /// No entropy device.
    Off,
    /// An entropy device, optionally limited to this many bytes a second.
    On(Option<u64>),
}

/// The largest CID a guest may have (VMADDR_CID_ANY, u32::MAX, is not one).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Parses `cid=N,socket=PATH`.
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax {
        option: "--vsock",
        problem,
    };
    let mut cid = None;
    let mut socket = None;
    for (key, value) in parse_key_values("--vsock", text, &["cid", "socket"])? {
        if key == "cid" {
            let n: u64 = value
                .parse()
                .map_err(|_| syntax(format!("cid={value} is not a whole number")))?;
            if !(moat_devices::virtio::vsock::MIN_GUEST_CID..=MAX_GUEST_CID).contains(&n) {
                return Err(syntax(format!(
                    "cid={value}: a guest CID is 3 to {MAX_GUEST_CID} (0-2 are reserved)"
                )));
            }
            cid = Some(n);
        } else {
            socket = Some(PathBuf::from(value));
        }
    }
    Ok(VsockConfig {
        cid: cid.ok_or_else(|| syntax("cid=N is required".into()))?,
        socket: socket.ok_or_else(|| syntax("socket=PATH is required".into()))?,
    })
}

/// Parses `unix:HOSTPATH=vsock:PORT`.
pub fn parse_forward(text: &str) -> Result<ForwardConfig, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax {
        option: "--forward",
        problem,
    };
    let (host, port) = text
        .rsplit_once("=vsock:")
        .ok_or_else(|| syntax(format!("expected unix:HOSTPATH=vsock:PORT, got '{text}'")))?;
    let host = host
        .strip_prefix("unix:")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            syntax(format!(
                "expected unix:HOSTPATH before '=vsock:', got '{host}'"
            ))
        })?;
    let port = port.parse().map_err(|_| {
        syntax(format!(
            "vsock:{port}: the port is not a number from 0 to 4294967295"
        ))
    })?;
    Ok(ForwardConfig {
        host: PathBuf::from(host),
        port,
    })
}

/// Parses `on`, `off` or `rate=BYTES_PER_S`.
pub fn parse_rng(text: &str) -> Result<RngConfig, ConfigError> {
    match text {
        "on" => return Ok(RngConfig::On(None)),
        "off" => return Ok(RngConfig::Off),
        _ => {}
    }
    let rate = parse_key_values("--rng", text, &["rate"])?
        .into_iter()
        .next()
        .map(|(_, v)| v)
        .unwrap_or_default();
    rate.parse::<u64>()
        .ok()
        .filter(|r| *r > 0)
        .map(|r| RngConfig::On(Some(r)))
        .ok_or_else(|| ConfigError::Syntax {
            option: "--rng",
            problem: format!("rate={rate}: expected a number of bytes per second above 0"),
        })
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// How the host backs it.
    pub huge_pages: HugePages,
    /// Entry protocol.
    pub boot_protocol: BootProtocol,
    /// virtio-blk disks, in order (the guest sees vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards, in order (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Host sockets forwarded to guest vsock ports (need `vsock`).
    pub forwards: Vec<ForwardConfig>,
    /// The entropy device.
    pub rng: RngConfig,
    /// Report start-up times when the guest writes the boot-timer marker.
    pub boot_timer: bool,
    /// How long the guest has to shut down after a termination signal
    /// pressed its power button (zero: no button, stop at once).
    pub shutdown_timeout: Duration,
    /// Install the seccomp filters (see [`crate::seccomp`]).
    pub seccomp: bool,
    /// Let the guest see VMX/SVM (nested virtualization).
    pub nested: bool,
    /// `--trace-exits`: count and time every VM exit.
    pub trace_exits: Option<crate::trace::TraceConfig>,
    /// The virtio transport.
    pub transport: Transport,
}

impl VmConfig {
    /// The host's side of a VM restored from a snapshot (the snapshot
    /// gives the rest: see [`crate::snapshot::restored_config`]).
    pub fn for_restore(kvm_device: PathBuf, boot_timer: bool, seccomp: bool) -> VmConfig {
        VmConfig {
            kvm_device,
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 1,
            memory: 0,
            huge_pages: HugePages::default(),
            boot_protocol: BootProtocol::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            forwards: Vec::new(),
            rng: RngConfig::Off,
            boot_timer,
            shutdown_timeout: Duration::from_secs(10),
            seccomp,
            nested: false,
            trace_exits: None,
            transport: Transport::Mmio,
        }
    }
}

/// Parses a `key=value[,key=value]` list where only `allowed` keys may
/// appear, each at most once.
pub fn parse_key_values(
    option: &'static str,
    text: &str,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax { option, problem };
    let mut pairs: Vec<(String, String)> = Vec::new();
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| syntax(format!("expected key=value, got '{item}'")))?;
        if !allowed.contains(&key) {
            return Err(syntax(format!(
                "unknown key '{key}' (expected {})",
                allowed.join(", ")
            )));
        }
        if value.is_empty() {
            return Err(syntax(format!("'{key}' needs a value")));
        }
        if pairs.iter().any(|(k, _)| k == key) {
            return Err(syntax(format!("'{key}' given twice")));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Parses a size such as `4096`, `512K`, `256M`, `2G` or `1T` (binary
/// units, optional `B`/`iB` suffix).
pub fn parse_size(option: &'static str, text: &str) -> Result<u64, ConfigError> {
    let syntax = || ConfigError::Syntax {
        option,
        problem: format!("'{text}' is not a size (examples: 256M, 2G, 1048576)"),
    };
    let upper = text.trim().to_ascii_uppercase();
    let trimmed = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match trimmed.chars().last() {
        Some('K') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G') => (&trimmed[..trimmed.len() - 1], 30),
        Some('T') => (&trimmed[..trimmed.len() - 1], 40),
        _ => (trimmed, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let value: u64 = digits.parse().map_err(|_| syntax())?;
    value.checked_mul(1 << shift).ok_or_else(syntax)
}

/// Longest duration a seconds option takes (a day).
const MAX_SECONDS: f64 = 86_400.0;

/// Parses a number of seconds such as `10` or `2.5` (0 to a day).
pub fn parse_seconds(option: &'static str, text: &str) -> Result<Duration, ConfigError> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (0.0..=MAX_SECONDS).contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| ConfigError::Syntax {
            option,
            problem: format!("'{text}' is not a number of seconds from 0 to {MAX_SECONDS}"),
        })
}

/// `bytes` in the largest binary unit that keeps it readable.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            let whole = bytes / unit;
            let tenths = (bytes % unit) * 10 / unit;
            return if tenths == 0 {
                format!("{whole} {name}")
            } else {
                format!("{whole}.{tenths} {name}")
            };
        }
    }
    format!("{bytes} B")
}

/// Checks a memory size against the host: not zero, whole pages, and no
/// more than `host_limit` (the host's RAM and swap).
pub fn check_memory(size: u64, host_limit: u64) -> Result<u64, ConfigError> {
    if size == 0 {
        return Err(ConfigError::MemoryZero);
    }
    if !size.is_multiple_of(4096) {
        return Err(ConfigError::MemoryUnaligned);
    }
    if size > host_limit {
        return Err(ConfigError::MemoryTooLarge {
            requested: format_size(size),
            available: format_size(host_limit),
        });
    }
    Ok(size)
}

/// Checks a vCPU count against the host's limit.
pub fn check_cpus(count: u64, max: u64) -> Result<u8, ConfigError> {
    if count == 0 {
        return Err(ConfigError::CpusZero);
    }
    if count > max {
        return Err(ConfigError::CpusTooMany {
            requested: count,
            max,
        });
    }
    u8::try_from(count).map_err(|_| ConfigError::CpusTooMany {
        requested: count,
        max,
    })
}

/// The host's RAM plus swap, in bytes.
pub fn host_memory_limit() -> u64 {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: sysinfo() only writes into the struct we pass, which is large
    // enough and zero-initialised.
    let rc = unsafe { libc::sysinfo(info.as_mut_ptr()) };
    if rc != 0 {
        return u64::MAX;
    }
    // SAFETY: sysinfo() succeeded, so the struct is initialised.
    let info = unsafe { info.assume_init() };
    info.totalram
        .saturating_add(info.totalswap)
        .saturating_mul(u64::from(info.mem_unit.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_suffixes() {
        for (text, want) in [
            ("4096", 4096),
            ("512K", 512 << 10),
            ("256M", 256 << 20),
            ("256m", 256 << 20),
            ("2G", 2 << 30),
            ("2GiB", 2 << 30),
            ("1T", 1 << 40),
            ("64MB", 64 << 20),
        ] {
            assert_eq!(parse_size("--memory", text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        for text in [
            "",
            "M",
            "12X",
            "-1",
            "1.5G",
            "99999999999999999999",
            "20000000T",
        ] {
            let err = parse_size("--memory", text).unwrap_err();
            assert!(err.to_string().starts_with("--memory: "), "{err}");
        }
    }

    #[test]
    fn key_values_reject_unknown_duplicate_and_bare_items() {
        assert_eq!(
            parse_key_values("--cpus", "boot=2", &["boot"]).unwrap(),
            vec![("boot".to_string(), "2".to_string())]
        );
        for bad in ["2", "max=2", "boot=", "boot=1,boot=2", ""] {
            let err = parse_key_values("--cpus", bad, &["boot"]).unwrap_err();
            assert!(err.to_string().starts_with("--cpus: "), "{bad}: {err}");
        }
    }

    #[test]
    fn memory_checks_name_the_problem() {
        assert!(matches!(
            check_memory(0, 1 << 30),
            Err(ConfigError::MemoryZero)
        ));
        assert!(matches!(
            check_memory(1000, 1 << 30),
            Err(ConfigError::MemoryUnaligned)
        ));
        let err = check_memory(2 << 30, 1 << 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--memory: 2 GiB is more than this host's 1 GiB of RAM and swap"
        );
        assert_eq!(check_memory(256 << 20, 1 << 30).unwrap(), 256 << 20);
    }

    #[test]
    fn cpu_checks_name_the_problem() {
        assert!(matches!(check_cpus(0, 8), Err(ConfigError::CpusZero)));
        assert_eq!(
            check_cpus(9, 8).unwrap_err().to_string(),
            "--cpus: boot=9 is above the maximum of 8 vCPUs on this host"
        );
        assert_eq!(check_cpus(8, 8).unwrap(), 8);
    }

    #[test]
    fn disks_parse_with_defaults_and_options() {
        assert_eq!(
            parse_disk("path=/img").unwrap(),
            DiskConfig {
                path: "/img".into(),
                read_only: false,
                id: None,
                io_engine: IoEngine::Sync,
            }
        );
        assert_eq!(
            parse_disk("path=/img,readonly=on,id=data-1,io_engine=async").unwrap(),
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                id: Some("data-1".into()),
                io_engine: IoEngine::Async,
            }
        );
        assert_eq!(
            parse_disk("path=/img,io_engine=Sync").unwrap().io_engine,
            IoEngine::Sync
        );
    }

    #[test]
    fn malformed_disks_name_the_problem() {
        for (text, problem) in [
            ("readonly=on", "path=FILE is required"),
            ("path=/img,readonly=yes", "expected on or off"),
            (
                "path=/img,io_engine=uring",
                "io_engine=uring: expected sync or async",
            ),
            (
                "path=/img,id=this-id-is-far-too-long-for-virtio",
                "up to 20",
            ),
            ("path=/img,id=has space", "printable ASCII"),
            ("path=/img,cache=none", "unknown key 'cache'"),
            ("/img", "expected key=value"),
        ] {
            let err = parse_disk(text).unwrap_err().to_string();
            assert!(
                err.starts_with("--disk: ") && err.contains(problem),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn nets_parse_tap_fd_and_mac() {
        assert_eq!(
            parse_net("tap=tap0").unwrap(),
            NetConfig {
                backend: NetBackendConfig::Tap("tap0".into()),
                mac: None,
                offload: true,
                id: None,
            }
        );
        assert_eq!(
            parse_net("fd=3,mac=02:aa:bb:cc:dd:0E,offload=off").unwrap(),
            NetConfig {
                backend: NetBackendConfig::Fd(3),
                mac: Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]),
                offload: false,
                id: None,
            }
        );
    }

    #[test]
    fn malformed_nets_name_the_problem() {
        for (text, problem) in [
            ("mac=02:00:00:00:00:01", "tap=NAME or fd=N is required"),
            ("tap=a,fd=3", "not both"),
            ("tap=a,mac=02:00:00:00:00", "not a MAC address"),
            ("tap=a,mac=zz:00:00:00:00:00", "not a MAC address"),
            ("tap=a,mac=01:00:5e:00:00:01", "multicast"),
            ("fd=-1", "not a file descriptor number"),
            ("fd=x", "not a file descriptor number"),
        ] {
            let err = parse_net(text).unwrap_err().to_string();
            assert!(
                err.starts_with("--net: ") && err.contains(problem),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn vsock_takes_a_cid_and_a_socket() {
        assert_eq!(
            parse_vsock("cid=3,socket=/run/v.sock").unwrap(),
            VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into()
            }
        );
        for (text, problem) in [
            ("cid=2,socket=/s", "3 to"),
            ("cid=0,socket=/s", "reserved"),
            ("cid=4294967295,socket=/s", "3 to"),
            ("cid=x,socket=/s", "not a whole number"),
            ("socket=/s", "cid=N is required"),
            ("cid=5", "socket=PATH is required"),
            ("cid=5,path=/s", "unknown key 'path'"),
        ] {
            let err = parse_vsock(text).unwrap_err().to_string();
            assert!(
                err.starts_with("--vsock: ") && err.contains(problem),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn forwards_take_a_host_path_and_a_port() {
        assert_eq!(
            parse_forward("unix:/tmp/docker.sock=vsock:2375").unwrap(),
            ForwardConfig {
                host: "/tmp/docker.sock".into(),
                port: 2375
            }
        );
        for (text, problem) in [
            ("unix:/a=vsock:http", "not a number"),
            ("unix:/a=vsock:-1", "not a number"),
            ("unix:/a=vsock:99999999999", "not a number"),
            ("/a=vsock:1", "expected unix:HOSTPATH"),
            ("unix:=vsock:1", "expected unix:HOSTPATH"),
            ("unix:/a", "expected unix:HOSTPATH=vsock:PORT"),
        ] {
            let err = parse_forward(text).unwrap_err().to_string();
            assert!(
                err.starts_with("--forward: ") && err.contains(problem),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn rng_is_on_off_or_rate_limited() {
        assert_eq!(parse_rng("on").unwrap(), RngConfig::On(None));
        assert_eq!(parse_rng("off").unwrap(), RngConfig::Off);
        assert_eq!(parse_rng("rate=4096").unwrap(), RngConfig::On(Some(4096)));
        for bad in ["rate=0", "rate=fast", "yes", "rate=-5"] {
            let err = parse_rng(bad).unwrap_err().to_string();
            assert!(err.starts_with("--rng: "), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_format_readably() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(12), "12 B");
    }

    #[test]
    fn host_has_some_memory() {
        assert!(host_memory_limit() > 16 << 20);
    }
}
