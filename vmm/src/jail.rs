//! The jail: `moat run --jail DIR --uid N --gid N [--netns PATH]
//! [--cgroup FILE=VALUE,...]`, and the same options in API mode, so that
//! no separate jailer is needed.
//!
//! Before the guest runs, moat shuts itself in, so that a guest that took
//! over a moat thread (past the seccomp filters) finds little to use:
//!
//! 1. [`enter`], as root in the process that was started: makes a cgroup v2
//!    group with the limits asked for, joins the network namespace asked
//!    for, unshares new mount, PID, IPC and UTS namespaces and forks. The
//!    original process only waits: it passes termination signals on,
//!    removes the cgroup once the jailed moat has ended and exits with its
//!    status.
//! 2. The child, PID 1 of the new PID namespace, joins the cgroup, mounts an
//!    empty tmpfs on DIR (in its own mount namespace: the host's DIR stays
//!    empty) and binds into it, each at its own path, only what the VM
//!    needs: the kernel and initramfs (read-only), the disks (read-only
//!    when they are), the KVM device, `/dev/net/tun` when a card names a
//!    TAP, and the directories of the vsock sockets. It pivot_roots there,
//!    makes the root read-only, names its host `moat`, sets RLIMIT_CORE to 0
//!    (no core file full of guest memory) and closes every descriptor it
//!    was not given on purpose (`--net fd=N`).
//! 3. moat builds the VM as root (it opens those files, creates TAPs), then
//!    [`Jailed::drop_privileges`]: no_new_privs, every capability out of
//!    the bounding and ambient sets, no supplementary groups, then the gid
//!    and uid, after which it holds no capability at all. Only then do the
//!    vCPUs start and the seccomp filters go on.
//!
//! The API mode cannot know the VM's files before its clients name them,
//! so there the root is DIR as its owner prepared it ([`Layout::Prepared`],
//! Firecracker's jailer's way: kernel, disks and sockets' directories put
//! in DIR, readable or writable by the uid), with a /dev of its own holding
//! a KVM node owned by the uid; moat drops its privileges right after
//! binding the API socket, before it reads a config file or a request.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::config::{ConfigError, NetBackendConfig, VmConfig};
use crate::error::Error;

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The group, under [`CGROUP_ROOT`], that holds one group per jailed moat.
const CGROUP_PARENT: &str = "moat";

/// What `--jail` and its companions asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The directory that becomes moat's root.
    pub dir: PathBuf,
    /// The uid moat runs as once the VM is built.
    pub uid: u32,
    /// The gid moat runs as once the VM is built.
    pub gid: u32,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    pub netns: Option<PathBuf>,
    /// cgroup v2 files and the values to write to them.
    pub cgroup: Vec<(String, String)>,
}

