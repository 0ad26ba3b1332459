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

use moat_devices::virtio::net::{NetBackend, MAX_FRAME, NET_HDR_LEN};
use vm_memory::VolatileSlice;

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

/// virtio-blk's work for read requests on a [`RawRing`]: what moat's
/// device does per request with the ring and the disk, and nothing more.
pub struct RawBlk {
    pub ring: RawRing,
    pub disk: Box<dyn moat_devices::virtio::block::DiskBackend>,
    /// The disk's size in bytes.
    pub size: u64,
}

impl RawBlk {
    /// Serves one kick: takes each request, reads its header, checks its
    /// buffers, reads the disk into them (one preadv), writes its status
    /// and uses it; then EVENT_IDX's turn, and the interrupt if the driver
    /// asked for one.
    pub fn serve(&mut self, irq: &moat_devices::virtio::Interrupt) {
        let mut descs = [Desc::default(); MAX_DESCS];
        let mut served = false;
        loop {
            while let Some((head, n)) = self.ring.pop(&mut descs) {
                let used = self.request(&descs[..n]);
                self.ring.push_used(head, used);
                served = true;
            }
            if !self.ring.enable_notification() {
                break;
            }
        }
        if served && self.ring.needs_notification() {
            irq.signal_used_queue();
        }
    }

    /// One read request's chain (buffers checked by `pop`); returns the
    /// used length. Anything but a read that fits the disk gets IOERR.
    fn request(&mut self, chain: &[Desc]) -> u32 {
        let (header, status) = (chain[0], chain[chain.len() - 1]);
        let data = &chain[1..chain.len() - 1];
        let len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let fits = chain.len() >= 2
            && header.flags & WRITE == 0
            && header.len >= 16
            && status.flags & WRITE != 0
            && data.iter().all(|d| d.flags & WRITE != 0);
        let p = self.ring.host(header.addr, 16).unwrap();
        // SAFETY: `pop` checked the header's buffer lies in guest memory.
        let (kind, sector) = unsafe {
            (
                std::ptr::read_unaligned(p.cast::<u32>()),
                std::ptr::read_unaligned(p.add(8).cast::<u64>()),
            )
        };
        let at = sector
            .checked_mul(512)
            .filter(|at| at.checked_add(len).is_some_and(|end| end <= self.size));
        let mut ok = fits && kind == 0 && len.is_multiple_of(512) && at.is_some();
        if ok {
            let iov: smallvec::SmallVec<[libc::iovec; MAX_DESCS]> = data
                .iter()
                .map(|d| libc::iovec {
                    iov_base: self.ring.host(d.addr, u64::from(d.len)).unwrap().cast(),
                    iov_len: d.len as usize,
                })
                .collect();
            // SAFETY: the buffers lie in guest memory (checked by `pop`),
            // which outlives the call.
            let read = unsafe { self.disk.read_vectored_at(&iov, at.unwrap() as i64) };
            ok = read.is_ok_and(|n| n as u64 == len);
        }
        let at = self.ring.host(status.addr + u64::from(status.len) - 1, 1);
        // SAFETY: `pop` checked the status buffer lies in guest memory.
        unsafe { std::ptr::write_volatile(at.unwrap(), if ok { 0 } else { 1 }) };
        len as u32 + 1
    }
}

/// virtio-net's work for received frames on a [`RawRing`], with mergeable
/// buffers, as moat's device does it: the backend reads each frame into as
/// many buffers as recent frames needed and a bounce buffer behind them,
/// whence the rest of a larger frame is copied into further buffers.
pub struct RawRx {
    pub ring: RawRing,
    /// Buffers taken off the ring and not used yet: head, address, length.
    taken: std::collections::VecDeque<(u16, u64, usize)>,
    room: usize,
    recent: usize,
    bounce: Vec<u8>,
}

impl RawRx {
    pub fn new(ring: RawRing) -> RawRx {
        RawRx {
            ring,
            taken: Default::default(),
            room: 0,
            recent: 0,
            bounce: vec![0; MAX_FRAME],
        }
    }

    /// Takes one-descriptor buffers until `want` bytes are taken or the
    /// ring is empty; others go back used and empty.
    fn take(&mut self, want: usize) {
        let mut descs = [Desc::default(); MAX_DESCS];
        while self.room < want {
            let Some((head, n)) = self.ring.pop(&mut descs) else {
                return;
            };
            let d = descs[0];
            if n != 1 || d.flags & WRITE == 0 || (d.len as usize) < NET_HDR_LEN {
                self.ring.push_used(head, 0);
                continue;
            }
            self.taken.push_back((head, d.addr, d.len as usize));
            self.room += d.len as usize;
        }
    }

    /// Moves frames from `backend` to the guest until the backend is empty
    /// or the guest is out of buffers (the frame then lost: the benchmark
    /// posts enough), then the interrupt if the driver asked for one.
    pub fn serve(&mut self, backend: &mut dyn NetBackend, irq: &moat_devices::virtio::Interrupt) {
        loop {
            self.take(MAX_FRAME);
            let mut slices = smallvec::SmallVec::<[VolatileSlice<'_, ()>; 18]>::new();
            let mut room = 0;
            for &(_, addr, len) in &self.taken {
                if room >= self.recent.max(1) {
                    break;
                }
                let p = self.ring.host(addr, len as u64).unwrap();
                // SAFETY: `pop` checked the buffer lies in guest memory,
                // which outlives the call; the guest gave it to the device.
                slices.push(unsafe { VolatileSlice::new(p, len) });
                room += len;
            }
            if room < MAX_FRAME {
                slices.push(VolatileSlice::from(&mut self.bounce[..MAX_FRAME - room]));
            }
            let Ok(n) = backend.recv_into(&slices) else {
                break;
            };
            drop(slices);
            if n > room {
                self.take(n);
                if self.room < n {
                    break;
                }
                self.copy_bounced(room, n);
            }
            self.publish(n);
        }
        if self.ring.needs_notification() {
            irq.signal_used_queue();
        }
    }

    /// Copies bytes `from..len` of the frame, read into the bounce buffer,
    /// into the taken buffers that hold those bytes.
    fn copy_bounced(&mut self, from: usize, len: usize) {
        let mut offset = 0;
        for &(_, addr, size) in &self.taken {
            let end = (offset + size).min(len);
            if end > from {
                let start = offset.max(from);
                let src = &self.bounce[start - from..end - from];
                let at = self
                    .ring
                    .host(addr + (start - offset) as u64, src.len() as u64);
                // SAFETY: within a buffer `pop` checked.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), at.unwrap(), src.len());
                }
            }
            offset = end;
            if offset >= len {
                break;
            }
        }
    }

    /// Gives the guest the buffers that hold a frame of `len` bytes:
    /// num_buffers in its header, then their used elements.
    fn publish(&mut self, len: usize) {
        let (mut count, mut filled) = (0, 0);
        for &(_, _, size) in &self.taken {
            if filled >= len {
                break;
            }
            (count, filled) = (count + 1, filled + size);
        }
        let first = self.taken[0].1;
        let at = self.ring.host(first + 10, 2).unwrap();
        // SAFETY: the first buffer is at least a header long (`take`).
        unsafe { std::ptr::write_unaligned(at.cast::<u16>(), count as u16) };
        let mut left = len;
        for (head, _, size) in self.taken.drain(..count) {
            let used = size.min(left);
            left -= used;
            self.room -= size;
            self.ring.push_used(head, used as u32);
        }
        self.recent = len.max(self.recent - self.recent / 16);
    }
}
