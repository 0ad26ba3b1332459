//! Virtio devices (virtio 1.2) and their virtio-mmio transport.
//!
//! A [`VirtioDevice`] is the device-specific part: features, config space,
//! and what to do with its queues. [`mmio::MmioTransport`] is the register
//! interface the guest's `virtio_mmio` driver talks to; it negotiates
//! features, tracks the device status, sets up the queues and hands them to
//! the device when the driver is ready.

pub mod block;
mod interrupt;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod ring;
pub mod rng;
#[cfg(any(test, feature = "test-driver"))]
pub mod test_driver;
pub mod vsock;

use std::fmt;
use std::os::fd::RawFd;

pub use interrupt::{Interrupt, RegisterPage, INT_CONFIG, INT_VRING};
use virtio_queue::{Queue, QueueT};

/// Guest memory as devices see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// VIRTIO_F_VERSION_1 (virtio 1.2, 6): the device follows the 1.x spec.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_F_EVENT_IDX (virtio 1.2, 2.7.7, 2.7.10): driver and device tell
/// each other how far to go before the next interrupt or notification,
/// instead of raising one for every buffer. The transport turns it on in
/// the queues; a device that offers it processes its queues with
/// notifications off and turns them back on before it waits.
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// A device failure the guest caused: the device stops, reports
/// NEEDS_RESET, and waits for the driver to reset it.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceError(pub String);

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Copies `config[offset..]` into `data`, with zeros past its end: how
/// every device answers config-space reads of any offset and width.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| config.get(usize::try_from(at).ok()?))
            .copied()
            .unwrap_or(0);
    }
}

/// The device-specific half of a virtio device.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio 1.2, 5).
    fn device_type(&self) -> u32;

    /// The largest size each queue may have; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers.
    fn features(&self) -> u64;

    /// Reads device config space at `offset`. Out-of-range bytes read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device config space. Most devices have nothing writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver finished initialisation: start using `queues` (one per
    /// entry of `queue_max_sizes`, set up by the driver) with the features
    /// it accepted.
    fn activate(&mut self, acked_features: u64, queues: Vec<Queue>) -> Result<(), DeviceError>;

    /// Forget the queues and any in-flight state (device reset). Work the
    /// host is doing for the device is waited for, not handed back: after
    /// a reset the device touches no guest memory.
    fn reset(&mut self);

    /// Finish the work the host is doing for the device (a disk's requests
    /// in flight) and hand it back to the driver, so that the device holds
    /// nothing the guest gave it: before a snapshot, or before the device's
    /// backend changes.
    fn quiesce(
        &mut self,
        _mem: &GuestMemoryMmap,
        _interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Whether the last [`VirtioDevice::process_queue`] of queue `index`
    /// stopped at its budget with work left: the transport then signals
    /// the queue again, so the event loop serves everything else first and
    /// comes back. A guest that keeps its ring full cannot hold the event
    /// loop (or delay a termination signal).
    fn wants_more(&self, _index: usize) -> bool {
        false
    }

    /// Where each of its queues resumes when a snapshot of the VM is
    /// restored: (next available index, next used index), one pair per
    /// queue, empty while the device is not active. Chains the device took
    /// off a ring and has not used yet do not count: after a restore the
    /// device takes them again.
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }

    /// The VM was restored from a snapshot and the device activated again
    /// with its queues where they were: tell the driver what did not
    /// survive (vsock: its connections).
    fn restored(
        &mut self,
        _mem: &GuestMemoryMmap,
        _interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The device's counters for the metrics, by name (cumulative).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The device as `Any`, for the VMM to reach a device type's own
    /// methods (a disk's backing file).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;

    /// A host descriptor whose readiness this device serves (a TAP), if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    /// Whether the device can use events on [`VirtioDevice::backend_fd`]
    /// now. A device with nowhere to put more input says no, so the event
    /// loop stops polling the descriptor instead of spinning on it.
    fn backend_wanted(&self) -> bool {
        false
    }

    /// The backend descriptor is ready.
    fn process_backend(
        &mut self,
        _mem: &GuestMemoryMmap,
        _interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The driver notified queue `index`: process what it made available
    /// and raise `interrupt` as needed. An error puts the device in
    /// NEEDS_RESET.
    fn process_queue(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError>;
}

/// A queue's (next available, next used) indexes, for
/// [`VirtioDevice::queue_positions`].
pub fn queue_position(queue: &Queue) -> (u16, u16) {
    (queue.next_avail(), queue.next_used())
}

/// The iovec for a slice of guest memory, for readv/writev/preadv/pwritev.
/// The pointer stays valid as long as the guest memory mapping does: for
/// as long as a device holds the `GuestMemoryMmap` the slice came from.
pub(crate) fn iovec(slice: &vm_memory::VolatileSlice<'_, ()>) -> libc::iovec {
    libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: slice.len(),
    }
}

/// Pieces of guest memory for one readv/writev: on the stack for up to 64,
/// so a frame or packet moves without an allocation (a TSO frame from
/// Linux is a header and up to 17 pages; a 64 KiB receive takes 17 to 43
/// of its mergeable buffers).
pub(crate) type Slices<'a> = smallvec::SmallVec<[vm_memory::VolatileSlice<'a, ()>; 64]>;