/// Parses `--cgroup FILE=VALUE[,FILE=VALUE...]` (cgroup v2 interface files
/// such as `cpu.max=50000 100000`, `memory.max=512M`, `pids.max=64`).
pub fn parse_cgroup(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let syntax = |problem: String| ConfigError::Syntax {
        option: "--cgroup",
        problem,
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for item in text.split(',') {
        let (file, value) = item
            .split_once('=')
            .ok_or_else(|| syntax(format!("'{item}': expected FILE=VALUE")))?;
        let (controller, rest) = file.split_once('.').unwrap_or(("", ""));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
        };
        if !name_ok(controller) || !name_ok(rest) || controller == "cgroup" {
            return Err(syntax(format!(
                "'{file}' is not a controller's file (such as cpu.max, memory.max, pids.max)"
            )));
        }
        if value.is_empty() || value.contains('\n') {
            return Err(syntax(format!("'{file}' needs a value")));
        }
        if out.iter().any(|(f, _)| f == file) {
            return Err(syntax(format!("'{file}' given twice")));
        }
        out.push((file.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Checks the jail's options.
pub fn check(jail: &JailConfig) -> Result<(), ConfigError> {
    let syntax = |option, problem: &str| ConfigError::Syntax {
        option,
        problem: problem.to_string(),
    };
    if jail.uid == 0 {
        return Err(syntax(
            "--uid",
            "0 would keep root's power; give an unprivileged uid",
        ));
    }
    if jail.gid == 0 {
        return Err(syntax(
            "--gid",
            "0 is root's group; give an unprivileged gid",
        ));
    }
    if jail.dir.as_os_str().is_empty() || jail.dir == Path::new("/") {
        return Err(syntax("--jail", "needs a directory other than /"));
    }
    Ok(())
}

/// One file or directory bound into the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Its absolute path, on the host and in the jail.
    pub path: PathBuf,
    /// A directory (else a file or device node).
    pub dir: bool,
    /// Bound read-only.
    pub read_only: bool,
}

/// What the jailed moat starts its VM from, besides its devices.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// The kernel and initramfs the configuration names.
    Boot,
    /// A snapshot's memory file, at an absolute path (see [`absolute`]);
    /// the state file is read before the jail.
    Snapshot {
        /// The memory file.
        memory: &'a Path,
    },
}

/// `path` made absolute, with links resolved; `option` names it if it
/// does not exist.
pub fn absolute(option: &'static str, path: &Path) -> Result<PathBuf, ConfigError> {
    std::fs::canonicalize(path).map_err(|e| ConfigError::File {
        option,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The configuration with every path absolute (the jail's working
/// directory is its root), and what to bind into the jail for it and for
/// `source`.
pub fn plan(config: &VmConfig, source: Source) -> Result<(VmConfig, Vec<Bind>), ConfigError> {
    let mut config = config.clone();
    let mut binds = Vec::new();
    config.kvm_device = absolute("--kvm", &config.kvm_device)?;
    binds.push(Bind {
        path: config.kvm_device.clone(),
        dir: false,
        read_only: false,
    });
    let read_only = |path: PathBuf| Bind {
        path,
        dir: false,
        read_only: true,
    };
    match source {
        Source::Boot => {
            config.kernel = absolute("--kernel", &config.kernel)?;
            binds.push(read_only(config.kernel.clone()));
            if let Some(initramfs) = &config.initramfs {
                let path = absolute("--initramfs", initramfs)?;
                binds.push(read_only(path.clone()));
                config.initramfs = Some(path);
            }
        }
        // Mapped privately: the guest's writes never reach the file.
        Source::Snapshot { memory } => binds.push(read_only(absolute("--restore", memory)?)),
    }
    for disk in &mut config.disks {
        disk.path = absolute("--disk", &disk.path)?;
        binds.push(Bind {
            path: disk.path.clone(),
            dir: false,
            read_only: disk.read_only,
        });
    }
    if config
        .nets
        .iter()
        .any(|n| matches!(n.backend, NetBackendConfig::Tap(_)))
    {
        binds.push(Bind {
            path: PathBuf::from("/dev/net/tun"),
            dir: false,
            read_only: false,
        });
    }
    // Files moat makes (sockets, the exit trace): their directories, where
    // it makes them and, for vsock, finds the guest-initiated connections'
    // `PATH_PORT` listeners.
    let mut made_in_dir = |option: &'static str, path: &mut PathBuf| -> Result<(), ConfigError> {
        let name =
            path.file_name()
                .map(|n| n.to_os_string())
                .ok_or_else(|| ConfigError::Syntax {
                    option,
                    problem: format!("{} names no file", path.display()),
                })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = absolute(option, &parent)?;
        *path = dir.join(name);
        if !binds.iter().any(|b| b.path == dir) {
            binds.push(Bind {
                path: dir,
                dir: true,
                read_only: false,
            });
        }
        Ok(())
    };
    if let Some(vsock) = &mut config.vsock {
        made_in_dir("--vsock", &mut vsock.socket)?;
    }
    for forward in &mut config.forwards {
        made_in_dir("--forward", &mut forward.host)?;
    }
    if let Some(file) = config.trace_exits.as_mut().and_then(|t| t.file.as_mut()) {
        made_in_dir("--trace-exits", file)?;
    }
    Ok((config, binds))
}

/// What the jail's root holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// An empty tmpfs with these bound in, each at its own path, made
    /// read-only once built (`moat run`, whose files are all known first).
    Only(Vec<Bind>),
    /// DIR itself, as its owner prepared it (nosuid, nodev), with a /dev of
    /// its own that holds a KVM device node owned by the jail's uid (made
    /// like `kvm`) and `/dev/net/tun`: Firecracker's jailer's layout, for
    /// the API mode, whose paths arrive later and name files in DIR.
    Prepared {
        /// The KVM device to make a node like.
        kvm: PathBuf,
    },
}

/// The jailed moat, still root, with the privileges to drop.
#[derive(Debug)]
pub struct Jailed {
    uid: u32,
    gid: u32,
}

/// The jailed moat's pid, for the signal relay in the waiting process.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// siginfo's `si_code` for a signal the kernel sent, such as the terminal's
/// SIGINT on Ctrl-C.
const SI_KERNEL: libc::c_int = 0x80;

extern "C" fn relay(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A signal from the terminal went to the whole process group, the
    // jailed moat included: passing it on would make it a second one
    // (which stops the guest at once instead of shutting it down).
    // SAFETY: the kernel hands the handler a valid siginfo.
    if !info.is_null() && unsafe { (*info).si_code } == SI_KERNEL {
        return;
    }
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe and touches no memory.
        unsafe { libc::kill(child, signal) };
    }
}

fn os_error(what: &str) -> Error {
    Error::Jail(format!("{what}: {}", std::io::Error::last_os_error()))
}

fn cstring(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Jail(format!("{} has a NUL byte", path.display())))
}

/// Enters the jail (see the module notes), its root laid out as `layout`
/// says. Returns in the jailed moat; the process that called it waits for
/// that one and exits with its status. `keep_fds` are descriptors the
/// jailed moat keeps (`--net fd=N`).
pub fn enter(jail: &JailConfig, layout: &Layout, keep_fds: &[i32]) -> Result<Jailed, Error> {
    // SAFETY: geteuid only returns a number.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Jail(
            "--jail needs root (namespaces, mounts, cgroups); without it moat runs as any user \
             with access to /dev/kvm (docs/security.md)"
                .into(),
        ));
    }
    std::fs::create_dir_all(&jail.dir)
        .map_err(|e| Error::Jail(format!("cannot make {}: {e}", jail.dir.display())))?;
    let dir = std::fs::canonicalize(&jail.dir)
        .map_err(|e| Error::Jail(format!("{}: {e}", jail.dir.display())))?;
    if dir == Path::new("/") {
        return Err(Error::Jail("--jail needs a directory other than /".into()));
    }
    let cgroup = if jail.cgroup.is_empty() {
        None
    } else {
        Some(make_cgroup(&jail.cgroup)?)
    };
    if let Layout::Prepared { kvm } = layout {
        // Checked here, while a problem can still be told in one line.
        std::fs::metadata(kvm).map_err(|e| Error::Jail(format!("{}: {e}", kvm.display())))?;
    }
    let result = split(jail, &dir, layout, keep_fds, cgroup.as_deref());
    if result.is_err() {
        if let Some(group) = &cgroup {
            let _ = std::fs::remove_dir(group);
        }
    }
    result
}

