//! vCPU threads. Each runs KVM_RUN in a loop and routes port-I/O and MMIO
//! exits to the buses; everything else about devices happens elsewhere
//! (interrupts go out through irqfds, device work on the event loop).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_run, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use moat_boot::cpu::{self, EntryPoint};
use moat_devices::trigger::EventFdTrigger;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot_timer::FirstRun;
use crate::bus::Bus;
use crate::console_batch::ConsoleBatch;
use crate::error::{Error, KvmOp};
use crate::exit::{ExitSignal, VmExit};
use crate::snapshot::VcpuState;
use crate::trace::{Exit, ExitKind, ExitTrace, VcpuTrace};

/// The signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run` area, for the kick handler; null on
    /// other threads. Const-initialised, so the handler can read it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A kick that lands in KVM_RUN makes it return EINTR. One that lands
    // just before the thread enters KVM_RUN would be lost, so the handler
    // also sets `immediate_exit`: KVM_RUN then returns EINTR at once
    // (Documentation/virt/kvm/api.rst, "immediate_exit").
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // `run` before it first enters KVM_RUN and valid until the VcpuFd
        // it came from is dropped, after the thread has cleared it. A
        // volatile byte store cannot tear.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), Error> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| Error::Io("install the vCPU kick signal handler", e.into()))
}

/// Creates vCPU `index` of `count` and sets up its CPUID, MSRs, FPU and
/// LAPIC; the boot vCPU also gets `entry`'s registers. The others wait for
/// the boot vCPU's INIT/SIPI in the in-kernel LAPIC.
pub fn create(
    kvm: &Kvm,
    vm: &VmFd,
    index: u8,
    count: u8,
    entry: EntryPoint,
    page_table: u64,
    nested: bool,
) -> Result<VcpuFd, Error> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(KvmOp::CreateVcpu.err())?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmOp::GetSupportedCpuid.err())?;
    cpu::configure_cpuid(cpuid.as_mut_slice(), index, count);
    cpu::apply_cpuid_policy(cpuid.as_mut_slice(), nested);
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        cpu::set_tsc_deadline(cpuid.as_mut_slice());
    }
    cpu::set_brand_string(&mut cpuid, &host_brand_string())
        .map_err(|e| Error::Internal(format!("CPUID brand string: {e}")))?;
    fd.set_cpuid2(&cpuid).map_err(KvmOp::SetCpuid.err())?;

    let wanted = cpu::boot_msrs();
    let msrs =
        Msrs::from_entries(&wanted).map_err(|_| Error::Internal("too many boot MSRs".into()))?;
    let set = fd.set_msrs(&msrs).map_err(KvmOp::SetMsrs.err())?;
    if set != wanted.len() {
        return Err(Error::Internal(format!(
            "KVM refused boot MSR {:#x} on vCPU {index}",
            wanted[set].index
        )));
    }
    fd.set_fpu(&cpu::boot_fpu()).map_err(KvmOp::SetFpu.err())?;
    let lapic = fd.get_lapic().map_err(KvmOp::Lapic.err())?;
    fd.set_lapic(&cpu::configure_lint(&lapic))
        .map_err(KvmOp::Lapic.err())?;

    if index == 0 {
        let sregs = fd.get_sregs().map_err(KvmOp::Sregs.err())?;
        fd.set_sregs(&cpu::boot_sregs(&sregs, entry, page_table))
            .map_err(KvmOp::Sregs.err())?;
        fd.set_regs(&cpu::boot_regs(entry))
            .map_err(KvmOp::Regs.err())?;
    }
    Ok(fd)
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Interrupts the thread's KVM_RUN (or its next one).
    fn kick(&self) {
        let _ = self.handle.kill(kick_signal());
    }
}

/// What each vCPU last told the halt probe (see [`HaltProbe`]).
#[derive(Default)]
pub struct HaltReport {
    /// The probe round the vCPU last answered.
    answered: AtomicU64,
    /// Whether the vCPU could not run again by itself in that round.
    stuck: AtomicBool,
}

