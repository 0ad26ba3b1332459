//! `--boot-timer`: how long the boot took, measured from inside moat. Three
//! moments: when moat started, when vCPU 0 first entered KVM_RUN, and when
//! the guest wrote the marker to the boot-timer port (moat's benchmark
//! /init does so first thing). The report is one line on stderr, with
//! moat's start as a CLOCK_MONOTONIC reading so that a harness that noted
//! the clock before exec(2) can add the time exec took.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use moat_devices::legacy::BootTimer;

/// When moat started, on two clocks read together.
pub struct ProcessStart {
    instant: Instant,
    monotonic: Duration,
}

/// moat's start: fixed by the first call, which `main` makes first thing.
pub fn process_start() -> &'static ProcessStart {
    static START: OnceLock<ProcessStart> = OnceLock::new();
    START.get_or_init(|| ProcessStart {
        instant: Instant::now(),
        monotonic: monotonic_now(),
    })
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only to `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Set by vCPU 0 just before its first KVM_RUN.
pub type FirstRun = Arc<OnceLock<Instant>>;

/// The report line for a marker written at `marker`.
pub fn report(start: &ProcessStart, first_run: Option<Instant>, marker: Instant) -> String {
    let ms = |at: Instant| at.saturating_duration_since(start.instant).as_secs_f64() * 1e3;
    let first_run = first_run.map_or_else(|| "-".to_string(), |at| format!("{:.3}", ms(at)));
    format!(
        "boot timer: guest marker at {:.3} ms, first KVM_RUN at {first_run} ms \
         (since moat started, at CLOCK_MONOTONIC {:.6} s)",
        ms(marker),
        start.monotonic.as_secs_f64()
    )
}

/// The boot-timer device, reporting on stderr.
pub fn device(first_run: FirstRun) -> BootTimer {
    BootTimer::new(Box::new(move |marker| {
        let line = report(process_start(), first_run.get().copied(), marker);
        let mut err = std::io::stderr().lock();
        // The console may have the terminal in raw mode: no newline mapping.
        let _ = if err.is_terminal() {
            write!(err, "\rmoat: {line}\r\n")
        } else {
            writeln!(err, "moat: {line}")
        };
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gives_both_moments_since_start() {
        let start = ProcessStart {
            instant: Instant::now(),
            monotonic: Duration::from_micros(5_000_250),
        };
        let first = start.instant + Duration::from_micros(1_500);
        let marker = start.instant + Duration::from_millis(2_000);
        assert_eq!(
            report(&start, Some(first), marker),
            "boot timer: guest marker at 2000.000 ms, first KVM_RUN at 1.500 ms \
             (since moat started, at CLOCK_MONOTONIC 5.000250 s)"
        );
        assert!(report(&start, None, marker).contains("first KVM_RUN at - ms"));
    }

    #[test]
    fn the_process_start_is_fixed_by_the_first_call() {
        let a = process_start().instant;
        assert_eq!(process_start().instant, a);
        assert!(process_start().monotonic <= monotonic_now());
    }
}
