// virtio-blk driven through the mmio transport by the test driver, on a
// temporary file, with plain guest memory, with the engine `ENGINE` of the
// module that includes this file.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::block::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_driver::{read32, Desc, Driver, DESC_NEXT, DESC_WRITE};

const HEADER: u64 = 0x8_0000;
const DATA: u64 = 0x9_0000;
const STATUS: u64 = 0xf_0000;
const DISK_SIZE: u64 = 64 * 1024;

struct Rig {
    transport: MmioTransport,
    driver: Driver,
    mem: GuestMemoryMmap,
    disk: std::path::PathBuf,
    irq: Arc<Interrupt>,
}

fn temp_disk(name: &str, contents: &[u8]) -> (std::path::PathBuf, File) {
    let path = std::env::temp_dir().join(format!(
        "moat-blk-{}-{ENGINE:?}-{name}",
        std::process::id()
    ));
    let f = moat_tests::file_with(&path, contents);
    (path, f)
}

fn rig(name: &str, read_only: bool) -> Rig {
    rig_with(name, |file| {
        Block::with_engine(file, DISK_SIZE, read_only, "disk-serial-1", ENGINE).unwrap()
    })
}

/// A rig whose device `make` builds on the disk file (of DISK_SIZE bytes,
/// each sector filled with its number).
fn rig_with(name: &str, make: impl FnOnce(File) -> Block) -> Rig {
    let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 512) as u8).collect();
    let (disk, file) = temp_disk(name, &pattern);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let block = make(file);
    let mut transport = MmioTransport::new(Box::new(block), mem.clone(), irq.clone()).unwrap();
    let features = transport_features(&mut transport);
    let driver = Driver::init(&mut transport, &mem, features, &[QUEUE_SIZE]).unwrap();
    Rig {
        transport,
        driver,
        mem,
        disk,
        irq,
    }
}

fn transport_features(t: &mut MmioTransport) -> u64 {
    crate::virtio::test_driver::write32(t, 0x014, 0);
    let low = read32(t, 0x010);
    crate::virtio::test_driver::write32(t, 0x014, 1);
    u64::from(low) | u64::from(read32(t, 0x010)) << 32
}

/// Serves the engine's completions until none is in flight.
fn wait_for_completions(transport: &mut MmioTransport) {
    while transport.backend_wanted() {
        let fd = transport.backend_fd().expect("an engine with requests in flight");
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
        assert_eq!(ready, 1, "requests in flight for 10 s");
        transport.process_backend();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.disk);
    }
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain and runs the device; returns (status byte, used len).
    fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> (u8, u32) {
        self.driver.queues[0].add_chain(&self.mem, buffers);
        self.run()
    }

    fn submit_raw(&mut self, descs: &[Desc]) -> (u8, u32) {
        self.driver.queues[0].add_raw(&self.mem, descs);
        self.run()
    }

    /// Runs the device on its queue's notification, and on its engine's
    /// completions until none is in flight.
    fn serve(&mut self) {
        self.transport.process_queue(0);
        wait_for_completions(&mut self.transport);
    }

    fn run(&mut self) -> (u8, u32) {
        self.serve();
        let used = self.driver.queues[0].take_used(&self.mem);
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (status, used.last().map_or(u32::MAX, |u| u.1))
    }

    fn request(&mut self, kind: u32, sector: u64, data_len: u32, device_writes: bool) -> (u8, u32) {
        self.header(kind, sector);
        let mut chain = vec![(HEADER, 16, false)];
        if data_len > 0 {
            chain.push((DATA, data_len, device_writes));
        }
        chain.push((STATUS, 1, true));
        self.submit(&chain)
    }

    fn disk_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.disk).unwrap()
    }

    /// The driver resets the device and sets it up again.
    fn reinit(&mut self) {
        let features = transport_features(&mut self.transport);
        self.driver =
            Driver::init(&mut self.transport, &self.mem, features, &[QUEUE_SIZE]).unwrap();
    }

    fn needs_reset(&mut self) -> bool {
        self.transport.status() & 0x40 != 0
    }
}

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