/// Tells a guest that halted for good (every vCPU stopped with interrupts
/// off, or never started) from an idle one. With the in-kernel LAPIC, KVM
/// handles HLT without exiting to moat, so moat asks: each round, the
/// event loop kicks every vCPU and each looks at its own state. When all
/// answered "stuck" in two rounds in a row (one round could catch an AP
/// between its INIT and SIPI), the guest can never resume. (A Linux guest
/// without a power-off device ends `poweroff` and `halt` this way.)
#[derive(Default)]
pub struct HaltProbe {
    round: AtomicU64,
    stuck_rounds: AtomicU64,
    reports: Vec<HaltReport>,
}

impl HaltProbe {
    /// Rounds in a row in which every vCPU must answer "stuck".
    const ROUNDS: u64 = 2;

    /// A probe for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            round: AtomicU64::new(0),
            stuck_rounds: AtomicU64::new(0),
            reports: (0..vcpus).map(|_| HaltReport::default()).collect(),
        }
    }

    /// Ends the current round and starts the next, kicking every vCPU.
    /// Returns whether the guest has halted for good.
    pub fn next_round(&self, threads: &[VcpuThread]) -> bool {
        let round = self.round.load(Ordering::SeqCst);
        let all_stuck = round > 0
            && self.reports.iter().all(|r| {
                r.answered.load(Ordering::SeqCst) == round && r.stuck.load(Ordering::SeqCst)
            });
        let stuck_rounds = if all_stuck {
            self.stuck_rounds.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.stuck_rounds.store(0, Ordering::SeqCst);
            0
        };
        self.round.store(round + 1, Ordering::SeqCst);
        for thread in threads {
            thread.kick();
        }
        stuck_rounds >= Self::ROUNDS
    }

    /// vCPU `index` answers the current round, if it has not yet.
    fn answer(&self, index: usize, fd: &VcpuFd) {
        let round = self.round.load(Ordering::SeqCst);
        let Some(report) = self.reports.get(index) else {
            return;
        };
        if report.answered.load(Ordering::SeqCst) == round {
            return;
        }
        report.stuck.store(is_stuck(fd), Ordering::SeqCst);
        report.answered.store(round, Ordering::SeqCst);
    }
}

/// Whether a vCPU (not in KVM_RUN) cannot run again by itself: halted with
/// interrupts off, or waiting for an INIT/SIPI nobody will send.
fn is_stuck(fd: &VcpuFd) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    let Ok(mp) = fd.get_mp_state() else {
        return false;
    };
    match mp.mp_state {
        KVM_MP_STATE_HALTED => fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0),
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => true,
        _ => false,
    }
}

/// Pauses and resumes the vCPUs (`PATCH /vm`). A vCPU parks when it
/// finds the gate closed after a kick, and counts itself parked; parked
/// vCPUs also save their state for a snapshot when asked
/// ([`PauseGate::save_states`]).
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// A snapshot's request: one slot per vCPU, filled by the vCPU.
    saves: Option<Vec<Option<Result<VcpuState, String>>>>,
}

impl PauseGate {
    /// How long [`PauseGate::pause`] waits for every vCPU to park.
    pub const PARK_TIMEOUT: Duration = Duration::from_secs(2);

