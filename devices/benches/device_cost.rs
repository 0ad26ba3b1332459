//! Device cost without a guest: a synthetic driver fills a device's queue
//! in guest memory and kicks, and the same I/O is also done directly in the
//! same process, on the same guest memory, as the baseline: pread/pwrite for virtio-blk, write(2) to
//! the same TAP for virtio-net transmit, read(2) from it for virtio-net
//! receive (the TAP rows need CAP_NET_ADMIN; skipped without it), and for
//! virtio-vsock write(2) and read(2) on a Unix socket pair, with a thread
//! at the far end of both.
//!
//! virtio-blk also runs with its asynchronous engine (io_uring): 4 KiB
//! reads one at a time from the page cache, as above, and eight 4 KiB reads
//! made available at once on a file the host has not cached (its pages
//! dropped before each round), against the synchronous engine and eight
//! preads alike.
//!
//! virtio-blk's 4 KiB reads and virtio-net receive also run on a disk and
//! a backend that cost nothing, which leaves the device's own work per
//! request or frame, and beside it the same ring work done through raw
//! pointers (`RawRing`): the least a device in user space can pay for it
//! (printed after the table).
//!
//! Each row also counts the interrupts the device raised per request and
//! gives the ceiling they set: the dev/base of a device that did nothing
//! but the baseline's I/O and that many eventfd writes (each timed here
//! too), the least a VMM whose interrupts are irqfds pays. `only/base`
//! leaves the synthetic driver's work out: the device's own calls are
//! timed alone.
//!
//!     cargo bench -p moat-devices --features test-driver --bench device_cost [-- ROW...]
//!
//! With ROW arguments only the rows whose names contain one of them run
//! (`-- "blk read 4 KiB"`; with `--exact`, only rows so named), so that
//! one row can be profiled alone.
//!
//! Prints a table and writes target/bench/device_cost.json. Figures are
//! ratios against the baseline measured in the same run; never assert on them.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_devices::virtio::block::{Block, DiskBackend, IoEngine, QUEUE_SIZE};
use moat_devices::virtio::mmio::MmioTransport;
use moat_devices::virtio::net::{Net, NetBackend, Tap, MAX_FRAME, NET_HDR_LEN};
use moat_devices::virtio::test_driver::{read32, write32, Driver, DriverQueue};
use moat_devices::virtio::{GuestMemoryMmap, Interrupt};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{Bytes, GuestAddress};

#[path = "device_cost/raw_ring.rs"]
mod raw_ring;
use raw_ring::{RawBlk, RawRing, RawRx};

const DISK_SIZE: u64 = 256 << 20;
const HEADER: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
/// How long each measurement runs.
const RUN_FOR: Duration = Duration::from_millis(700);

/// The rows asked for on the command line (all without any): those whose
/// names contain one of the arguments, or with `--exact` are one of them.
struct Only {
    names: Vec<String>,
    exact: bool,
}

impl Only {
    fn from_args() -> Only {
        // cargo passes --bench; every argument that is not a flag names rows.
        let args: Vec<String> = std::env::args().skip(1).collect();
        Only {
            exact: args.iter().any(|a| a == "--exact"),
            names: args.into_iter().filter(|a| !a.starts_with("--")).collect(),
        }
    }

    fn wants(&self, row: &str) -> bool {
        let named = |name: &String| match self.exact {
            true => row == name,
            false => row.contains(name.as_str()),
        };
        self.names.is_empty() || self.names.iter().any(named)
    }
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (or zeroed if it failed).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[derive(Clone, Copy)]
struct Measurement {
    requests: u64,
    wall: Duration,
    cpu: Duration,
    /// Interrupts the device raised meanwhile (see [`counting_interrupts`]).
    interrupts: u64,
    /// The time per request spent in the device's own calls, without the
    /// synthetic driver's (see [`DeviceClock`]), where it was measured.
    inside: Option<Duration>,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests as f64
    }
    fn interrupts_per_request(&self) -> f64 {
        self.interrupts as f64 / self.requests as f64
    }
}

/// One row of the table.
struct Row {
    name: String,
    /// Bytes per request.
    size: u64,
    dev: Measurement,
    base: Measurement,
    /// The same requests served by a device on a [`RawRing`] (with its
    /// calls timed alone), where the bench has one.
    raw: Option<Measurement>,
}

impl Row {
    fn new(name: impl Into<String>, size: u64, dev: Measurement, base: Measurement) -> Row {
        Row {
            name: name.into(),
            size,
            dev,
            base,
            raw: None,
        }
    }
}

/// Runs a device's measurement and counts the interrupts it raised: the
/// writes to its interrupt eventfd, which nothing else reads here (the
/// counter adds them up). The warm-up's few requests are counted too.
fn counting_interrupts(irq: &Interrupt, run: impl FnOnce() -> Measurement) -> Measurement {
    let _ = irq.irq_fd().read(); // zero it (EAGAIN if it is)
    let mut m = run();
    m.interrupts = irq.irq_fd().read().unwrap_or(0);
    m
}

/// Times the device's own calls in a measurement: what the VMM spends on
/// a request, without what the synthetic driver spends filling the ring
/// and reaping it (in a VM, the guest's work). Each timed call also pays
/// for reading the clock twice (some 20 ns each with the vDSO), which
/// `finish` takes off again: what timing nothing costs, measured.
#[derive(Default)]
struct DeviceClock {
    total: std::cell::Cell<Duration>,
    calls: std::cell::Cell<u64>,
}

