//! The boot timer: a one-byte I/O port that a guest writes a marker to at
//! the moment worth timing. moat's benchmark /init writes
//! [`BootTimer::MAGIC`] as the first thing it does, so the time of that
//! write is the time the guest reached userspace. Firecracker has the same
//! idea on an MMIO address; a port needs only ioperm(2) in the guest, not
//! /dev/mem.

use std::time::Instant;

use crate::bus::BusDevice;

/// Called once, with the time of the first marker write.
pub type BootTimerReport = Box<dyn FnOnce(Instant) + Send>;

/// The boot-timer port. Reads return nothing (the bus leaves the data as
/// is); only the first write of [`BootTimer::MAGIC`] counts, so a guest
/// that keeps writing it cannot flood moat's log.
pub struct BootTimer {
    report: Option<BootTimerReport>,
}

impl BootTimer {
    /// Port window size.
    pub const WINDOW: u64 = 1;
    /// The marker value (the one Firecracker's boot timer uses).
    pub const MAGIC: u8 = 123;

    /// A timer that calls `report` at the first marker write.
    pub fn new(report: BootTimerReport) -> Self {
        Self {
            report: Some(report),
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [Self::MAGIC] {
            let now = Instant::now();
            if let Some(report) = self.report.take() {
                report(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn only_the_first_magic_write_reports() {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let sink = reports.clone();
        let before = Instant::now();
        let mut timer = BootTimer::new(Box::new(move |at| sink.lock().unwrap().push(at)));
        timer.write(0, &[BootTimer::MAGIC - 1]);
        timer.write(0, &[BootTimer::MAGIC, 0]);
        timer.write(1, &[BootTimer::MAGIC]);
        assert!(reports.lock().unwrap().is_empty());
        timer.write(0, &[BootTimer::MAGIC]);
        timer.write(0, &[BootTimer::MAGIC]);
        let reports = reports.lock().unwrap();
        assert_eq!(reports.len(), 1);
        assert!(reports[0] >= before);
    }
}
