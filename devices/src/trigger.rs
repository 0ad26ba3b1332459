//! Interrupt and event signalling through eventfds.
//!
//! An eventfd is the one currency both sides understand: the VMM registers it
//! with KVM as an irqfd (so raising an interrupt needs no vCPU exit) or with
//! its event loop (for events such as a reset request).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An eventfd that devices write to in order to signal something.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
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