#[test]
fn features_cover_version_1_seg_max_blk_size_and_flush() {
    let mut r = rig("features", false);
    let f = transport_features(&mut r.transport);
    assert_eq!(f, 1 << 32 | 1 << 29 | 1 << 2 | 1 << 6 | 1 << 9);
    let mut ro = rig("features-ro", true);
    assert_eq!(transport_features(&mut ro.transport), f | 1 << 5);
}

#[test]
fn config_space_reports_capacity_seg_max_and_block_size() {
    let mut r = rig("config", false);
    let mut cap = [0u8; 8];
    r.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    assert_eq!(read32(&mut r.transport, 0x100 + 12), SEG_MAX);
    assert_eq!(read32(&mut r.transport, 0x100 + 20), 512);
    assert_eq!(read32(&mut r.transport, 0x100 + 0x400), 0);
}

#[test]
fn a_partial_last_sector_is_not_exposed() {
    let (path, file) = temp_disk("partial", &[0u8; 1000]);
    let block = Block::new(file, 1000, false, "");
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn read_returns_the_disk_contents_and_interrupts() {
    let mut r = rig("read", false);
    assert_eq!(r.request(0, 3, 1024, true), (OK, 1025));
    let mut got = vec![0u8; 1024];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3));
    assert!(got[512..].iter().all(|b| *b == 4));
    assert_eq!(r.irq.status() & 1, 1);
}

#[test]
fn write_lands_at_the_requested_sector_only() {
    let mut r = rig("write", false);
    let before = r.disk_bytes();
    r.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(1, 10, 1024, false), (OK, 1));
    let after = r.disk_bytes();
    assert_eq!(after.len(), before.len());
    assert!(after[5120..6144].iter().all(|b| *b == 0xab));
    assert_eq!(after[..5120], before[..5120]);
    assert_eq!(after[6144..], before[6144..]);
}

#[test]
fn requests_may_split_header_and_data_across_descriptors() {
    let mut r = rig("split", false);
    r.header(0, 1);
    // Header in two pieces, data in two pieces, status alone.
    let (status, len) = r.submit(&[
        (HEADER, 8, false),
        (HEADER + 8, 8, false),
        (DATA, 256, true),
        (DATA + 256, 256, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((status, len), (OK, 513));
    let mut got = vec![0u8; 512];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|b| *b == 1));
}

#[test]
fn the_last_sector_can_be_written_but_not_one_past_it() {
    let mut r = rig("edge", false);
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(r.request(1, last, 512, false).0, OK);
    let before = r.disk_bytes();
    assert_eq!(r.request(1, last, 1024, false).0, IOERR);
    assert_eq!(r.request(1, last + 1, 512, false).0, IOERR);
    assert_eq!(r.request(0, u64::MAX, 512, true).0, IOERR);
    assert_eq!(r.request(1, u64::MAX / 512, 512, false).0, IOERR);
    assert_eq!(r.disk_bytes(), before);
}

#[test]
fn lengths_that_are_not_whole_sectors_fail() {
    let mut r = rig("partial-len", false);
    let before = r.disk_bytes();
    assert_eq!(r.request(1, 0, 100, false).0, IOERR);
    assert_eq!(r.request(0, 0, 100, true).0, IOERR);
    assert_eq!(r.disk_bytes(), before);
}

#[test]
fn a_read_past_the_end_of_a_file_that_shrank_fails() {
    let mut r = rig("shrank", false);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&r.disk)
        .unwrap()
        .set_len(1024)
        .unwrap();
    // The first 1 KiB is still there; the rest of the request is not.
    assert_eq!(r.request(0, 0, 4096, true).0, IOERR);
    assert_eq!(r.request(0, 0, 1024, true).0, OK);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), 1);
    assert!(!r.needs_reset());
}

