//! What moat's fuzz targets share: guest memory with a hole in it, a guest
//! driver whose every move the fuzzer picks, and backends that fail the way
//! real ones do (a disk that answers EIO, ENOSPC or a short transfer, a TAP
//! that takes at most 1024 iovecs).
//!
//! A target builds a device, then plays [`Op`]s against it the way moat's
//! event loop would: a queue notification runs the device's queue handler,
//! and its backend handler runs only when its descriptor is readable and
//! the device wants it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use moat_devices::virtio::block::DiskBackend;
use moat_devices::virtio::mmio::MmioTransport;
use moat_devices::virtio::net::NetBackend;
use moat_devices::virtio::test_driver::{Desc, Driver};
use moat_devices::virtio::{GuestMemoryMmap, Interrupt, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: 1 MiB from 0 (the driver's rings are at 64 KiB steps from
/// 64 KiB), a 4 KiB hole (as the MMIO hole is to a real guest), then 64 KiB.
pub const LOW_END: u64 = 0x10_0000;
/// Where the second region starts.
pub const HIGH_START: u64 = LOW_END + 0x1000;
/// The second region's size.
pub const HIGH_SIZE: u64 = 0x1_0000;
/// Where the fuzzer's buffers go in the first region (above the rings).
const BUFFERS: u64 = 0x8_0000;

/// Guest memory of two regions with a hole between them.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), HIGH_SIZE as usize),
    ])
    .expect("guest memory")
}

/// A guest-physical address, mostly where it matters: buffers, the end of a
/// region, the hole, or anything at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// In the buffer area of the first region.
    Buffer(u16),
    /// Anywhere in the first region (rings included).
    Low(u32),
    /// Within 256 bytes of the first region's end.
    LowEnd(u8),
    /// In the hole.
    Hole(u16),
    /// In the second region or just past it.
    High(u32),
    /// Any address.
    Raw(u64),
}

impl Addr {
    /// The address.
    pub fn get(self) -> u64 {
        match self {
            Addr::Buffer(o) => BUFFERS + u64::from(o) * 8,
            Addr::Low(o) => u64::from(o) % LOW_END,
            Addr::LowEnd(o) => LOW_END - 1 - u64::from(o),
            Addr::Hole(o) => LOW_END + u64::from(o) % 0x1000,
            Addr::High(o) => HIGH_START + u64::from(o) % (HIGH_SIZE + 0x1000),
            Addr::Raw(a) => a,
        }
    }
}

/// A descriptor length: small, a block request's sizes, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    /// 0 to 255 bytes.
    Small(u8),
    /// A multiple of 512 bytes up to 32 KiB.
    Sectors(u8),
    /// Any length.
    Raw(u32),
}

impl Len {
    /// The length.
    pub fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Sectors(n) => u32::from(n % 65) * 512,
            Len::Raw(n) => n,
        }
    }
}

/// A descriptor as a hostile driver writes it: the flags keep NEXT, WRITE
/// and INDIRECT most of the time, `next` points anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct RawDesc {
    /// Buffer address.
    pub addr: Addr,
    /// Buffer length.
    pub len: Len,
    /// Flags (NEXT 1, WRITE 2, INDIRECT 4; other bits as they come).
    pub flags: u16,
    /// Next descriptor's index.
    pub next: u16,
}

/// An access width the bus allows.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Width {
    /// 1 byte.
    One,
    /// 2 bytes.
    Two,
    /// 4 bytes.
    Four,
    /// 8 bytes.
    Eight,
}

impl Width {
    fn bytes(self) -> usize {
        match self {
            Width::One => 1,
            Width::Two => 2,
            Width::Four => 4,
            Width::Eight => 8,
        }
    }
}

