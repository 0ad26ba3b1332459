//! seccomp filters, one per kind of moat thread, installed before the guest
//! runs (rust-vmm's `seccompiler` compiles them to BPF).
//!
//! Each thread may make only the system calls its work needs; ioctls are
//! allowed by request number. A call outside the list raises SIGSYS, whose
//! handler restores the terminal, names the call and ends moat with status
//! 1: a device bug a guest can reach cannot become an arbitrary system call.
//!
//! - vCPU threads: `KVM_RUN` and the two vCPU reads of the halt probe, and
//!   what the devices do when a guest writes their registers (the UART's
//!   output, eventfd writes, a virtio device's activation and reset, and
//!   mapping a virtio window's register page when the guest claims it, and
//!   on virtio-pci, MSI routes, irqfds and ioeventfds as the guest programs
//!   MSI-X and places BARs).
//! - The VMM thread (the event loop, and in API mode the controller once
//!   the VM runs): I/O on disks, TAPs, Unix sockets and eventfds, epoll,
//!   timers, kicking vCPUs, and opening a disk for `PATCH /drives`.
//! - The API thread: poll, accept and stream I/O on its socket, and the
//!   channel to the VMM thread. No files, no sockets of its own, no ioctls
//!   but FIONBIO.

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::ioctl::ioctl_expr;

/// The kinds of moat threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The VMM thread: event loop and devices.
    Vmm,
    /// The API thread.
    Api,
    /// The thread writing the console's output to stdout.
    Console,
    /// The thread waiting for the host's random pool (virtio-rng), while
    /// the pool is not ready.
    Entropy,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::Entropy,
    ];

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "a vCPU thread",
            ThreadKind::Vmm => "the VMM thread",
            ThreadKind::Api => "the API thread",
            ThreadKind::Console => "the console output thread",
            ThreadKind::Entropy => "the entropy wait thread",
        }
    }
}

/// A filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

const KVMIO: u32 = 0xae;
const TUNIO: u32 = b'T' as u32;

/// KVM_RUN.
pub fn kvm_run() -> u64 {
    ioctl_expr(0, KVMIO, 0x80, 0)
}

fn kvm_get_regs() -> u64 {
    ioctl_expr(
        2,
        KVMIO,
        0x81,
        std::mem::size_of::<kvm_bindings::kvm_regs>() as u32,
    )
}

/// KVM_SET_USER_MEMORY_REGION: a vCPU maps a virtio device's register
/// page when the guest's first DeviceID read claims the device's window
/// (see [`crate::virtio`]).
fn kvm_set_user_memory_region() -> u64 {
    ioctl_expr(
        1,
        KVMIO,
        0x46,
        std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>() as u32,
    )
}

/// KVM_REGISTER_COALESCED_MMIO and KVM_UNREGISTER_COALESCED_MMIO: a vCPU
/// turns the console's batching on and off as the guest writes the UART's
/// IER (see [`crate::console_batch`]).
fn kvm_coalesced_zone() -> [u64; 2] {
    let size = std::mem::size_of::<kvm_bindings::kvm_coalesced_mmio_zone>() as u32;
    [
        ioctl_expr(1, KVMIO, 0x67, size),
        ioctl_expr(1, KVMIO, 0x68, size),
    ]
}

/// KVM_SET_GSI_ROUTING, KVM_IRQFD and KVM_IOEVENTFD: a vCPU points a
/// virtio-pci function's MSI lines and notifications where the guest's
/// writes to its MSI-X table and BAR say (see [`crate::pci`]).
fn kvm_msi_wiring() -> [u64; 3] {
    let size = |n: usize| n as u32;
    [
        ioctl_expr(
            1,
            KVMIO,
            0x6a,
            size(std::mem::size_of::<kvm_bindings::kvm_irq_routing>()),
        ),
        ioctl_expr(
            1,
            KVMIO,
            0x76,
            size(std::mem::size_of::<kvm_bindings::kvm_irqfd>()),
        ),
        ioctl_expr(
            1,
            KVMIO,
            0x79,
            size(std::mem::size_of::<kvm_bindings::kvm_ioeventfd>()),
        ),
    ]
}