#[test]
fn flush_succeeds() {
    let mut r = rig("flush", false);
    assert_eq!(r.request(4, 0, 0, false), (OK, 1));
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let mut r = rig("getid", false);
    r.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(8, 0, 20, true), (OK, 21));
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert!(id[13..].iter().all(|b| *b == 0));
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut r = rig("unsupp", false);
    assert_eq!(r.request(11, 0, 0, false), (UNSUPP, 1));
    assert_eq!(r.request(0xdead, 0, 512, true), (UNSUPP, 1));
}

#[test]
fn read_only_disk_refuses_writes_but_reads() {
    let mut r = rig("ro", true);
    let before = r.disk_bytes();
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(1, 0, 512, false).0, IOERR);
    assert_eq!(r.disk_bytes(), before);
    assert_eq!(r.request(0, 2, 512, true).0, OK);
    assert_eq!(r.request(4, 0, 0, false).0, OK);
}

#[test]
fn data_outside_guest_memory_fails_the_request_without_touching_the_disk() {
    let mut r = rig("outside", false);
    let before = r.disk_bytes();
    r.header(1, 0);
    assert_eq!(
        r.submit(&[
            (HEADER, 16, false),
            (0x7fff_0000, 512, false),
            (STATUS, 1, true)
        ])
        .0,
        IOERR
    );
    r.header(0, 0);
    assert_eq!(
        r.submit(&[
            (HEADER, 16, false),
            (0xf_ff00, 512, true),
            (STATUS, 1, true)
        ])
        .0,
        IOERR
    );
    assert_eq!(r.disk_bytes(), before);
    assert!(!r.needs_reset());
}

#[test]
fn header_outside_guest_memory_or_short_fails_the_request() {
    let mut r = rig("badheader", false);
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(
        r.submit(&[(u64::MAX - 8, 16, false), (STATUS, 1, true)]).0,
        IOERR
    );
    r.header(0, 0);
    assert_eq!(r.submit(&[(HEADER, 8, false), (STATUS, 1, true)]).0, IOERR);
}

#[test]
fn wrong_direction_fails_the_request() {
    let mut r = rig("direction", false);
    let before = r.disk_bytes();
    // Header marked device-writable.
    r.header(1, 0);
    assert_eq!(
        r.submit(&[(HEADER, 16, true), (DATA, 512, true), (STATUS, 1, true)])
            .0,
        IOERR
    );
    // Readable data after a writable buffer.
    r.header(1, 0);
    assert_eq!(
        r.submit(&[
            (HEADER, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true)
        ])
        .0,
        IOERR
    );
    assert_eq!(r.disk_bytes(), before);
}

#[test]
fn too_many_descriptors_fail_the_request() {
    let mut r = rig("toolong", false);
    r.header(0, 0);
    let mut chain = vec![(HEADER, 16, false)];
    for i in 0..(SEG_MAX as u64 + 1) {
        chain.push((DATA + i * 512, 512, true));
    }
    chain.push((STATUS, 1, true));
    assert_eq!(r.submit(&chain).0, IOERR);
    assert!(!r.needs_reset());
}

#[test]
fn a_missing_status_byte_needs_reset() {
    let mut r = rig("nostatus", false);
    r.header(0, 0);
    r.submit(&[(HEADER, 16, false), (DATA, 512, false)]);
    assert!(r.needs_reset());
    assert!(!r.transport.is_active());
}

#[test]
fn a_zero_length_status_buffer_needs_reset() {
    let mut r = rig("zerostatus", false);
    r.header(0, 0);
    r.submit(&[(HEADER, 16, false), (STATUS, 0, true)]);
    assert!(r.needs_reset());
}