/// What [`DeviceClock::time`] adds to each call it times: the time it
/// measures for a call that does nothing (the least of a few tries).
fn clock_cost() -> Duration {
    static COST: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        (0..5)
            .map(|_| {
                let clock = DeviceClock::default();
                for _ in 0..200_000 {
                    clock.time(|| std::hint::black_box(()));
                }
                clock.total.get() / clock.calls.get() as u32
            })
            .min()
            .unwrap()
    })
}

impl DeviceClock {
    fn time<T>(&self, call: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = call();
        self.total.set(self.total.get() + start.elapsed());
        self.calls.set(self.calls.get() + 1);
        out
    }

    /// `m` with the time per request inside the device, when each timed
    /// call served `per_call` requests (warm-up calls count alike).
    fn finish(self, mut m: Measurement, per_call: u64) -> Measurement {
        let (calls, requests) = (self.calls.get(), self.calls.get() * per_call);
        let timing = clock_cost() * calls as u32;
        m.inside =
            (requests > 0).then(|| self.total.get().saturating_sub(timing) / requests as u32);
        m
    }
}

/// The least an interrupt costs the device: one write(2) to an eventfd
/// (under KVM the irqfd's injection into the guest comes on top).
fn signal_cost() -> Duration {
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let m = measure(|_| efd.write(1).unwrap());
    m.wall / m.requests as u32
}

/// The highest dev/base a device can reach when each of its requests does
/// what the baseline does plus `interrupts_per_request` eventfd writes.
fn ceiling(dev: &Measurement, base: &Measurement, signal: Duration) -> f64 {
    let base_time = 1.0 / base.per_second();
    base_time / (base_time + dev.interrupts_per_request() * signal.as_secs_f64())
}

/// Runs `op(i)` for RUN_FOR and measures it.
fn measure(mut op: impl FnMut(u64)) -> Measurement {
    for i in 0..16 {
        op(i); // warm up
    }
    let (start, cpu) = (Instant::now(), cpu_time());
    let mut requests = 0;
    while start.elapsed() < RUN_FOR {
        for _ in 0..16 {
            op(requests);
            requests += 1;
        }
    }
    Measurement {
        requests,
        wall: start.elapsed(),
        cpu: cpu_time() - cpu,
        interrupts: 0,
        inside: None,
    }
}

/// The two halves of a round in [`measure_rounds`].
#[derive(Clone, Copy, PartialEq)]
enum Half {
    /// Set up the requests (not timed).
    Prepare,
    /// Complete them (timed).
    Complete,
}

/// Runs rounds of `round(Prepare)` then `round(Complete)` for RUN_FOR,
/// timing only the second half, which completes `per_round` requests.
fn measure_rounds(per_round: u64, mut round: impl FnMut(Half)) -> Measurement {
    round(Half::Prepare);
    round(Half::Complete); // warm up
    let started = Instant::now();
    let mut m = Measurement {
        requests: 0,
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
        interrupts: 0,
        inside: None,
    };
    while started.elapsed() < RUN_FOR {
        round(Half::Prepare);
        let (start, cpu) = (Instant::now(), cpu_time());
        round(Half::Complete);
        m.wall += start.elapsed();
        m.cpu += cpu_time() - cpu;
        m.requests += per_round;
    }
    m
}

/// `len` bytes of guest memory at `at` as a plain slice, for a baseline to
/// do its I/O on the very memory the device uses: where a buffer lies
/// moves the cost of a 64 KiB copy by up to a fifth here, which is no
/// part of the device's cost.
#[allow(clippy::mut_from_ref)] // guest memory is shared by nature
fn guest_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> &mut [u8] {
    use vm_memory::GuestMemoryBackend;
    let slice = mem.get_slice(GuestAddress(at), len).unwrap();
    // SAFETY: the range lies inside a region that `mem` keeps mapped while
    // it is borrowed, and nothing else touches it while a baseline runs.
    unsafe { std::slice::from_raw_parts_mut(slice.ptr_guard_mut().as_ptr(), len) }
}

/// Offset of request `i` of `size` bytes: a scattered walk over the disk.
fn offset(i: u64, size: u64) -> u64 {
    let slots = DISK_SIZE / size;
    (i.wrapping_mul(2_654_435_761) % slots) * size
}

/// Makes request `i` of the blk rows available on `q`: a read (`kind` 0)
/// or write (1) of `size` bytes at DATA, at `offset(i, size)` on the disk.
fn post_blk_request(q: &mut DriverQueue, mem: &GuestMemoryMmap, kind: u32, i: u64, size: u64) {
    mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    mem.write_obj(offset(i, size) / 512, GuestAddress(HEADER + 8))
        .unwrap();
    let device_writes = kind == 0;
    q.add_chain(
        mem,
        &[
            (HEADER, 16, false),
            (DATA, size as u32, device_writes),
            (STATUS, 1, true),
        ],
    );
}

