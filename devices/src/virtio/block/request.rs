//! Parsing and executing one virtio-blk request (virtio 1.2, 5.2.6).
//!
//! A request is a descriptor chain: device-readable bytes (a 16-byte header,
//! then data for writes), then device-writable bytes (data for reads, then
//! a status byte as the very last byte). With VIRTIO_F_VERSION_1 the driver
//! may split these bytes across descriptors any way it likes, so they are
//! treated as two byte streams. Data moves between the disk and guest
//! memory with one preadv/pwritev over the guest buffers, without a copy.
//!
//! What a hostile chain gets:
//! - wrong direction (a readable descriptor after a writable one), too many
//!   descriptors, a header that is short or outside guest memory, data
//!   outside guest memory, a length that is not whole sectors, sectors past
//!   the end of the disk, a write to a read-only disk: VIRTIO_BLK_S_IOERR,
//!   and the disk is not touched;
//! - no status byte (the chain does not end in a device-writable buffer),
//!   or a chain that never ends (a loop): no status can be reported, so the
//!   device goes to NEEDS_RESET.

use std::io;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::uring::{Op, Uring};
use super::{DiskBackend, SECTOR_SIZE, SEG_MAX};
use crate::virtio::{DeviceError, GuestMemoryMmap};

/// The request header: type, reserved, sector.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: Header is repr(C), made of integers only, with no padding (4 + 4 +
// 8 bytes), so any byte pattern is a valid value.
unsafe impl ByteValued for Header {}

/// The backing store and what the guest may do with it.
pub(super) struct Disk {
    pub file: Box<dyn DiskBackend>,
    pub sectors: u64,
    pub read_only: bool,
    pub serial: [u8; 20],
    pub counters: Counters,
}

/// What the disk has done, for the metrics (Firecracker's names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from the disk into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: u64,
    /// Read requests done.
    pub read_count: u64,
    /// Write requests done.
    pub write_count: u64,
    /// Flushes done.
    pub flush_count: u64,
    /// Requests answered IOERR or UNSUPP.
    pub invalid_reqs_count: u64,
}

/// Why a request failed, for the status byte.
struct IoError;

/// A request's descriptors, on the stack for the usual few (header, data,
/// status): serving a request allocates nothing.
pub(super) type Descriptors = SmallVec<[Descriptor; 8]>;
/// The iovecs of a request's data, on the stack for up to 8 pieces.
pub(super) type Iovecs = SmallVec<[libc::iovec; 8]>;

/// What became of a request.
pub(super) enum Handled {
    /// Done: the status byte is written; the used length.
    Done(u32),
    /// Handed to the asynchronous engine, which completes it later.
    Queued,
}

/// What running a request's body came to.
enum Executed {
    /// Done, with this many data bytes written to the guest.
    Done(u32),
    /// Not a request type moat knows.
    Unsupported,
    /// In the asynchronous engine.
    Queued,
}