#[test]
fn a_descriptor_loop_needs_reset_and_does_not_hang() {
    let mut r = rig("loop", false);
    r.header(0, 0);
    // Slots 0 and 1 point at each other.
    r.submit_raw(&[
        Desc {
            addr: HEADER,
            len: 16,
            flags: DESC_NEXT,
            next: 1,
        },
        Desc {
            addr: DATA,
            len: 512,
            flags: DESC_NEXT | DESC_WRITE,
            next: 0,
        },
    ]);
    assert!(r.needs_reset());
}

#[test]
fn a_status_byte_outside_guest_memory_needs_reset() {
    let mut r = rig("statusoutside", false);
    r.header(0, 0);
    r.submit(&[(HEADER, 16, false), (0x7fff_0000, 1, true)]);
    assert!(r.needs_reset());
}

#[test]
fn a_bogus_available_index_needs_reset() {
    let mut r = rig("availidx", false);
    // Claim 1000 new buffers in a 256-entry ring.
    let avail = r.driver.queues[0].desc_table() + 16 * u64::from(QUEUE_SIZE);
    r.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    r.run();
    assert!(r.needs_reset());
}

#[test]
fn device_works_again_after_reset_and_reinitialisation() {
    let mut r = rig("reinit", false);
    r.header(0, 0);
    r.submit(&[(HEADER, 16, false), (DATA, 512, false)]);
    assert!(r.needs_reset());
    r.reinit();
    assert_eq!(r.request(0, 5, 512, true).0, OK);
}

/// `count` reads of one sector each, sector i into DATA + 512 i, status
/// at STATUS + i, all made available before one notification.
fn add_reads(r: &mut Rig, count: u64) {
    for i in 0..count {
        r.mem.write_obj(0u32, GuestAddress(HEADER + 16 * i)).unwrap();
        r.mem
            .write_obj(i, GuestAddress(HEADER + 16 * i + 8))
            .unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        r.driver.queues[0].add_chain(
            &r.mem,
            &[
                (HEADER + 16 * i, 16, false),
                (DATA + 512 * i, 512, true),
                (STATUS + i, 1, true),
            ],
        );
    }
}

/// The reads [`add_reads`] made are done, each with its sector.
fn assert_reads_done(r: &Rig, count: u64) {
    for i in 0..count {
        let s: u8 = r.mem.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(s, OK, "request {i}");
        let b: u8 = r.mem.read_obj(GuestAddress(DATA + 512 * i)).unwrap();
        assert_eq!(b, i as u8, "request {i}");
    }
}

#[test]
fn many_requests_in_one_notification_all_complete() {
    let mut r = rig("batch", false);
    add_reads(&mut r, 8);
    r.serve();
    assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 8);
    assert_reads_done(&r, 8);
}

#[test]
fn one_wakeup_serves_at_most_a_budget_of_requests_and_asks_for_another() {
    // A guest keeping its queue full cannot hold the event loop (and the
    // transport's lock) for longer than REQUEST_BUDGET requests: the device
    // stops there, and the transport re-signals the queue's eventfd so the
    // event loop comes back after serving everything else.
    let mut r = rig("budget", false);
    let total = REQUEST_BUDGET as u64 + 5;
    for i in 0..total {
        r.mem
            .write_obj(
                virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID,
                GuestAddress(HEADER + 16 * i),
            )
            .unwrap();
        r.driver.queues[0].add_chain(
            &r.mem,
            &[
                (HEADER + 16 * i, 16, false),
                (DATA + 32 * i, 20, true),
                (STATUS + i, 1, true),
            ],
        );
    }
    let event = r.transport.queue_events()[0].try_clone().unwrap();
    let _ = event.read();
    let mut served = Vec::new();
    loop {
        r.serve();
        let used = r.driver.queues[0].take_used(&r.mem).len();
        served.push(used);
        if event.read().is_err() {
            break; // no re-signal: the ring is drained
        }
        assert!(served.len() < 10, "{served:?}");
    }
    let budget = REQUEST_BUDGET as usize;
    assert_eq!(served, [budget, 5]);
    assert!(!r.needs_reset());
}