/// The iovecs of [`Slices`], on the stack alike.
type Iovecs = smallvec::SmallVec<[libc::iovec; 64]>;

/// The iovec count for readv/writev: more than IOV_MAX is an error here,
/// never a shorter list (which would send or fill part of a frame and call
/// it whole).
fn iov_count(iov: &[libc::iovec]) -> std::io::Result<libc::c_int> {
    if iov.len() > libc::UIO_MAXIOV as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} buffer pieces, more than the {} one system call takes",
                iov.len(),
                libc::UIO_MAXIOV
            ),
        ));
    }
    Ok(iov.len() as libc::c_int)
}

fn io_result(n: isize) -> std::io::Result<usize> {
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// readv(2) from `fd` straight into `bufs` (guest memory, or buffers the
/// caller owns); read(2) for one buffer, which costs the kernel less
/// (no iovec array to copy in and walk).
pub(crate) fn readv(
    fd: RawFd,
    bufs: &[vm_memory::VolatileSlice<'_, ()>],
) -> std::io::Result<usize> {
    if let [one] = bufs {
        let one = iovec(one);
        // SAFETY: as below, for the one buffer.
        return io_result(unsafe { libc::read(fd, one.iov_base, one.iov_len) });
    }
    let iov: Iovecs = bufs.iter().map(iovec).collect();
    let count = iov_count(&iov)?;
    // SAFETY: every iovec covers a VolatileSlice the caller holds, valid
    // for the length of the call; the kernel writes only inside them.
    io_result(unsafe { libc::readv(fd, iov.as_ptr(), count) })
}

/// writev(2) to `fd` straight from `bufs`; write(2) for one buffer (a
/// frame a guest sends in one piece), as in `readv`.
pub(crate) fn writev(
    fd: RawFd,
    bufs: &[vm_memory::VolatileSlice<'_, ()>],
) -> std::io::Result<usize> {
    if let [one] = bufs {
        let one = iovec(one);
        // SAFETY: as in `readv`; the kernel only reads the buffer.
        return io_result(unsafe { libc::write(fd, one.iov_base, one.iov_len) });
    }
    let iov: Iovecs = bufs.iter().map(iovec).collect();
    let count = iov_count(&iov)?;
    // SAFETY: as in `readv`; the kernel only reads the buffers.
    io_result(unsafe { libc::writev(fd, iov.as_ptr(), count) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors, which we then own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: both were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn one_piece_or_many_the_bytes_arrive_whole_and_in_order() {
        let (read_end, write_end) = pipe();
        let mut out: Vec<u8> = (0..100).collect();
        let mut back = vec![0u8; 100];
        for pieces in [1, 3] {
            let sent: Vec<vm_memory::VolatileSlice<'_, ()>> = out
                .chunks_mut(100usize.div_ceil(pieces))
                .map(vm_memory::VolatileSlice::from)
                .collect();
            assert_eq!(sent.len(), pieces);
            assert_eq!(writev(write_end.as_raw_fd(), &sent).unwrap(), 100);
            back.fill(0);
            let got: Vec<vm_memory::VolatileSlice<'_, ()>> = back
                .chunks_mut(100usize.div_ceil(pieces))
                .map(vm_memory::VolatileSlice::from)
                .collect();
            assert_eq!(readv(read_end.as_raw_fd(), &got).unwrap(), 100);
            assert_eq!(back, (0..100).collect::<Vec<u8>>(), "{pieces} pieces");
        }
        // Errors come back as such (EAGAIN: the pipe is empty).
        let one = [vm_memory::VolatileSlice::from(&mut back[..])];
        assert!(readv(read_end.as_raw_fd(), &one).is_err());
    }

    #[test]
    fn more_buffer_pieces_than_a_system_call_takes_is_an_error_not_a_shorter_write() {
        let mut bytes = vec![7u8; 1025];
        let (read_end, write_end) = pipe();
        let slices: Vec<vm_memory::VolatileSlice<'_, ()>> = bytes
            .chunks_mut(1)
            .map(vm_memory::VolatileSlice::from)
            .collect();
        assert!(writev(write_end.as_raw_fd(), &slices).is_err());
        assert_eq!(
            writev(write_end.as_raw_fd(), &slices[..1024]).unwrap(),
            1024
        );
        assert!(readv(read_end.as_raw_fd(), &slices).is_err());
        assert_eq!(readv(read_end.as_raw_fd(), &slices[..1024]).unwrap(), 1024);
    }
}