fn kvm_get_mp_state() -> u64 {
    ioctl_expr(
        2,
        KVMIO,
        0x98,
        std::mem::size_of::<kvm_bindings::kvm_mp_state>() as u32,
    )
}

/// The vCPU reads a snapshot makes (see [`crate::vcpu::save_state`]).
fn kvm_vcpu_snapshot_reads() -> Vec<u64> {
    use kvm_bindings::*;
    let size = |n: usize| n as u32;
    vec![
        ioctl_expr(2, KVMIO, 0x83, size(std::mem::size_of::<kvm_sregs>())),
        ioctl_expr(3, KVMIO, 0x88, size(std::mem::size_of::<kvm_msrs>())),
        ioctl_expr(2, KVMIO, 0x8e, size(std::mem::size_of::<kvm_lapic_state>())),
        ioctl_expr(3, KVMIO, 0x91, size(std::mem::size_of::<kvm_cpuid2>())),
        ioctl_expr(2, KVMIO, 0x9f, size(std::mem::size_of::<kvm_vcpu_events>())),
        ioctl_expr(2, KVMIO, 0xa1, size(std::mem::size_of::<kvm_debugregs>())),
        ioctl_expr(0, KVMIO, 0xa3, 0),
        ioctl_expr(2, KVMIO, 0xa4, size(std::mem::size_of::<kvm_xsave>())),
        ioctl_expr(2, KVMIO, 0xa6, size(std::mem::size_of::<kvm_xcrs>())),
    ]
}

/// The VM reads a snapshot makes: interrupt controllers, PIT, clock.
fn kvm_vm_snapshot_reads() -> Vec<u64> {
    use kvm_bindings::*;
    let size = |n: usize| n as u32;
    vec![
        ioctl_expr(3, KVMIO, 0x62, size(std::mem::size_of::<kvm_irqchip>())),
        ioctl_expr(2, KVMIO, 0x9f, size(std::mem::size_of::<kvm_pit_state2>())),
        ioctl_expr(2, KVMIO, 0x7c, size(std::mem::size_of::<kvm_clock_data>())),
    ]
}

fn tun_set_offload() -> u64 {
    ioctl_expr(1, TUNIO, 208, 4)
}

/// A terminal or socket ioctl request from libc, as the filter compares
/// it: glibc types these `c_ulong`, musl `c_int`; the kernel takes an
/// unsigned 32-bit number, and the filter compares 32 bits.
fn req(request: libc::Ioctl) -> u64 {
    u64::from(request as u32)
}

/// Rules for one syscall: any of `values` in argument `arg`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *v,
            )
            .expect("argument index below 6")])
            .expect("one condition")
        })
        .collect()
}

