//! A minimal virtio driver for tests and benchmarks: it brings a device up
//! through its virtio-mmio registers, as Linux's `virtio_mmio` does, and
//! fills split virtqueues in plain guest memory.
//!
//! It can also build chains no real driver would (loops, bad addresses,
//! wrong directions) to check how devices treat a hostile guest.

use vm_memory::{Bytes, GuestAddress};

use super::GuestMemoryMmap;
use crate::bus::BusDevice;

/// Descriptor flag: another descriptor follows.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;

/// Where the driver's queues start in guest memory.
const RINGS_START: u64 = 0x1_0000;
/// Space reserved per queue (descriptor table, avail and used rings).
const RING_STRIDE: u64 = 0x1_0000;

/// Reads a 32-bit register.
pub fn read32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register.
pub fn write32(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// A raw split-queue descriptor.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_*` flags.
    pub flags: u16,
    /// Next descriptor index, when `DESC_NEXT` is set.
    pub next: u16,
}

/// Writes a one-entry indirect descriptor table at `table` naming `len`
/// bytes at `addr` with `flags`, and returns the descriptor that refers to
/// it: what a driver may use only if the device offered
/// VIRTIO_F_INDIRECT_DESC, which no moat device does.
pub fn indirect(mem: &GuestMemoryMmap, table: u64, addr: u64, len: u32, flags: u16) -> Desc {
    mem.write_obj(addr, GuestAddress(table)).unwrap();
    mem.write_obj(len, GuestAddress(table + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(table + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(table + 14)).unwrap();
    Desc {
        addr: table,
        len: 16,
        flags: virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        next: 0,
    }
}

/// One split virtqueue, driver side.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_idx: u16,
}

impl DriverQueue {
    fn new(index: usize, size: u16) -> Self {
        let desc = RINGS_START + index as u64 * RING_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    /// Writes `descs` at consecutive table slots, with `next` indexes as
    /// given, and makes the first one available. Returns the head index.
    pub fn add_raw(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let slot = (head as usize + i) % self.size as usize;
            let at = self.desc + 16 * slot as u64;
            mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = ((head as usize + descs.len().max(1)) % self.size as usize) as u16;
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Makes a well-formed chain of `(addr, len, device_writable)` buffers
    /// available. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        // On the stack: a benchmark's driver should not time its own
        // allocations.
        let descs: smallvec::SmallVec<[Desc; 8]> = buffers
            .iter()
            .enumerate()
            .map(|(i, (addr, len, writable))| {
                let last = i + 1 == buffers.len();
                Desc {
                    addr: *addr,
                    len: *len,
                    flags: if last { 0 } else { DESC_NEXT }
                        | if *writable { DESC_WRITE } else { 0 },
                    next: ((head as usize + i + 1) % self.size as usize) as u16,
                }
            })
            .collect();
        self.add_raw(mem, &descs)
    }

    /// Used elements the device returned since the last call: (id, len).
    /// Like Linux after reaping, it then sets `used_event` to ask for an
    /// interrupt at the next used element (read only with EVENT_IDX).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        self.take_used_into(mem, &mut out);
        out
    }

    /// [`Self::take_used`] into `out` (cleared first), which a caller in a
    /// loop keeps, so reaping allocates nothing once `out` is big enough.
    pub fn take_used_into(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<(u32, u32)>) {
        out.clear();
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        while self.used_idx != idx {
            let slot = u64::from(self.used_idx % self.size);
            let id: u32 = mem
                .read_obj(GuestAddress(self.used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = mem
                .read_obj(GuestAddress(self.used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        self.set_used_event(mem, self.used_idx);
    }

    /// Sets `used_event` (EVENT_IDX): interrupt once the used index passes
    /// `index`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, index: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(index, GuestAddress(at)).unwrap();
    }

    /// `avail_event` (EVENT_IDX): the device wants a notification once the
    /// available index passes it.
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc
    }

    /// Guest addresses of the descriptor table, the available ring and the
    /// used ring, in that order.
    pub fn rings(&self) -> [u64; 3] {
        [self.desc, self.avail, self.used]
    }

    /// The queue's size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Queue `index` of `size` entries with zeroed rings, and the device's
    /// side of it, ready: for driving a device without its transport.
    pub fn standalone(
        mem: &GuestMemoryMmap,
        index: usize,
        size: u16,
        event_idx: bool,
    ) -> (DriverQueue, virtio_queue::Queue) {
        use virtio_queue::QueueT;
        let q = DriverQueue::new(index, size);
        mem.write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(q.desc))
            .unwrap();
        let mut device = virtio_queue::Queue::new(size).unwrap();
        device.set_size(size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(q.desc);
        device.set_desc_table_address(lo, hi);
        let (lo, hi) = split(q.avail);
        device.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(q.used);
        device.set_used_ring_address(lo, hi);
        device.set_event_idx(event_idx);
        device.set_ready(true);
        assert!(device.is_valid(mem));
        (q, device)
    }
}

/// A driver that has brought a device up.
#[derive(Debug)]
pub struct Driver {
    /// The device's queues.
    pub queues: Vec<DriverQueue>,
}

impl Driver {
    /// Runs the virtio initialisation sequence (virtio 1.2, 3.1.1) on the
    /// device behind `dev`: reset, ACKNOWLEDGE, DRIVER, write `features`,
    /// FEATURES_OK (checked), queue setup with `sizes`, DRIVER_OK.
    pub fn init(
        dev: &mut dyn BusDevice,
        mem: &GuestMemoryMmap,
        features: u64,
        sizes: &[u16],
    ) -> Result<Driver, String> {
        // Identify the device first, as Linux's probe does.
        if read32(dev, 0x000) != 0x7472_6976 || read32(dev, 0x004) != 2 {
            return Err("not a virtio-mmio version 2 device".into());
        }
        if read32(dev, 0x008) == 0 {
            return Err("placeholder device (DeviceID 0)".into());
        }
        write32(dev, 0x070, 0);
        write32(dev, 0x070, 1);
        write32(dev, 0x070, 3);
        write32(dev, 0x024, 0);
        write32(dev, 0x020, features as u32);
        write32(dev, 0x024, 1);
        write32(dev, 0x020, (features >> 32) as u32);
        write32(dev, 0x070, 0xb);
        if read32(dev, 0x070) & 0x8 == 0 {
            return Err("device refused FEATURES_OK".into());
        }
        let mut queues = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let q = DriverQueue::new(i, *size);
            // Rings must start zeroed: a re-initialised device sees fresh ones.
            let zeros = vec![0u8; RING_STRIDE as usize];
            mem.write_slice(&zeros, GuestAddress(q.desc))
                .map_err(|e| e.to_string())?;
            write32(dev, 0x030, i as u32);
            if read32(dev, 0x034) < u32::from(*size) {
                return Err(format!("queue {i} is smaller than {size}"));
            }
            write32(dev, 0x038, u32::from(*size));
            for (reg, addr) in [(0x080, q.desc), (0x090, q.avail), (0x0a0, q.used)] {
                write32(dev, reg, addr as u32);
                write32(dev, reg + 4, (addr >> 32) as u32);
            }
            write32(dev, 0x044, 1);
            queues.push(q);
        }
        write32(dev, 0x070, 0xf);
        if read32(dev, 0x070) & 0x40 != 0 {
            return Err("device needs reset after DRIVER_OK".into());
        }
        Ok(Driver { queues })
    }
}

/// A small deterministic generator (xorshift64) for randomized tests: the
/// same seed gives the same run, so a failure can be replayed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value but 0 works).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// One of `choices`.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// 1 to 4 descriptors a hostile driver might write: addresses inside
    /// `mem_size`, at its edge or far outside; lengths from 0 to 4 GiB;
    /// any flags; `next` anywhere in (or past) a queue of `queue_size`.
    pub fn hostile_descs(&mut self, mem_size: u64, queue_size: u16) -> Vec<Desc> {
        (0..1 + self.below(4))
            .map(|_| {
                let addrs = [
                    0x8_0000 + self.below(0x10_0000),
                    mem_size - 1 - self.below(64),
                    mem_size + self.below(1 << 20),
                    u64::MAX - self.below(64),
                ];
                Desc {
                    addr: self.pick(&addrs),
                    len: self.pick(&[0, 1, 11, 12, 100, 1500, 4096, 70_000, u32::MAX]),
                    flags: self.below(4) as u16,
                    next: self.below(u64::from(queue_size) + 2) as u16,
                }
            })
            .collect()
    }
}