/// Namespaces and the fork; the waiting side never returns.
fn split(
    jail: &JailConfig,
    dir: &Path,
    layout: &Layout,
    keep_fds: &[i32],
    cgroup: Option<&Path>,
) -> Result<Jailed, Error> {
    if let Some(netns) = &jail.netns {
        let ns = std::fs::File::open(netns)
            .map_err(|e| Error::Jail(format!("--netns {}: {e}", netns.display())))?;
        // SAFETY: setns on a descriptor we own.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            return Err(os_error(&format!(
                "cannot join the network namespace {}",
                netns.display()
            )));
        }
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare changes only this process's namespaces.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(os_error(
            "cannot make new mount, PID, IPC and UTS namespaces",
        ));
    }
    // SAFETY: moat has no other thread yet, so the child is a whole copy.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_error("cannot fork the jailed moat"));
    }
    if pid > 0 {
        wait_and_exit(pid, cgroup);
    }
    // The jailed moat. It dies with the process that waits for it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if let Some(group) = cgroup {
        std::fs::write(group.join("cgroup.procs"), "0")
            .map_err(|e| Error::Jail(format!("cannot join cgroup {}: {e}", group.display())))?;
    }
    build_root(dir, layout, jail)?;
    let hostname = b"moat";
    // SAFETY: the name is ours and its length is given.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(os_error("cannot set the host name"));
    }
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        return Err(os_error("cannot set RLIMIT_CORE"));
    }
    close_other_fds(keep_fds)?;
    Ok(Jailed {
        uid: jail.uid,
        gid: jail.gid,
    })
}

