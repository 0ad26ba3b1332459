//! virtio-blk (virtio 1.2, 5.2) backed by a host file or block device.
//!
//! One request queue served on the event loop. Requests: IN, OUT, FLUSH
//! (fdatasync) and GET_ID. Every value in a request is the guest's and is
//! checked before use: see [`request`]. Two engines move the data: the
//! synchronous one does each read or write with a system call on the
//! event loop before it takes the next request; the asynchronous one
//! ([`IoEngine::Async`], see [`uring`]) hands them to an io_uring and
//! completes them as the host finishes them, many at a time.

mod request;
mod uring;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;

use super::ring::{self, Ring};
use super::{
    DeviceError, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (the SEG_MAX config field).
pub const SEG_MAX: u32 = 128;
/// Most requests served in one wakeup of the event loop (see
/// [`VirtioDevice::wants_more`]).
pub const REQUEST_BUDGET: u32 = 64;

/// How a disk's reads, writes and flushes reach the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// One system call per request, on the event loop, one request after
    /// another. Every operation passes the seccomp filter.
    #[default]
    Sync,
    /// An io_uring restricted to reads, writes and fsync of the disk's
    /// file: requests are in flight together and the event loop does not
    /// wait for them. For images the host has not cached, and guests that
    /// keep many requests in flight.
    Async,
}

/// What a disk's bytes are stored in: a host file, or a stand-in (tests,
/// fuzzing) that fails the way files do.
pub trait DiskBackend: Send {
    /// preadv(2): reads into the buffers `iov` names, from byte `offset`;
    /// returns how many bytes were read (0 at the end).
    ///
    /// # Safety
    /// Each iovec must name memory that is valid for writes for its whole
    /// length while the call runs.
    unsafe fn read_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize>;
    /// pwritev(2): writes the buffers `iov` names at byte `offset`; returns
    /// how many bytes were written.
    ///
    /// # Safety
    /// Each iovec must name memory that is valid for reads for its whole
    /// length while the call runs.
    unsafe fn write_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize>;
    /// fdatasync(2): what was written is on stable storage.
    fn sync_data(&self) -> io::Result<()>;
}

/// The return of a system call that gives a count or -1.
fn count_or_errno(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl DiskBackend for File {
    unsafe fn read_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the caller vouches for the buffers; the kernel checks the
        // rest.
        count_or_errno(unsafe { libc::preadv(self.as_raw_fd(), iov.as_ptr(), count, offset) })
    }

    unsafe fn write_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: as above.
        count_or_errno(unsafe { libc::pwritev(self.as_raw_fd(), iov.as_ptr(), count, offset) })
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: request::Disk,
    queue: Option<Queue>,
    /// The last wakeup stopped at [`REQUEST_BUDGET`].
    more: bool,
    /// The asynchronous engine, if the disk uses it.
    uring: Option<uring::Uring>,
    /// The asynchronous engine had no room for more requests: the queue
    /// is served again once some complete.
    blocked: bool,
}

impl Block {
    /// A device for `file` of `size` bytes (the last partial sector, if any,
    /// is not exposed). `id` is the serial the guest reads with GET_ID, at
    /// most 20 bytes (longer ids are cut).
    pub fn new(file: File, size: u64, read_only: bool, id: &str) -> Self {
        Self::with_backend(Box::new(file), size, read_only, id)
    }

    /// A device for `backend`, as [`Block::new`] for a file.
    pub fn with_backend(
        backend: Box<dyn DiskBackend>,
        size: u64,
        read_only: bool,
        id: &str,
    ) -> Self {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let len = id.len().min(serial.len());
        serial[..len].copy_from_slice(&id.as_bytes()[..len]);
        Self {
            disk: request::Disk {
                file: backend,
                sectors: size / SECTOR_SIZE,
                read_only,
                serial,
                counters: request::Counters::default(),
            },
            queue: None,
            more: false,
            uring: None,
            blocked: false,
        }
    }

    /// A device for `file` whose requests go through `engine`. Fails if
    /// the host has no io_uring for [`IoEngine::Async`] (an old kernel, or
    /// `kernel.io_uring_disabled`).
    pub fn with_engine(
        file: File,
        size: u64,
        read_only: bool,
        id: &str,
        engine: IoEngine,
    ) -> io::Result<Self> {
        let uring = match engine {
            IoEngine::Sync => None,
            IoEngine::Async => Some(uring::Uring::new(file.as_raw_fd(), QUEUE_SIZE)?),
        };
        let mut block = Self::new(file, size, read_only, id);
        block.uring = uring;
        Ok(block)
    }