/// Requests of the blk rows, one at a time, on queue `q`: the driver
/// makes request `i` available and kicks, `serve` has the device serve it
/// (timed alone too), and the driver reaps it, its status OK.
fn blk_requests(
    q: &mut DriverQueue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    kind: u32,
    size: u64,
    mut serve: impl FnMut(),
) -> Measurement {
    let mut used = Vec::new();
    let clock = DeviceClock::default();
    let device = counting_interrupts(irq, || {
        measure(|i| {
            post_blk_request(q, mem, kind, i, size);
            clock.time(&mut serve);
            q.take_used_into(mem, &mut used);
            assert_eq!(used.len(), 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
            irq.ack(1);
        })
    });
    clock.finish(device, 1)
}

/// A virtio-blk device on `file` with `engine`.
fn block_on(file: &std::fs::File, engine: IoEngine) -> Block {
    Block::with_engine(file.try_clone().unwrap(), DISK_SIZE, false, "bench", engine)
        .expect("a block device (io_uring for the async engine)")
}

/// `block`, brought up by a driver.
fn block_rig(block: Block) -> (MmioTransport, Driver, GuestMemoryMmap, Arc<Interrupt>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let mut transport = MmioTransport::new(Box::new(block), mem.clone(), irq.clone()).unwrap();
    write32(&mut transport, 0x014, 1);
    let features = u64::from(read32(&mut transport, 0x010)) << 32;
    let driver = Driver::init(&mut transport, &mem, features, &[QUEUE_SIZE]).unwrap();
    (transport, driver, mem, irq)
}

/// Lets the device's engine finish what it has in flight (nothing for the
/// synchronous engine), waiting for its completions as the event loop
/// does.
fn finish_in_flight(transport: &mut MmioTransport) {
    while transport.backend_wanted() {
        let fd = transport.backend_fd().unwrap();
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll, 1, -1) };
        transport.process_backend();
    }
}

