//! virtio-net driven through the mmio transport by the test driver, with a
//! fake TAP.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_driver::{indirect, Desc, Driver, DESC_NEXT, DESC_WRITE};

#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    refuse_sends: bool,
    offload: Option<u32>,
    broken: bool,
    /// How many buffers the device offered for the last frame read.
    last_frame_buffers: usize,
}

struct FakeTap {
    wire: Arc<Mutex<Wire>>,
    fd: EventFd,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn recv_into(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        let mut wire = self.wire.lock().unwrap();
        if wire.broken {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        // Like readv(2), which takes at most UIO_MAXIOV buffers.
        if bufs.len() > 1024 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        match wire.to_guest.pop_front() {
            Some(frame) => {
                wire.last_frame_buffers = bufs.len();
                // Like a TAP: what does not fit is cut off.
                let mut rest = &frame[..];
                for buf in bufs {
                    let n = buf.len().min(rest.len());
                    buf.copy_from(&rest[..n]);
                    rest = &rest[n..];
                }
                Ok(frame.len() - rest.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn send_from(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        let mut frame = Vec::new();
        for buf in bufs {
            let start = frame.len();
            frame.resize(start + buf.len(), 0);
            buf.copy_to(&mut frame[start..]);
        }
        let mut wire = self.wire.lock().unwrap();
        if wire.refuse_sends {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let len = frame.len();
        wire.from_guest.push(frame);
        Ok(len)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.wire.lock().unwrap().offload = Some(flags);
        Ok(())
    }
}

const MAC: [u8; 6] = [0x02, 1, 2, 3, 4, 5];
const BUFS: u64 = 0x8_0000;

struct Rig {
    transport: MmioTransport,
    driver: Driver,
    mem: GuestMemoryMmap,
    wire: Arc<Mutex<Wire>>,
    irq: Arc<Interrupt>,
}

fn rig(features: u64) -> Rig {
    let wire = Arc::new(Mutex::new(Wire::default()));
    let tap = FakeTap {
        wire: wire.clone(),
        fd: EventFd::new(0).unwrap(),
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let mut transport = MmioTransport::new(
        Box::new(Net::new(Box::new(tap), MAC, true)),
        mem.clone(),
        irq.clone(),
    )
    .unwrap();
    let driver = Driver::init(&mut transport, &mem, features, &[QUEUE_SIZE, QUEUE_SIZE]).unwrap();
    Rig {
        transport,
        driver,
        mem,
        wire,
        irq,
    }
}

fn all_features() -> u64 {
    VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF
}

/// A frame: zeroed vnet header, then `len` payload bytes counting up
/// modulo 251 (a period no buffer size here is a multiple of, so bytes
/// landing at the wrong offset show).
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_LEN];
    f.extend((0..len).map(|i| (i % 251) as u8));
    f
}

impl Rig {
    fn rx_buffers(&mut self, count: u64, size: u32) {
        for i in 0..count {
            self.driver.queues[0].add_chain(&self.mem, &[(BUFS + i * 0x1_0000, size, true)]);
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn needs_reset(&self) -> bool {
        self.transport.status() & 0x40 != 0
    }
}

#[test]
fn offers_version_1_mac_and_mergeable_buffers_and_reports_the_mac() {
    let net = Net::new(
        Box::new(FakeTap {
            wire: Arc::default(),
            fd: EventFd::new(0).unwrap(),
        }),
        MAC,
        false,
    );
    assert_eq!(net.features(), all_features());
    let mut mac = [0u8; 8];
    net.read_config(0, &mut mac);
    assert_eq!(mac, [2, 1, 2, 3, 4, 5, 0, 0]);
}

#[test]
fn offloads_are_offered_and_the_tap_follows_what_the_guest_accepts() {
    let offloads = 1 << 0 | 1 << 1 | 1 << 7 | 1 << 8 | 1 << 11 | 1 << 12;
    let net = Net::new(
        Box::new(FakeTap {
            wire: Arc::default(),
            fd: EventFd::new(0).unwrap(),
        }),
        MAC,
        true,
    );
    assert_eq!(net.features(), all_features() | offloads);
    // Receive checksum + TSO4 accepted: the TAP may pass TSO4 frames.
    let r = rig(all_features() | 1 << 1 | 1 << 7 | 1 << 11);
    assert_eq!(
        r.wire.lock().unwrap().offload,
        Some(TUN_F_CSUM | TUN_F_TSO4)
    );
    // No receive offloads: the TAP must finish every frame.
    let r = rig(all_features() | 1 << 0 | 1 << 11);
    assert_eq!(r.wire.lock().unwrap().offload, Some(0));
    // TSO without checksum offload is not valid; the TAP gets neither.
    assert_eq!(tun_offload_flags(1 << 7), 0);
}

#[test]
fn transmitted_frames_reach_the_backend_whole() {
    let mut r = rig(all_features());
    let f = frame(100);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    // Header and payload in separate descriptors, as Linux does.
    r.driver.queues[1].add_chain(
        &r.mem,
        &[(BUFS, NET_HDR_LEN as u32, false), (BUFS + 12, 100, false)],
    );
    r.transport.process_queue(1);
    assert_eq!(r.wire.lock().unwrap().from_guest, vec![f]);
    assert_eq!(r.driver.queues[1].take_used(&r.mem), vec![(0, 0)]);
    assert_eq!(r.irq.status() & 1, 1);
}

#[test]
fn a_received_frame_fills_one_buffer_with_num_buffers_1() {
    let mut r = rig(VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    r.rx_buffers(2, 2048);
    r.wire.lock().unwrap().to_guest.push_back(frame(500));
    r.transport.process_backend();
    assert_eq!(r.driver.queues[0].take_used(&r.mem), vec![(0, 512)]);
    let got = r.read(BUFS, 512);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[12..], frame(500)[12..]);
}

#[test]
fn mergeable_buffers_split_a_large_frame_and_count_them() {
    let mut r = rig(all_features());
    r.rx_buffers(4, 1024);
    r.wire.lock().unwrap().to_guest.push_back(frame(3000 - 12));
    r.transport.process_backend();
    let used = r.driver.queues[0].take_used(&r.mem);
    assert_eq!(used, vec![(0, 1024), (1, 1024), (2, 952)]);
    let first = r.read(BUFS, 1024);
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
    let mut whole = first;
    whole.extend(r.read(BUFS + 0x1_0000, 1024));
    whole.extend(r.read(BUFS + 0x2_0000, 952));
    assert_eq!(whole[12..], frame(3000 - 12)[12..]);
}

#[test]
fn frames_wait_for_buffers_instead_of_being_dropped() {
    let mut r = rig(all_features());
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(100), frame(200)]);
    r.transport.process_backend();
    assert!(!r.transport.backend_wanted(), "stop polling the TAP");
    assert!(r.driver.queues[0].take_used(&r.mem).is_empty());
    // A frame larger than the one buffer offered waits too (mergeable).
    r.rx_buffers(1, 64);
    r.transport.process_queue(0);
    assert!(r.driver.queues[0].take_used(&r.mem).is_empty());
    r.rx_buffers(3, 2048);
    r.transport.process_queue(0);
    assert_eq!(
        r.driver.queues[0].take_used(&r.mem).len(),
        3,
        "64+48 split, then 212"
    );
    assert!(r.transport.backend_wanted(), "poll the TAP again");
    assert_eq!(r.wire.lock().unwrap().to_guest.len(), 0);
}

#[test]
fn a_frame_too_big_for_a_non_mergeable_buffer_is_dropped_and_counted() {
    let mut r = rig(VIRTIO_F_VERSION_1);
    r.rx_buffers(2, 100);
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(500), frame(50)]);
    r.transport.process_backend();
    assert_eq!(r.driver.queues[0].take_used(&r.mem), vec![(0, 0), (1, 62)]);
}

#[test]
fn one_wakeup_sends_at_most_a_budget_of_frames_and_asks_for_another() {
    let mut r = rig(all_features());
    let f = frame(60);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let total = TX_BUDGET + 3;
    for _ in 0..total {
        r.driver.queues[1].add_chain(&r.mem, &[(BUFS, f.len() as u32, false)]);
    }
    let event = r.transport.queue_events()[1].try_clone().unwrap();
    let _ = event.read();
    let mut sent = Vec::new();
    loop {
        r.transport.process_queue(1);
        sent.push(r.driver.queues[1].take_used(&r.mem).len());
        if event.read().is_err() {
            break;
        }
        assert!(sent.len() < 10, "{sent:?}");
    }
    assert_eq!(sent, [TX_BUDGET, 3]);
    assert_eq!(r.wire.lock().unwrap().from_guest.len(), total);
}

#[test]
fn a_transmit_descriptor_chained_to_itself_is_dropped_not_sent_256_times() {
    let mut r = rig(all_features());
    let f = frame(60);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let head = r.driver.queues[1].add_raw(
        &r.mem,
        &[Desc {
            addr: BUFS,
            len: f.len() as u32,
            flags: DESC_NEXT,
            next: 0,
        }],
    );
    assert_eq!(head, 0);
    r.transport.process_queue(1);
    assert!(
        r.wire.lock().unwrap().from_guest.is_empty(),
        "a looping chain was sent"
    );
    let dropped = r
        .transport
        .counters()
        .into_iter()
        .find(|(name, _)| *name == "tx_dropped_frames")
        .map(|(_, n)| n);
    assert_eq!(dropped, Some(1));
    assert!(!r.needs_reset());
    // The next, well-formed frame goes out.
    r.driver.queues[1].add_chain(&r.mem, &[(BUFS, f.len() as u32, false)]);
    r.transport.process_queue(1);
    assert_eq!(r.wire.lock().unwrap().from_guest, vec![f]);
}

#[test]
fn indirect_descriptors_never_offered_are_not_followed() {
    let mut r = rig(all_features());
    let f = frame(60);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let desc = indirect(&r.mem, 0x30_0000, BUFS, f.len() as u32, 0);
    r.driver.queues[1].add_raw(&r.mem, &[desc]);
    r.transport.process_queue(1);
    assert!(
        r.wire.lock().unwrap().from_guest.is_empty(),
        "an indirect frame went out"
    );
    assert_eq!(
        r.driver.queues[1].take_used(&r.mem).len(),
        1,
        "the chain goes back"
    );
    // A receive buffer behind an indirect table is given back unused.
    let desc = indirect(&r.mem, 0x30_1000, BUFS + 0x1000, 4096, DESC_WRITE);
    r.driver.queues[0].add_raw(&r.mem, &[desc]);
    r.wire.lock().unwrap().to_guest.push_back(frame(100));
    r.transport.process_queue(0);
    assert_eq!(r.driver.queues[0].take_used(&r.mem), vec![(0, 0)]);
    assert!(!r.needs_reset());
}

#[test]
fn hostile_transmit_chains_drop_the_frame_not_the_device() {
    let mut r = rig(all_features());
    // Outside guest memory; device-writable only; far too long; too short.
    r.driver.queues[1].add_chain(&r.mem, &[(0x7fff_0000, 100, false)]);
    r.driver.queues[1].add_chain(&r.mem, &[(BUFS, 100, true)]);
    r.driver.queues[1].add_chain(&r.mem, &[(BUFS, 0x2_0000, false)]);
    r.driver.queues[1].add_chain(&r.mem, &[(BUFS, 4, false)]);
    r.transport.process_queue(1);
    assert_eq!(r.driver.queues[1].take_used(&r.mem).len(), 4);
    assert!(r.wire.lock().unwrap().from_guest.is_empty());
    assert!(!r.needs_reset());
}

#[test]
fn a_backend_that_refuses_a_frame_costs_that_frame_only() {
    let mut r = rig(all_features());
    r.wire.lock().unwrap().refuse_sends = true;
    r.mem.write_slice(&frame(60), GuestAddress(BUFS)).unwrap();
    r.driver.queues[1].add_chain(&r.mem, &[(BUFS, 72, false)]);
    r.transport.process_queue(1);
    assert_eq!(r.driver.queues[1].take_used(&r.mem), vec![(0, 0)]);
    assert!(!r.needs_reset());
}

#[test]
fn receive_buffers_the_device_cannot_use_go_back_unused() {
    let mut r = rig(all_features());
    r.driver.queues[0].add_raw(
        &r.mem,
        &[Desc {
            addr: BUFS,
            len: 2048,
            flags: 0,
            next: 0,
        }],
    );
    r.driver.queues[0].add_raw(
        &r.mem,
        &[Desc {
            addr: 0x7fff_0000,
            len: 2048,
            flags: DESC_WRITE,
            next: 0,
        }],
    );
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(100), frame(100)]);
    // And one too short for the vnet header.
    r.driver.queues[0].add_chain(&r.mem, &[(BUFS, 8, true)]);
    r.transport.process_backend();
    assert_eq!(
        r.driver.queues[0].take_used(&r.mem),
        vec![(0, 0), (1, 0), (2, 0)]
    );
    assert!(!r.needs_reset());
    // The frames wait for buffers the device can use.
    assert!(!r.transport.backend_wanted());
    r.rx_buffers(2, 2048);
    r.transport.process_queue(0);
    let used = r.driver.queues[0].take_used(&r.mem);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [112, 112]);
}