/// What every moat thread needs: memory, locks, signals, time, ending.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // The kernel's own call to resume a sleep or a wait with a timeout
    // after a stop (SIGSTOP and SIGCONT, a debugger, a cgroup freezer).
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The rules of `kind`'s filter.
pub fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|call| (*call, Vec::new())).collect();
    let mut allow = |calls: &[i64]| {
        for call in calls {
            rules.insert(*call, Vec::new());
        }
    };
    match kind {
        ThreadKind::Vcpu => {
            // Device activation and reset from a guest's register write:
            // timers (rng), epoll (vsock), connections closed (vsock).
            allow(&[
                libc::SYS_timerfd_settime,
                libc::SYS_epoll_ctl,
                libc::SYS_shutdown,
                libc::SYS_fcntl,
                // A disk with io_engine=async waits for its requests in
                // flight when the driver resets it.
                libc::SYS_io_uring_enter,
            ]);
            let mut ioctls = vec![
                kvm_run(),
                kvm_get_regs(),
                kvm_get_mp_state(),
                kvm_set_user_memory_region(),
                tun_set_offload(),
                // isatty (the boot timer's report), and the SIGSYS
                // handler putting the terminal back.
                req(libc::TCGETS),
                req(libc::TCSETS),
            ];
            ioctls.extend(kvm_coalesced_zone());
            ioctls.extend(kvm_msi_wiring());
            // musl's isatty asks for the window size instead.
            #[cfg(target_env = "musl")]
            ioctls.push(req(libc::TIOCGWINSZ));
            // A snapshot: the vCPU reads its own state.
            ioctls.extend(kvm_vcpu_snapshot_reads());
            rules.insert(libc::SYS_ioctl, arg_in(1, &ioctls));
        }
        ThreadKind::Vmm => {
            allow(&[
                // The event loop and the devices' timers.
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_timerfd_settime,
                libc::SYS_timerfd_gettime,
                libc::SYS_poll,
                libc::SYS_ppoll,
                // Disks.
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_preadv2,
                libc::SYS_pwritev2,
                libc::SYS_fdatasync,
                libc::SYS_fsync,
                libc::SYS_lseek,
                // Disks with io_engine=async. Creating a ring
                // (io_uring_setup) is not allowed: only the rings moat made
                // before the filter, each restricted to reading, writing
                // and syncing its disk's file, and to taking a new one
                // (io_uring_register, PATCH /drives).
                libc::SYS_io_uring_enter,
                libc::SYS_io_uring_register,
                // PATCH /drives: a new backing file, opened and locked.
                libc::SYS_openat,
                libc::SYS_flock,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                // vsock: Unix sockets to and from the host.
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_getsockname,
                libc::SYS_fcntl,
                // Kicking vCPUs (halt probe, pause, stop).
                libc::SYS_tgkill,
                // Removing the API socket when moat ends.
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                // Writing a snapshot's memory file (holes for zero pages).
                libc::SYS_ftruncate,
            ]);
            // musl's names for three of them: open(2) and stat(2) where
            // glibc calls openat(2) and newfstatat(2) or statx(2), and
            // tkill(2) in pthread_kill where glibc calls tgkill(2).
            #[cfg(target_env = "musl")]
            allow(&[libc::SYS_open, libc::SYS_stat, libc::SYS_tkill]);
            rules.insert(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64]));
            let mut ioctls = vec![
                tun_set_offload(),
                req(libc::FIONBIO),
                req(libc::TCGETS),
                req(libc::TCSETS),
                req(libc::TIOCGWINSZ),
            ];
            // PUT /snapshot/create: the VM's own state.
            ioctls.extend(kvm_vm_snapshot_reads());
            rules.insert(libc::SYS_ioctl, arg_in(1, &ioctls));
        }
        ThreadKind::Api => {
            allow(&[
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_fcntl,
            ]);
            // FIONBIO for new connections; TCSETS for the SIGSYS handler.
            rules.insert(
                libc::SYS_ioctl,
                arg_in(1, &[req(libc::FIONBIO), req(libc::TCSETS)]),
            );
        }
        ThreadKind::Console => {
            // Writes to stdout are in COMMON; TCSETS for the SIGSYS handler.
            rules.insert(libc::SYS_ioctl, arg_in(1, &[req(libc::TCSETS)]));
        }
        ThreadKind::Entropy => {
            // getrandom is in COMMON; firing the device's timer; TCSETS
            // for the SIGSYS handler.
            allow(&[libc::SYS_timerfd_settime]);
            rules.insert(libc::SYS_ioctl, arg_in(1, &[req(libc::TCSETS)]));
        }
    }
    // Rust's std built with debug assertions checks that a descriptor is
    // open (fcntl F_GETFD) before it closes it; threads that need no other
    // fcntl get that one.
    rules
        .entry(libc::SYS_fcntl)
        .or_insert_with(|| arg_in(1, &[libc::F_GETFD as u64]));
    rules
}