/// Drops `file`'s pages from the host's page cache (they are clean: the
/// file was synced), so the next reads go to the disk.
fn evict(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fadvise on a descriptor we own; no memory is involved.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// How many reads the uncached rows make available at once.
const UNCACHED_DEPTH: u64 = 8;

/// The asynchronous engine's rows: 4 KiB reads one at a time from the
/// page cache, and UNCACHED_DEPTH at once from a file the host dropped
/// from its cache, for both engines.
fn async_rows(file: &std::fs::File, only: &Only) -> Vec<Row> {
    use std::os::fd::AsRawFd;
    let size = 4096u64;
    let mut rows = Vec::new();
    let mut used = Vec::new();
    let name = "virtio-blk read 4 KiB, async";
    if only.wants(name) {
        let (mut transport, mut driver, mem, irq) = block_rig(block_on(file, IoEngine::Async));
        let device = blk_requests(&mut driver.queues[0], &mem, &irq, 0, size, || {
            transport.process_queue(0);
            finish_in_flight(&mut transport);
        });
        let buf = guest_bytes(&mem, DATA, size as usize);
        let baseline = measure(|i| file.read_exact_at(buf, offset(i, size)).unwrap());
        rows.push(Row::new(name, size, device, baseline));
    }

    // Uncached: no readahead, so each read is one 4 KiB read of the disk.
    file.sync_all().unwrap();
    // SAFETY: as in `evict`.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let mut round = 0u64;
    let mut baseline = None;
    for engine in [IoEngine::Sync, IoEngine::Async] {
        let name = match engine {
            IoEngine::Sync => "virtio-blk 8 reads uncached",
            IoEngine::Async => "virtio-blk 8 reads uncached, async",
        };
        if !only.wants(name) {
            continue;
        }
        let (mut transport, mut driver, mem, irq) = block_rig(block_on(file, engine));
        let device = counting_interrupts(&irq, || {
            measure_rounds(UNCACHED_DEPTH, |half| match half {
                Half::Prepare => {
                    evict(file);
                    round += 1;
                    for j in 0..UNCACHED_DEPTH {
                        let header = HEADER + 16 * j;
                        mem.write_obj(0u32, GuestAddress(header)).unwrap();
                        let at = offset(round * UNCACHED_DEPTH + j, size);
                        mem.write_obj(at / 512, GuestAddress(header + 8)).unwrap();
                        driver.queues[0].add_chain(
                            &mem,
                            &[
                                (header, 16, false),
                                (DATA + size * j, size as u32, true),
                                (STATUS + j, 1, true),
                            ],
                        );
                    }
                }
                Half::Complete => {
                    transport.process_queue(0);
                    finish_in_flight(&mut transport);
                    driver.queues[0].take_used_into(&mem, &mut used);
                    assert_eq!(used.len() as u64, UNCACHED_DEPTH);
                    irq.ack(1);
                }
            })
        });
        let base = baseline.get_or_insert_with(|| {
            measure_rounds(UNCACHED_DEPTH, |half| match half {
                Half::Prepare => {
                    evict(file);
                    round += 1;
                }
                Half::Complete => {
                    for j in 0..UNCACHED_DEPTH {
                        let at = offset(round * UNCACHED_DEPTH + j, size);
                        let buf = guest_bytes(&mem, DATA + size * j, size as usize);
                        file.read_exact_at(buf, at).unwrap();
                    }
                }
            })
        });
        rows.push(Row::new(name, size, device, *base));
    }
    rows
}

/// A socket ioctl request as libc::ioctl takes it: libc types the SIOC
/// constants `c_ulong`, and `ioctl` takes `c_ulong` with glibc but
/// `c_int` with musl.
#[allow(clippy::unnecessary_cast)] // a no-op with glibc
fn sioc(request: libc::c_ulong) -> libc::Ioctl {
    request as libc::Ioctl
}

/// virtio-net transmit of 1514-byte and 64 KiB frames through a TAP,
/// against writing the same frames to the same TAP directly.
fn net_rows(only: &Only) -> Result<Vec<Row>, String> {
    let row = |size: u64| format!("virtio-net tx {size} B");
    let sizes: Vec<u64> = [1514u64, 64 << 10]
        .into_iter()
        .filter(|&size| only.wants(&row(size)))
        .collect();
    if sizes.is_empty() {
        return Ok(Vec::new());
    }
    let name = format!("mtbench{}", std::process::id() % 100_000);
    let frame = |size: u64| {
        let mut frame = vec![0u8; NET_HDR_LEN + size as usize];
        frame[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        frame
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    // A TAP takes one opener at a time: the baseline first, then the device.
    let mut direct = Tap::open(&name).map_err(|e| e.to_string())?;
    let baselines: Vec<Measurement> = sizes
        .iter()
        .map(|size| {
            let frame = frame(*size);
            mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
            let frame = guest_bytes(&mem, DATA, frame.len());
            // A full TAP queue refuses a frame; the device drops it the same way.
            measure(|_| {
                let _ = direct.send(frame);
            })
        })
        .collect();
    drop(direct);

    let tap = Tap::open(&name).map_err(|e| e.to_string())?;
    let NetRig {
        mut transport,
        mut driver,
        mem,
        irq,
    } = NetRig::new(Box::new(tap), mem, 0);
    let mut rows = Vec::new();
    let mut used = Vec::new();
    for (size, baseline) in sizes.into_iter().zip(baselines) {
        let frame = frame(size);
        mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
        let clock = DeviceClock::default();
        let device = counting_interrupts(&irq, || {
            measure(|_| {
                driver.queues[1].add_chain(&mem, &[(DATA, frame.len() as u32, false)]);
                clock.time(|| transport.process_queue(1));
                driver.queues[1].take_used_into(&mem, &mut used);
                irq.ack(1);
            })
        });
        rows.push(Row::new(row(size), size, clock.finish(device, 1), baseline));
    }
    Ok(rows)
}

/// A TAP's largest MTU (65535 less the Ethernet header): the largest frame
/// the host can send into it is 65535 bytes.
const TAP_MAX_MTU: i32 = 65_521;

/// Puts frames into a TAP from the host side: a packet socket bound to the
/// interface, whose transmissions the TAP's reader receives.
struct Injector(std::os::fd::OwnedFd);

impl Injector {
    /// Brings TAP `name` up with the largest MTU a TAP takes (IPv6 off, so the kernel
    /// sends nothing of its own) and binds a packet socket to it.
    fn new(name: &str) -> Result<Injector, String> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let fail = |what: &str| format!("{what} on {name}: {}", std::io::Error::last_os_error());
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let ctl = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if ctl < 0 {
            return Err(fail("socket"));
        }
        // SAFETY: ctl is a fresh descriptor nobody else owns.
        let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_mtu = TAP_MAX_MTU;
        // SAFETY: SIOCSIFMTU, SIOCGIFFLAGS, SIOCSIFFLAGS and SIOCGIFINDEX
        // read and write only the ifreq we pass.
        unsafe {
            if libc::ioctl(ctl.as_raw_fd(), sioc(libc::SIOCSIFMTU), &mut req) < 0 {
                return Err(fail("SIOCSIFMTU"));
            }
            if libc::ioctl(ctl.as_raw_fd(), sioc(libc::SIOCGIFFLAGS), &mut req) < 0 {
                return Err(fail("SIOCGIFFLAGS"));
            }
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(ctl.as_raw_fd(), sioc(libc::SIOCSIFFLAGS), &mut req) < 0 {
                return Err(fail("SIOCSIFFLAGS"));
            }
            if libc::ioctl(ctl.as_raw_fd(), sioc(libc::SIOCGIFINDEX), &mut req) < 0 {
                return Err(fail("SIOCGIFINDEX"));
            }
        }
        // SAFETY: reading the union member SIOCGIFINDEX filled in.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
        // SAFETY: plain socket(2); protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(fail("packet socket"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex;
        // SAFETY: bind(2) reads `addr`, of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(fail("bind"));
        }
        Ok(Injector(fd))
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: send(2) reads `frame`, of the length we pass.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reads whatever waits in `tap` (frames the kernel sent before the run).
fn drain(tap: &mut Tap, buf: &mut [u8]) {
    std::thread::sleep(Duration::from_millis(50));
    while tap.recv(buf).is_ok() {}
}

/// virtio-net receive of 1514-byte and 65535-byte frames that the host sends
/// into the TAP, against reading the same frames from the same TAP with
/// read(2). Only the receiving side is timed. The driver posts 4 KiB
/// buffers and negotiates mergeable buffers, as Linux guests do.
fn net_rx_rows(only: &Only) -> Result<Vec<Row>, String> {
    let row = |size: u64| format!("virtio-net rx {size} B");
    let sizes: Vec<u64> = [1514u64, 65_535]
        .into_iter()
        .filter(|&size| only.wants(&row(size)))
        .collect();
    if sizes.is_empty() {
        return Ok(Vec::new());
    }
    let name = format!("mtbrx{}", std::process::id() % 100_000);
    let frame = |size: u64| {
        let mut frame = vec![0x5au8; size as usize];
        frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
        frame
    };

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut direct = Tap::open(&name).map_err(|e| e.to_string())?;
    let injector = Injector::new(&name)?;
    let mut buf = vec![0u8; MAX_FRAME];
    drain(&mut direct, &mut buf);
    let baselines: Vec<Measurement> = sizes
        .iter()
        .map(|&size| {
            let (frame, n) = (frame(size), rx_batch(size));
            // Each frame of a round into the guest memory the device fills
            // with it: a round's frames use distinct buffers, as a guest's
            // ring of them does, and they need not all stay in the cache.
            let span = (size + NET_HDR_LEN as u64).div_ceil(RX_BUFFER) * RX_BUFFER;
            let mut into: Vec<&mut [u8]> = (0..n)
                .map(|j| guest_bytes(&mem, DATA + j * span, span as usize))
                .collect();
            measure_rounds(n, |half| {
                for into in into.iter_mut() {
                    if half == Half::Prepare {
                        injector.send(&frame);
                    } else {
                        assert_eq!(direct.recv(into).unwrap(), NET_HDR_LEN + frame.len());
                    }
                }
            })
        })
        .collect();
    drop((injector, direct));

    let mut tap = Tap::open(&name).map_err(|e| e.to_string())?;
    let injector = Injector::new(&name)?;
    drain(&mut tap, &mut buf);
    let mut rig = NetRig::new(Box::new(tap), mem, 1 << VIRTIO_NET_F_MRG_RXBUF);
    let mut rows = Vec::new();
    for (&size, baseline) in sizes.iter().zip(baselines) {
        let frame = frame(size);
        let device = rig.receive(size, |n| (0..n).for_each(|_| injector.send(&frame)));
        rows.push(Row::new(row(size), size, device, baseline));
    }
    drop((rig, injector));

    // The same frames from the same TAP, delivered by a raw-ring device.
    let mut tap = Tap::open(&name).map_err(|e| e.to_string())?;
    let injector = Injector::new(&name)?;
    drain(&mut tap, &mut buf);
    for (row, &size) in rows.iter_mut().zip(&sizes) {
        let frame = frame(size);
        let arrive = |n| (0..n).for_each(|_| injector.send(&frame));
        row.raw = Some(raw_receive(&mut tap, size, arrive));
    }
    Ok(rows)
}

/// The receive buffers a driver posts, as Linux does with mergeable
/// buffers.
const RX_BUFFER: u64 = 4096;

/// Frames of `size` bytes per timed round of a receive row: as many as
/// fit the 256-entry ring, up to 64.
fn rx_batch(size: u64) -> u64 {
    (240 / (size + NET_HDR_LEN as u64).div_ceil(RX_BUFFER)).min(64)
}

/// A virtio-net device on `backend`, brought up by a driver that takes
/// the device's VIRTIO_F_VERSION_1 page of features and, of the first page,
/// those in `low_features` that the device offers.
struct NetRig {
    transport: MmioTransport,
    driver: Driver,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
}

impl NetRig {
    fn new(backend: Box<dyn NetBackend>, mem: GuestMemoryMmap, low_features: u64) -> NetRig {
        let irq = Arc::new(Interrupt::new().unwrap());
        let net = Net::new(backend, [2, 0, 0, 0, 0, 1], false);
        let mut transport = MmioTransport::new(Box::new(net), mem.clone(), irq.clone()).unwrap();
        let low = u64::from(read32(&mut transport, 0x010));
        write32(&mut transport, 0x014, 1);
        let high = u64::from(read32(&mut transport, 0x010)) << 32;
        let features = high | (low & low_features);
        let driver = Driver::init(&mut transport, &mem, features, &[256, 256]).unwrap();
        NetRig {
            transport,
            driver,
            mem,
            irq,
        }
    }

    /// Rounds of frames of `size` bytes: the driver posts buffers for
    /// them and `arrive(n)` makes n frames wait in the backend (neither
    /// timed), then the device delivers them (timed, its calls alone too).
    fn receive(&mut self, size: u64, mut arrive: impl FnMut(u64)) -> Measurement {
        let NetRig {
            transport,
            driver,
            mem,
            irq,
        } = self;
        rx_rounds(&mut driver.queues[0], mem, irq, size, |half, n| {
            if half == Half::Prepare {
                transport.process_queue(0);
                arrive(n);
            } else {
                transport.process_backend();
            }
        })
    }
}

/// Rounds of `n` frames of `size` bytes into receive queue `q`: the
/// driver posts 4 KiB buffers for them and `device(Prepare, n)` readies
/// the device (neither timed), then `device(Complete, n)` delivers the
/// frames (timed, alone too), and the driver reaps the buffers.
fn rx_rounds(
    q: &mut DriverQueue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    size: u64,
    mut device: impl FnMut(Half, u64),
) -> Measurement {
    let n = rx_batch(size);
    let buffers = n * (size + NET_HDR_LEN as u64).div_ceil(RX_BUFFER);
    let mut used = Vec::new();
    let clock = DeviceClock::default();
    let m = counting_interrupts(irq, || {
        measure_rounds(n, |half| {
            if half == Half::Prepare {
                for b in 0..buffers {
                    q.add_chain(mem, &[(DATA + b * RX_BUFFER, RX_BUFFER as u32, true)]);
                }
                device(half, n);
            } else {
                clock.time(|| device(half, n));
                q.take_used_into(mem, &mut used);
                assert_eq!(used.len() as u64, buffers);
                irq.ack(1);
            }
        })
    });
    clock.finish(m, n)
}

/// A backend whose frames are there at once and cost nothing to read:
/// what is left of a receive row is the device's own work.
struct InstantFrames {
    waiting: Arc<std::sync::atomic::AtomicU64>,
    len: usize,
    /// Something to poll, which nothing here does.
    fd: std::fs::File,
}

impl std::os::fd::AsRawFd for InstantFrames {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for InstantFrames {
    fn recv_into(&mut self, _bufs: &[vm_memory::VolatileSlice<'_, ()>]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        match self.waiting.load(Ordering::Relaxed) {
            0 => Err(std::io::ErrorKind::WouldBlock.into()),
            n => {
                self.waiting.store(n - 1, Ordering::Relaxed);
                Ok(self.len)
            }
        }
    }

    fn send_from(&mut self, bufs: &[vm_memory::VolatileSlice<'_, ()>]) -> std::io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn set_offload(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device's work without I/O, printed after the table: the time per
/// request or frame in its calls, and what it did.
struct Work {
    name: String,
    each: Duration,
    how: &'static str,
}

/// A disk that costs nothing: reads and writes are done at once.
struct NullDisk;

impl DiskBackend for NullDisk {
    unsafe fn read_vectored_at(&self, iov: &[libc::iovec], _offset: i64) -> std::io::Result<usize> {
        Ok(iov.iter().map(|v| v.iov_len).sum())
    }
    unsafe fn write_vectored_at(
        &self,
        iov: &[libc::iovec],
        _offset: i64,
    ) -> std::io::Result<usize> {
        Ok(iov.iter().map(|v| v.iov_len).sum())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`RawRing`] on the queue `q` drives in `mem`.
fn raw_ring(mem: &GuestMemoryMmap, q: &DriverQueue) -> RawRing {
    use vm_memory::GuestMemoryBackend;
    let len = mem.last_addr().0 + 1;
    let base = mem.get_slice(GuestAddress(0), len as usize).unwrap();
    // SAFETY: `mem` is one region from address 0, mapped until the last
    // clone of it drops; the callers keep `mem` beside the ring.
    unsafe { RawRing::new(base.ptr_guard_mut().as_ptr(), len, q.size(), q.rings()) }
}

/// Read requests of `size` bytes, as the blk rows make them, served by a
/// [`RawBlk`] on `disk`.
fn raw_blk_reads(disk: Box<dyn DiskBackend>, size: u64) -> Measurement {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let (mut q, _) = DriverQueue::standalone(&mem, 0, QUEUE_SIZE, true);
    let mut blk = RawBlk {
        ring: raw_ring(&mem, &q),
        disk,
        size: DISK_SIZE,
    };
    let irq = Interrupt::new().unwrap();
    blk_requests(&mut q, &mem, &irq, 0, size, || blk.serve(&irq))
}

/// Frames of `size` bytes, as the receive rows deliver them, from
/// `backend` (where `arrive(n)` makes n wait) by a [`RawRx`].
fn raw_receive(
    backend: &mut dyn NetBackend,
    size: u64,
    mut arrive: impl FnMut(u64),
) -> Measurement {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let (mut q, _) = DriverQueue::standalone(&mem, 0, 256, true);
    let mut rx = RawRx::new(raw_ring(&mem, &q));
    let irq = Interrupt::new().unwrap();
    rx_rounds(&mut q, &mem, &irq, size, |half, n| {
        rx.serve(backend, &irq);
        if half == Half::Prepare {
            arrive(n);
        }
    })
}

/// The work lines for blk read 4 KiB: moat's device on [`NullDisk`], and
/// the same ring work through a [`RawRing`].
fn blk_work(only: &Only) -> Vec<Work> {
    let mut work = Vec::new();
    let name = "virtio-blk read 4 KiB, no I/O";
    if only.wants(name) {
        let block = Block::with_backend(Box::new(NullDisk), DISK_SIZE, false, "bench");
        let (mut transport, mut driver, mem, irq) = block_rig(block);
        let m = blk_requests(&mut driver.queues[0], &mem, &irq, 0, 4096, || {
            transport.process_queue(0);
        });
        work.extend(m.inside.map(|each| Work {
            name: name.into(),
            each,
            how: "a request in the device's calls (a disk that costs nothing)",
        }));
    }
    let name = "virtio-blk read 4 KiB, raw ring";
    if only.wants(name) {
        let m = raw_blk_reads(Box::new(NullDisk), 4096);
        work.extend(m.inside.map(|each| Work {
            name: name.into(),
            each,
            how: "a request, the same ring work through raw pointers, no I/O",
        }));
    }
    work
}

/// The receive rows' device work without I/O: moat's device on frames of
/// each size from [`InstantFrames`], and the same ring work through a
/// [`RawRing`].
fn net_rx_work(only: &Only) -> Vec<Work> {
    let mut work = Vec::new();
    for size in [1514u64, 65_535] {
        let instant = || {
            let waiting = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let backend = InstantFrames {
                waiting: waiting.clone(),
                len: size as usize + NET_HDR_LEN,
                fd: std::fs::File::open("/dev/null").unwrap(),
            };
            let arrive = move |n| waiting.store(n, std::sync::atomic::Ordering::Relaxed);
            (backend, arrive)
        };
        let name = format!("virtio-net rx {size} B, raw ring");
        if only.wants(&name) {
            let (mut backend, arrive) = instant();
            let m = raw_receive(&mut backend, size, arrive);
            work.extend(m.inside.map(|each| Work {
                name,
                each,
                how: "a frame, the same ring work through raw pointers, no I/O",
            }));
        }
        let name = format!("virtio-net rx {size} B, no I/O");
        if !only.wants(&name) {
            continue;
        }
        let (backend, arrive) = instant();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let mut rig = NetRig::new(Box::new(backend), mem, 1 << VIRTIO_NET_F_MRG_RXBUF);
        let m = rig.receive(size, arrive);
        work.extend(m.inside.map(|each| Work {
            name,
            each,
            how: "a frame in the device's calls (a backend whose frames cost nothing to read)",
        }));
    }
    work
}

/// A thread that reads `stream` until it closes.
fn sink(mut stream: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
    })
}

/// A thread that writes to `stream` until it closes.
fn source(mut stream: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let buf = vec![0x5au8; 1 << 16];
        while stream.write_all(&buf).is_ok() {}
    })
}

/// virtio-vsock: 64 KiB packets from the guest to a host Unix socket, and
/// 4 KiB receive buffers (Linux's size) filled from one, against write(2)
/// and read(2) on a Unix socket pair.
fn vsock_rows(only: &Only) -> Vec<Row> {
    use moat_devices::virtio::vsock::packet::{Header, HOST_CID, OP_REQUEST, OP_RW, TYPE_STREAM};
    use moat_devices::virtio::vsock::{
        listen, Vsock, BUF_ALLOC, EVENT_QUEUE_SIZE, QUEUE_SIZE as VQ,
    };
    use moat_devices::virtio::{VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1};
    use std::os::unix::net::{UnixListener, UnixStream};

    const CID: u64 = 3;
    const TX_BYTES: u64 = 64 << 10;
    const RX_BYTES: u64 = 4 << 10;
    let tx_row = format!("virtio-vsock tx {} KiB", TX_BYTES >> 10);
    let rx_row = format!("virtio-vsock rx {} KiB", RX_BYTES >> 10);
    let mut rows = Vec::new();
    if !only.wants(&tx_row) && !only.wants(&rx_row) {
        return rows;
    }
    let dir = std::env::temp_dir().join(format!("moat-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let vsock = Vsock::new(CID, path.clone(), listen(&path).unwrap()).unwrap();
    let server = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let mut t = MmioTransport::new(Box::new(vsock), mem.clone(), irq.clone()).unwrap();
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX;
    let mut driver = Driver::init(&mut t, &mem, features, &[VQ, VQ, EVENT_QUEUE_SIZE]).unwrap();
    let header = |op: u16, len: u32| Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: 5000,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        // The guest's credit is never what limits the bench.
        buf_alloc: u32::MAX,
        fwd_cnt: 0,
    };
    let mut used = Vec::new();
    let mut send = |driver: &mut Driver, t: &mut MmioTransport, h: Header| {
        mem.write_slice(&h.to_bytes(), GuestAddress(HEADER))
            .unwrap();
        driver.queues[1].add_chain(&mem, &[(HEADER, 44, false), (DATA, h.len, false)]);
        t.process_queue(1);
        driver.queues[1].take_used_into(&mem, &mut used);
    };
    let mut reaped = Vec::new();
    // The guest connects to the host's port 5000.
    driver.queues[0].add_chain(&mem, &[(DATA + (4 << 20), 4096, true)]);
    send(&mut driver, &mut t, header(OP_REQUEST, 0));
    driver.queues[0].take_used(&mem);
    let (stream, _) = server.accept().unwrap();

    let reader = sink(stream.try_clone().unwrap());
    if only.wants(&tx_row) {
        // The guest keeps within the credit moat gives it: bytes sent minus
        // moat's fwd_cnt (from the packets it sends back) at most BUF_ALLOC.
        let credit_buf = DATA + (4 << 20);
        let (mut sent, mut fwd_cnt) = (0u32, 0u32);
        driver.queues[0].add_chain(&mem, &[(credit_buf, 4096, true)]);
        let tx_device = counting_interrupts(&irq, || {
            measure(|_| {
                while sent.wrapping_sub(fwd_cnt) + TX_BYTES as u32 > BUF_ALLOC {
                    t.process_backend();
                    driver.queues[0].take_used_into(&mem, &mut reaped);
                    for _ in &reaped {
                        let mut raw = [0u8; 44];
                        mem.read_slice(&mut raw, GuestAddress(credit_buf)).unwrap();
                        fwd_cnt = Header::from_bytes(&raw).fwd_cnt;
                        driver.queues[0].add_chain(&mem, &[(credit_buf, 4096, true)]);
                        t.process_queue(0);
                    }
                    irq.ack(1);
                }
                send(&mut driver, &mut t, header(OP_RW, TX_BYTES as u32));
                sent = sent.wrapping_add(TX_BYTES as u32);
            })
        });
        let (mut a, b) = UnixStream::pair().unwrap();
        let pair_reader = sink(b);
        let data = guest_bytes(&mem, DATA, TX_BYTES as usize);
        let tx_base = measure(|_| a.write_all(data).unwrap());
        drop(a);
        let _ = pair_reader.join();
        rows.push(Row::new(tx_row, TX_BYTES, tx_device, tx_base));
    }

    let mut writer = None;
    if only.wants(&rx_row) {
        // Host to guest: a writer keeps the socket full.
        writer = Some(source(stream.try_clone().unwrap()));
        let rx_device = counting_interrupts(&irq, || {
            measure_rounds(64, |half| match half {
                Half::Prepare => {
                    driver.queues[0].take_used_into(&mem, &mut reaped);
                    for i in 0..64 {
                        driver.queues[0]
                            .add_chain(&mem, &[(DATA + i * RX_BYTES, RX_BYTES as u32, true)]);
                    }
                }
                Half::Complete => {
                    let mut got = 0;
                    let give_up = Instant::now() + Duration::from_secs(10);
                    while got < 64 {
                        t.process_queue(0);
                        t.process_backend();
                        driver.queues[0].take_used_into(&mem, &mut reaped);
                        got += reaped.len();
                        assert!(Instant::now() < give_up, "vsock receive stalled");
                    }
                    irq.ack(1);
                }
            })
        });
        let (a, mut b) = UnixStream::pair().unwrap();
        let pair_writer = source(a);
        let buf = guest_bytes(&mem, DATA, RX_BYTES as usize);
        let rx_base = measure(|_| std::io::Read::read_exact(&mut b, buf).unwrap());
        drop(b);
        let _ = pair_writer.join();
        rows.push(Row::new(rx_row, RX_BYTES, rx_device, rx_base));
    }
    drop(t);
    drop(stream);
    let _ = reader.join();
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

fn main() {
    let only = Only::from_args();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("device_cost.img");
    let file = moat_tests::bench_disk(&path, DISK_SIZE >> 20);

    let (mut transport, mut driver, mem, irq) = block_rig(block_on(&file, IoEngine::Sync));
    let mut rows = Vec::new();
    for size in [4u64 << 10, 64 << 10, 1 << 20] {
        for (name, kind) in [("read", 0u32), ("write", 1u32)] {
            let row = format!("virtio-blk {name} {} KiB", size >> 10);
            if !only.wants(&row) {
                continue;
            }
            let device = blk_requests(&mut driver.queues[0], &mem, &irq, kind, size, || {
                transport.process_queue(0);
            });
            let raw = (kind == 0).then(|| raw_blk_reads(Box::new(file.try_clone().unwrap()), size));
            let buf = guest_bytes(&mem, DATA, size as usize);
            let baseline = measure(|i| {
                if kind == 0 {
                    file.read_exact_at(buf, offset(i, size)).unwrap();
                } else {
                    file.write_all_at(buf, offset(i, size)).unwrap();
                }
            });
            rows.push(Row {
                raw,
                ..Row::new(row, size, device, baseline)
            });
        }
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| async_rows(&file, &only))) {
        Ok(mut more) => rows.append(&mut more),
        Err(_) => println!("virtio-blk's asynchronous engine skipped (no io_uring here?)"),
    }
    let _ = std::fs::remove_file(&path);
    match net_rows(&only) {
        Ok(mut net) => rows.append(&mut net),
        Err(e) => println!("virtio-net skipped: {e}"),
    }
    match net_rx_rows(&only) {
        Ok(mut net) => rows.append(&mut net),
        Err(e) => println!("virtio-net receive skipped: {e}"),
    }
    rows.append(&mut vsock_rows(&only));
    let mut work = blk_work(&only);
    work.append(&mut net_rx_work(&only));

    let signal = signal_cost();
    println!(
        "{:<34} {:>12} {:>10} {:>11} {:>12} {:>10} {:>11} {:>8} {:>9} {:>8} {:>8} {:>8}",
        "case",
        "dev req/s",
        "dev MB/s",
        "dev cpu/req",
        "base req/s",
        "base MB/s",
        "base cpu/req",
        "dev/base",
        "only/base",
        "raw/base",
        "irq/req",
        "ceiling"
    );
    let mut json = Vec::new();
    for Row {
        name,
        size,
        dev,
        base,
        raw,
    } in &rows
    {
        let mb = |m: &Measurement| m.per_second() * *size as f64 / 1e6;
        let ceiling = ceiling(dev, base, signal);
        // The baseline's time per request against the device's own.
        let inside = |m: &Measurement| m.inside.map(|t| 1.0 / base.per_second() / t.as_secs_f64());
        let (only, raw) = (inside(dev), raw.as_ref().and_then(inside));
        let text = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));
        let json_number = |r: Option<f64>| r.map_or("null".to_string(), |r| format!("{r:.3}"));
        println!(
            "{:<34} {:>12.0} {:>10.1} {:>9.1}us {:>12.0} {:>10.1} {:>10.1}us {:>8.2} {:>9} {:>8} {:>8.3} {:>8.2}",
            name,
            dev.per_second(),
            mb(dev),
            dev.cpu_us_per_request(),
            base.per_second(),
            mb(base),
            base.cpu_us_per_request(),
            dev.per_second() / base.per_second(),
            text(only),
            text(raw),
            dev.interrupts_per_request(),
            ceiling
        );
        json.push(format!(
            "{{\"case\":\"{name}\",\"bytes\":{size},\"device_req_per_s\":{:.1},\"device_cpu_us_per_req\":{:.2},\"baseline_req_per_s\":{:.1},\"baseline_cpu_us_per_req\":{:.2},\"device_over_baseline\":{:.3},\"device_only_over_baseline\":{},\"raw_ring_over_baseline\":{},\"interrupts_per_req\":{:.4},\"ceiling\":{:.3}}}",
            dev.per_second(),
            dev.cpu_us_per_request(),
            base.per_second(),
            base.cpu_us_per_request(),
            dev.per_second() / base.per_second(),
            json_number(only),
            json_number(raw),
            dev.interrupts_per_request(),
            ceiling
        ));
    }
    println!(
        "an interrupt (eventfd write) costs {:.2} us here, timing a device call {:.3} us (taken \
         off only/base and raw/base); ceiling: the dev/base of a device \
         that did only the baseline's I/O and irq/req such writes; only/base: the baseline's \
         time per request over the time in the device's own calls, without the synthetic \
         driver's; raw/base: the same for a device whose ring work is done through raw \
         pointers, the least a device in user space pays",
        signal.as_secs_f64() * 1e6,
        clock_cost().as_secs_f64() * 1e6
    );
    for Work { name, each, how } in &work {
        println!("{name}: {:.3} us {how}", each.as_secs_f64() * 1e6);
    }
    if !only.names.is_empty() {
        // A file with some rows would pass for a whole run's.
        println!("some rows only: device_cost.json not written");
        return;
    }
    let out = dir.join("device_cost.json");
    std::fs::write(&out, format!("[\n{}\n]\n", json.join(",\n"))).unwrap();
    println!("wrote {}", out.display());
}