#[test]
fn a_failing_backend_is_no_longer_polled() {
    let mut r = rig(all_features());
    r.rx_buffers(2, 2048);
    r.wire.lock().unwrap().broken = true;
    r.transport.process_backend();
    assert!(!r.transport.backend_wanted());
    assert!(!r.needs_reset(), "transmit still works");
}

#[test]
fn a_bogus_available_index_needs_reset() {
    let mut r = rig(all_features());
    let avail = r.driver.queues[1].desc_table() + 16 * u64::from(QUEUE_SIZE);
    r.mem.write_obj(999u16, GuestAddress(avail + 2)).unwrap();
    r.transport.process_queue(1);
    assert!(r.needs_reset());
}

#[test]
fn default_macs_are_local_unicast_and_stable() {
    let a = default_mac("tap0", 0);
    assert_eq!(a[0], 0x02);
    assert_eq!(a, default_mac("tap0", 0));
    assert_ne!(a, default_mac("tap1", 0));
    assert_ne!(a, default_mac("tap0", 1));
}

#[test]
fn frames_fill_4_kib_buffers_in_order_up_to_the_largest_frame() {
    let mut r = rig(all_features());
    // 17 buffers of 4 KiB hold the largest frame; then 3 spare.
    for i in 0..20u64 {
        r.driver.queues[0].add_chain(&r.mem, &[(BUFS + i * 0x1000, 4096, true)]);
    }
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(6000), frame(100)]);
    r.transport.process_backend();
    assert!(
        r.wire.lock().unwrap().last_frame_buffers > 1,
        "read into guest buffers"
    );
    let used = r.driver.queues[0].take_used(&r.mem);
    assert_eq!(used, vec![(0, 4096), (1, 1916), (2, 112)]);
    let first = r.read(BUFS, 4096);
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2);
    let mut whole = first;
    whole.extend(r.read(BUFS + 0x1000, 1916));
    assert_eq!(whole[12..], frame(6000)[12..]);
    let third = r.read(BUFS + 0x2000, 112);
    assert_eq!(u16::from_le_bytes([third[10], third[11]]), 1);
    assert_eq!(third[12..], frame(100)[12..]);
    // 17 buffers left: still room for the largest frame.
    r.wire.lock().unwrap().to_guest.push_back(frame(65_535));
    r.transport.process_backend();
    let used = r.driver.queues[0].take_used(&r.mem);
    assert_eq!(used.len(), 17);
    assert_eq!(
        used.iter().map(|u| u.1 as usize).sum::<usize>(),
        65_535 + 12
    );
}

