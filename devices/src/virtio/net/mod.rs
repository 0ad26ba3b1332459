//! virtio-net (virtio 1.2, 5.1) with a TAP backend.
//!
//! Queue 0 receives, queue 1 transmits. Frames keep the 12-byte
//! `virtio_net_hdr_v1` in front, which the TAP (opened with IFF_VNET_HDR)
//! reads and writes as is. With VIRTIO_NET_F_MRG_RXBUF a received frame may
//! span several receive buffers; `num_buffers` in its header says how many.
//!
//! Receive buffers are taken off the ring into a queue of their own (each
//! chain checked once). The TAP reads the next frame straight into as many
//! of them as recent frames needed, and what does not fit into a bounce
//! buffer, from where it is copied into the next buffers, waiting for the
//! driver to add some if need be: receiving never drops a frame for lack
//! of buffers. While a frame waits, the device asks the event loop to stop
//! polling the TAP (see [`VirtioDevice::backend_wanted`]).

mod tap;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use smallvec::SmallVec;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

pub use tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

use super::ring::{self, Ring};
use super::{
    DeviceError, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame: a 64 KiB packet plus Ethernet header, plus the vnet header.
pub const MAX_FRAME: usize = 65_550 + NET_HDR_LEN;
/// Most buffers one readv(2) takes (UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Where frames come from and go to: a TAP, or a fake one in tests.
pub trait NetBackend: Send + AsRawFd {
    /// Reads one frame (vnet header first) into `bufs`, in order; returns
    /// its length. `WouldBlock` when none waits.
    fn recv_into(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize>;
    /// Reads one frame into `buf`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_into(&[VolatileSlice::from(buf)])
    }
    /// Writes one frame (vnet header first) made of `bufs`, in order.
    fn send_from(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize>;
    /// Tells the backend which offloads the guest accepts for frames it
    /// receives (`TUN_F_*`): with none, the backend must hand over only
    /// complete, checksummed frames.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Checksum and segmentation offloads, both ways (virtio 1.2, 5.1.3):
/// the guest may send partially checksummed and TSO frames (the TAP
/// finishes them), and may receive them (the TAP stops finishing them).
const OFFLOAD_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6;

/// The TAP offload flags matching the receive offloads the guest accepted.
fn tun_offload_flags(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= TUN_F_CSUM;
        // TSO needs checksum offload (the kernel requires TUN_F_CSUM too).
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
    }
    flags
}

/// Counters of frames the device could not pass on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDrops {
    /// Frames the guest sent in malformed chains, or the backend refused.
    pub tx: u64,
    /// Received frames that did not fit the guest's buffers.
    pub rx: u64,
}

/// Frames and bytes that went through, for the metrics. Bytes count the
/// virtio-net header, as the guest's buffers hold it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames given to the guest.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames sent to the backend.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
}

/// A receive buffer taken off the ring: its head, and the guest memory of
/// its descriptors (all checked, all device-writable).
struct RxChain {
    head: u16,
    /// Linux posts one descriptor per buffer: two fit without allocating.
    parts: SmallVec<[(GuestAddress, usize); 2]>,
    len: usize,
}

/// Most frames sent in one wakeup of the event loop (see
/// [`VirtioDevice::wants_more`]).
pub const TX_BUDGET: usize = 128;

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    queues: Option<[Queue; 2]>,
    mergeable: bool,
    /// Receive buffers taken off the ring and not used yet, in ring order,
    /// and how many bytes they hold.
    rx_chains: VecDeque<RxChain>,
    rx_room: usize,
    /// A frame of `rx_len` bytes read from the backend and not yet given
    /// to the guest: its first `rx_in_place` bytes fill the first buffers
    /// in `rx_chains`, the rest is in this bounce buffer.
    rx_frame: Vec<u8>,
    rx_len: usize,
    rx_in_place: usize,
    /// About the largest recent frame: the largest one so far, decaying by
    /// a sixteenth with each frame.
    rx_recent: usize,
    /// The guest has no receive buffers for `rx_frame`.
    rx_blocked: bool,
    /// The backend failed a read (say, its interface was deleted): stop
    /// polling it, or a level-triggered error would spin the event loop.
    backend_broken: bool,
    drops: NetDrops,
    counters: NetCounters,
    /// The last transmit wakeup stopped at [`TX_BUDGET`].
    tx_more: bool,
    /// Offer checksum and TSO offloads.
    offload: bool,
}

