//! The `moat` command line.
//!
//! Options follow Cloud Hypervisor's `--option key=value` style. Values are
//! kept as strings by clap and parsed here, so every mistake gets a message
//! that names the option and the problem.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use moat_boot::loader::BootProtocol;

use crate::config::{self, ConfigError, VmConfig};

const EXIT_CODES: &str = "\
Exit status:
  0    the guest powered off, rebooted or halted (also after a SIGTERM, when
       it shut down within --shutdown-timeout)
  1    the VM failed: a KVM error, a triple fault, or an internal error
  2    bad input: options, kernel or initramfs files, /dev/kvm access
  128+N  moat was stopped by signal N (the guest did not shut down in time,
       or a second signal came)";

/// moat: a KVM micro-VM monitor that boots Linux guests.
///
/// `moat run` boots a kernel from the command line. Without a subcommand,
/// moat starts as Firecracker's tools start Firecracker: it serves
/// Firecracker's HTTP API on --api-sock and boots when told to (or at once
/// from --config-file). See docs/api.md.
#[derive(Debug, Parser)]
#[command(
    name = "moat",
    version,
    about,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The API mode's options.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// The options of the API mode (Firecracker's process flags).
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// Serve Firecracker's HTTP API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Boot at once from this file (Firecracker's format: the body of
    /// GET /vm/config).
    #[arg(long, value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Serve no API (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,

    /// The instance id (letters, digits and dashes), in logs and GET /.
    #[arg(long, value_name = "ID", default_value = crate::api::DEFAULT_ID)]
    pub id: String,

    /// The log.
    #[command(flatten)]
    pub log: LogArgs,

    /// Write metrics (JSON lines) to this file or FIFO.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,

    /// As `moat run --boot-timer`.
    #[arg(long)]
    pub boot_timer: bool,

    /// No seccomp filters (Firecracker's flag; as `moat run --seccomp off`).
    #[arg(long)]
    pub no_seccomp: bool,

    /// Put the virtio devices on PCI (Firecracker's flag; as `moat run
    /// --transport pci`).
    #[arg(long)]
    pub enable_pci: bool,

    /// KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm: PathBuf,

    /// The jail.
    #[command(flatten)]
    pub jail: JailArgs,
}

impl ApiArgs {
    /// The options `api::run_process` takes, checked.
    pub fn into_options(self) -> Result<crate::api::ProcessOptions, String> {
        if self.api_sock.is_none() && !self.no_api {
            return Err(
                "give --api-sock PATH (or --config-file FILE --no-api), or a subcommand such as run"
                    .into(),
            );
        }
        if self.api_sock.is_some() && self.no_api {
            return Err("--no-api and --api-sock contradict each other".into());
        }
        let log = self.log.options()?;
        let jail = self.jail.config().map_err(|e| e.to_string())?;
        Ok(crate::api::ProcessOptions {
            api_sock: self.api_sock,
            config_file: self.config_file,
            id: self.id,
            log,
            metrics_path: self.metrics_path,
            boot_timer: self.boot_timer,
            kvm_device: self.kvm,
            seccomp: !self.no_seccomp,
            transport: if self.enable_pci {
                crate::config::Transport::Pci
            } else {
                crate::config::Transport::Mmio
            },
            jail,
        })
    }
}

/// The log's options, in both modes.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Write the log to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,

    /// Log level: Error, Warning, Info, Debug, Trace or Off (default
    /// Warning on stderr, Info with --log-path).
    #[arg(long, visible_alias = "log-level", value_name = "LEVEL")]
    pub level: Option<String>,

    /// Print the level on each log line.
    #[arg(long)]
    pub show_level: bool,

    /// Print the source file and line on each log line.
    #[arg(long)]
    pub show_log_origin: bool,
}

impl LogArgs {
    /// The logger's options, checked.
    pub fn options(&self) -> Result<crate::logger::LogOptions, String> {
        let level = match &self.level {
            None => None,
            Some(text) => Some(crate::logger::parse_level(text).ok_or_else(|| {
                format!("--level: '{text}' is not Error, Warning, Info, Debug, Trace or Off")
            })?),
        };
        Ok(crate::logger::LogOptions {
            path: self.log_path.clone(),
            level,
            show_level: self.show_level,
            show_origin: self.show_log_origin,
            module: None,
        })
    }
}

/// moat's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a Linux kernel with its console on this terminal.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
}

