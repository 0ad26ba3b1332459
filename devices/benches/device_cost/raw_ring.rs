//! A split virtqueue (virtio 1.2, 2.7) served through raw pointers into
//! guest memory, for the benchmark only: the least the ring work of a
//! request can cost a device in user space, to set beside a device built
//! on virtio-queue and vm-memory, whose every access to the rings and
//! descriptors is a checked one through a region lookup.
//!
//! It does what a device must and no more: the available index with
//! acquire order, the ring entry, each descriptor (its index and buffer
//! checked against the queue and guest memory, indirect ones refused), the
//! used element, the used index with release order, and EVENT_IDX's
//! avail_event and used_event around a full fence.

use std::sync::atomic::{fence, AtomicU16, Ordering};

/// VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT.
const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// The most descriptors a chain may have here (moat's devices keep up to
/// 8 on the stack too).
pub const MAX_DESCS: usize = 8;

/// A descriptor as it lies in the table.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// The device's side of one split queue with EVENT_IDX negotiated.
pub struct RawRing {
    /// Host address of guest address 0, and how many bytes follow it.
    base: *mut u8,
    mem_len: u64,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    /// The used index when the driver was last considered for an
    /// interrupt.
    signalled: u16,
}

impl RawRing {
    /// The queue of `size` entries whose rings lie at guest addresses
    /// `desc`, `avail` and `used` (aligned as the spec asks), in guest
    /// memory mapped at `base` for `mem_len` bytes.
    ///
    /// # Safety
    ///
    /// `base` must stay mapped, readable and writable for `mem_len` bytes
    /// while the ring is used.
    pub unsafe fn new(
        base: *mut u8,
        mem_len: u64,
        size: u16,
        [desc, avail, used]: [u64; 3],
    ) -> RawRing {
        let size64 = u64::from(size);
        assert!(size.is_power_of_two());
        assert!(desc.is_multiple_of(16) && avail.is_multiple_of(2) && used.is_multiple_of(4));
        assert!(desc + 16 * size64 <= mem_len);
        assert!(avail + 6 + 2 * size64 <= mem_len);
        assert!(used + 6 + 8 * size64 <= mem_len);
        RawRing {
            base,
            mem_len,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            next_used: 0,
            signalled: 0,
        }
    }

    /// The host address of `len` bytes of guest memory at `addr`, if
    /// they all lie in it.
    pub fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let end = addr.checked_add(len)?;
        // SAFETY: addr is within the mapping (end <= mem_len).
        (end <= self.mem_len).then(|| unsafe { self.base.add(addr as usize) })
    }

    /// The 16-bit ring field at guest address `at`, as an atomic.
    fn field(&self, at: u64) -> &AtomicU16 {
        // SAFETY: `new` checked that every ring field lies in the mapping,
        // and ring fields are 2-aligned; the guest may write them at any
        // time, which atomics allow.
        unsafe { AtomicU16::from_ptr(self.base.add(at as usize).cast()) }
    }

    /// Takes the next available chain: its head and its descriptors, in
    /// `out`. None when the ring is empty, or the chain is one no device
    /// may use (an index or buffer out of bounds, an indirect table, a
    /// loop or more than MAX_DESCS descriptors), which a device would
    /// then report.
    pub fn pop(&mut self, out: &mut [Desc; MAX_DESCS]) -> Option<(u16, usize)> {
        if self.field(self.avail + 2).load(Ordering::Acquire) == self.next_avail {
            return None;
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = self
            .field(self.avail + 4 + 2 * slot)
            .load(Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut index = head;
        for (n, d) in out.iter_mut().enumerate() {
            if index >= self.size {
                return None;
            }
            let at = self.desc + 16 * u64::from(index);
            // SAFETY: `new` checked the table lies in the mapping and is
            // 16-aligned; index < size.
            *d = unsafe { std::ptr::read_volatile(self.base.add(at as usize).cast::<Desc>()) };
            if d.flags & INDIRECT != 0 || self.host(d.addr, u64::from(d.len)).is_none() {
                return None;
            }
            if d.flags & NEXT == 0 {
                return Some((head, n + 1));
            }
            index = d.next;
        }
        None
    }

    /// Puts `head` in the used ring with `len` bytes written, and
    /// publishes it.
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = u64::from(self.next_used % self.size);
        let at = self.used + 4 + 8 * slot;
        // SAFETY: `new` checked the used ring lies in the mapping and is
        // 4-aligned.
        unsafe {
            std::ptr::write_volatile(self.base.add(at as usize).cast::<u32>(), u32::from(head));
            std::ptr::write_volatile(self.base.add(at as usize + 4).cast::<u32>(), len);
        }
        self.next_used = self.next_used.wrapping_add(1);
        self.field(self.used + 2)
            .store(self.next_used, Ordering::Release);
    }

    /// Asks for a notification at the next available chain; returns
    /// whether one came meanwhile.
    pub fn enable_notification(&mut self) -> bool {
        let avail_event = self.used + 4 + 8 * u64::from(self.size);
        self.field(avail_event)
            .store(self.next_avail, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.field(self.avail + 2).load(Ordering::Relaxed) != self.next_avail
    }

    /// Whether the driver asked for an interrupt for the chains used since
    /// the last call (its used_event among them).
    pub fn needs_notification(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let used_event_at = self.avail + 4 + 2 * u64::from(self.size);
        let used_event = self.field(used_event_at).load(Ordering::Relaxed);
        let (new, old) = (self.next_used, self.signalled);
        self.signalled = new;
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}
