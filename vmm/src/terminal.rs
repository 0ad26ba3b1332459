//! Raw mode for the user's terminal while a guest owns the console.
//!
//! In raw mode every key, Ctrl-C included, goes to the guest. The original
//! settings are restored when the guard drops, and also from the panic hook
//! and the signal path, so the user never gets a broken terminal back.

use std::sync::Mutex;

/// The settings to restore, kept where the panic hook can reach them.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Restores the terminal when dropped.
pub struct RawMode(());

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal; `None` otherwise.
    pub fn enter() -> std::io::Result<Option<RawMode>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        let mut original = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr writes a termios into the buffer we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, original.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded and initialised it.
        let original = unsafe { original.assume_init() };
        let mut raw = original;
        // SAFETY: cfmakeraw only modifies the struct we pass.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: raw is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(original);
        install_panic_hook();
        Ok(Some(RawMode(())))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the saved settings, if any. Safe to call more than once.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(original) = saved {
        // SAFETY: original is the termios read from this terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

/// Restores the saved settings from a signal handler: never waits for the
/// lock (whoever holds it is restoring them already).
pub fn restore_from_signal() {
    let Ok(mut saved) = SAVED.try_lock() else {
        return;
    };
    if let Some(original) = saved.take() {
        // SAFETY: tcsetattr is async-signal-safe; original is this
        // terminal's termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