#[test]
fn reads_take_as_many_buffers_as_recent_frames_needed_and_bounce_the_rest() {
    let mut r = rig(all_features());
    for i in 0..5u64 {
        r.driver.queues[0].add_chain(&r.mem, &[(BUFS + i * 0x1000, 4096, true)]);
    }
    // Nothing received yet: one guest buffer, then the bounce buffer.
    r.wire.lock().unwrap().to_guest.push_back(frame(6000));
    r.transport.process_backend();
    assert_eq!(r.wire.lock().unwrap().last_frame_buffers, 2);
    // The next frame of that size goes wholly into guest buffers.
    r.wire.lock().unwrap().to_guest.push_back(frame(6000));
    r.transport.process_backend();
    assert_eq!(r.wire.lock().unwrap().last_frame_buffers, 3);
    assert_eq!(
        r.driver.queues[0].take_used(&r.mem),
        vec![(0, 4096), (1, 1916), (2, 4096), (3, 1916)]
    );
    for first in [BUFS, BUFS + 0x2000] {
        let mut whole = r.read(first, 2 * 4096);
        assert_eq!(u16::from_le_bytes([whole[10], whole[11]]), 2);
        whole.truncate(6012);
        assert_eq!(whole[12..], frame(6000)[12..]);
    }
    // A frame bigger than the one buffer left: its start lands in that
    // buffer, the rest waits in the bounce buffer for more buffers.
    r.wire.lock().unwrap().to_guest.push_back(frame(10_000));
    r.transport.process_backend();
    assert!(r.driver.queues[0].take_used(&r.mem).is_empty());
    assert!(!r.transport.backend_wanted(), "stop polling the TAP");
    for i in 5..7u64 {
        r.driver.queues[0].add_chain(&r.mem, &[(BUFS + i * 0x1000, 4096, true)]);
    }
    r.transport.process_queue(0);
    assert_eq!(
        r.driver.queues[0].take_used(&r.mem),
        vec![(4, 4096), (5, 4096), (6, 10_012 - 8192)]
    );
    let mut whole = r.read(BUFS + 0x4000, 3 * 4096);
    assert_eq!(u16::from_le_bytes([whole[10], whole[11]]), 3);
    whole.truncate(10_012);
    assert_eq!(whole[12..], frame(10_000)[12..]);
    assert!(r.transport.backend_wanted());
}