/// One move of the guest, or of the host's side.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A chain in the driver's descriptor table, made available.
    Chain {
        /// The queue (modulo the number of queues).
        queue: u8,
        /// Its descriptors, written from the driver's next free slot.
        descs: Vec<RawDesc>,
    },
    /// Bytes into guest memory (request headers, packets, indirect
    /// tables, or rings overwritten under the device).
    Poke {
        /// Where.
        at: Addr,
        /// What.
        bytes: Vec<u8>,
    },
    /// A block request header (type, sector) at `at`: what most chains
    /// start with, so the fuzzer need not find its layout.
    BlockHeader {
        /// Where.
        at: Addr,
        /// VIRTIO_BLK_T_*: 0 IN, 1 OUT, 4 FLUSH, 8 GET_ID, others.
        kind: u8,
        /// The first sector.
        sector: u64,
    },
    /// The avail index set to any value (jumps ahead, goes back).
    AvailIdx {
        /// The queue.
        queue: u8,
        /// The index.
        idx: u16,
    },
    /// The guest notifies a queue (any index, existing or not).
    Notify {
        /// The queue.
        queue: u8,
    },
    /// The host side: the event loop runs the backend if it is due.
    Backend,
    /// The guest reads a register.
    Read {
        /// The register window (0: registers, 1: the second window).
        window: bool,
        /// Offset in the window.
        offset: u16,
        /// Width.
        width: Width,
    },
    /// The guest writes a register.
    Write {
        /// The register window.
        window: bool,
        /// Offset in the window.
        offset: u16,
        /// Width.
        width: Width,
        /// The value (its low bytes).
        value: u64,
    },
    /// The driver collects what the device used.
    TakeUsed {
        /// The queue.
        queue: u8,
    },
}

/// The guest-physical addresses of the driver's rings for queue `index`
/// of `size` (the test driver's layout): descriptor table, avail, used.
fn ring_addresses(index: usize, size: u16) -> (u64, u64, u64) {
    let desc = 0x1_0000 + index as u64 * 0x1_0000;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
    (desc, avail, used)
}

/// A device behind its transport, with the guest's driver.
pub struct Bench {
    /// The transport (registers, queues, device).
    pub transport: MmioTransport,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The driver's view of the queues, if it set them up.
    pub driver: Option<Driver>,
    /// Queue sizes the driver chose.
    sizes: Vec<u16>,
}

impl Bench {
    /// `device` behind a transport over fresh guest memory, untouched.
    pub fn new(device: Box<dyn VirtioDevice>) -> Bench {
        let mem = guest_memory();
        let interrupt = Arc::new(Interrupt::new().expect("eventfd"));
        let transport = MmioTransport::new(device, mem.clone(), interrupt).expect("transport");
        Bench {
            transport,
            mem,
            driver: None,
            sizes: Vec::new(),
        }
    }

    /// Sets the device up as a driver would, accepting the features
    /// `wanted` picks out of what the device offers, with queue sizes from
    /// the fuzzer (mostly the largest; sometimes 1, 3 or any value the
    /// device allows).
    pub fn init(&mut self, u: &mut Unstructured<'_>, wanted: u64, queues: usize) {
        let mut sizes = Vec::new();
        for index in 0..queues {
            let max = self.queue_max(index);
            let size = match u.int_in_range(0u8..=7).unwrap_or(0) {
                1 => 1,
                2 => 3.min(max),
                3 => u.int_in_range(1..=max.max(1)).unwrap_or(1),
                _ => max,
            };
            sizes.push(size.max(1));
        }
        let offered = self.device_features();
        match Driver::init(&mut self.transport, &self.mem, offered & wanted, &sizes) {
            Ok(driver) => {
                self.driver = Some(driver);
                self.sizes = sizes;
            }
            Err(_) => self.driver = None,
        }
    }

    fn queue_max(&mut self, index: usize) -> u16 {
        self.write(0x030, 4, index as u64);
        self.read(0x034, 4) as u16
    }

    fn device_features(&mut self) -> u64 {
        self.write(0x014, 4, 0);
        let low = self.read(0x010, 4);
        self.write(0x014, 4, 1);
        let high = self.read(0x010, 4);
        low | high << 32
    }

    fn read(&mut self, offset: u64, width: usize) -> u64 {
        let mut data = [0u8; 8];
        self.transport.read_window(0, offset, &mut data[..width]);
        u64::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, width: usize, value: u64) {
        self.transport
            .write_window(0, offset, &value.to_le_bytes()[..width]);
    }