/// The BPF program of `kind`'s filter: allowed calls pass, others trap.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError(format!("cannot build the {} filter: {e}", kind.name())))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| {
        SeccompError(format!("cannot compile the {} filter: {e}", kind.name()))
    })
}

thread_local! {
    /// This thread's kind, for the SIGSYS message.
    static KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Installs `program` (the filter of `kind`) on the calling thread.
pub fn install(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(program)
        .map_err(|e| SeccompError(format!("cannot install the {} filter: {e}", kind.name())))
}

/// Offset of `si_syscall` in a SIGSYS siginfo (after signo, errno, code,
/// padding and the 8-byte `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, whose
    // `_sigsys` member holds the call number at this offset.
    let call = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let who = KIND
        .with(|k| k.get())
        .map_or("a moat thread", ThreadKind::name);
    // Only async-signal-safe work from here: format into a stack buffer,
    // write(2), put the terminal back, _exit(2).
    let mut line = [0u8; 200];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for b in bytes {
            if len < line.len() {
                line[len] = *b;
                len += 1;
            }
        }
    };
    push(b"\r\nmoat: seccomp: ");
    push(who.as_bytes());
    push(b" made system call ");
    let mut digits = [0u8; 12];
    let mut n = call.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if call < 0 {
        push(b"-");
    }
    push(&digits[i..]);
    push(b", which it never needs; stopping the VM (--seccomp off disables the filters)\r\n");
    crate::terminal::restore_from_signal();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        libc::_exit(1);
    }
}