/// `moat run` options.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    pub kernel: Option<PathBuf>,

    /// Resume a snapshot (written by PUT /snapshot/create) instead of
    /// booting a kernel. The machine is the snapshot's: its CPUs, memory,
    /// command line and devices. --disk, --net and --vsock, if given,
    /// replace the host ends of its disks, cards and vsock socket in order
    /// (so clones each have their own disk copy and TAP); the guest keeps
    /// its disks' settings and its MAC addresses.
    #[arg(
        long,
        value_name = "state=FILE,memory=FILE",
        conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "boot_protocol", "forward", "rng", "nested"]
    )]
    pub restore: Option<String>,

    /// Initramfs (cpio archive, optionally compressed) loaded with the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. The default with --transport pci leaves out
    /// pci=off.
    #[arg(long, value_name = "STRING", default_value = config::DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// How the guest reaches its virtio devices: virtio-mmio, or virtio-pci
    /// with MSI-X (interrupts without acknowledgement exits; the guest
    /// kernel needs CONFIG_PCI, CONFIG_PCI_MSI and CONFIG_VIRTIO_PCI).
    #[arg(long, value_enum, value_name = "TRANSPORT", default_value_t = config::Transport::Mmio)]
    pub transport: config::Transport,

    /// vCPUs: boot=N.
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    pub cpus: String,

    /// Guest memory: size=SIZE, with K, M, G or T suffixes (binary units),
    /// and how the host backs it: huge_pages=transparent (the default:
    /// transparent huge pages where the host has them, a faster boot) or
    /// huge_pages=none (4 KiB pages, the least memory resident).
    #[arg(
        long,
        value_name = "size=SIZE[,huge_pages=transparent|none]",
        default_value = "size=256M"
    )]
    pub memory: String,

    /// Kernel entry: PVH when the ELF kernel has a PVH note (auto), the
    /// 64-bit Linux boot protocol (linux), or PVH only (pvh).
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value_t = BootProtocolArg::Auto)]
    pub boot_protocol: BootProtocolArg,

    /// A virtio-blk disk: path=FILE[,readonly=on][,id=NAME][,io_engine=async].
    /// Repeat for more disks; the guest sees them as vda, vdb, ... in this
    /// order. io_engine=async serves its requests through io_uring, many
    /// in flight at once (default sync: one system call per request).
    #[arg(
        long,
        value_name = "path=FILE[,readonly=on][,id=NAME][,io_engine=async]"
    )]
    pub disk: Vec<String>,

    /// A virtio-net card: tap=NAME opens (or creates) the TAP NAME; fd=N
    /// uses a TAP descriptor inherited from the parent (opened with IFF_TAP
    /// | IFF_NO_PI | IFF_VNET_HDR). mac= sets the guest's address;
    /// offload=off turns off checksum and TSO offloads (on by default when
    /// the TAP supports them). Repeat for more cards (eth0, eth1, ...).
    #[arg(long, value_name = "tap=NAME|fd=N[,mac=MAC][,offload=off]")]
    pub net: Vec<String>,

    /// A virtio-vsock device for guest CID N (3 or more). Host programs
    /// connect to the Unix socket PATH and write "CONNECT <port>\n" to
    /// reach the guest's port (Firecracker's protocol: moat answers
    /// "OK <host-port>\n"); the guest connecting to the host (CID 2) port P
    /// reaches the Unix socket PATH_P.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,

    /// Listen on the Unix socket HOSTPATH and connect each client to the
    /// guest's vsock PORT (needs --vsock). Repeatable.
    #[arg(long, value_name = "unix:HOSTPATH=vsock:PORT")]
    pub forward: Vec<String>,

    /// A virtio-rng entropy device fed by getrandom(2): on, off, or
    /// rate=BYTES_PER_S to limit it.
    #[arg(long, value_name = "on|off|rate=BYTES_PER_S", default_value = "on")]
    pub rng: String,

    /// KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm: PathBuf,

    /// On SIGTERM (or SIGINT, SIGHUP) moat presses the guest's ACPI power
    /// button and gives it this many seconds to shut down before stopping
    /// it; 0 stops it at once. A second signal always stops it at once.
    #[arg(long, value_name = "SECONDS", default_value = "10")]
    pub shutdown_timeout: String,

    /// Time the boot: when the guest first writes 123 to I/O port 0xf4,
    /// print on stderr how long after moat's start that was and when vCPU 0
    /// first entered KVM_RUN. moat's benchmark /init writes it first thing.
    #[arg(long)]
    pub boot_timer: bool,

    /// Show the host's VMX or SVM to the guest, so it can run VMs of its
    /// own (hidden by default: docs/security.md).
    #[arg(long)]
    pub nested: bool,

    /// seccomp filters on moat's threads (docs/security.md): on, or off
    /// to debug a forbidden system call.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub seccomp: String,

    /// Count every VM exit by kind and device, with the time moat spent
    /// on it: a table on stderr when the VM ends; with =FILE the same as
    /// JSON into FILE, with =FILE,live also a JSON line per exit.
    #[arg(
        long,
        value_name = "FILE[,live]",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    pub trace_exits: Option<String>,

    /// The log.
    #[command(flatten)]
    pub log: LogArgs,

    /// The jail.
    #[command(flatten)]
    pub jail: JailArgs,
}