/// The waiting side: relays termination signals, waits, cleans up, exits.
fn wait_and_exit(child: libc::pid_t, cgroup: Option<&Path>) -> ! {
    CHILD.store(child, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: a zeroed sigaction is valid; `relay` only reads the
        // siginfo and calls kill(2), which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = relay as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    let mut status = 0;
    let code = loop {
        // SAFETY: waitpid writes the status into our variable.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            if libc::WIFEXITED(status) {
                break libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                break 128 + libc::WTERMSIG(status);
            }
        } else if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break 1;
        }
    };
    if let Some(group) = cgroup {
        // The group empties as the child's exit completes; give it a moment.
        for _ in 0..100 {
            if std::fs::remove_dir(group).is_ok() || !group.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    std::process::exit(code)
}

/// Creates this moat's cgroup with `limits`; returns its directory.
fn make_cgroup(limits: &[(String, String)]) -> Result<PathBuf, Error> {
    let root = Path::new(CGROUP_ROOT);
    let available = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|_| Error::Jail(format!("--cgroup needs cgroup v2 mounted at {CGROUP_ROOT}")))?;
    let available: BTreeSet<&str> = available.split_whitespace().collect();
    let mut wanted = BTreeSet::new();
    for (file, _) in limits {
        let controller = file.split('.').next().unwrap_or_default();
        if !available.contains(controller) {
            return Err(Error::Jail(format!(
                "--cgroup {file}: the {controller} controller is not available in {CGROUP_ROOT} \
                 (it has: {})",
                available.iter().copied().collect::<Vec<_>>().join(" ")
            )));
        }
        wanted.insert(controller.to_string());
    }
    let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
    let parent = root.join(CGROUP_PARENT);
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value).map_err(|e| {
            Error::Jail(format!(
                "cannot write '{}' to {}: {e}",
                value.trim(),
                path.display()
            ))
        })
    };
    write(&root.join("cgroup.subtree_control"), enable.trim())?;
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Jail(format!(
                "cannot make {}: {e}",
                parent.display()
            )))
        }
    }
    write(&parent.join("cgroup.subtree_control"), enable.trim())?;
    let group = parent.join(std::process::id().to_string());
    std::fs::create_dir(&group)
        .map_err(|e| Error::Jail(format!("cannot make {}: {e}", group.display())))?;
    for (file, value) in limits {
        let path = group.join(file);
        if !path.exists() {
            let _ = std::fs::remove_dir(&group);
            return Err(Error::Jail(format!(
                "--cgroup: {file} is not a file of a cgroup here"
            )));
        }
        if let Err(e) = std::fs::write(&path, value) {
            let _ = std::fs::remove_dir(&group);
            return Err(Error::Jail(format!(
                "--cgroup: cannot set {file} to '{value}': {e}"
            )));
        }
    }
    Ok(group)
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string we own, or null.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc != 0 {
        return Err(os_error(&format!("cannot mount on {}", target.display())));
    }
    Ok(())
}

