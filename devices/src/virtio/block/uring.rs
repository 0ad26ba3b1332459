//! The asynchronous block engine: requests go to the host through an
//! io_uring and complete when the host is done with them, in any order,
//! while the event loop serves everything else.
//!
//! The ring is locked down before it is used
//! (`IORING_REGISTER_RESTRICTIONS`): it can only read, write and fsync,
//! only the disk's own file (registered as fixed file 0, required on every
//! submission), and the only change it accepts afterwards is a new disk
//! file in that slot. seccomp sees `io_uring_enter`, not the operations a
//! ring carries, so the ring itself is where they are limited.
//!
//! A request in flight owns a slot: where its status byte goes, its head
//! for the used ring, and its iovecs, which must stay put until the kernel
//! is done with them. The slots are allocated once; serving a request
//! allocates nothing. When every slot is taken the device stops taking
//! requests off the ring and goes on once completions free some.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::request::{self, Counters, Direction, Iovecs};
use super::DiskBackend;
use crate::virtio::GuestMemoryMmap;

/// The disk's file is fixed file 0 of the ring.
const DISK: types::Fixed = types::Fixed(0);

/// `io_uring_register`'s opcode for replacing registered files (Linux's
/// uapi `io_uring.h`; the io-uring crate keeps its own copy private).
const IORING_REGISTER_FILES_UPDATE: u8 = 6;

/// What a request in flight does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Reads `len` bytes at `offset` into the guest.
    Read { offset: u64, len: u32 },
    /// Writes `len` bytes at `offset` from the guest.
    Write { offset: u64, len: u32 },
    /// fdatasync.
    Flush,
}

/// A request in flight.
struct Slot {
    head: u16,
    status: GuestAddress,
    op: Op,
    iov: Iovecs,
}

// SAFETY: the iovecs point into guest memory, which is mapped in the whole
// process and which `Uring::mem` keeps mapped while the slot is in use;
// nothing about them is tied to the thread that made them.
unsafe impl Send for Slot {}

/// A request the host finished: its head and used length, for the used
/// ring.
pub(super) struct Done {
    pub head: u16,
    pub used_len: u32,
}

/// An io_uring for one disk, with its requests in flight.
pub(super) struct Uring {
    ring: IoUring,
    /// Signalled by the ring when completions arrive.
    event: EventFd,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// Guest memory, kept mapped while the kernel may still write to it.
    mem: Option<GuestMemoryMmap>,
}