#[test]
fn chains_of_many_descriptors_never_cost_a_read_more_iovecs_than_readv_takes() {
    let mut r = rig(all_features());
    // One chain of 256 16-byte buffers, made available 40 times over (a
    // driver may repeat a head): 17 such chains hold the largest frame,
    // with 4,352 descriptors, more than readv(2) takes (1,024).
    let pieces: Vec<(u64, u32, bool)> = (0..256).map(|i| (BUFS + i * 16, 16, true)).collect();
    for _ in 0..40 {
        r.driver.queues[0].add_chain(&r.mem, &pieces);
    }
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(65_535), frame(65_535)]);
    r.transport.process_backend();
    assert!(r.wire.lock().unwrap().to_guest.is_empty(), "both received");
    assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 2 * 17);
    assert!(r.transport.backend_wanted(), "the TAP is still polled");
}

#[test]
fn without_mergeable_buffers_a_frame_is_read_into_the_one_buffer_it_fits() {
    let mut r = rig(VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    r.rx_buffers(2, 1536);
    r.wire
        .lock()
        .unwrap()
        .to_guest
        .extend([frame(1500), frame(2000)]);
    r.transport.process_backend();
    assert_eq!(
        r.wire.lock().unwrap().last_frame_buffers,
        2,
        "the guest buffer, then the bounce tail"
    );
    // The second frame does not fit a buffer: dropped, buffer given back.
    assert_eq!(
        r.driver.queues[0].take_used(&r.mem),
        vec![(0, 1512), (1, 0)]
    );
    assert_eq!(r.read(BUFS + 12, 1500), frame(1500)[12..]);
}

#[test]
fn a_reset_gives_up_the_buffers_taken_off_the_ring() {
    let mut r = rig(all_features());
    r.rx_buffers(3, 2048);
    r.wire.lock().unwrap().to_guest.push_back(frame(100));
    r.transport.process_backend();
    assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 1);
    // Reset and bring the device up again with fresh rings: the two
    // buffers it held from the old ring must not be used.
    r.transport.write(0x70, &0u32.to_le_bytes());
    r.driver = Driver::init(
        &mut r.transport,
        &r.mem,
        all_features(),
        &[QUEUE_SIZE, QUEUE_SIZE],
    )
    .unwrap();
    r.driver.queues[0].add_chain(&r.mem, &[(BUFS + 0x8_0000, 2048, true)]);
    r.wire.lock().unwrap().to_guest.push_back(frame(50));
    r.transport.process_backend();
    assert_eq!(r.driver.queues[0].take_used(&r.mem), vec![(0, 62)]);
    assert_eq!(r.read(BUFS + 0x8_0000 + 12, 50), frame(50)[12..]);
}