/// The jail's root on `dir`, laid out as `layout` says, pivoted into.
fn build_root(dir: &Path, layout: &Layout, jail: &JailConfig) -> Result<(), Error> {
    // Nothing done here may reach the host's mount table.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    match layout {
        Layout::Only(binds) => build_bound_root(dir, binds),
        Layout::Prepared { kvm } => build_prepared_root(dir, kvm, jail),
    }
}

/// [`Layout::Only`]: a tmpfs on `dir` with `binds`, read-only.
fn build_bound_root(dir: &Path, binds: &[Bind]) -> Result<(), Error> {
    mount(
        Some(Path::new("tmpfs")),
        dir,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755,size=1m"),
    )?;
    for bind in binds {
        let relative = bind.path.strip_prefix("/").unwrap_or(&bind.path);
        let target = dir.join(relative);
        let made = if bind.dir {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(&target).map(drop))
        };
        made.map_err(|e| Error::Jail(format!("cannot make {}: {e}", target.display())))?;
        mount(Some(&bind.path), &target, None, libc::MS_BIND, None)?;
        if bind.read_only {
            mount(
                None,
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                None,
            )?;
        }
    }
    enter_root(dir)?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        Some("mode=0755,size=1m"),
    )
}

/// [`Layout::Prepared`]: `dir` bound onto itself without set-user-id
/// files or devices, over its `dev` a tmpfs with the device nodes moat
/// needs, owned by the jail's uid so that it can open them once it is no
/// longer root (the nodes vanish with the mount namespace).
fn build_prepared_root(dir: &Path, kvm: &Path, jail: &JailConfig) -> Result<(), Error> {
    mount(Some(dir), dir, None, libc::MS_BIND, None)?;
    mount(
        None,
        dir,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;
    let dev = dir.join("dev");
    let made = |path: &Path, result: std::io::Result<()>| match result {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(Error::Jail(format!("cannot make {}: {e}", path.display())))
        }
        _ => Ok(()),
    };
    made(&dev, std::fs::create_dir(&dev))?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    device_node(kvm, &dev.join("kvm"), 0o600, Some((jail.uid, jail.gid)))?;
    let tun = Path::new("/dev/net/tun");
    if tun.exists() {
        made(&dev.join("net"), std::fs::create_dir(dev.join("net")))?;
        device_node(tun, &dev.join("net/tun"), 0o666, None)?;
    }
    enter_root(dir)
}

/// A character device node at `path` for the device `like` is, with `mode`
/// and, if given, that owner.
fn device_node(
    like: &Path,
    path: &Path,
    mode: libc::mode_t,
    owner: Option<(u32, u32)>,
) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta =
        std::fs::metadata(like).map_err(|e| Error::Jail(format!("{}: {e}", like.display())))?;
    if !meta.file_type().is_char_device() {
        return Err(Error::Jail(format!(
            "{} is not a character device",
            like.display()
        )));
    }
    let path_c = cstring(path)?;
    // SAFETY: mknod, chmod (umask aside) and chown with a path we own.
    unsafe {
        if libc::mknod(path_c.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) != 0 {
            return Err(os_error(&format!("cannot make {}", path.display())));
        }
        if libc::chmod(path_c.as_ptr(), mode) != 0 {
            return Err(os_error(&format!("cannot chmod {}", path.display())));
        }
        if let Some((uid, gid)) = owner {
            if libc::chown(path_c.as_ptr(), uid, gid) != 0 {
                return Err(os_error(&format!("cannot chown {}", path.display())));
            }
        }
    }
    Ok(())
}