#[test]
fn a_request_behind_an_indirect_table_needs_reset() {
    // moat never offers VIRTIO_F_INDIRECT_DESC; a driver that uses it
    // anyway gets NEEDS_RESET, not a request read through the table.
    let mut r = rig("indirect", false);
    let table = 0xa_0000u64;
    let entries = [
        (HEADER, 16u32, DESC_NEXT, 1u16),
        (DATA, 512, DESC_NEXT | DESC_WRITE, 2),
        (STATUS, 1, DESC_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.iter().enumerate() {
        let at = table + 16 * i as u64;
        r.mem.write_obj(*addr, GuestAddress(at)).unwrap();
        r.mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
        r.mem.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        r.mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
    }
    r.header(0, 0);
    let (status, _) = r.submit_raw(&[Desc {
        addr: table,
        len: 48,
        flags: virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        next: 0,
    }]);
    assert_eq!(status, 0xff, "the request was not carried out");
    assert!(r.needs_reset());
}

#[test]
fn data_may_share_a_descriptor_with_the_header_or_the_status() {
    let mut r = rig("shared", false);
    // A write whose header and data are one readable buffer.
    r.header(1, 2);
    r.mem
        .write_slice(&[0x5a; 512], GuestAddress(HEADER + 16))
        .unwrap();
    assert_eq!(
        r.submit(&[(HEADER, 16 + 512, false), (STATUS, 1, true)]),
        (OK, 1)
    );
    assert!(r.disk_bytes()[1024..1536].iter().all(|b| *b == 0x5a));
    // A read whose data and status are one writable buffer.
    r.header(0, 5);
    r.mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    r.driver.queues[0].add_chain(&r.mem, &[(HEADER, 16, false), (DATA, 513, true)]);
    r.serve();
    let used = r.driver.queues[0].take_used(&r.mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [513]);
    let mut got = [0u8; 513];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 5));
    assert_eq!(got[512], OK);
}

#[test]
fn scattered_segments_read_and_write_in_order() {
    let mut r = rig("scatter", false);
    // 64 segments of 512 bytes, each followed by a 512-byte gap.
    let segment = |i: u64| DATA + i * 1024;
    let chain = |device_writes: bool| {
        let mut chain = vec![(HEADER, 16, false)];
        chain.extend((0..64).map(|i| (segment(i), 512, device_writes)));
        chain.push((STATUS, 1, true));
        chain
    };
    r.header(0, 40);
    assert_eq!(r.submit(&chain(true)), (OK, 64 * 512 + 1));
    for i in 0..64 {
        let mut got = [0u8; 512];
        r.mem
            .read_slice(&mut got, GuestAddress(segment(i)))
            .unwrap();
        assert!(got.iter().all(|b| *b == (40 + i) as u8), "segment {i}");
    }
    for i in 0..64 {
        r.mem
            .write_slice(&[i as u8 ^ 0xa0; 512], GuestAddress(segment(i)))
            .unwrap();
    }
    r.header(1, 0);
    assert_eq!(r.submit(&chain(false)), (OK, 1));
    let disk = r.disk_bytes();
    for i in 0..64 {
        let sector = &disk[i * 512..(i + 1) * 512];
        assert!(sector.iter().all(|b| *b == i as u8 ^ 0xa0), "sector {i}");
    }
}

