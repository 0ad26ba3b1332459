//! virtio-net (virtio 1.2, 5.1) with a TAP backend.
//!
//! Queue 0 receives, queue 1 transmits. Frames keep the 12-byte
//! `virtio_net_hdr_v1` in front, which the TAP (opened with IFF_VNET_HDR)
//! reads and writes as is. With VIRTIO_NET_F_MRG_RXBUF a received frame may
//! span several receive buffers; `num_buffers` in its header says how many.
//!
//! Receiving never drops a frame for lack of buffers: the frame read from
//! the TAP waits until the driver adds buffers, and meanwhile the device asks
//! the event loop to stop polling the TAP (see
//! [`VirtioDevice::backend_wanted`]).

mod tap;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

pub use tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

use super::{DeviceError, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame: a 64 KiB packet plus Ethernet header, plus the vnet header.
pub const MAX_FRAME: usize = 65_550 + NET_HDR_LEN;
/// Queue size offered for both queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

/// Where frames come from and go to: a TAP, or a fake one in tests.
pub trait NetBackend: Send + AsRawFd {
    /// Reads one frame (vnet header first); `WouldBlock` when none waits.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (vnet header first).
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
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

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    queues: Option<[Queue; 2]>,
    mergeable: bool,
    /// A frame read from the backend and not yet given to the guest.
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// The guest has no receive buffers for `rx_frame`.
    rx_blocked: bool,
    /// The backend failed a read (say, its interface was deleted): stop
    /// polling it, or a level-triggered error would spin the event loop.
    backend_broken: bool,
    tx_frame: Vec<u8>,
    drops: NetDrops,
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
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_blocked: false,
            backend_broken: false,
            tx_frame: Vec::with_capacity(MAX_FRAME),
            drops: NetDrops::default(),
            offload,
        }
    }

    /// Frames dropped so far.
    pub fn drops(&self) -> NetDrops {
        self.drops
    }

    /// Moves frames from the backend to the guest until the backend is
    /// empty or the guest is out of buffers. Returns whether any frame was
    /// delivered.
    fn receive(&mut self, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut delivered = false;
        loop {
            if self.rx_len == 0 {
                match self.backend.recv(&mut self.rx_frame) {
                    Ok(0) => return Ok(delivered),
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(delivered),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A broken backend loses its input, not the device.
                    Err(_) => {
                        self.backend_broken = true;
                        return Ok(delivered);
                    }
                }
            }
            if !self.deliver(mem)? {
                self.rx_blocked = true;
                return Ok(delivered);
            }
            self.rx_len = 0;
            delivered = true;
        }
    }

    /// Gives the pending frame to the guest. `Ok(false)`: not enough
    /// buffers yet (nothing consumed).
    fn deliver(&mut self, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let [rxq, _] = self
            .queues
            .as_mut()
            .ok_or_else(|| DeviceError("not activated".into()))?;
        let len = self.rx_len;
        let mut chains = Vec::new();
        let mut capacity = 0usize;
        let mut malformed = false;
        while capacity < len {
            let chain = rxq
                .iter(mem)
                .map_err(|e| DeviceError(format!("bad rx ring: {e}")))?
                .next();
            let Some(chain) = chain else {
                // Not enough buffers: put back what we took and wait.
                for _ in 0..chains.len() {
                    rxq.go_to_previous_position();
                }
                return Ok(false);
            };
            let head = chain.head_index();
            match chain.writer(mem) {
                Ok(writer) if writer.available_bytes() > 0 => {
                    capacity += writer.available_bytes();
                    chains.push((head, writer));
                }
                _ => {
                    // No usable writable buffer: hand it back empty and drop the frame.
                    rxq.add_used(mem, head, 0)
                        .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
                    malformed = true;
                    break;
                }
            }
            if !self.mergeable {
                break;
            }
        }
        if malformed || capacity < len || len < NET_HDR_LEN {
            self.drops.rx += 1;
            for (head, _) in chains {
                rxq.add_used(mem, head, 0)
                    .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
            }
            return Ok(true);
        }
        // num_buffers (virtio 1.2, 5.1.6.3.1): how many buffers this frame uses.
        let count = chains.len() as u16;
        self.rx_frame[10..12].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for (head, mut writer) in chains {
            let n = writer.available_bytes().min(len - offset);
            writer
                .write_all(&self.rx_frame[offset..offset + n])
                .map_err(|e| DeviceError(format!("rx buffer write: {e}")))?;
            offset += n;
            rxq.add_used(mem, head, n as u32)
                .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
        }
        Ok(true)
    }

    /// Sends every frame the guest queued. Returns whether any chain was used.
    fn transmit(&mut self, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let [_, txq] = self
            .queues
            .as_mut()
            .ok_or_else(|| DeviceError("not activated".into()))?;
        let mut used = false;
        loop {
            let chain = txq
                .iter(mem)
                .map_err(|e| DeviceError(format!("bad tx ring: {e}")))?
                .next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let sent = match chain.reader(mem) {
                Ok(mut reader) if (NET_HDR_LEN..=MAX_FRAME).contains(&reader.available_bytes()) => {
                    self.tx_frame.resize(reader.available_bytes(), 0);
                    reader.read_exact(&mut self.tx_frame).is_ok()
                        && self.backend.send(&self.tx_frame).is_ok()
                }
                _ => false,
            };
            if !sent {
                self.drops.tx += 1;
            }
            txq.add_used(mem, head, 0)
                .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }

    fn notify(&mut self, queue: usize, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        if let Some(queues) = self.queues.as_mut() {
            if queues[queue].needs_notification(mem).unwrap_or(true) {
                interrupt.signal_used_queue();
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF;
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
        self.mergeable = acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.rx_blocked = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.rx_len = 0;
        self.rx_blocked = false;
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
        if self.receive(mem)? {
            self.notify(RX, mem, interrupt);
        }
        Ok(())
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
                if self.receive(mem)? {
                    self.notify(RX, mem, interrupt);
                }
            }
            TX if self.transmit(mem)? => self.notify(TX, mem, interrupt),
            _ => {}
        }
        Ok(())
    }
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