#[test]
fn with_event_idx_a_blocked_receiver_asks_for_the_next_buffer() {
    let mut r = rig(all_features());
    r.rx_buffers(1, 64);
    r.wire.lock().unwrap().to_guest.push_back(frame(100));
    r.transport.process_backend();
    // The 112-byte frame waits; the device has taken the one buffer and
    // wants to hear about the next.
    assert!(!r.transport.backend_wanted());
    assert_eq!(r.driver.queues[0].avail_event(&r.mem), 1);
    r.rx_buffers(1, 2048);
    r.transport.process_queue(0);
    assert_eq!(r.driver.queues[0].take_used(&r.mem).len(), 2);
    assert!(r.transport.backend_wanted());
}

#[test]
fn with_event_idx_transmit_asks_for_the_frame_after_those_it_sent() {
    let mut r = rig(all_features());
    let f = frame(60);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    for _ in 0..3 {
        r.driver.queues[1].add_chain(&r.mem, &[(BUFS, f.len() as u32, false)]);
    }
    r.transport.process_queue(1);
    assert_eq!(r.wire.lock().unwrap().from_guest.len(), 3);
    assert_eq!(r.driver.queues[1].avail_event(&r.mem), 3);
}

#[test]
fn without_mergeable_buffers_one_big_chain_takes_a_frame_directly() {
    // Linux's "big packets" receive buffers: one chain of many pages.
    let mut r = rig(VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC);
    let pages: Vec<(u64, u32, bool)> = (0..17).map(|i| (BUFS + i * 0x1000, 4096, true)).collect();
    r.driver.queues[0].add_chain(&r.mem, &pages);
    r.wire.lock().unwrap().to_guest.push_back(frame(5000));
    r.transport.process_backend();
    let used = r.driver.queues[0].take_used(&r.mem);
    let bufs = r.wire.lock().unwrap().last_frame_buffers;
    assert_eq!(
        (used, bufs),
        (vec![(0, 5012)], 17),
        "read into guest buffers"
    );
    let got = r.read(BUFS, 5012);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[12..], frame(5000)[12..]);
}