    /// Plays one move.
    pub fn play(&mut self, op: Op) {
        match op {
            Op::Chain { queue, descs } => {
                let Some(q) = self.queue(queue) else {
                    return;
                };
                // Longer than any queue: the driver's table wraps over itself.
                let descs: Vec<Desc> = descs
                    .iter()
                    .take(2 * usize::from(self.sizes[q]).max(1))
                    .map(|d| Desc {
                        addr: d.addr.get(),
                        len: d.len.get(),
                        flags: d.flags,
                        next: d.next,
                    })
                    .collect();
                if descs.is_empty() {
                    return;
                }
                if let Some(driver) = self.driver.as_mut() {
                    driver.queues[q].add_raw(&self.mem, &descs);
                }
            }
            Op::Poke { at, bytes } => {
                let _ = self.mem.write_slice(&bytes, GuestAddress(at.get()));
            }
            Op::BlockHeader { at, kind, sector } => {
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&u32::from(kind).to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                let _ = self.mem.write_slice(&header, GuestAddress(at.get()));
            }
            Op::AvailIdx { queue, idx } => {
                if let Some(q) = self.queue(queue) {
                    let (_, avail, _) = ring_addresses(q, self.sizes[q]);
                    let _ = self.mem.write_obj(idx, GuestAddress(avail + 2));
                }
            }
            Op::Notify { queue } => {
                // Any index: a notification for a queue that does not
                // exist must be ignored.
                self.transport.process_queue(usize::from(queue % 8));
            }
            Op::Backend => self.run_backend(),
            Op::Read {
                window,
                offset,
                width,
            } => {
                let mut data = [0u8; 8];
                self.transport.read_window(
                    u8::from(window),
                    u64::from(offset),
                    &mut data[..width.bytes()],
                );
            }
            Op::Write {
                window,
                offset,
                width,
                value,
            } => {
                self.transport.write_window(
                    u8::from(window),
                    u64::from(offset),
                    &value.to_le_bytes()[..width.bytes()],
                );
            }
            Op::TakeUsed { queue } => {
                if let (Some(q), Some(driver)) = (self.queue(queue), self.driver.as_mut()) {
                    let _ = driver.queues[q].take_used(&self.mem);
                }
            }
        }
    }

    /// The driver's queue `queue` stands for, if the driver set any up.
    fn queue(&self, queue: u8) -> Option<usize> {
        let count = self.driver.as_ref()?.queues.len();
        (count > 0).then(|| usize::from(queue) % count)
    }

    /// What the event loop does: the backend handler runs when the device
    /// wants its descriptor and the descriptor is readable.
    pub fn run_backend(&mut self) {
        let Some(fd) = self.transport.backend_fd() else {
            return;
        };
        if self.transport.backend_wanted() && readable(fd) {
            self.transport.process_backend();
        }
    }

    /// Plays every move the fuzzer has left, then lets the backend finish.
    pub fn play_all(&mut self, u: &mut Unstructured<'_>) {
        // An exhausted input still yields values: stop at its end.
        while !u.is_empty() {
            let Ok(op) = Op::arbitrary(u) else {
                break;
            };
            self.play(op);
        }
        for _ in 0..4 {
            self.run_backend();
        }
    }
}

/// Whether `fd` can be read without blocking.
pub fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the length given.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

/// How a backend call fails, picked by the fuzzer call by call.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// It works.
    None,
    /// EIO.
    Eio,
    /// ENOSPC.
    Enospc,
    /// EINTR (to be retried).
    Eintr,
    /// Half of what was asked (at least 1 byte).
    Short,
    /// EAGAIN.
    WouldBlock,
}

impl Fault {
    fn error(self) -> Option<io::Error> {
        match self {
            Fault::Eio => Some(io::Error::from_raw_os_error(libc::EIO)),
            Fault::Enospc => Some(io::Error::from_raw_os_error(libc::ENOSPC)),
            Fault::Eintr => Some(io::Error::from_raw_os_error(libc::EINTR)),
            Fault::WouldBlock => Some(io::ErrorKind::WouldBlock.into()),
            Fault::None | Fault::Short => None,
        }
    }
}

/// A disk in memory that fails as the fuzzer says, and checks that the
/// device never reaches past its end or writes to it when read-only.
pub struct FakeDisk {
    data: RefCell<Vec<u8>>,
    faults: RefCell<VecDeque<Fault>>,
    read_only: bool,
}

impl FakeDisk {
    /// A disk of `size` bytes whose calls fail as `faults` says, in turn
    /// (then work).
    pub fn new(size: usize, faults: Vec<Fault>, read_only: bool) -> FakeDisk {
        FakeDisk {
            data: RefCell::new((0..size).map(|i| (i / 512) as u8).collect()),
            faults: RefCell::new(faults.into()),
            read_only,
        }
    }

    fn next_fault(&self) -> Fault {
        self.faults.borrow_mut().pop_front().unwrap_or(Fault::None)
    }