    /// Closes the gate and kicks `threads` out of KVM_RUN; returns once
    /// all of them parked, or false if some did not within
    /// [`Self::PARK_TIMEOUT`] (one busy in a device, or one that ended).
    pub fn pause(&self, threads: &[VcpuThread]) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.paused = true;
        drop(state);
        let deadline = Instant::now() + Self::PARK_TIMEOUT;
        loop {
            for thread in threads {
                thread.kick();
            }
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.parked >= threads.len() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            let _ = self.changed.wait_timeout(state, wait);
        }
    }

    /// Opens the gate: parked vCPUs run again.
    pub fn resume(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.paused = false;
        self.changed.notify_all();
    }

    /// Whether a pause was asked for.
    pub fn is_paused(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).paused
    }

    /// Has each of the `count` vCPUs, all parked, save its state; returns
    /// them in order. Fails if the VM is not paused or a vCPU could not
    /// save within [`Self::PARK_TIMEOUT`].
    pub fn save_states(&self, count: usize) -> Result<Vec<VcpuState>, String> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.paused || state.parked < count {
            return Err(
                "the microVM is not paused (PATCH /vm {\"state\": \"Paused\"} first)".into(),
            );
        }
        state.saves = Some((0..count).map(|_| None).collect());
        self.changed.notify_all();
        let deadline = Instant::now() + Self::PARK_TIMEOUT;
        loop {
            let done = state
                .saves
                .as_ref()
                .is_some_and(|s| s.iter().all(Option::is_some));
            if done {
                let saves = state.saves.take().unwrap_or_default();
                return saves.into_iter().flatten().collect();
            }
            let now = Instant::now();
            if now >= deadline {
                state.saves = None;
                return Err("a vCPU did not save its state within 2 s".into());
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Called by a vCPU between runs: parks while the gate is closed and
    /// the VM is not stopping, saving its state when a snapshot asks.
    fn park_while_paused(
        &self,
        stop: &AtomicBool,
        index: usize,
        save: &mut dyn FnMut() -> Result<VcpuState, String>,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !stop.load(Ordering::SeqCst) {
            let asked = state
                .saves
                .as_ref()
                .is_some_and(|s| s.get(index).is_some_and(Option::is_none));
            if asked {
                let saved = save();
                if let Some(slot) = state.saves.as_mut().and_then(|s| s.get_mut(index)) {
                    *slot = Some(saved);
                }
                self.changed.notify_all();
                continue;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
    }
}

/// vCPU exits by kind, for the metrics.
#[derive(Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT, interrupt-window and signal exits.
    pub other: AtomicU64,
    /// Exits that ended the VM (triple fault, KVM errors, ...).
    pub failures: AtomicU64,
}

impl ExitCounters {
    /// The counters by Firecracker's metric names.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("exit_io_in", get(&self.io_in)),
            ("exit_io_out", get(&self.io_out)),
            ("exit_mmio_read", get(&self.mmio_read)),
            ("exit_mmio_write", get(&self.mmio_write)),
            ("exit_other", get(&self.other)),
            ("failures", get(&self.failures)),
        ]
    }
}

/// State shared by all vCPU threads.
#[derive(Clone)]
pub struct Shared {
    /// Port-I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where a vCPU reports that the VM must stop.
    pub exit: Arc<ExitSignal>,
    /// Set when the VM is stopping; vCPUs leave their loop.
    pub stop: Arc<AtomicBool>,
    /// When vCPU 0 first entered KVM_RUN (for `--boot-timer`).
    pub first_run: FirstRun,
    /// Whether the guest has halted for good.
    pub halt_probe: Arc<HaltProbe>,
    /// Pauses the vCPUs.
    pub pause: Arc<PauseGate>,
    /// Exits by kind.
    pub exits: Arc<ExitCounters>,
    /// The vCPU seccomp filter, installed by each thread before it runs.
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
    /// `--trace-exits`.
    pub trace: Option<Arc<ExitTrace>>,
    /// The MSRs a snapshot saves (KVM's list).
    pub msr_indices: Arc<Vec<u32>>,
    /// The guest's reset request (i8042 or ACPI reset register), which the
    /// event loop serves; a vCPU looks at it when the guest triple-faults.
    pub reset: Arc<EventFdTrigger>,
    /// The console's bytes batched by KVM, when it can.
    pub console_batch: Option<Arc<ConsoleBatch>>,
}

/// IA32_TSC_DEADLINE: restored after the TSC, or the deadline it holds
/// would be measured against the wrong clock.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs a snapshot saves: every one KVM lists, the TSC deadline last.
pub fn snapshot_msrs(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::Internal(format!("KVM_GET_MSR_INDEX_LIST: {e}")))?;
    let mut msrs: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|m| *m != MSR_TSC_DEADLINE)
        .collect();
    msrs.push(MSR_TSC_DEADLINE);
    Ok(msrs)
}