impl Net {
    /// A device sending and receiving through `backend`, with address
    /// `mac`. With `offload`, checksum and TSO offloads are offered; the
    /// backend must then accept `set_offload`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6], offload: bool) -> Self {
        Self {
            backend,
            mac,
            queues: None,
            mergeable: false,
            rx_chains: VecDeque::new(),
            rx_room: 0,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_in_place: 0,
            rx_recent: 0,
            rx_blocked: false,
            backend_broken: false,
            drops: NetDrops::default(),
            counters: NetCounters::default(),
            tx_more: false,
            offload,
        }
    }

    /// Frames dropped so far.
    pub fn drops(&self) -> NetDrops {
        self.drops
    }

    fn rx_queue(&mut self) -> Option<&mut Queue> {
        self.queues.as_mut().map(|[rx, _]| rx)
    }

    fn tx_queue(&mut self) -> Option<&mut Queue> {
        self.queues.as_mut().map(|[_, tx]| tx)
    }

    /// Moves frames from the backend to the guest until the backend is
    /// empty or the guest is out of buffers, then interrupts the driver if
    /// it asked to hear of buffers used meanwhile.
    fn receive(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> Result<(), DeviceError> {
        ring::serve(self, Net::rx_queue, mem, interrupt, |net, ring| {
            net.receive_on(ring, mem)
        })
    }

    /// [`Self::receive`]'s work on the receive queue's `ring`.
    fn receive_on(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        loop {
            if self.rx_len == 0 {
                self.take_rx_chains(ring, mem, MAX_FRAME)?;
                // Straight into as many of the guest's buffers as recent
                // frames needed (each one more iovec for the TAP's read);
                // what does not fit goes to the bounce buffer.
                let mut slices = super::Slices::new();
                let mut room = 0;
                for chain in &self.rx_chains {
                    // One iovec is kept for the bounce buffer.
                    if room >= self.rx_recent.max(1)
                        || slices.len() + chain.parts.len() >= MAX_IOVECS
                    {
                        break;
                    }
                    for &(addr, len) in &chain.parts {
                        // Checked when the chain was taken; memory does not shrink.
                        let slice = mem
                            .get_slice(addr, len)
                            .map_err(|e| DeviceError(format!("rx buffer vanished: {e}")))?;
                        slices.push(slice);
                    }
                    room += chain.len;
                }
                if room < MAX_FRAME {
                    slices.push(VolatileSlice::from(&mut self.rx_frame[..MAX_FRAME - room]));
                }
                let read = self.backend.recv_into(&slices);
                drop(slices);
                match read {
                    Ok(0) => return Ok(()),
                    Ok(n) if n <= room => {
                        self.complete_direct(ring, mem, n)?;
                        continue;
                    }
                    Ok(n) => (self.rx_len, self.rx_in_place) = (n, room),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A broken backend loses its input, not the device.
                    Err(e) => {
                        log::error!(
                            "virtio-net: reading the TAP failed ({e}); the card receives nothing more"
                        );
                        self.backend_broken = true;
                        return Ok(());
                    }
                }
            }
            if !self.deliver(ring, mem)? {
                // Out of buffers: ask the driver to notify when it adds
                // some (with EVENT_IDX: at the next buffer after those
                // taken), unless it did while we looked.
                if ring.enable_notification()? {
                    continue;
                }
                self.rx_blocked = true;
                return Ok(());
            }
            (self.rx_len, self.rx_in_place) = (0, 0);
        }
    }

    /// Takes chains off the receive ring until `rx_chains` holds `want`
    /// bytes (one chain is enough without mergeable buffers) or the ring is
    /// empty. A chain the device cannot use (a readable descriptor, memory
    /// outside the guest, too short for a header) goes back used and empty.
    fn take_rx_chains(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
        want: usize,
    ) -> Result<(), DeviceError> {
        while self.rx_room < want && (self.mergeable || self.rx_chains.is_empty()) {
            let Some(head) = ring.pop()? else {
                break;
            };
            let mut parts = SmallVec::new();
            let mut len = 0usize;
            let mut usable = true;
            let mut chain = ring.chain(head);
            for d in chain.by_ref() {
                let part = (d.addr(), d.len() as usize);
                usable &= d.is_write_only() && mem.get_slice(part.0, part.1).is_ok();
                len = len.saturating_add(part.1);
                parts.push(part);
            }
            if usable && !chain.uses_indirect() && len >= NET_HDR_LEN {
                self.rx_room += len;
                self.rx_chains.push_back(RxChain { head, parts, len });
            } else {
                ring.add_used(head, 0)?;
            }
        }
        Ok(())
    }

    /// Gives the front `count` chains of `rx_chains` to the guest as one
    /// frame of `len` bytes already in them: `num_buffers` first, then the
    /// used elements.
    fn publish(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
        count: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        // num_buffers (virtio 1.2, 5.1.6.3.1): how many buffers this frame
        // uses, in the header at the start of the first one. Written before
        // the used elements, which hand the buffers to the guest.
        let first = self
            .rx_chains
            .front()
            .ok_or_else(|| DeviceError("no rx chain".into()))?;
        write_at(mem, &first.parts, 10, &(count as u16).to_le_bytes())?;
        let mut left = len;
        for chain in self.rx_chains.drain(..count) {
            let used = chain.len.min(left);
            left -= used;
            self.rx_room -= chain.len;
            ring.add_used(chain.head, used as u32)?;
        }
        Ok(())
    }

    /// How many chains from the front of `rx_chains` a frame of `len` bytes
    /// fills.
    fn chains_for(&self, len: usize) -> usize {
        let mut room = 0;
        self.rx_chains
            .iter()
            .take_while(|c| {
                let more = room < len;
                room += c.len;
                more
            })
            .count()
    }

    /// The backend read a frame of `len` bytes straight into `rx_chains`.
    fn complete_direct(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
        len: usize,
    ) -> Result<(), DeviceError> {
        if len < NET_HDR_LEN {
            // Not a frame; the buffers stay unused.
            self.drops.rx += 1;
            return Ok(());
        }
        let count = if self.mergeable {
            self.chains_for(len)
        } else {
            1
        };
        self.count_rx(len);
        self.publish(ring, mem, count, len)
    }

    fn count_rx(&mut self, len: usize) {
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += len as u64;
        self.rx_recent = len.max(self.rx_recent - self.rx_recent / 16);
    }

    /// Gives the frame read in part or whole into the bounce buffer to the
    /// guest. `Ok(false)`: not enough buffers yet (nothing consumed).
    fn deliver(&mut self, ring: &mut Ring<'_>, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let len = self.rx_len;
        if len < NET_HDR_LEN {
            self.drops.rx += 1;
            return Ok(true);
        }
        self.take_rx_chains(ring, mem, len)?;
        let count = if self.mergeable {
            if self.rx_room < len {
                return Ok(false);
            }
            self.chains_for(len)
        } else {
            match self.rx_chains.front() {
                None => return Ok(false),
                Some(chain) if chain.len < len => {
                    // Without mergeable buffers a frame must fit one buffer.
                    self.drops.rx += 1;
                    self.publish(ring, mem, 1, 0)?;
                    return Ok(true);
                }
                Some(_) => 1,
            }
        };
        // The chains filled by the read come first; the bounced rest
        // follows them.
        let mut offset = 0;
        for chain in self.rx_chains.iter().take(count) {
            let end = (offset + chain.len).min(len);
            if end > self.rx_in_place {
                let start = offset.max(self.rx_in_place);
                let bounced = &self.rx_frame[start - self.rx_in_place..end - self.rx_in_place];
                write_at(mem, &chain.parts, start - offset, bounced)?;
            }
            offset = end;
        }
        self.count_rx(len);
        self.publish(ring, mem, count, len)?;
        Ok(true)
    }

    /// Sends every frame the guest queued, up to [`TX_BUDGET`], then
    /// interrupts the driver if it asked to hear of their buffers.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        ring::serve(self, Net::tx_queue, mem, interrupt, |net, ring| {
            net.transmit_on(ring, mem)
        })
    }

    /// [`Self::transmit`]'s work on the transmit queue's `ring`.
    fn transmit_on(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        let mut frames = 0;
        self.tx_more = false;
        // No notifications while the ring is being drained; turning them
        // back on reports frames queued meanwhile. At the budget, stop with
        // them off: the transport signals the queue again.
        ring.disable_notification()?;
        loop {
            if frames >= TX_BUDGET {
                self.tx_more = true;
                return Ok(());
            }
            frames += 1;
            let Some(head) = ring.pop_or_notify()? else {
                return Ok(());
            };
            // The frame is the chain's readable descriptors, sent straight
            // from guest memory.
            let mut slices = super::Slices::new();
            let mut len = 0usize;
            let mut usable = true;
            // A chain must end within the queue's size: the ring stops a
            // looping one there, with the last descriptor still pointing
            // on (a descriptor chained to itself would otherwise go out as
            // one frame of 256 copies).
            let mut ended = false;
            let mut chain = ring.chain(head);
            for d in chain.by_ref() {
                if d.is_write_only() {
                    ended = true;
                    break;
                }
                match mem.get_slice(d.addr(), d.len() as usize) {
                    Ok(slice) => {
                        len = len.saturating_add(slice.len());
                        slices.push(slice);
                    }
                    Err(_) => usable = false,
                }
                if !d.has_next() {
                    ended = true;
                }
            }
            usable &= ended && !chain.uses_indirect();
            let sent = usable
                && (NET_HDR_LEN..=MAX_FRAME).contains(&len)
                && self.backend.send_from(&slices).is_ok();
            if sent {
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += len as u64;
            } else {
                self.drops.tx += 1;
            }
            ring.add_used(head, 0)?;
        }
    }
}

