//! Interrupt and event signalling through eventfds.
//!
//! An eventfd is the one currency both sides understand: the VMM registers it
//! with KVM as an irqfd (so raising an interrupt needs no vCPU exit) or with
//! its event loop (for events such as a reset request).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A new non-blocking eventfd that is not inherited across exec: every
/// eventfd moat makes comes from here.
pub fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// An eventfd that devices write to in order to signal something.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        new_eventfd().map(Self)
    }

    /// Another handle to the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The underlying eventfd, for registering it with KVM or an event loop.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    /// Consumes pending signals; returns how many were pending (0 if none).
    pub fn drain(&self) -> u64 {
        self.0.read().unwrap_or(0)
    }
}

impl AsRawFd for EventFdTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_superio::Trigger;

    /// Whether `fd` is closed on exec.
    pub(crate) fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn eventfds_and_their_clones_are_closed_on_exec() {
        let trigger = EventFdTrigger::new().unwrap();
        assert!(cloexec(trigger.as_raw_fd()));
        assert!(cloexec(trigger.try_clone().unwrap().as_raw_fd()));
        let interrupt = crate::virtio::Interrupt::new().unwrap();
        assert!(cloexec(interrupt.irq_fd().as_raw_fd()));
    }

    #[test]
    fn trigger_is_seen_through_a_clone() {
        let t = EventFdTrigger::new().unwrap();
        let other = t.try_clone().unwrap();
        assert_eq!(other.drain(), 0);
        t.trigger().unwrap();
        t.trigger().unwrap();
        assert_eq!(other.drain(), 2);
        assert_eq!(other.drain(), 0);
    }
}