/// The jail's options, in both modes.
#[derive(Debug, clap::Args)]
pub struct JailArgs {
    /// Run in a jail rooted at DIR (needs root; docs/security.md): new
    /// mount, PID, IPC and UTS namespaces and --uid/--gid with no
    /// capabilities. `moat run` binds only the VM's files into DIR; the
    /// API mode uses DIR as prepared (paths then name files in it).
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
    pub jail: Option<PathBuf>,

    /// The uid moat runs as in the jail (not 0).
    #[arg(long, value_name = "N", requires = "jail")]
    pub uid: Option<u32>,

    /// The gid moat runs as in the jail (not 0).
    #[arg(long, value_name = "N", requires = "jail")]
    pub gid: Option<u32>,

    /// A network namespace for the jail to join (e.g. /var/run/netns/NAME);
    /// the VM's TAPs must be in it.
    #[arg(long, value_name = "PATH", requires = "jail")]
    pub netns: Option<PathBuf>,

    /// cgroup v2 limits for the jail: cgroup files and values, e.g.
    /// cpu.max=50000 100000,memory.max=512M,pids.max=64 (a group under
    /// /sys/fs/cgroup/moat/, removed when moat ends).
    #[arg(long, value_name = "FILE=VALUE,...", requires = "jail")]
    pub cgroup: Option<String>,
}

impl JailArgs {
    /// The jail `--jail` asks for, if any.
    pub fn config(&self) -> Result<Option<crate::jail::JailConfig>, ConfigError> {
        let (Some(dir), Some(uid), Some(gid)) = (&self.jail, self.uid, self.gid) else {
            return Ok(None);
        };
        let jail = crate::jail::JailConfig {
            dir: dir.clone(),
            uid,
            gid,
            netns: self.netns.clone(),
            cgroup: self
                .cgroup
                .as_deref()
                .map(crate::jail::parse_cgroup)
                .transpose()?
                .unwrap_or_default(),
        };
        crate::jail::check(&jail)?;
        Ok(Some(jail))
    }
}

/// `--boot-protocol` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootProtocolArg {
    /// PVH if the kernel supports it, else Linux 64-bit.
    Auto,
    /// Linux 64-bit boot protocol.
    Linux,
    /// PVH.
    Pvh,
}

impl From<BootProtocolArg> for BootProtocol {
    fn from(arg: BootProtocolArg) -> Self {
        match arg {
            BootProtocolArg::Auto => BootProtocol::Auto,
            BootProtocolArg::Linux => BootProtocol::Linux,
            BootProtocolArg::Pvh => BootProtocol::Pvh,
        }
    }
}

/// The value of the one key a `key=value` option allows.
fn single_value(
    option: &'static str,
    text: &str,
    key: &'static str,
) -> Result<String, ConfigError> {
    let pairs = config::parse_key_values(option, text, &[key])?;
    Ok(pairs.into_iter().map(|(_, v)| v).next().unwrap_or_default())
}

/// `--memory size=SIZE[,huge_pages=transparent|none]`.
fn parse_memory(text: &str) -> Result<(u64, config::HugePages), ConfigError> {
    const OPTION: &str = "--memory";
    let pairs = config::parse_key_values(OPTION, text, &["size", "huge_pages"])?;
    let value = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let size = value("size").ok_or_else(|| ConfigError::Syntax {
        option: OPTION,
        problem: "needs size=SIZE".into(),
    })?;
    let huge_pages = value("huge_pages")
        .map(|v| config::HugePages::parse(OPTION, v))
        .transpose()?
        .unwrap_or_default();
    Ok((config::parse_size(OPTION, size)?, huge_pages))
}