impl VirtioDevice for Net {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn wants_more(&self, index: usize) -> bool {
        index == TX && self.tx_more
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters;
        vec![
            ("rx_packets_count", c.rx_packets),
            ("rx_bytes_count", c.rx_bytes),
            ("tx_packets_count", c.tx_packets),
            ("tx_bytes_count", c.tx_bytes),
            ("rx_dropped_frames", self.drops.rx),
            ("tx_dropped_frames", self.drops.tx),
        ]
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_MRG_RXBUF;
        if self.offload {
            base | OFFLOAD_FEATURES
        } else {
            base
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config starts with mac[6]; the rest needs features we
        // do not offer.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, acked_features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let [rx, tx]: [Queue; 2] = queues
            .try_into()
            .map_err(|_| DeviceError("virtio-net needs two queues".into()))?;
        if self.offload {
            self.backend
                .set_offload(tun_offload_flags(acked_features))
                .map_err(|e| DeviceError(format!("cannot set TAP offloads: {e}")))?;
        }
        self.queues = Some([rx, tx]);
        self.rx_chains.clear();
        self.rx_room = 0;
        (self.rx_len, self.rx_in_place) = (0, 0);
        self.mergeable = acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.rx_blocked = false;
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        let Some([rx, tx]) = &self.queues else {
            return Vec::new();
        };
        // Receive chains taken for frames to come are the last ones taken
        // off the ring, in order: a restored device takes them again.
        let (avail, used) = super::queue_position(rx);
        let held = self.rx_chains.len() as u16;
        vec![(avail.wrapping_sub(held), used), super::queue_position(tx)]
    }