    /// Puts `file` of `size` bytes behind the device in place of the old
    /// backing file. The caller quiesces the device first
    /// ([`VirtioDevice::quiesce`]), so that no request is in flight, and
    /// tells the guest the new capacity with a config-change interrupt.
    pub fn replace_backing(&mut self, file: File, size: u64) -> io::Result<()> {
        if let Some(uring) = &mut self.uring {
            uring.replace_file(file.as_raw_fd())?;
        }
        self.disk.file = Box::new(file);
        self.disk.sectors = size / SECTOR_SIZE;
        Ok(())
    }

    /// The disk's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors
    }

    /// Whether the guest may write.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The config space (virtio 1.2, 5.2.4): capacity, size_max (unused),
    /// seg_max, geometry (unused), blk_size.
    fn config(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queue.as_mut()
    }

    /// Serves the requests on `ring` (notifications off meanwhile; turning
    /// them back on reports requests that arrived meanwhile). At the
    /// budget it stops with notifications still off and sets `more`: the
    /// transport signals the queue again (`wants_more`) and the next
    /// wakeup goes on. With the asynchronous engine full it stops alike
    /// and sets `blocked`: its completions go on. Returns how many
    /// requests went to the engine.
    fn drain(&mut self, ring: &mut Ring<'_>, mem: &GuestMemoryMmap) -> Result<u32, DeviceError> {
        let (mut taken, mut queued) = (0u32, 0u32);
        self.more = false;
        self.blocked = false;
        ring.disable_notification()?;
        loop {
            if taken >= REQUEST_BUDGET {
                self.more = true;
                return Ok(queued);
            }
            if self.uring.as_ref().is_some_and(|u| !u.has_room()) {
                self.blocked = true;
                return Ok(queued);
            }
            let Some(head) = ring.pop_or_notify()? else {
                return Ok(queued);
            };
            let mut chain = ring.chain(head);
            let descriptors: request::Descriptors = chain.by_ref().collect();
            if chain.uses_indirect() {
                return Err(DeviceError(
                    "a request uses an indirect descriptor table, which moat never offered".into(),
                ));
            }
            taken += 1;
            match self
                .disk
                .handle(mem, head, &descriptors, self.uring.as_mut())?
            {
                request::Handled::Done(used_len) => ring.add_used(head, used_len)?,
                request::Handled::Queued => queued += 1,
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.disk.counters;
        vec![
            ("read_bytes", c.read_bytes),
            ("write_bytes", c.write_bytes),
            ("read_count", c.read_count),
            ("write_count", c.write_count),
            ("flush_count", c.flush_count),
            ("invalid_reqs_count", c.invalid_reqs_count),
        ]
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn activate(&mut self, _acked_features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
        self.queue = Some(
            queues
                .into_iter()
                .next()
                .ok_or_else(|| DeviceError("no request queue".into()))?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(uring) = &mut self.uring {
            uring.discard_all();
        }
        self.queue = None;
        self.more = false;
        self.blocked = false;
    }

    fn quiesce(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> Result<(), DeviceError> {
        while let Some(uring) = &mut self.uring {
            if uring.in_flight() == 0 {
                break;
            }
            uring
                .wait_all()
                .map_err(|e| DeviceError(format!("cannot wait for the io_uring: {e}")))?;
            self.process_backend(mem, interrupt)?;
        }
        Ok(())
    }

    fn restored(
        &mut self,
        _mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        // Requests the snapshot's device completed may have had their
        // interrupt still on its way to the guest when the VM was saved.
        // An extra one costs the driver a look at its used ring.
        if self.queue.is_some() {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.uring.as_ref().map(uring::Uring::event_fd)
    }

    fn backend_wanted(&self) -> bool {
        self.uring.as_ref().is_some_and(|u| u.in_flight() > 0)
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let Some(uring) = &mut self.uring else {
            return Ok(());
        };
        uring.clear_event();
        if self.queue.is_none() {
            return Ok(());
        }
        ring::serve(self, Block::queue, mem, interrupt, |blk, ring| {
            let Block {
                uring: Some(uring),
                disk,
                ..
            } = blk
            else {
                return Ok(());
            };
            while let Some(done) = uring.complete(&*disk.file, &mut disk.counters, mem) {
                ring.add_used(done.head, done.used_len)?;
            }
            Ok(())
        })?;
        if self.blocked && self.uring.as_ref().is_some_and(|u| u.has_room()) {
            self.process_queue(0, mem, interrupt)?;
        }
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queue.iter().map(super::queue_position).collect()
    }

    fn wants_more(&self, _index: usize) -> bool {
        self.more
    }

    fn process_queue(
        &mut self,
        _index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let queued = ring::serve(self, Block::queue, mem, interrupt, |blk, ring| {
            blk.drain(ring, mem)
        })?;
        if let Some(uring) = self.uring.as_mut().filter(|_| queued > 0) {
            uring
                .submit()
                .map_err(|e| DeviceError(format!("io_uring submission failed: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
