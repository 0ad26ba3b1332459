//! Why a VM stopped, and how the thread that notices tells the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// The reason a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset with `reboot=k`, or a
    /// KVM reset event). moat has no firmware to reboot into, so a reboot
    /// ends the VM like a power-off.
    GuestReset,
    /// The guest powered off (ACPI S5, or a KVM shutdown system event).
    GuestPowerOff,
    /// Every vCPU stopped with interrupts off (or never started): the
    /// guest can never resume. Linux ends `halt`, and `poweroff` without
    /// ACPI, this way.
    GuestHalted,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU index.
        cpu: u8,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// The vCPU index.
        cpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM reported an internal error (often: an instruction it cannot
    /// emulate).
    InternalError {
        /// The vCPU index.
        cpu: u8,
        /// KVM's KVM_INTERNAL_ERROR_* code.
        suberror: u32,
        /// Where the guest was, if its registers could be read.
        rip: Option<u64>,
    },
    /// The guest kernel reported a crash through a KVM system event.
    GuestCrash,
    /// A vCPU exit moat does not handle.
    Unexpected {
        /// The vCPU index.
        cpu: u8,
        /// The exit, as KVM named it.
        exit: String,
    },
    /// KVM_RUN failed.
    KvmError {
        /// The vCPU index.
        cpu: u8,
        /// The error.
        error: String,
    },
    /// moat received a termination signal.
    Signal(i32),
    /// A moat thread could not be set up (its seccomp filter).
    ThreadSetup(String),
}

impl VmExit {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestPowerOff | VmExit::GuestHalted => 0,
            VmExit::Signal(signo) => 128 + signo,
            _ => 1,
        }
    }

    /// A one-line description for the user, or `None` for a clean stop.
    pub fn message(&self) -> Option<String> {
        Some(match self {
            VmExit::GuestReset | VmExit::GuestPowerOff => return None,
            VmExit::GuestHalted => {
                "the guest halted (every vCPU stopped with interrupts off); ending the VM"
                    .to_string()
            }
            VmExit::TripleFault { cpu } => format!("vCPU {cpu} triple-faulted; the guest is dead"),
            VmExit::FailEntry { cpu, reason } => {
                format!(
                    "KVM could not enter vCPU {cpu} (hardware entry failure reason {reason:#x})"
                )
            }
            VmExit::InternalError { cpu, suberror, rip } => {
                let what = match suberror {
                    1 => "an instruction KVM cannot emulate",
                    2 => "an exception while emulating an instruction",
                    3 => "an event KVM could not deliver",
                    4 => "an exit KVM did not expect",
                    _ => "an unknown reason",
                };
                let at = rip.map_or(String::new(), |rip| format!(" at guest rip {rip:#x}"));
                format!("KVM internal error on vCPU {cpu}{at}: {what} (suberror {suberror})")
            }
            VmExit::GuestCrash => "the guest reported a crash".to_string(),
            VmExit::Unexpected { cpu, exit } => format!("vCPU {cpu}: unhandled KVM exit {exit}"),
            VmExit::KvmError { cpu, error } => format!("KVM_RUN failed on vCPU {cpu}: {error}"),
            VmExit::Signal(signo) => format!("stopped by signal {signo}"),
            VmExit::ThreadSetup(error) => error.clone(),
        })
    }
}

/// The first reason any thread gives for stopping, plus an eventfd that
/// wakes the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSignal {
    /// A signal with no reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: moat_devices::trigger::new_eventfd()?,
        })
    }

    /// Records `exit` unless a reason was already recorded, and wakes the
    /// event loop.
    pub fn raise(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        drop(reason);
        let _ = self.event.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.reason(), None);
        signal.raise(VmExit::TripleFault { cpu: 1 });
        signal.raise(VmExit::GuestReset);
        assert_eq!(signal.reason(), Some(VmExit::TripleFault { cpu: 1 }));
        assert_eq!(signal.event().read().unwrap(), 2);
    }

    #[test]
    fn clean_exits_are_zero_and_silent() {
        assert_eq!(VmExit::GuestReset.exit_code(), 0);
        assert_eq!(VmExit::GuestPowerOff.message(), None);
        assert_eq!(VmExit::TripleFault { cpu: 0 }.exit_code(), 1);
        assert_eq!(VmExit::Signal(15).exit_code(), 143);
        let internal = VmExit::InternalError {
            cpu: 2,
            suberror: 1,
            rip: Some(0x20_0010),
        };
        assert_eq!(
            internal.message().unwrap(),
            "KVM internal error on vCPU 2 at guest rip 0x200010: an instruction KVM cannot emulate (suberror 1)"
        );
    }
}