#[test]
fn with_event_idx_interrupts_follow_used_event_and_avail_event_follows_the_device() {
    let mut r = rig("event-idx", false);
    assert_eq!(r.request(0, 0, 512, true).0, OK);
    assert_eq!(r.irq.status() & 1, 1, "used_event 0 asks for the first");
    r.irq.ack(1);
    // The device has consumed one request: notify it at the next.
    assert_eq!(r.driver.queues[0].avail_event(&r.mem), 1);
    // The driver asks for no interrupt before the used index passes 3.
    r.driver.queues[0].set_used_event(&r.mem, 3);
    r.header(0, 0);
    r.driver.queues[0].add_chain(
        &r.mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    r.serve();
    assert_eq!(r.irq.status() & 1, 0, "used index 2: no interrupt yet");
    assert_eq!(r.driver.queues[0].avail_event(&r.mem), 2);
    r.driver.queues[0].add_chain(
        &r.mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    r.driver.queues[0].add_chain(
        &r.mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    r.serve();
    assert_eq!(r.irq.status() & 1, 1, "used index 4 passed 3");
    assert_eq!(r.driver.queues[0].avail_event(&r.mem), 4);
}

#[test]
fn random_hostile_chains_never_panic_or_write_a_read_only_disk() {
    use crate::virtio::test_driver::Rng;
    let (mut ok, mut used, mut resets) = (0, 0, 0);
    for seed in 1..=20 {
        let mut rng = Rng::new(seed);
        let mut r = rig(&format!("random-{seed}"), true);
        let before = r.disk_bytes();
        for _ in 0..200 {
            // Random request headers, so some chains parse as reads or writes.
            r.header(rng.pick(&[0, 1, 4, 8, 99]), rng.below(200));
            if rng.below(2) == 0 {
                // A well-formed request among the hostile ones.
                let data = 512 * (1 + rng.below(8)) as u32;
                r.driver.queues[0].add_chain(
                    &r.mem,
                    &[(HEADER, 16, false), (DATA, data, true), (STATUS, 1, true)],
                );
            } else {
                let descs = rng.hostile_descs(0x10_0000, QUEUE_SIZE);
                r.driver.queues[0].add_raw(&r.mem, &descs);
            }
            if rng.below(3) == 0 {
                r.serve();
                let done = r.driver.queues[0].take_used(&r.mem);
                used += done.len();
                ok += done.iter().filter(|u| u.1 > 1).count();
            }
            if r.needs_reset() {
                resets += 1;
                let features = transport_features(&mut r.transport);
                r.driver = Driver::init(&mut r.transport, &r.mem, features, &[QUEUE_SIZE])
                    .unwrap_or_else(|e| panic!("seed {seed}: re-init failed: {e}"));
            }
        }
        assert_eq!(r.disk_bytes(), before, "seed {seed}");
    }
    // The run exercised the device, not only its error paths.
    assert!(
        ok > 0 && used > 100 && resets > 0,
        "ok {ok}, used {used}, resets {resets}"
    );
}

#[test]
fn serving_requests_allocates_nothing() {
    let mut r = rig("no-alloc", false);
    // Warm: the asynchronous engine takes its own handle on guest memory
    // (which allocates) at its first request.
    assert_eq!(r.request(0, 0, 512, true).0, OK);
    // (type, data bytes, device writes the data): read, write, flush, get-id.
    for (kind, len, device_writes) in [
        (0, 4096, true),
        (1, 4096, false),
        (4, 0, false),
        (8, 20, true),
    ] {
        // Two at once, with the data split in two descriptors, as well as one.
        for split in [false, true] {
            r.header(kind, 2);
            let mut chain = vec![(HEADER, 16, false)];
            if split {
                chain.push((DATA, len / 2, device_writes));
                chain.push((DATA + u64::from(len / 2), len - len / 2, device_writes));
            } else if len > 0 {
                chain.push((DATA, len, device_writes));
            }
            chain.push((STATUS, 1, true));
            r.driver.queues[0].add_chain(&r.mem, &chain);
            r.driver.queues[0].add_chain(&r.mem, &chain);
            let allocations = crate::alloc_count::allocations(|| r.serve());
            let used = r.driver.queues[0].take_used(&r.mem);
            assert_eq!(used.len(), 2, "type {kind}");
            assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
            assert_eq!(allocations, 0, "type {kind}, split {split}");
        }
    }
}