    /// The range `iov` covers at `offset`, checked against the disk.
    fn range(&self, iov: &[libc::iovec], offset: i64) -> (usize, usize) {
        assert!(
            iov.len() <= 1024,
            "{} iovecs: preadv/pwritev allow 1024",
            iov.len()
        );
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let start = usize::try_from(offset).expect("a negative disk offset");
        let size = self.data.borrow().len();
        assert!(
            start.checked_add(len).is_some_and(|end| end <= size),
            "the device reached past the disk's end: {len} bytes at {start} of {size}"
        );
        (start, len)
    }
}

impl FakeDisk {
    /// The fault this call gets, or the byte range it moves (cut in half
    /// for a short transfer).
    fn begin(&self, iov: &[libc::iovec], offset: i64) -> io::Result<(usize, usize)> {
        let fault = self.next_fault();
        if let Some(e) = fault.error() {
            return Err(e);
        }
        let (start, len) = self.range(iov, offset);
        Ok((
            start,
            if fault == Fault::Short && len > 1 {
                len / 2
            } else {
                len
            },
        ))
    }
}

impl DiskBackend for FakeDisk {
    unsafe fn read_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize> {
        let (start, len) = self.begin(iov, offset)?;
        let data = self.data.borrow();
        let mut at = start;
        for v in iov {
            let n = v.iov_len.min(start + len - at);
            // SAFETY: the caller vouches that each iovec is writable for
            // its length; n is at most that.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), v.iov_base.cast(), n) };
            at += n;
        }
        Ok(len)
    }

    unsafe fn write_vectored_at(&self, iov: &[libc::iovec], offset: i64) -> io::Result<usize> {
        assert!(!self.read_only, "the device wrote to a read-only disk");
        let (start, len) = self.begin(iov, offset)?;
        let mut data = self.data.borrow_mut();
        let mut at = start;
        for v in iov {
            let n = v.iov_len.min(start + len - at);
            // SAFETY: the caller vouches that each iovec is readable for
            // its length; n is at most that.
            unsafe { std::ptr::copy_nonoverlapping(v.iov_base.cast(), data[at..].as_mut_ptr(), n) };
            at += n;
        }
        Ok(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        match self.next_fault().error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// UIO_MAXIOV: the most iovecs readv/writev take; a TAP refuses more.
const MAX_IOVECS: usize = 1024;
/// The largest frame a TAP takes or gives (with its 12-byte vnet header).
const MAX_FRAME: usize = 65_535 + 12;

/// A TAP in memory: frames for the guest from the fuzzer, frames from the
/// guest counted; at most 1024 iovecs a call, as readv/writev.
pub struct FakeTap {
    to_guest: VecDeque<Vec<u8>>,
    faults: VecDeque<Fault>,
    /// Readable while a frame waits.
    ready: EventFd,
}

impl FakeTap {
    /// A TAP that offers `frames` to the guest and fails as `faults` says.
    pub fn new(frames: Vec<Vec<u8>>, faults: Vec<Fault>) -> FakeTap {
        let ready = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        if !frames.is_empty() {
            ready.write(1).expect("eventfd write");
        }
        FakeTap {
            to_guest: frames.into(),
            faults: faults.into(),
            ready,
        }
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn recv_into(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        if bufs.len() > MAX_IOVECS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(e) = self.faults.pop_front().and_then(Fault::error) {
            return Err(e);
        }
        let Some(mut frame) = self.to_guest.pop_front() else {
            let _ = self.ready.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        frame.truncate(MAX_FRAME);
        // Like a TAP: what does not fit is cut off.
        let mut rest = &frame[..];
        for buf in bufs {
            let n = buf.len().min(rest.len());
            buf.copy_from(&rest[..n]);
            rest = &rest[n..];
        }
        if self.to_guest.is_empty() {
            let _ = self.ready.read();
        }
        Ok(frame.len() - rest.len())
    }

    fn send_from(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        if bufs.len() > MAX_IOVECS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(e) = self.faults.pop_front().and_then(Fault::error) {
            return Err(e);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len > MAX_FRAME {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(len)
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        match self.faults.pop_front().and_then(Fault::error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The feature bits a driver asks for, picked by the fuzzer (all of them
/// when the input has run out).
pub fn features(u: &mut Unstructured<'_>) -> u64 {
    u.arbitrary().unwrap_or(u64::MAX)
}