impl Disk {
    /// Handles one request, the chain at `head` made of `descriptors`: at
    /// once, or, given `uring`, reads, writes and flushes are queued there
    /// and complete later. Done, it returns the number of bytes written
    /// into the chain (the used length). An error means the chain has no
    /// usable status byte and the device must be reset.
    pub fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        descriptors: &[Descriptor],
        uring: Option<&mut Uring>,
    ) -> Result<Handled, DeviceError> {
        let Some(last) = descriptors.last() else {
            return Err(DeviceError(
                "descriptor chain is empty or unreadable".into(),
            ));
        };
        if last.has_next() {
            return Err(DeviceError(
                "descriptor chain does not end (loop or too long)".into(),
            ));
        }
        if !last.is_write_only() || last.len() == 0 {
            return Err(DeviceError("request has no status byte".into()));
        }
        let status_addr = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or_else(|| DeviceError("status byte address overflows".into()))?;

        let first_writable = descriptors
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descriptors.len());
        // The readable bytes come first, then the writable ones.
        let (readable, writable) = descriptors.split_at(first_writable);
        let direction_ok = writable.iter().all(|d| d.is_write_only());
        let too_long = descriptors.len() > SEG_MAX as usize + 2;
        let in_memory = descriptors
            .iter()
            .all(|d| mem.check_range(d.addr(), d.len() as usize));

        let (status, written) = if !direction_ok || too_long || !in_memory {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let queue_to = uring.map(|uring| (uring, head, status_addr));
            match self.execute(mem, readable, writable, queue_to) {
                Ok(Executed::Done(written)) => (VIRTIO_BLK_S_OK, written),
                Ok(Executed::Queued) => return Ok(Handled::Queued),
                Ok(Executed::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
                Err(IoError) => (VIRTIO_BLK_S_IOERR, 0),
            }
        };
        if status != VIRTIO_BLK_S_OK {
            self.counters.invalid_reqs_count += 1;
        }
        mem.write_obj(status as u8, status_addr)
            .map_err(|_| DeviceError("status byte is outside guest memory".into()))?;
        Ok(Handled::Done(written + 1))
    }

    /// Runs the request whose device-readable descriptors are `readable`
    /// (all inside guest memory) and device-writable ones `writable` (the
    /// last byte of which is the status). With `queue_to` (the engine, the
    /// request's head and its status byte's address), reads, writes and
    /// flushes of any data go there instead of running now.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        readable: &[Descriptor],
        writable: &[Descriptor],
        queue_to: Option<(&mut Uring, u16, GuestAddress)>,
    ) -> Result<Executed, IoError> {
        let queue = |(uring, head, status): (&mut Uring, u16, GuestAddress), op, iov| {
            uring
                .push(mem, head, status, op, iov)
                .map_err(|_| IoError)?;
            Ok(Executed::Queued)
        };
        let header_len = std::mem::size_of::<Header>();
        let mut header = Header::default();
        let mut at = 0;
        pieces(readable, 0, header_len, |addr, n| {
            mem.read_slice(&mut header.as_mut_slice()[at..at + n], addr)
                .map_err(|_| IoError)?;
            at += n;
            Ok(())
        })?;
        // The last writable byte is the status, written by `handle`.
        let data_len = usize::try_from(stream_len(writable))
            .ok()
            .and_then(|n| n.checked_sub(1))
            .ok_or(IoError)?;

        match header.kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.range(header.sector, data_len)?;
                let mut iov = iovecs(mem, writable, 0, data_len)?;
                if let Some(to) = queue_to.filter(|_| data_len > 0) {
                    let len = data_len as u32;
                    return queue(to, Op::Read { offset, len }, iov);
                }
                transfer(&*self.file, &mut iov, offset, Direction::FromDisk)
                    .map_err(|_| IoError)?;
                self.counters.read_count += 1;
                self.counters.read_bytes += data_len as u64;
                Ok(Executed::Done(data_len as u32))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(IoError);
                }
                let len = usize::try_from(stream_len(readable) - header_len as u64)
                    .map_err(|_| IoError)?;
                let offset = self.range(header.sector, len)?;
                let mut iov = iovecs(mem, readable, header_len, len)?;
                if let Some(to) = queue_to.filter(|_| len > 0) {
                    return queue(
                        to,
                        Op::Write {
                            offset,
                            len: len as u32,
                        },
                        iov,
                    );
                }
                transfer(&*self.file, &mut iov, offset, Direction::ToDisk).map_err(|_| IoError)?;
                self.counters.write_count += 1;
                self.counters.write_bytes += len as u64;
                Ok(Executed::Done(0))
            }
            VIRTIO_BLK_T_FLUSH => {
                if let Some(to) = queue_to {
                    return queue(to, Op::Flush, Iovecs::new());
                }
                self.file.sync_data().map_err(|_| IoError)?;
                self.counters.flush_count += 1;
                Ok(Executed::Done(0))
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(self.serial.len());
                let mut at = 0;
                pieces(writable, 0, n, |addr, len| {
                    mem.write_slice(&self.serial[at..at + len], addr)
                        .map_err(|_| IoError)?;
                    at += len;
                    Ok(())
                })?;
                Ok(Executed::Done(n as u32))
            }
            _ => Ok(Executed::Unsupported),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors
    /// inside the disk.
    fn range(&self, sector: u64, len: usize) -> Result<u64, IoError> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(IoError);
        }
        let end_sector = sector.checked_add(len / SECTOR_SIZE).ok_or(IoError)?;
        if end_sector > self.sectors {
            return Err(IoError);
        }
        Ok(sector * SECTOR_SIZE)
    }
}