/// Makes `dir` the root: pivot_root, with the host's tree unmounted, or,
/// where the root is the initial ramfs (which pivot_root cannot leave, as
/// on a machine that runs from its initramfs), moving `dir` over `/` and
/// chroot-ing into it; the host's tree is then out of reach once moat has
/// no capability left (no CAP_SYS_CHROOT to escape with).
fn enter_root(dir: &Path) -> Result<(), Error> {
    let chdir = |path: &Path| {
        std::env::set_current_dir(path)
            .map_err(|e| Error::Jail(format!("cannot enter {}: {e}", path.display())))
    };
    let old = dir.join(".old");
    std::fs::create_dir(&old)
        .map_err(|e| Error::Jail(format!("cannot make {}: {e}", old.display())))?;
    let (dir_c, old_c) = (cstring(dir)?, cstring(&old)?);
    // SAFETY: pivot_root with two paths we own.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dir_c.as_ptr(), old_c.as_ptr()) } == 0 {
        chdir(Path::new("/"))?;
        let old = CString::new("/.old").unwrap_or_default();
        // SAFETY: umount2 of a path we own.
        if unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(os_error("cannot let go of the host's file system"));
        }
        let _ = std::fs::remove_dir("/.old");
        return Ok(());
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(os_error("cannot pivot_root into the jail"));
    }
    let _ = std::fs::remove_dir(&old);
    chdir(dir)?;
    mount(Some(dir), Path::new("/"), None, libc::MS_MOVE, None)?;
    let here = CString::new(".").unwrap_or_default();
    // SAFETY: chroot to a path we own.
    if unsafe { libc::chroot(here.as_ptr()) } != 0 {
        return Err(os_error("cannot chroot into the jail"));
    }
    chdir(Path::new("/"))
}

/// Closes every descriptor above stderr but `keep`.
fn close_other_fds(keep: &[i32]) -> Result<(), Error> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.iter().copied().filter(|fd| *fd >= 3).chain([u32::MAX]) {
        if fd > first {
            let last = if fd == u32::MAX { u32::MAX } else { fd - 1 };
            // SAFETY: close_range closes descriptors; nothing else of ours
            // refers to them (moat has opened nothing yet but these).
            if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) } != 0 {
                return Err(os_error("cannot close inherited descriptors"));
            }
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

/// The capability sets, from capget(2).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Whether the calling thread holds any capability.
pub fn holds_capabilities() -> bool {
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills two CapData for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    rc != 0
        || data
            .iter()
            .any(|d| d.effective | d.permitted | d.inheritable != 0)
}