impl RunArgs {
    /// Parses the option values into a [`VmConfig`]. Checks that need the
    /// host (memory and vCPU limits, files) happen when the VM is built.
    /// The snapshot `--restore` names, if given: (state file, memory file).
    pub fn restore_files(&self) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
        let Some(text) = &self.restore else {
            return Ok(None);
        };
        let pairs = config::parse_key_values("--restore", text, &["state", "memory"])?;
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| PathBuf::from(v))
                .ok_or_else(|| ConfigError::Syntax {
                    option: "--restore",
                    problem: format!("needs {key}=FILE"),
                })
        };
        Ok(Some((get("state")?, get("memory")?)))
    }

    /// Checks the options and turns them into a VM config (for a restore,
    /// the host's side of it: see [`crate::restore`]).
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let cpus_text = single_value("--cpus", &self.cpus, "boot")?;
        let cpus: u64 = cpus_text.parse().map_err(|_| ConfigError::Syntax {
            option: "--cpus",
            problem: format!("boot={cpus_text} is not a whole number"),
        })?;
        let cpus = config::check_cpus(cpus, u64::from(moat_boot::mptable::MAX_CPUS))?;
        let (memory, huge_pages) = parse_memory(&self.memory)?;
        if !self.forward.is_empty() && self.vsock.is_none() {
            return Err(ConfigError::Syntax {
                option: "--forward",
                problem: "needs a vsock device: add --vsock cid=N,socket=PATH".into(),
            });
        }
        let disks = self
            .disk
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<Vec<_>, _>>()?;
        let nets = self
            .net
            .iter()
            .map(|n| config::parse_net(n))
            .collect::<Result<Vec<_>, _>>()?;
        config::check_net_backends(&nets)?;
        Ok(VmConfig {
            kvm_device: self.kvm,
            kernel: self.kernel.unwrap_or_default(),
            initramfs: self.initramfs,
            cmdline: if self.cmdline == config::DEFAULT_CMDLINE {
                config::default_cmdline(self.transport)
            } else {
                self.cmdline
            },
            transport: self.transport,
            cpus,
            memory,
            huge_pages,
            boot_protocol: self.boot_protocol.into(),
            disks,
            nets,
            vsock: self.vsock.as_deref().map(config::parse_vsock).transpose()?,
            forwards: self
                .forward
                .iter()
                .map(|f| config::parse_forward(f))
                .collect::<Result<Vec<_>, _>>()?,
            rng: config::parse_rng(&self.rng)?,
            boot_timer: self.boot_timer,
            shutdown_timeout: config::parse_seconds("--shutdown-timeout", &self.shutdown_timeout)?,
            nested: self.nested,
            trace_exits: self
                .trace_exits
                .as_deref()
                .map(crate::trace::parse)
                .transpose()
                .map_err(|problem| ConfigError::Syntax {
                    option: "--trace-exits",
                    problem,
                })?,
            seccomp: match self.seccomp.as_str() {
                "on" => true,
                "off" => false,
                other => {
                    return Err(ConfigError::Syntax {
                        option: "--seccomp",
                        problem: format!("'{other}': expected on or off"),
                    })
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HugePages;
    use std::time::Duration;

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let mut argv = vec!["moat", "run", "--kernel", "/k"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Some(Command::Run(run)) = cli.command else {
            return Err("no subcommand".into());
        };
        run.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_one_cpu_256m_and_the_default_cmdline() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.cpus, 1);
        assert_eq!(cfg.memory, 256 << 20);
        assert_eq!(cfg.cmdline, config::DEFAULT_CMDLINE);
        assert_eq!(cfg.boot_protocol, BootProtocol::Auto);
        assert_eq!(cfg.kvm_device, PathBuf::from("/dev/kvm"));
    }

    #[test]
    fn key_value_options_parse() {
        let cfg = parse(&[
            "--cpus",
            "boot=2",
            "--memory",
            "size=2G",
            "--boot-protocol",
            "linux",
        ])
        .unwrap();
        assert_eq!((cfg.cpus, cfg.memory), (2, 2 << 30));
        assert_eq!(cfg.boot_protocol, BootProtocol::Linux);
    }

    #[test]
    fn malformed_values_name_the_option() {
        assert_eq!(
            parse(&["--cpus", "2"]).unwrap_err(),
            "--cpus: expected key=value, got '2'"
        );
        assert_eq!(
            parse(&["--cpus", "boot=two"]).unwrap_err(),
            "--cpus: boot=two is not a whole number"
        );
        assert_eq!(
            parse(&["--cpus", "boot=0"]).unwrap_err(),
            "--cpus: boot must be at least 1"
        );
        assert!(parse(&["--memory", "sz=1G"])
            .unwrap_err()
            .starts_with("--memory: unknown key 'sz'"));
        assert!(parse(&["--memory", "size=lots"])
            .unwrap_err()
            .starts_with("--memory: 'lots' is not a size"));
        assert_eq!(
            parse(&["--memory", "size=1G,huge_pages=2M"]).unwrap_err(),
            "--memory: huge_pages=2M: expected transparent or none"
        );
        assert_eq!(
            parse(&["--memory", "huge_pages=none"]).unwrap_err(),
            "--memory: needs size=SIZE"
        );
    }

    #[test]
    fn guest_memory_is_in_transparent_huge_pages_unless_asked_for_none() {
        assert_eq!(parse(&[]).unwrap().huge_pages, HugePages::Transparent);
        let none = parse(&["--memory", "size=1G,huge_pages=none"]).unwrap();
        assert_eq!((none.memory, none.huge_pages), (1 << 30, HugePages::None));
        let named = parse(&["--memory", "huge_pages=Transparent,size=64M"]).unwrap();
        assert_eq!(named.huge_pages, HugePages::Transparent);
    }

    #[test]
    fn disks_are_repeatable_and_keep_their_order() {
        let cfg = parse(&["--disk", "path=/a", "--disk", "path=/b,readonly=on"]).unwrap();
        let paths: Vec<_> = cfg.disks.iter().map(|d| d.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["/a", "/b"]);
        assert!(cfg.disks[1].read_only);
    }

    #[test]
    fn one_tap_cannot_back_two_cards() {
        for twice in [["fd=3", "fd=3,mac=02:00:00:00:00:01"], ["tap=t0", "tap=t0"]] {
            let err = parse(&["--net", twice[0], "--net", twice[1]]).unwrap_err();
            assert!(
                err.starts_with("--net: ") && err.contains("given twice"),
                "{err}"
            );
        }
        assert!(parse(&["--net", "fd=3", "--net", "fd=4"]).is_ok());
    }

    #[test]
    fn shutdown_timeout_takes_seconds() {
        assert_eq!(
            parse(&[]).unwrap().shutdown_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(
            parse(&["--shutdown-timeout", "2.5"])
                .unwrap()
                .shutdown_timeout,
            Duration::from_millis(2500)
        );
        assert!(parse(&["--shutdown-timeout", "0"])
            .unwrap()
            .shutdown_timeout
            .is_zero());
        for bad in ["-1", "soon", "1e99", "", "NaN", "inf"] {
            let err = parse(&[&format!("--shutdown-timeout={bad}")]).unwrap_err();
            assert!(err.starts_with("--shutdown-timeout: "), "{bad}: {err}");
        }
    }

    #[test]
    fn the_api_mode_takes_firecracker_flags() {
        let cli = Cli::try_parse_from([
            "moat",
            "--api-sock",
            "/tmp/s",
            "--id",
            "vm1",
            "--log-path",
            "/tmp/l",
            "--level",
            "Debug",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let options = cli.api.into_options().unwrap();
        assert_eq!(
            options.api_sock.as_deref(),
            Some(std::path::Path::new("/tmp/s"))
        );
        assert_eq!(options.id, "vm1");
        assert_eq!(options.log.level, Some(log::LevelFilter::Debug));
        let cli = Cli::try_parse_from(["moat"]).unwrap();
        assert!(cli.api.into_options().unwrap_err().contains("--api-sock"));
        assert!(Cli::try_parse_from(["moat", "--no-api"]).is_err());
        let cli = Cli::try_parse_from(["moat", "--api-sock", "/s", "--level", "loud"]).unwrap();
        assert!(cli.api.into_options().unwrap_err().starts_with("--level"));
    }

    #[test]
    fn unknown_flags_are_clap_errors() {
        assert!(parse(&["--frobnicate"]).is_err());
    }
}
