//! vCPU threads. Each runs KVM_RUN in a loop and routes port-I/O and MMIO
//! exits to the buses; everything else about devices happens elsewhere
//! (interrupts go out through irqfds, device work on the event loop).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use moat_boot::cpu::{self, EntryPoint};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot_timer::FirstRun;
use crate::bus::Bus;
use crate::error::{Error, KvmOp};
use crate::exit::{ExitSignal, VmExit};

/// The signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: interrupting KVM_RUN with EINTR is the point.
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
) -> Result<VcpuFd, Error> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(KvmOp::CreateVcpu.err())?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmOp::GetSupportedCpuid.err())?;
    cpu::configure_cpuid(cpuid.as_mut_slice(), index, count);
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

/// Stops all vCPU threads: kicks each out of KVM_RUN until it notices the
/// stop flag. A thread that does not stop within a second is left to die
/// with the process.
pub fn stop_all(threads: Vec<VcpuThread>, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(1);
    for thread in threads {
        while !thread.handle.is_finished() && Instant::now() < deadline {
            let _ = thread.handle.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.handle.is_finished() {
            let _ = thread.handle.join();
        }
    }
}

fn run(index: u8, mut fd: VcpuFd, shared: &Shared) {
    if index == 0 {
        let _ = shared.first_run.set(Instant::now());
    }
    while !shared.stop.load(Ordering::SeqCst) {
        let outcome = match fd.run() {
            Ok(exit) => handle_exit(index, exit, shared),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::KvmError {
                cpu: index,
                error: e.to_string(),
            }),
        };
        if let Some(exit) = outcome {
            shared.exit.raise(exit);
            return;
        }
    }
}

/// Handles one exit; returns why the VM must stop, if it must.
fn handle_exit(cpu: u8, exit: VcpuExit, shared: &Shared) -> Option<VmExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            shared.pio.read(u64::from(port), data);
            None
        }
        VcpuExit::IoOut(port, data) => {
            shared.pio.write(u64::from(port), data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.mmio.read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.mmio.write(addr, data);
            None
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; an exit here is
        // harmless and the next KVM_RUN waits for an interrupt.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => Some(VmExit::TripleFault { cpu }),
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
        VcpuExit::InternalError => Some(VmExit::InternalError { cpu }),
        other => Some(VmExit::Unexpected {
            cpu,
            exit: format!("{other:?}"),
        }),
    }
}
