//! Buses route a vCPU's port-I/O and MMIO exits to the device that owns the
//! address. A bus is built before the vCPUs start and is read-only after,
//! so vCPU threads share it without locking; each device has its own lock.

use std::sync::{Arc, Mutex};

use moat_devices::BusDevice;

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Two devices claimed overlapping ranges (a moat bug, not a user error).
#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device or is empty")]
pub struct OverlapError {
    base: u64,
    len: u64,
}

struct Range {
    base: u64,
    len: u64,
    /// The device's name, for exit tracing.
    name: Arc<str>,
    device: SharedDevice,
}

/// An address space of non-overlapping device windows.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// Places `device`, called `name`, at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &str,
        device: SharedDevice,
    ) -> Result<(), OverlapError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(OverlapError { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(OverlapError { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            at,
            Range {
                base,
                len,
                name: Arc::from(name),
                device,
            },
        );
        Ok(())
    }

    /// The name of the device whose window holds `addr`, and the offset.
    pub fn owner(&self, addr: u64) -> Option<(Arc<str>, u64)> {
        let (range, offset) = self.find_range(addr)?;
        Some((range.name.clone(), offset))
    }

    /// The devices' names, each once, in address order.
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = Vec::new();
        for range in &self.ranges {
            if !names.contains(&range.name) {
                names.push(range.name.clone());
            }
        }
        names
    }

    /// The device whose window holds `addr`, and the offset into it.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (range, offset) = self.find_range(addr)?;
        Some((&range.device, offset))
    }

    fn find_range(&self, addr: u64) -> Option<(&Range, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    /// Reads from the device at `addr`. Unclaimed addresses read as all
    /// ones, like an undecoded PC bus; returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to unclaimed addresses are
    /// dropped. Returns whether a device took the write.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: device state is plain
/// data that stays consistent between register accesses.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_the_right_device_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Probe::default()));
        let b = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, "b", b.clone()).unwrap();
        bus.insert(0x60, 5, "a", a.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(b.lock().unwrap().writes.is_empty());
        assert_eq!(bus.owner(0x3fd), Some((Arc::from("b"), 5)));
        assert_eq!(bus.owner(0x400), None);
        assert_eq!(bus.names(), [Arc::from("a"), Arc::from("b")]);
    }

    #[test]
    fn unclaimed_addresses_read_all_ones() {
        let mut bus = Bus::default();
        bus.insert(0x60, 5, "probe", Arc::new(Mutex::new(Probe::default())))
            .unwrap();
        let mut data = [0u8; 4];
        for addr in [0, 0x5f, 0x65, 0xcfc, u64::MAX] {
            assert!(!bus.read(addr, &mut data));
            assert_eq!(data, [0xff; 4]);
            assert!(!bus.write(addr, &data));
        }
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = || Arc::new(Mutex::new(Probe::default()));
        bus.insert(0x100, 0x10, "dev", dev()).unwrap();
        assert!(bus.insert(0x10f, 1, "dev", dev()).is_err());
        assert!(bus.insert(0xf8, 9, "dev", dev()).is_err());
        assert!(bus.insert(0x200, 0, "dev", dev()).is_err());
        assert!(bus.insert(u64::MAX, 2, "dev", dev()).is_err());
        bus.insert(0x110, 1, "dev", dev()).unwrap();
    }
}
