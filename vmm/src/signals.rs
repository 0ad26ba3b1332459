//! Termination signals (SIGTERM, SIGINT, SIGHUP) stop the VM through the
//! event loop, so the terminal is restored and the exit status says why.

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::error::Error;

/// The eventfd the handler writes to; -1 until installed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The last termination signal received; 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
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
