//! Termination signals (SIGTERM, SIGINT, SIGHUP) stop the VM through the
//! event loop, so the terminal is restored and the exit status says why.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::error::Error;

/// The eventfd the handler writes to; -1 until installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The last termination signal received; 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// When it arrived, in CLOCK_MONOTONIC nanoseconds.
static RECEIVED_AT: AtomicU64 = AtomicU64::new(0);

/// CLOCK_MONOTONIC in nanoseconds (async-signal-safe).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED_AT.store(monotonic_ns(), Ordering::SeqCst);
    RECEIVED.store(signo, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local u64
        // and fd is an eventfd that lives as long as the process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Installs the handlers; returns the eventfd they signal.
pub fn install() -> Result<EventFd, Error> {
    let event =
        moat_devices::trigger::new_eventfd().map_err(|e| Error::Io("create an eventfd", e))?;
    // The handler's copy is never closed, so it outlives every signal.
    let handler_copy = event
        .try_clone()
        .map_err(|e| Error::Io("create an eventfd", e))?;
    WAKE_FD.store(
        std::os::fd::IntoRawFd::into_raw_fd(handler_copy),
        Ordering::SeqCst,
    );
    for signo in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        register_signal_handler(signo, on_signal)
            .map_err(|e| Error::Io("install a signal handler", e.into()))?;
    }
    Ok(event)
}

/// The termination signal received, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signo => Some(signo),
    }
}

/// How long ago the last termination signal arrived, if one did.
pub fn since_received() -> Option<Duration> {
    match RECEIVED_AT.load(Ordering::SeqCst) {
        0 => None,
        at => Some(Duration::from_nanos(monotonic_ns().saturating_sub(at))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_timed_from_its_arrival() {
        install().unwrap();
        // SAFETY: raise(3) sends SIGHUP to this thread, whose handler is ours.
        unsafe { libc::raise(libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(received(), Some(libc::SIGHUP));
        let waited = since_received().unwrap();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
    }
}