/// Reads a parked vCPU's whole state for a snapshot. An I/O exit moat
/// handled last is completed first (a KVM_RUN that returns at once), so
/// the registers hold its result.
pub fn save_state(fd: &mut VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    fd.set_kvm_immediate_exit(1);
    let ran = fd.run().map(drop);
    fd.set_kvm_immediate_exit(0);
    match ran {
        Err(err) if err.errno() == libc::EINTR => {}
        Err(err) => return Err(format!("KVM_RUN to complete I/O: {err}")),
        Ok(_) => return Err("KVM_RUN to complete I/O ran the guest".into()),
    }
    // Each MSR alone: a list with one KVM cannot read would stop there.
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for index in msr_indices {
        let mut one = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: *index,
            ..Default::default()
        }])
        .map_err(|_| "MSR list".to_string())?;
        if fd.get_msrs(&mut one).map_err(e("KVM_GET_MSRS"))? == 1 {
            msrs.push(one.as_slice()[0]);
        }
    }
    Ok(VcpuState {
        regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        msrs,
        cpuid: fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec(),
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Creates vCPU `index` with the state a snapshot saved (see
/// [`save_state`]), in the order KVM needs: CPUID first, the LAPIC before
/// the MSRs (the TSC deadline), the pending events last.
pub fn restore(vm: &VmFd, index: u8, state: &VcpuState) -> Result<VcpuFd, Error> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(KvmOp::CreateVcpu.err())?;
    let restore_error = |what: &'static str| {
        move |e: kvm_ioctls::Error| Error::Internal(format!("restoring vCPU {index}: {what}: {e}"))
    };
    if let Some(khz) = state.tsc_khz {
        // Another host's TSC may run at another rate; KVM scales the guest's
        // where the processor can. Where it cannot, the guest's clock
        // still runs from the TSC, at the host's rate.
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("vCPU {index}: cannot set the guest's TSC to {khz} kHz: {e}");
            }
        }
    }
    let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid)
        .map_err(|_| Error::Internal("too many CPUID entries in the snapshot".into()))?;
    fd.set_cpuid2(&cpuid).map_err(KvmOp::SetCpuid.err())?;
    fd.set_mp_state(state.mp_state)
        .map_err(restore_error("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(KvmOp::Regs.err())?;
    fd.set_sregs(&state.sregs).map_err(KvmOp::Sregs.err())?;
    // SAFETY: the kvm_xsave came from KVM_GET_XSAVE, whose 4 KiB area is
    // the whole of what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(restore_error("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(restore_error("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(restore_error("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(KvmOp::Lapic.err())?;
    let msrs = Msrs::from_entries(&state.msrs)
        .map_err(|_| Error::Internal("too many MSRs in the snapshot".into()))?;
    let set = fd.set_msrs(&msrs).map_err(KvmOp::SetMsrs.err())?;
    if set != state.msrs.len() {
        return Err(Error::Internal(format!(
            "restoring vCPU {index}: KVM refused MSR {:#x}",
            state.msrs[set].index
        )));
    }
    fd.set_vcpu_events(&state.events)
        .map_err(restore_error("KVM_SET_VCPU_EVENTS"))?;
    Ok(fd)
}

/// The host processor's brand-string leaves, for the guest's model name.
fn host_brand_string() -> [[u32; 4]; 3] {
    std::array::from_fn(|i| {
        let leaf = cpu::LEAF_BRAND_STRING + i as u32;
        // SAFETY: CPUID exists on every x86-64 processor and only reads.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(leaf) };
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

/// Starts a thread that runs `fd` until the VM stops.
pub fn spawn(index: u8, fd: VcpuFd, shared: Shared) -> Result<VcpuThread, Error> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run(index, fd, &shared))
        .map_err(|e| Error::Io("start a vCPU thread", e))?;
    Ok(VcpuThread { handle })
}

/// Stops all vCPU threads: one kick each (which `immediate_exit` makes
/// impossible to miss) and they leave their loop. Returns whether all of
/// them ended within [`STOP_TIMEOUT`]; one still busy in a device then is
/// left to end with the process, and its caller must keep guest memory
/// mapped, since that thread may still touch it.
pub fn stop_all(threads: Vec<VcpuThread>, stop: &AtomicBool) -> bool {
    stop.store(true, Ordering::SeqCst);
    for thread in &threads {
        thread.kick();
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut all = true;
    for thread in threads {
        while !thread.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.handle.is_finished() {
            let _ = thread.handle.join();
        } else {
            all = false;
        }
    }
    all
}

/// How long [`stop_all`] waits for the vCPU threads to end.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(1);

fn run(index: u8, mut fd: VcpuFd, shared: &Shared) {
    if let Some(filter) = &shared.seccomp {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu, filter) {
            shared
                .exit
                .raise(VmExit::ThreadSetup(format!("vCPU {index}: {e}")));
            return;
        }
    }
    KVM_RUN.with(|run| run.set(fd.get_kvm_run()));
    if index == 0 {
        let _ = shared.first_run.set(Instant::now());
    }
    let mut trace = shared.trace.clone().map(|t| VcpuTrace::new(t, index));
    while !shared.stop.load(Ordering::SeqCst) {
        shared
            .pause
            .park_while_paused(&shared.stop, usize::from(index), &mut || {
                save_state(&mut fd, &shared.msr_indices)
            });
        let outcome = match fd.run() {
            Ok(exit) => match trace.as_mut() {
                None => handle_exit(index, exit, shared),
                Some(trace) => {
                    let started = Instant::now();
                    let what = describe(&exit);
                    let outcome = handle_exit(index, exit, shared);
                    let handling = started.elapsed();
                    let owner = what.addr.and_then(|addr| match what.kind {
                        ExitKind::IoIn | ExitKind::IoOut => shared.pio.owner(addr),
                        _ => shared.mmio.owner(addr),
                    });
                    trace.record(what, owner, handling);
                    outcome
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                // A kick (pause, snapshot, stop): the console's last bytes
                // go to the UART before its state is saved or moat ends.
                if let Some(batch) = &shared.console_batch {
                    batch.drain(&shared.pio);
                }
                shared.halt_probe.answer(usize::from(index), &fd);
                if let Some(trace) = trace.as_mut() {
                    let kick = Exit {
                        kind: ExitKind::Interrupted,
                        addr: None,
                        len: 0,
                    };
                    trace.record(kick, None, Duration::ZERO);
                }
                None
            }
            Err(e) => Some(VmExit::KvmError {
                cpu: index,
                error: e.to_string(),
            }),
        };
        if let Some(exit) = outcome {
            shared.exits.failures.fetch_add(1, Ordering::Relaxed);
            shared.exit.raise(with_guest_state(exit, &mut fd));
            break;
        }
    }
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
}

/// Adds what KVM and the registers say to an internal error: its code and
/// the guest's instruction pointer, so the message names where it failed.
fn with_guest_state(exit: VmExit, fd: &mut VcpuFd) -> VmExit {
    match exit {
        VmExit::InternalError { cpu, .. } => {
            // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit, `internal` is
            // the member of kvm_run's exit union that KVM filled.
            let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            VmExit::InternalError {
                cpu,
                suberror,
                rip: fd.get_regs().ok().map(|regs| regs.rip),
            }
        }
        other => other,
    }
}

/// What `--trace-exits` records of an exit, taken before it is handled.
fn describe(exit: &VcpuExit) -> Exit {
    let (kind, addr, len) = match exit {
        VcpuExit::IoIn(port, data) => (ExitKind::IoIn, Some(u64::from(*port)), data.len()),
        VcpuExit::IoOut(port, data) => (ExitKind::IoOut, Some(u64::from(*port)), data.len()),
        VcpuExit::MmioRead(addr, data) => (ExitKind::MmioRead, Some(*addr), data.len()),
        VcpuExit::MmioWrite(addr, data) => (ExitKind::MmioWrite, Some(*addr), data.len()),
        VcpuExit::Hlt => (ExitKind::Hlt, None, 0),
        VcpuExit::IrqWindowOpen => (ExitKind::IrqWindowOpen, None, 0),
        VcpuExit::Intr => (ExitKind::Interrupted, None, 0),
        VcpuExit::Shutdown => (ExitKind::Shutdown, None, 0),
        VcpuExit::SystemEvent(..) => (ExitKind::SystemEvent, None, 0),
        _ => (ExitKind::Other, None, 0),
    };
    Exit { kind, addr, len }
}

/// Why the VM ends when vCPU `cpu` triple-faults. Linux reboots by asking
/// the i8042 (or the ACPI reset register) to reset the machine, waits
/// about a millisecond, then triple-faults on purpose. When the event loop
/// has not yet acted on the request by then (a busy host), the fault is
/// the reboot's last step, not a crash. The event loop records the reset
/// before it consumes the request (see [`crate::shutdown`]), so a request
/// this finds consumed has already been recorded, and first reason wins.
fn triple_fault(cpu: u8, reset: &EventFdTrigger) -> VmExit {
    if reset.drain() > 0 {
        VmExit::GuestReset
    } else {
        VmExit::TripleFault { cpu }
    }
}

/// Handles one exit; returns why the VM must stop, if it must.
fn handle_exit(cpu: u8, exit: VcpuExit, shared: &Shared) -> Option<VmExit> {
    let count = |c: &AtomicU64| c.fetch_add(1, Ordering::Relaxed);
    // The console bytes KVM took since the last exit reach the UART before
    // the guest's next access to anything.
    if let Some(batch) = &shared.console_batch {
        batch.drain(&shared.pio);
    }
    match exit {
        VcpuExit::IoIn(port, data) => {
            count(&shared.exits.io_in);
            shared.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            count(&shared.exits.io_out);
            shared.pio.write(u64::from(port), data);
            match &shared.console_batch {
                Some(batch) if batch.touches_ier(u64::from(port)) => batch
                    .follow_uart(&shared.pio)
                    .err()
                    .map(|e| VmExit::KvmError {
                        cpu,
                        error: format!("{}: {e}", KvmOp::CoalescedPio),
                    }),
                _ => None,
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            count(&shared.exits.mmio_read);
            shared.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            count(&shared.exits.mmio_write);
            shared.mmio.write(addr, data);
            None
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is
        // harmless and the next KVM_RUN waits for an interrupt.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
            count(&shared.exits.other);
            None
        }
        VcpuExit::Shutdown => Some(triple_fault(cpu, &shared.reset)),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::GuestPowerOff),
            KVM_SYSTEM_EVENT_RESET => Some(VmExit::GuestReset),
            KVM_SYSTEM_EVENT_CRASH => Some(VmExit::GuestCrash),
            other => Some(VmExit::Unexpected {
                cpu,
                exit: format!("SystemEvent({other})"),
            }),
        },
        VcpuExit::FailEntry(reason, _) => Some(VmExit::FailEntry { cpu, reason }),
        // Its code and the guest's rip are added by the caller, which has
        // the vCPU.
        VcpuExit::InternalError => Some(VmExit::InternalError {
            cpu,
            suberror: 0,
            rip: None,
        }),
        other => Some(VmExit::Unexpected {
            cpu,
            exit: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    #[test]
    fn a_triple_fault_after_a_reset_request_is_the_reset() {
        let reset = EventFdTrigger::new().unwrap();
        assert_eq!(triple_fault(1, &reset), VmExit::TripleFault { cpu: 1 });
        // The guest wrote the i8042's reset command; the event loop has
        // not served it yet.
        reset.trigger().unwrap();
        assert_eq!(triple_fault(1, &reset), VmExit::GuestReset);
        // Served now, by the vCPU: the event loop finds nothing to do.
        assert_eq!(reset.drain(), 0);
    }

    /// A thread that ends once `until` is set (the stop flag, or a flag
    /// `stop_all` knows nothing of: a thread stuck in a device).
    fn thread_until(until: Arc<AtomicBool>) -> VcpuThread {
        VcpuThread {
            handle: std::thread::spawn(move || {
                while !until.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }),
        }
    }

    #[test]
    fn stop_all_says_whether_every_vcpu_thread_ended() {
        install_kick_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![thread_until(stop.clone()), thread_until(stop.clone())];
        assert!(stop_all(threads, &stop));

        let stop = AtomicBool::new(false);
        let stuck = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        assert!(!stop_all(vec![thread_until(stuck.clone())], &stop));
        assert!(start.elapsed() >= STOP_TIMEOUT);
        stuck.store(true, Ordering::SeqCst);
    }
}
