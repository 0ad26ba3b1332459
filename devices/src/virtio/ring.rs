//! A split virtqueue's rings, looked up once for a run of work (virtio 1.2,
//! 2.7).
//!
//! virtio-queue's [`Queue`] keeps each queue's configuration and position:
//! it checks that the rings lie in guest memory when the driver sets them
//! up, and snapshots save its position. Its accessors look the guest
//! memory region up anew for every field of the rings and descriptors
//! they touch, several times for every chain. A [`Ring`] looks the three
//! rings up once, when a device
//! starts a run of work on a queue, and then reads and writes them through
//! vm-memory's bounds-checked volatile slices; when the run ends it hands
//! the position back to the `Queue` and raises the interrupt if the driver
//! asked for one. The device-cost bench measured the difference (see
//! docs/benchmarks.md, "The ring work, measured against a raw ring").
//!
//! Every moat device serves its queues through `Ring`s. virtio-queue's own
//! accessors (`iter`, `add_used`, `needs_notification`) must not be mixed
//! in on the same queue: the interrupt decision (EVENT_IDX's used_event)
//! needs to know which used elements the driver has not been told of, and
//! each side keeps that to itself.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory, VolatileSlice};

use super::{DeviceError, GuestMemoryMmap, Interrupt};

/// Bytes of a descriptor table entry, and of the rings' parts (2.7.5-2.7.8).
const DESC_SIZE: usize = 16;
const RING_HEADER: usize = 4;
const AVAIL_ELEMENT: usize = 2;
const USED_ELEMENT: usize = 8;

/// What a driver can do wrong that no device can serve past.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// The rings do not lie in guest memory (checked when the driver set
    /// the queue up, so the memory changed under it).
    #[error("the queue's rings do not lie in guest memory")]
    Outside,
    /// The available index ran more than a queue's size ahead of the
    /// device (2.7.13.3: it can be at most that far ahead).
    #[error("the available index {avail} is more than {size} ahead of the device's {next}")]
    AvailIndex {
        /// The driver's available index.
        avail: u16,
        /// The next entry the device would take.
        next: u16,
        /// The queue's size.
        size: u16,
    },
}

impl From<RingError> for DeviceError {
    fn from(e: RingError) -> DeviceError {
        DeviceError(format!("the driver broke a queue: {e}"))
    }
}