#[test]
fn random_hostile_chains_never_panic_and_sent_frames_are_well_formed() {
    use crate::virtio::test_driver::Rng;
    let (mut sent, mut used, mut resets) = (0, 0, 0);
    for seed in 1..=20 {
        let mut rng = Rng::new(seed);
        let mut r = rig(all_features());
        for _ in 0..300 {
            match rng.below(6) {
                0 | 1 => {
                    let queue = rng.below(2) as usize;
                    let descs = rng.hostile_descs(0x40_0000, QUEUE_SIZE);
                    r.driver.queues[queue].add_raw(&r.mem, &descs);
                }
                2 => {
                    let len = rng.pick(&[0, 5, 100, 1500, 9000, 65_535]);
                    r.wire.lock().unwrap().to_guest.push_back(frame(len));
                }
                3 => r.transport.process_backend(),
                4 => r.transport.process_queue(rng.below(2) as usize),
                _ => {
                    used += r.driver.queues[0].take_used(&r.mem).len();
                    used += r.driver.queues[1].take_used(&r.mem).len();
                }
            }
            if r.needs_reset() {
                resets += 1;
                // What a driver does after NEEDS_RESET: reset and start over.
                r.driver = Driver::init(
                    &mut r.transport,
                    &r.mem,
                    all_features(),
                    &[QUEUE_SIZE, QUEUE_SIZE],
                )
                .unwrap_or_else(|e| panic!("seed {seed}: re-init failed: {e}"));
            }
        }
        sent += r.wire.lock().unwrap().from_guest.len();
        for f in r.wire.lock().unwrap().from_guest.iter() {
            assert!(
                (NET_HDR_LEN..=MAX_FRAME).contains(&f.len()),
                "seed {seed}: sent {} bytes",
                f.len()
            );
        }
    }
    // The run exercised the device, not only its error paths.
    assert!(
        sent > 20 && used > 100,
        "sent {sent}, used {used}, resets {resets}"
    );
}