impl Uring {
    /// A ring for `file` with room for `slots` requests in flight.
    pub fn new(file: RawFd, slots: u16) -> io::Result<Self> {
        let entries = u32::from(slots).next_power_of_two().max(1);
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_cqsize(entries * 2)
            .build(entries)?;
        let event = crate::trigger::new_eventfd()?;
        let submitter = ring.submitter();
        submitter.register_files(&[file])?;
        submitter.register_eventfd(event.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_required(fixed),
            Restriction::sqe_flags_allowed(fixed | squeue::Flags::IO_DRAIN.bits()),
            Restriction::register_op(IORING_REGISTER_FILES_UPDATE),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            event,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            mem: None,
        })
    }

    /// The descriptor that becomes readable when requests complete.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Requests taken and not yet handed back by [`Uring::complete`].
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another request can be taken.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Queues `op` for the request at `head`, with its data in `iov`
    /// (guest memory in `mem`) and its status byte at `status`. Takes
    /// effect at the next [`Uring::submit`]. The caller checked
    /// [`Uring::has_room`].
    pub fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        status: GuestAddress,
        op: Op,
        iov: Iovecs,
    ) -> io::Result<()> {
        let index = self.free.pop().ok_or(io::ErrorKind::WouldBlock)?;
        if self.mem.is_none() {
            self.mem = Some(mem.clone());
        }
        let slot = self.slots[usize::from(index)].insert(Slot {
            head,
            status,
            op,
            iov,
        });
        let count = slot.iov.len() as u32;
        let entry = match op {
            Op::Read { offset, .. } => opcode::Readv::new(DISK, slot.iov.as_ptr(), count)
                .offset(offset)
                .build(),
            Op::Write { offset, .. } => opcode::Writev::new(DISK, slot.iov.as_ptr(), count)
                .offset(offset)
                .build(),
            // A flush waits for every request before it to finish (virtio
            // asks only for the completed ones; Linux waits for its writes
            // before it flushes anyway).
            Op::Flush => opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(u64::from(index));
        // SAFETY: the entry names the slot's iovecs, which stay where they
        // are (the slot is not touched until its completion is taken) and
        // cover guest memory that `self.mem` keeps mapped until then. The
        // submission queue has as many entries as there are slots, so it
        // has room for this one.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.slots[usize::from(index)] = None;
            self.free.push(index);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }

    /// Hands the queued requests to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => return done.map(drop),
            }
        }
    }

    /// Waits until every request in flight has completed (their results
    /// wait in the completion queue for [`Uring::complete`]).
    pub fn wait_all(&mut self) -> io::Result<()> {
        loop {
            let want = self.in_flight();
            if want == 0 || self.ring.completion().len() >= want {
                return Ok(());
            }
            match self.ring.submit_and_wait(want) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
    }

    /// Takes the next finished request, if any: finishes a short transfer
    /// with `file`, writes its status byte into guest memory and counts it
    /// in `counters`.
    pub fn complete(
        &mut self,
        file: &dyn DiskBackend,
        counters: &mut Counters,
        mem: &GuestMemoryMmap,
    ) -> Option<Done> {
        let (mut slot, result) = loop {
            let cqe = self.ring.completion().next()?;
            let index = cqe.user_data() as u16;
            // Every entry moat submits names a slot in use; anything else
            // is skipped, not taken for the end of the queue.
            if let Some(slot) = self
                .slots
                .get_mut(usize::from(index))
                .and_then(Option::take)
            {
                self.free.push(index);
                break (slot, cqe.result());
            }
        };
        let done = match slot.op {
            Op::Read { offset, len } | Op::Write { offset, len } if result >= 0 => {
                let direction = match slot.op {
                    Op::Read { .. } => Direction::FromDisk,
                    _ => Direction::ToDisk,
                };
                // A short transfer goes on synchronously from where the
                // kernel stopped.
                let mut rest = &mut slot.iov[..];
                request::advance(&mut rest, result as usize);
                request::transfer(file, rest, offset + result as u64, direction).is_ok()
                    && (result as u64) <= u64::from(len)
            }
            Op::Flush => result >= 0,
            _ => false,
        };
        let used_len = match (done, slot.op) {
            (true, Op::Read { len, .. }) => {
                counters.read_count += 1;
                counters.read_bytes += u64::from(len);
                len + 1
            }
            (true, Op::Write { len, .. }) => {
                counters.write_count += 1;
                counters.write_bytes += u64::from(len);
                1
            }
            (true, Op::Flush) => {
                counters.flush_count += 1;
                1
            }
            (false, _) => {
                counters.invalid_reqs_count += 1;
                1
            }
        };
        let status = if done {
            virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK
        } else {
            virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR
        };
        // The whole chain was checked to be in guest memory before the
        // request was queued, and guest memory does not change.
        let _ = mem.write_obj(status as u8, slot.status);
        Some(Done {
            head: slot.head,
            used_len,
        })
    }

    /// Clears the completion event (before taking completions, so one
    /// that arrives meanwhile signals it again).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Waits for every request in flight and forgets them without telling
    /// the guest (device reset: the driver gave up on them).
    pub fn discard_all(&mut self) {
        if let Err(e) = self.wait_all() {
            self.abandon(&e);
            return;
        }
        let mut completion = self.ring.completion();
        for cqe in &mut completion {
            let index = cqe.user_data() as u16;
            if let Some(slot) = self.slots.get_mut(usize::from(index)) {
                if slot.take().is_some() {
                    self.free.push(index);
                }
            }
        }
        drop(completion);
        self.clear_event();
    }

    /// Puts `file` in the disk's slot of the ring. Requests in flight
    /// finish with the file they started with.
    pub fn replace_file(&mut self, file: RawFd) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(0, &[file])
            .map(drop)
    }

    /// The ring failed while requests were in flight: the kernel may still
    /// write into guest memory, so the mapping stays until moat exits.
    fn abandon(&mut self, e: &io::Error) {
        log::error!(
            "virtio-blk: cannot wait for the io_uring's requests in flight ({e}); guest memory stays mapped until moat exits"
        );
        std::mem::forget(self.mem.take());
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.take().is_some() {
                self.free.push(index as u16);
            }
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if let Err(e) = self.wait_all() {
            self.abandon(&e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Submits `entry` on the engine's ring and returns its result.
    fn result_of(uring: &mut Uring, entry: squeue::Entry) -> i32 {
        // SAFETY: the entries below name no memory or a live buffer.
        unsafe { uring.ring.submission().push(&entry).unwrap() };
        uring.ring.submit_and_wait(1).unwrap();
        uring.ring.completion().next().unwrap().result()
    }

    #[test]
    fn the_ring_does_nothing_but_read_write_and_fsync_the_disk() {
        let path = std::env::temp_dir().join(format!("moat-uring-{}", std::process::id()));
        let disk = moat_tests::file_with(&path, &[7u8; 4096]);
        let other = std::fs::File::open("/proc/self/status").unwrap();
        let mut uring = Uring::new(disk.as_raw_fd(), 4).unwrap();
        let mut buf = [0u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let eacces = -libc::EACCES;
        // The disk, as the device uses it.
        let readv = opcode::Readv::new(DISK, iov.as_ptr(), 1).build();
        assert_eq!(result_of(&mut uring, readv), 512);
        assert_eq!(buf[0], 7);
        let fsync = opcode::Fsync::new(DISK).build();
        assert_eq!(result_of(&mut uring, fsync), 0);
        // Another descriptor of moat's, not through the fixed file.
        let readv = opcode::Readv::new(types::Fd(other.as_raw_fd()), iov.as_ptr(), 1).build();
        assert_eq!(result_of(&mut uring, readv), eacces);
        // Any other operation, even on the disk.
        let read = opcode::Read::new(DISK, buf.as_mut_ptr(), 512).build();
        assert_eq!(result_of(&mut uring, read), eacces);
        assert_eq!(result_of(&mut uring, opcode::Nop::new().build()), eacces);
        let unlink = opcode::UnlinkAt::new(types::Fd(libc::AT_FDCWD), c"/nonexistent".as_ptr());
        assert_eq!(result_of(&mut uring, unlink.build()), eacces);
        // And no registration but the disk's replacement.
        assert!(uring
            .ring
            .submitter()
            .register_files_update(0, &[other.as_raw_fd()])
            .is_ok());
        let err = uring.ring.submitter().unregister_files().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        assert!(uring.ring.submitter().unregister_eventfd().is_err());
        std::fs::remove_file(path).unwrap();
    }
}