/// Serves the queue `pick` chooses of `device` for one run of `work`, on a
/// [`Ring`] made for the run and finished after it (also when `work`
/// fails: what it used goes to the driver).
pub fn serve<D, T>(
    device: &mut D,
    pick: impl Fn(&mut D) -> Option<&mut Queue>,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    work: impl FnOnce(&mut D, &mut Ring<'_>) -> Result<T, DeviceError>,
) -> Result<T, DeviceError> {
    let queue = pick(device).ok_or_else(|| DeviceError("the queue is not set up".into()))?;
    let mut ring = Ring::new(mem, queue)?;
    let done = work(device, &mut ring);
    if let Some(queue) = pick(device) {
        ring.finish(queue, interrupt)?;
    }
    done
}

/// One run of work on a split virtqueue: take chains off the available
/// ring, read their descriptors, put them in the used ring.
#[must_use = "a Ring's position goes back to its Queue in `finish`"]
pub struct Ring<'m> {
    desc: VolatileSlice<'m>,
    avail: VolatileSlice<'m>,
    used: VolatileSlice<'m>,
    size: u16,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    /// The driver's available index as last read: chains up to it can be
    /// taken without reading it again.
    avail_idx: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The used index when the run began: the driver has been told of (or
    /// asked not to be told of) everything before it.
    start_used: Wrapping<u16>,
}

impl<'m> Ring<'m> {
    /// The rings of `queue` (set up and checked by the transport) in `mem`.
    pub fn new(mem: &'m GuestMemoryMmap, queue: &Queue) -> Result<Ring<'m>, RingError> {
        // A power of two, never 0: virtio-queue refuses other sizes.
        let size = queue.size();
        let n = usize::from(size);
        let slice = |addr: u64, len: usize| {
            mem.get_slice(GuestAddress(addr), len)
                .map_err(|_| RingError::Outside)
        };
        // The rings' trailing event fields (2.7.6, 2.7.8) are there with
        // or without EVENT_IDX: a driver sets the queue up with them.
        let desc = slice(queue.desc_table(), DESC_SIZE * n)?;
        let avail = slice(queue.avail_ring(), RING_HEADER + AVAIL_ELEMENT * n + 2)?;
        let used = slice(queue.used_ring(), RING_HEADER + USED_ELEMENT * n + 2)?;
        let next_avail = Wrapping(queue.next_avail());
        let next_used = Wrapping(queue.next_used());
        Ok(Ring {
            desc,
            avail,
            used,
            size,
            event_idx: queue.event_idx_enabled(),
            next_avail,
            avail_idx: next_avail,
            next_used,
            start_used: next_used,
        })
    }

    /// The head of the next available chain, if the driver made one
    /// available.
    pub fn pop(&mut self) -> Result<Option<u16>, RingError> {
        if self.next_avail == self.avail_idx {
            // Acquire: the ring entries and descriptors the driver wrote
            // before it moved the index are visible (2.7.13).
            self.avail_idx = Wrapping(u16::from_le(self.load(
                &self.avail,
                2,
                Ordering::Acquire,
            )?));
            let ahead = self.avail_idx - self.next_avail;
            if ahead.0 > self.size {
                return Err(RingError::AvailIndex {
                    avail: self.avail_idx.0,
                    next: self.next_avail.0,
                    size: self.size,
                });
            }
            if ahead.0 == 0 {
                return Ok(None);
            }
        }
        let slot = usize::from(self.next_avail.0 % self.size);
        let at = RING_HEADER + AVAIL_ELEMENT * slot;
        let head = u16::from_le(self.load(&self.avail, at, Ordering::Relaxed)?);
        self.next_avail += 1;
        Ok(Some(head))
    }

    /// The next available chain, for a device that drains the ring with
    /// notifications off ([`Self::disable_notification`] first): when
    /// there is none, notifications come back on, and a chain the driver
    /// made available meanwhile is taken after all, with them off again
    /// (2.7.10). `None`: the ring is empty and the driver will notify.
    pub fn pop_or_notify(&mut self) -> Result<Option<u16>, RingError> {
        loop {
            if let Some(head) = self.pop()? {
                return Ok(Some(head));
            }
            if !self.enable_notification()? {
                return Ok(None);
            }
            self.disable_notification()?;
        }
    }

    /// Puts the chain [`Self::pop`] just took back: the next pop takes it
    /// again (for a device that found it cannot serve it yet).
    pub fn give_back(&mut self) {
        self.next_avail -= 1;
    }

    /// The descriptors of the chain starting at `head`, in order (2.7.5).
    pub fn chain(&self, head: u16) -> Chain<'_, 'm> {
        Chain {
            table: &self.desc,
            size: self.size,
            next: head,
            ttl: self.size,
            bytes: 0,
            indirect: false,
        }
    }

    /// Puts the chain at `head` in the used ring, `len` bytes written into
    /// it, and moves the used index past it (2.7.8).
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        let slot = usize::from(self.next_used.0 % self.size);
        let at = RING_HEADER + USED_ELEMENT * slot;
        self.store(&self.used, at, u32::from(head).to_le(), Ordering::Relaxed)?;
        self.store(&self.used, at + 4, len.to_le(), Ordering::Relaxed)?;
        self.next_used += 1;
        // Release: the element, and what the device wrote into the
        // buffers, are visible before the index that hands them over.
        self.store(&self.used, 2, self.next_used.0.to_le(), Ordering::Release)
    }

    /// Asks the driver not to notify the device (without EVENT_IDX;
    /// with it, not moving avail_event does the same).
    pub fn disable_notification(&mut self) -> Result<(), RingError> {
        if self.event_idx {
            return Ok(());
        }
        let no_notify = (VRING_USED_F_NO_NOTIFY as u16).to_le();
        self.store(&self.used, 0, no_notify, Ordering::Relaxed)
    }

    /// Asks the driver to notify the device of the next chain it makes
    /// available (2.7.10); returns whether one came meanwhile, which the
    /// device must then take itself.
    pub fn enable_notification(&mut self) -> Result<bool, RingError> {
        if self.event_idx {
            let at = RING_HEADER + USED_ELEMENT * usize::from(self.size);
            let avail_event = self.next_avail.0.to_le();
            self.store(&self.used, at, avail_event, Ordering::Relaxed)?;
        } else {
            self.store(&self.used, 0, 0u16, Ordering::Relaxed)?;
        }
        // The driver writes the index and then reads avail_event (or the
        // flags); the device writes those and then reads the index. A full
        // fence on both sides keeps one of them from missing the other.
        fence(Ordering::SeqCst);
        // Not kept as `avail_idx`: the next pop reads the index again and
        // checks how far ahead it runs.
        let avail_idx = u16::from_le(self.load(&self.avail, 2, Ordering::Relaxed)?);
        Ok(avail_idx != self.next_avail.0)
    }

    /// Ends the run: gives `queue` the ring's position and interrupts the
    /// driver if it asked to hear of a chain used in this run (2.7.7,
    /// 2.7.10: with EVENT_IDX, used_event among them).
    pub fn finish(self, queue: &mut Queue, interrupt: &Interrupt) -> Result<(), RingError> {
        queue.set_next_avail(self.next_avail.0);
        queue.set_next_used(self.next_used.0);
        if self.next_used != self.start_used && self.needs_interrupt()? {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Whether the driver wants an interrupt for the chains used in this
    /// run.
    fn needs_interrupt(&self) -> Result<bool, RingError> {
        // Pairs with the driver's fence between moving used_event (or the
        // flags) and reading the used index.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = RING_HEADER + AVAIL_ELEMENT * usize::from(self.size);
            let used_event = Wrapping(u16::from_le(self.load(
                &self.avail,
                at,
                Ordering::Relaxed,
            )?));
            // used_event lies in [start_used, next_used): the driver asked
            // to hear once the used index passes it (vring_need_event).
            let (new, old) = (self.next_used, self.start_used);
            return Ok(new - used_event - Wrapping(1) < new - old);
        }
        let flags = u16::from_le(self.load(&self.avail, 0, Ordering::Relaxed)?);
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }

    fn load(&self, ring: &VolatileSlice<'m>, at: usize, order: Ordering) -> Result<u16, RingError> {
        ring.load(at, order).map_err(|_| RingError::Outside)
    }

    fn store<T: vm_memory::AtomicAccess>(
        &self,
        ring: &VolatileSlice<'m>,
        at: usize,
        value: T,
        order: Ordering,
    ) -> Result<(), RingError> {
        ring.store(value, at, order).map_err(|_| RingError::Outside)
    }
}

/// The descriptors of one chain, read from the descriptor table as the
/// iteration goes. It ends after the last descriptor, after `size` of them
/// (a loop), at an index outside the table, at 4 GiB of buffers (2.7.5.2),
/// or at an indirect descriptor, which no moat device offers (2.7.5.3):
/// [`Chain::uses_indirect`] then says so.
pub struct Chain<'r, 'm> {
    table: &'r VolatileSlice<'m>,
    size: u16,
    next: u16,
    ttl: u16,
    bytes: u32,
    indirect: bool,
}

impl Chain<'_, '_> {
    /// Whether the chain stopped at an indirect descriptor.
    pub fn uses_indirect(&self) -> bool {
        self.indirect
    }
}

impl Iterator for Chain<'_, '_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let at = DESC_SIZE * usize::from(self.next);
        let desc: Descriptor = self.table.get_ref(at).ok()?.load();
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            (self.indirect, self.ttl) = (true, 0);
            return None;
        }
        let Some(bytes) = self.bytes.checked_add(desc.len()) else {
            self.ttl = 0;
            return None;
        };
        self.bytes = bytes;
        self.ttl -= 1;
        if desc.has_next() {
            self.next = desc.next();
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests;