/// A backend that allocates nothing: it counts what is sent and answers
/// each receive, while `pending` says frames wait, with `frame`.
struct Echo {
    frame: Vec<u8>,
    pending: Arc<Mutex<usize>>,
    sent: Arc<Mutex<usize>>,
    fd: EventFd,
}

impl AsRawFd for Echo {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for Echo {
    fn recv_into(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        let mut pending = self.pending.lock().unwrap();
        if *pending == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        *pending -= 1;
        let mut rest = &self.frame[..];
        for buf in bufs {
            let n = buf.len().min(rest.len());
            buf.copy_from(&rest[..n]);
            rest = &rest[n..];
        }
        Ok(self.frame.len() - rest.len())
    }
    fn send_from(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        let len = bufs.iter().map(|b| b.len()).sum();
        *self.sent.lock().unwrap() += 1;
        Ok(len)
    }
    fn set_offload(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn sending_and_receiving_allocate_nothing_once_warm() {
    // (guest features, receive buffer size, frame payload): Linux's
    // mergeable buffers of a page and its big buffers without them.
    for (features, buffer, payload) in [
        (all_features(), 4096, 1514),
        (all_features(), 4096, 65535 - NET_HDR_LEN),
        (VIRTIO_F_VERSION_1, MAX_FRAME as u32, 65535 - NET_HDR_LEN),
    ] {
        let (pending, sent) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
        let echo = Echo {
            frame: frame(payload),
            pending: pending.clone(),
            sent: sent.clone(),
            fd: EventFd::new(0).unwrap(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let mut transport = MmioTransport::new(
            Box::new(Net::new(Box::new(echo), MAC, true)),
            mem.clone(),
            irq,
        )
        .unwrap();
        let mut driver =
            Driver::init(&mut transport, &mem, features, &[QUEUE_SIZE, QUEUE_SIZE]).unwrap();
        let per_frame = (payload + NET_HDR_LEN).div_ceil(buffer as usize) as u64;
        for round in 0..3 {
            // Receive: buffers for two frames, two frames waiting.
            for i in 0..2 * per_frame {
                driver.queues[0].add_chain(&mem, &[(BUFS + i * u64::from(buffer), buffer, true)]);
            }
            *pending.lock().unwrap() = 2;
            let rx = crate::alloc_count::allocations(|| {
                transport.process_queue(0);
                transport.process_backend();
            });
            assert_eq!(*pending.lock().unwrap(), 0, "both frames read");
            let used = driver.queues[0].take_used(&mem);
            assert_eq!(used.len() as u64, 2 * per_frame);
            // Transmit: two frames, header and payload apart as Linux has them.
            for _ in 0..2 {
                driver.queues[1].add_chain(
                    &mem,
                    &[
                        (BUFS, NET_HDR_LEN as u32, false),
                        (BUFS + 12, payload as u32, false),
                    ],
                );
            }
            let tx = crate::alloc_count::allocations(|| transport.process_queue(1));
            assert_eq!(driver.queues[1].take_used(&mem).len(), 2);
            assert_eq!(*sent.lock().unwrap(), 2 * (round + 1));
            if round > 0 {
                assert_eq!((rx, tx), (0, 0), "buffer {buffer}, payload {payload}");
            }
        }
    }
}
