//! How a VM ends: the event-loop subscribers that turn a guest's power-off
//! or reset, a vCPU's report, a guest that halted for good, or a
//! termination signal into an [`ExitSignal`].
//!
//! A termination signal (SIGTERM, SIGINT, SIGHUP) first asks the guest to
//! shut down: moat presses the ACPI power button and waits up to the
//! shutdown timeout for the guest to power off (or reset), which ends moat
//! with status 0. When the timeout passes, or a second signal arrives,
//! moat stops the VM at once and exits 128 + the signal number.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use moat_devices::trigger::EventFdTrigger;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::exit::{ExitSignal, VmExit};
use crate::signals;
use crate::vcpu::{HaltProbe, VcpuThread};

/// The longest a termination signal should wait for the event loop.
const SIGNAL_LATENCY_GOAL: Duration = Duration::from_millis(100);

/// How often moat asks the vCPUs whether the guest halted for good.
const HALT_PROBE_PERIOD: Duration = Duration::from_secs(1);

/// Watches the events that end a VM.
pub struct ExitWatcher {
    exit: Arc<ExitSignal>,
    reset: EventFdTrigger,
    power_off: EventFdTrigger,
    power_button: EventFdTrigger,
    termination: EventFd,
    shutdown_timeout: Duration,
    /// Armed when the power button was pressed for a termination signal.
    deadline: TimerFd,
    /// The termination signal that pressed the power button.
    pending_signal: Option<i32>,
    halt_timer: TimerFd,
    halt_probe: Arc<HaltProbe>,
    vcpus: Arc<Mutex<Vec<VcpuThread>>>,
}

/// What [`ExitWatcher`] needs.
pub struct ExitEvents {
    /// Where the VM's end is recorded.
    pub exit: Arc<ExitSignal>,
    /// The guest reset (i8042 or ACPI reset register).
    pub reset: EventFdTrigger,
    /// The guest powered off (ACPI S5).
    pub power_off: EventFdTrigger,
    /// Presses the ACPI power button.
    pub power_button: EventFdTrigger,
    /// A termination signal arrived.
    pub termination: EventFd,
    /// How long the guest gets to shut down after the power button.
    pub shutdown_timeout: Duration,
    /// The vCPUs' halt probe.
    pub halt_probe: Arc<HaltProbe>,
    /// The vCPU threads, to kick for the halt probe.
    pub vcpus: Arc<Mutex<Vec<VcpuThread>>>,
}

impl ExitWatcher {
    /// A watcher for `events`; its timers start disarmed (the halt probe
    /// is armed when the watcher joins the event loop).
    pub fn new(events: ExitEvents) -> std::io::Result<Self> {
        Ok(Self {
            exit: events.exit,
            reset: events.reset,
            power_off: events.power_off,
            power_button: events.power_button,
            termination: events.termination,
            shutdown_timeout: events.shutdown_timeout,
            deadline: TimerFd::new()?,
            pending_signal: None,
            halt_timer: TimerFd::new()?,
            halt_probe: events.halt_probe,
            vcpus: events.vcpus,
        })
    }

    /// A termination signal: the first presses the power button and arms
    /// the deadline; a second (or a zero timeout) stops the VM now.
    fn terminate(&mut self, signo: i32) {
        if self.pending_signal.is_some() || self.shutdown_timeout.is_zero() {
            self.exit.raise(VmExit::Signal(signo));
            return;
        }
        if self.power_button.trigger().is_err()
            || self.deadline.reset(self.shutdown_timeout, None).is_err()
        {
            self.exit.raise(VmExit::Signal(signo));
            return;
        }
        self.pending_signal = Some(signo);
        eprint!(
            "\r\nmoat: signal {signo}: pressed the power button; the guest has {} s to shut down \
             (signal again to stop it now)\r\n",
            self.shutdown_timeout.as_secs_f64()
        );
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.exit.event().as_raw_fd(),
            self.reset.as_raw_fd(),
            self.power_off.as_raw_fd(),
            self.termination.as_raw_fd(),
            self.deadline.as_raw_fd(),
            self.halt_timer.as_raw_fd(),
        ] {
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
        let _ = self
            .halt_timer
            .reset(HALT_PROBE_PERIOD, Some(HALT_PROBE_PERIOD));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.reset.as_raw_fd() {
            // Recorded before the request is consumed: a vCPU that finds
            // it consumed after a triple fault knows the reset is already
            // the VM's exit reason (vcpu::triple_fault).
            self.exit.raise(VmExit::GuestReset);
            self.reset.drain();
        } else if fd == self.power_off.as_raw_fd() {
            self.power_off.drain();
            self.exit.raise(VmExit::GuestPowerOff);
        } else if fd == self.termination.as_raw_fd() {
            let _ = self.termination.read();
            let signo = signals::received().unwrap_or(libc::SIGTERM);
            // What a busy guest costs a signal: the time from the handler
            // to here (the goal is SIGNAL_LATENCY_GOAL, whatever the guest does).
            if let Some(waited) = signals::since_received() {
                let micros = waited.as_micros();
                if waited > SIGNAL_LATENCY_GOAL {
                    log::warn!(
                        "signal {signo} reached the event loop {micros} µs after it arrived"
                    );
                } else {
                    log::info!(
                        "signal {signo} reached the event loop {micros} µs after it arrived"
                    );
                }
            }
            self.terminate(signo);
        } else if fd == self.deadline.as_raw_fd() {
            let _ = self.deadline.wait();
            let signo = self.pending_signal.unwrap_or(libc::SIGTERM);
            eprint!("\r\nmoat: the guest did not shut down in time; stopping it\r\n");
            self.exit.raise(VmExit::Signal(signo));
        } else if fd == self.halt_timer.as_raw_fd() {
            let _ = self.halt_timer.wait();
            let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
            if self.halt_probe.next_round(&vcpus) {
                self.exit.raise(VmExit::GuestHalted);
            }
        } else {
            let _ = self.exit.event().read();
        }
    }
}