    fn reset(&mut self) {
        self.queues = None;
        self.rx_chains.clear();
        self.rx_room = 0;
        self.rx_len = 0;
        self.rx_in_place = 0;
        self.rx_blocked = false;
        self.tx_more = false;
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.backend.as_raw_fd())
    }

    fn backend_wanted(&self) -> bool {
        self.queues.is_some() && !self.rx_blocked && !self.backend_broken
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        self.receive(mem, interrupt)
    }

    fn process_queue(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        match index {
            RX => {
                // New receive buffers: deliver what waits, then read on.
                self.rx_blocked = false;
                self.receive(mem, interrupt)?;
            }
            TX => self.transmit(mem, interrupt)?,
            _ => {}
        }
        Ok(())
    }
}

/// Writes `bytes` at byte `offset` of the guest memory `parts` make up.
fn write_at(
    mem: &GuestMemoryMmap,
    parts: &[(GuestAddress, usize)],
    mut offset: usize,
    mut bytes: &[u8],
) -> Result<(), DeviceError> {
    for &(addr, len) in parts {
        if bytes.is_empty() {
            break;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(bytes.len());
        let at = addr
            .checked_add(offset as u64)
            .ok_or_else(|| DeviceError("rx buffer address overflows".into()))?;
        mem.write_slice(&bytes[..n], at)
            .map_err(|e| DeviceError(format!("rx buffer write: {e}")))?;
        (offset, bytes) = (0, &bytes[n..]);
    }
    Ok(())
}

/// The default MAC of device `index` attached to `backend_name`: locally
/// administered and unicast (first byte 0x02), stable for the same
/// configuration.
pub fn default_mac(backend_name: &str, index: usize) -> [u8; 6] {
    // FNV-1a: small, stable across releases (unlike std's hasher).
    let mut hash: u32 = 0x811c_9dc5;
    for byte in backend_name.bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    let h = hash.to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], index as u8]
}

#[cfg(test)]
mod tests;