/// Installs the SIGSYS handler (once, before any filter).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError(format!("cannot install the SIGSYS handler: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that installs `kind`'s filter (without moat's
    /// handler, so a trap kills it with SIGSYS), runs `call`, and exits 0.
    /// Returns the child's wait status.
    fn in_filtered_child(kind: ThreadKind, call: fn() -> i64) -> i32 {
        wait(filtered_child(kind, call), 0)
    }

    /// The child of [`in_filtered_child`], running; returns its pid.
    fn filtered_child(kind: ThreadKind, call: fn() -> i64) -> libc::pid_t {
        let program = program(kind).unwrap();
        // SAFETY: the child only makes raw system calls (prctl, seccomp,
        // the probe, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: _exit is always safe.
                unsafe { libc::_exit(3) };
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        pid
    }

    /// waitpid(2) on our own child `pid` with `flags`; returns the status.
    fn wait(pid: libc::pid_t, flags: i32) -> i32 {
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, flags) }, pid);
        status
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    /// A raw system call for the probes. The arguments are constants or
    /// pointers to static strings and a local termios; a probe that gets
    /// through fails harmlessly (EBADF, ENOENT, ENOTTY) or runs /bin/true.
    fn sys(call: i64, a: i64, b: i64, c: i64) -> i64 {
        // SAFETY: see above; the kernel checks every argument.
        unsafe { libc::syscall(call, a, b, c) }
    }

    fn path(p: &'static std::ffi::CStr) -> i64 {
        p.as_ptr() as i64
    }

    const AT_FDCWD: i64 = libc::AT_FDCWD as i64;
    const AF_UNIX: i64 = libc::AF_UNIX as i64;
    const AF_INET: i64 = libc::AF_INET as i64;
    const STREAM: i64 = libc::SOCK_STREAM as i64;

    #[test]
    fn a_vcpu_thread_cannot_exec_open_or_make_sockets() {
        let forbidden: [fn() -> i64; 4] = [
            || sys(libc::SYS_execve, path(c"/bin/true"), 0, 0),
            || sys(libc::SYS_openat, AT_FDCWD, path(c"/etc/passwd"), 0),
            || sys(libc::SYS_socket, AF_INET, STREAM, 0),
            || sys(libc::SYS_ioctl, 0, libc::TIOCSTI as i64, 0),
        ];
        for (i, call) in forbidden.into_iter().enumerate() {
            let status = in_filtered_child(ThreadKind::Vcpu, call);
            assert!(killed_by_sigsys(status), "probe {i}: status {status:#x}");
        }
        // What a vCPU does is allowed: writes, time, KVM_RUN (on a
        // descriptor that is not KVM: EBADF, but not trapped).
        let allowed: [fn() -> i64; 3] = [
            || sys(libc::SYS_write, -1, path(c"x"), 1),
            || sys(libc::SYS_getpid, 0, 0, 0),
            || sys(libc::SYS_ioctl, -1, kvm_run() as i64, 0),
        ];
        for (i, call) in allowed.into_iter().enumerate() {
            let status = in_filtered_child(ThreadKind::Vcpu, call);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "allowed probe {i}: status {status:#x}"
            );
        }
    }

    #[test]
    fn the_console_thread_can_write_and_nothing_else_of_note() {
        let forbidden: [fn() -> i64; 4] = [
            || sys(libc::SYS_openat, AT_FDCWD, path(c"/etc/passwd"), 0),
            || sys(libc::SYS_socket, AF_UNIX, STREAM, 0),
            || sys(libc::SYS_ioctl, -1, kvm_run() as i64, 0),
            || sys(libc::SYS_epoll_ctl, -1, 0, -1),
        ];
        for (i, call) in forbidden.into_iter().enumerate() {
            let status = in_filtered_child(ThreadKind::Console, call);
            assert!(killed_by_sigsys(status), "probe {i}: status {status:#x}");
        }
        let write = in_filtered_child(ThreadKind::Console, || {
            sys(libc::SYS_write, -1, path(c"x"), 1)
        });
        assert!(libc::WIFEXITED(write) && libc::WEXITSTATUS(write) == 0);
    }

    #[test]
    fn the_api_thread_cannot_open_files_or_connect() {
        let forbidden: [fn() -> i64; 2] = [
            || sys(libc::SYS_openat, AT_FDCWD, path(c"/etc/passwd"), 0),
            || sys(libc::SYS_socket, AF_UNIX, STREAM, 0),
        ];
        for call in forbidden {
            assert!(killed_by_sigsys(in_filtered_child(ThreadKind::Api, call)));
        }
        // The VMM thread may make Unix sockets (vsock) but no others.
        let unix: fn() -> i64 = || sys(libc::SYS_socket, AF_UNIX, STREAM, 0);
        let inet: fn() -> i64 = || sys(libc::SYS_socket, AF_INET, STREAM, 0);
        assert!(libc::WIFEXITED(in_filtered_child(ThreadKind::Vmm, unix)));
        assert!(killed_by_sigsys(in_filtered_child(ThreadKind::Vmm, inet)));
    }

    #[test]
    fn what_the_sigsys_handler_needs_is_in_every_filter() {
        // A call the handler makes that its own filter forbids would kill
        // the process without a word (SIGSYS is blocked in the handler).
        for kind in ThreadKind::ALL {
            let rules = rules(kind);
            for call in [libc::SYS_write, libc::SYS_exit_group] {
                assert!(rules.contains_key(&call), "{kind:?} lacks {call}");
            }
            let tcsets = in_filtered_child(kind, || {
                let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
                sys(
                    libc::SYS_ioctl,
                    -1,
                    libc::TCSETS as i64,
                    t.as_mut_ptr() as i64,
                )
            });
            assert!(
                libc::WIFEXITED(tcsets),
                "{kind:?}: TCSETS trapped ({tcsets:#x})"
            );
        }
    }

    #[test]
    fn a_sleep_stopped_and_continued_goes_on_in_every_filter() {
        // SIGSTOP then SIGCONT (job control, a debugger attaching, a
        // freezer) during a sleep with a timeout: the kernel resumes it
        // with restart_syscall(2), a call no code makes itself.
        for kind in ThreadKind::ALL {
            let pid = filtered_child(kind, || {
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 400_000_000,
                };
                sys(libc::SYS_nanosleep, &ts as *const _ as i64, 0, 0)
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            // SAFETY: signals to our own child.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            assert!(libc::WIFSTOPPED(wait(pid, libc::WUNTRACED)));
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            let status = wait(pid, 0);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: status {status:#x}"
            );
        }
    }

    #[test]
    fn every_filter_lets_a_debug_build_check_a_descriptor_before_closing_it() {
        // Rust's std, built with debug assertions, asks fcntl(F_GETFD)
        // whether a descriptor is open before it closes one.
        for kind in ThreadKind::ALL {
            let status =
                in_filtered_child(kind, || sys(libc::SYS_fcntl, 0, libc::F_GETFD as i64, 0));
            assert!(libc::WIFEXITED(status), "{kind:?}: status {status:#x}");
        }
        // Nothing more than that where fcntl is not otherwise needed.
        let setfl: fn() -> i64 = || sys(libc::SYS_fcntl, 0, libc::F_SETFL as i64, 0);
        assert!(killed_by_sigsys(in_filtered_child(
            ThreadKind::Console,
            setfl
        )));
    }

    #[test]
    fn the_entropy_thread_may_wait_for_the_pool_and_fire_a_timer_only() {
        let allowed: [fn() -> i64; 2] = [
            || {
                let mut byte = 0u8;
                sys(libc::SYS_getrandom, &mut byte as *mut u8 as i64, 1, 0)
            },
            // On no timer: EBADF, but not trapped.
            || sys(libc::SYS_timerfd_settime, -1, 0, 0),
        ];
        for (i, call) in allowed.into_iter().enumerate() {
            let status = in_filtered_child(ThreadKind::Entropy, call);
            assert!(libc::WIFEXITED(status), "allowed {i}: status {status:#x}");
        }
        // setresuid too: which is why the thread starts only once the
        // jail has dropped privileges (glibc makes every thread of the
        // process make that call).
        let forbidden: [fn() -> i64; 5] = [
            || sys(libc::SYS_openat, AT_FDCWD, path(c"/etc/passwd"), 0),
            || sys(libc::SYS_socket, AF_UNIX, STREAM, 0),
            || sys(libc::SYS_epoll_ctl, -1, 0, 0),
            || sys(libc::SYS_setresuid, -1, -1, -1),
            || sys(libc::SYS_ioctl, 0, libc::TIOCSTI as i64, 0),
        ];
        for (i, call) in forbidden.into_iter().enumerate() {
            let status = in_filtered_child(ThreadKind::Entropy, call);
            assert!(
                killed_by_sigsys(status),
                "forbidden {i}: status {status:#x}"
            );
        }
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(kvm_run(), 0xae80);
        assert_eq!(kvm_get_regs(), 0x8090_ae81);
        assert_eq!(kvm_get_mp_state(), 0x8004_ae98);
        assert_eq!(kvm_set_user_memory_region(), 0x4020_ae46);
        assert_eq!(kvm_coalesced_zone(), [0x4010_ae67, 0x4010_ae68]);
        assert_eq!(kvm_msi_wiring(), [0x4008_ae6a, 0x4020_ae76, 0x4040_ae79]);
        assert_eq!(tun_set_offload(), 0x4004_54d0);
    }

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            assert!(!program(kind).unwrap().is_empty());
        }
    }

    #[test]
    fn the_vcpu_filter_has_no_files_sockets_or_processes() {
        let vcpu = rules(ThreadKind::Vcpu);
        for call in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_connect,
        ] {
            assert!(!vcpu.contains_key(&call), "vCPU filter allows {call}");
        }
        let api = rules(ThreadKind::Api);
        for call in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_connect,
        ] {
            assert!(!api.contains_key(&call), "API filter allows {call}");
        }
    }
}