impl Jailed {
    /// Drops to the jail's uid and gid with no capability and no way to
    /// gain one (call once the VM is built, before it runs).
    pub fn drop_privileges(&self) -> Result<(), Error> {
        // SAFETY: prctl, setgroups, setresgid and setresuid take integers
        // (setgroups a null list of length 0).
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(os_error("cannot set no_new_privs"));
            }
            let mut cap = 0;
            while libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 {
                cap += 1;
            }
            if cap == 0 {
                return Err(os_error("cannot empty the capability bounding set"));
            }
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(os_error("cannot drop the supplementary groups"));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(os_error(&format!("cannot switch to gid {}", self.gid)));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(os_error(&format!("cannot switch to uid {}", self.uid)));
            }
        }
        if holds_capabilities() {
            return Err(Error::Jail(format!(
                "still holding capabilities as uid {}",
                self.uid
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_cgroup("cpu.max=50000 100000,memory.max=512M,pids.max=64").unwrap(),
            vec![
                ("cpu.max".to_string(), "50000 100000".to_string()),
                ("memory.max".to_string(), "512M".to_string()),
                ("pids.max".to_string(), "64".to_string()),
            ]
        );
        for (bad, says) in [
            ("memory.max", "expected FILE=VALUE"),
            ("../etc/passwd=1", "not a controller's file"),
            ("cgroup.procs=1", "not a controller's file"),
            ("max=1", "not a controller's file"),
            ("pids.max=", "needs a value"),
            ("pids.max=1,pids.max=2", "given twice"),
        ] {
            let e = parse_cgroup(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("--cgroup: ") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn root_uid_or_gid_and_the_root_directory_are_refused() {
        let jail = |uid, gid, dir: &str| JailConfig {
            dir: dir.into(),
            uid,
            gid,
            netns: None,
            cgroup: Vec::new(),
        };
        assert!(check(&jail(1000, 1000, "/srv/jail")).is_ok());
        assert!(check(&jail(0, 1000, "/srv/jail"))
            .unwrap_err()
            .to_string()
            .starts_with("--uid"));
        assert!(check(&jail(1000, 0, "/srv/jail"))
            .unwrap_err()
            .to_string()
            .starts_with("--gid"));
        assert!(check(&jail(1000, 1000, "/"))
            .unwrap_err()
            .to_string()
            .starts_with("--jail"));
    }

    #[test]
    fn the_plan_binds_exactly_what_the_vm_uses_at_absolute_paths() {
        let dir = std::env::temp_dir().join(format!("moat-jail-plan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("socks")).unwrap();
        for f in ["vmlinux", "initrd", "root.img", "ro.img", "kvm", "vm.mem"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let path = |f: &str| dir.join(f).display().to_string();
        let argv = [
            "moat".to_string(),
            "run".into(),
            "--kvm".into(),
            path("kvm"),
            "--kernel".into(),
            path("vmlinux"),
            "--initramfs".into(),
            path("initrd"),
            "--disk".into(),
            format!("path={}", path("root.img")),
            "--disk".into(),
            format!("path={},readonly=on", path("ro.img")),
            "--net".into(),
            "tap=tap0".into(),
            "--vsock".into(),
            format!("cid=3,socket={}", path("socks/v.sock")),
            "--forward".into(),
            format!("unix:{}=vsock:22", path("socks/../socks/f.sock")),
        ];
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
        let Some(crate::cli::Command::Run(run)) = cli.command else {
            panic!("not a run command");
        };
        let mut config = run.into_config().unwrap();
        let (planned, binds) = plan(&config, Source::Boot).unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        let bind = |p: PathBuf, is_dir, ro| Bind {
            path: p,
            dir: is_dir,
            read_only: ro,
        };
        assert_eq!(
            binds,
            vec![
                bind(dir.join("kvm"), false, false),
                bind(dir.join("vmlinux"), false, true),
                bind(dir.join("initrd"), false, true),
                bind(dir.join("root.img"), false, false),
                bind(dir.join("ro.img"), false, true),
                bind("/dev/net/tun".into(), false, false),
                bind(dir.join("socks"), true, false),
            ]
        );
        assert_eq!(planned.forwards[0].host, dir.join("socks/f.sock"));
        assert_eq!(planned.vsock.unwrap().socket, dir.join("socks/v.sock"));
        // A restore binds the memory file instead of the boot files.
        let (_, restore_binds) = plan(
            &config,
            Source::Snapshot {
                memory: &dir.join("vm.mem"),
            },
        )
        .unwrap();
        let mut expected = binds.clone();
        expected.splice(1..3, [bind(dir.join("vm.mem"), false, true)]);
        assert_eq!(restore_binds, expected);
        let e = plan(
            &config,
            Source::Snapshot {
                memory: &dir.join("missing"),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--restore: cannot open"), "{e}");
        config.kernel = dir.join("missing");
        let e = plan(&config, Source::Boot).unwrap_err().to_string();
        assert!(e.starts_with("--kernel: cannot open"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn closing_other_descriptors_keeps_the_ones_asked_for() {
        // In a child, so the test process keeps its descriptors.
        let keep = std::fs::File::open("/dev/null").unwrap();
        let close = std::fs::File::open("/dev/null").unwrap();
        let (k, c) = (
            std::os::fd::AsRawFd::as_raw_fd(&keep),
            std::os::fd::AsRawFd::as_raw_fd(&close),
        );
        // SAFETY: the child only makes system calls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = close_other_fds(&[k]).is_ok()
                // SAFETY: fcntl queries descriptor flags only.
                && unsafe { libc::fcntl(k, libc::F_GETFD) } >= 0
                // SAFETY: as above.
                && unsafe { libc::fcntl(c, libc::F_GETFD) } < 0
                // SAFETY: as above.
                && unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0;
            // SAFETY: _exit ends the child without running the parent's
            // destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
    }
}