/// The number of bytes in the byte stream `descriptors` make up (at most
/// SEG_MAX + 2 lengths of u32, so it cannot overflow).
fn stream_len(descriptors: &[Descriptor]) -> u64 {
    descriptors.iter().map(|d| u64::from(d.len())).sum()
}

/// Calls `f` with the guest address and length of each piece of bytes
/// `[start, start + len)` of the byte stream `descriptors` make up, in
/// order. Fails if the stream is shorter.
fn pieces(
    descriptors: &[Descriptor],
    start: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let (mut skip, mut want) = (start, len);
    for d in descriptors {
        if want == 0 {
            break;
        }
        let d_len = d.len() as usize;
        if skip >= d_len {
            skip -= d_len;
            continue;
        }
        let n = (d_len - skip).min(want);
        f(d.addr().checked_add(skip as u64).ok_or(IoError)?, n)?;
        (skip, want) = (0, want - n);
    }
    if want == 0 {
        Ok(())
    } else {
        Err(IoError)
    }
}

/// The guest memory holding bytes `[start, start + len)` of the byte stream
/// that `descriptors` make up, as iovecs. Fails if any of it is outside
/// guest memory.
fn iovecs(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    start: usize,
    len: usize,
) -> Result<Iovecs, IoError> {
    let mut iov = Iovecs::new();
    pieces(descriptors, start, len, |addr, n| {
        let slice = mem.get_slice(addr, n).map_err(|_| IoError)?;
        iov.push(crate::virtio::iovec(&slice));
        Ok(())
    })?;
    Ok(iov)
}

/// Which way data moves.
#[derive(Clone, Copy)]
pub(super) enum Direction {
    FromDisk,
    ToDisk,
}

/// preadv/pwritev of all of `iov` at `offset`, resuming after short
/// transfers; running into the end of the file is an error.
pub(super) fn transfer(
    file: &dyn DiskBackend,
    mut iov: &mut [libc::iovec],
    mut offset: u64,
    direction: Direction,
) -> io::Result<()> {
    while !iov.is_empty() {
        let count = iov.len().min(libc::UIO_MAXIOV as usize);
        let pos = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: each iovec covers guest memory that get_slice checked is
        // inside a region of `mem`, which stays mapped while the device
        // holds it (the whole time a request runs). The backend reads or
        // writes only those bytes; the guest racing on them can change the
        // data, never reach outside them.
        let done = unsafe {
            match direction {
                Direction::FromDisk => file.read_vectored_at(&iov[..count], pos),
                Direction::ToDisk => file.write_vectored_at(&iov[..count], pos),
            }
        };
        let n = match done {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        offset += n as u64;
        advance(&mut iov, n);
    }
    Ok(())
}

/// Moves `iov` past its first `n` bytes: whole iovecs drop off the front,
/// and the first one left starts `n` bytes later.
pub(super) fn advance(iov: &mut &mut [libc::iovec], mut n: usize) {
    while let Some(first) = iov.first_mut() {
        if n < first.iov_len {
            // SAFETY: n < iov_len, so the new base is still inside the
            // same buffer.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
            return;
        }
        n -= first.iov_len;
        *iov = &mut std::mem::take(iov)[1..];
    }
}
