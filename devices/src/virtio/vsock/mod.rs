//! virtio-vsock (virtio 1.2, 5.10): stream sockets between the guest and
//! host Unix sockets, without a network.
//!
//! Queue 0 carries packets to the guest, queue 1 packets from it, queue 2
//! events (a transport reset). The device is the guest-facing half; the
//! [`muxer`] serves the host's Unix sockets and owns the connections.

mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

pub use connection::BUF_ALLOC;
pub use muxer::{listen, ListenError, ListenerKind, Muxer, MuxerStats};
use packet::{Buffers, HEADER_LEN, MAX_DATA};

use super::{
    DeviceError, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// Queue size offered for the receive and transmit queues.
pub const QUEUE_SIZE: u16 = 256;
/// Queue size offered for the event queue.
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// The lowest CID a guest may have (0-2 are reserved: hypervisor, local,
/// host).
pub const MIN_GUEST_CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    queues: Option<[Queue; 3]>,
}

impl Vsock {
    /// A device for guest `cid`, whose hybrid Unix socket is `listener`
    /// bound at `path` (guest-initiated connections go to `path_<port>`).
    pub fn new(cid: u64, path: PathBuf, listener: UnixListener) -> std::io::Result<Vsock> {
        Ok(Vsock {
            cid,
            muxer: Muxer::new(cid, path, listener)?,
            queues: None,
        })
    }

    /// Adds a forward: every client of `listener` is connected to the
    /// guest's `port`.
    pub fn add_forward(&mut self, listener: UnixListener, port: u32) -> std::io::Result<()> {
        self.muxer
            .add_listener(listener, ListenerKind::Forward(port))
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        self.muxer.stats()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Tells the guest its transport was reset (virtio 1.2, 5.10.6.7):
    /// every connection is gone. Used when the device's host side changes
    /// under the guest (a restored snapshot).
    pub fn transport_reset(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        self.muxer.reset();
        let queues = self
            .queues
            .as_mut()
            .ok_or_else(|| DeviceError("not activated".into()))?;
        let eventq = &mut queues[EVENT];
        let Some(chain) = eventq
            .iter(mem)
            .map_err(|e| DeviceError(format!("bad event ring: {e}")))?
            .next()
        else {
            return Ok(());
        };
        let head = chain.head_index();
        let len = match Buffers::of(mem, chain, true) {
            Some(buffers) if buffers.len() >= 4 => {
                buffers.write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
                4
            }
            _ => 0,
        };
        eventq
            .add_used(mem, head, len)
            .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
        if eventq.needs_notification(mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Takes every packet the guest queued. Returns whether any was.
    fn transmit(&mut self, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let Some(queues) = self.queues.as_mut() else {
            return Ok(false);
        };
        let txq = &mut queues[TX];
        let ring_error = |e: virtio_queue::Error| DeviceError(format!("bad tx ring: {e}"));
        let mut used = false;
        txq.disable_notification(mem).map_err(ring_error)?;
        loop {
            let chain = txq.iter(mem).map_err(ring_error)?.next();
            let Some(chain) = chain else {
                if txq.enable_notification(mem).map_err(ring_error)? {
                    txq.disable_notification(mem).map_err(ring_error)?;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            // A packet is the chain's readable bytes: the header, then
            // exactly `len` bytes of data. Anything else is dropped.
            let packet = Buffers::of(mem, chain, false).and_then(|buffers| {
                let header = buffers.read_header(mem)?;
                let len = header.len as usize;
                (len <= MAX_DATA && HEADER_LEN + len <= buffers.len()).then_some((header, buffers))
            });
            match packet {
                Some((header, buffers)) => {
                    let data = buffers.slices(mem, HEADER_LEN, header.len as usize)?;
                    self.muxer.from_guest(&header, &data);
                }
                None => self.muxer.count_dropped(),
            }
            txq.add_used(mem, head, 0)
                .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }

    /// Fills the guest's receive buffers with what the muxer has for it.
    /// Returns whether any buffer was used.
    fn receive(&mut self, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let Some(queues) = self.queues.as_mut() else {
            return Ok(false);
        };
        let rxq = &mut queues[RX];
        let ring_error = |e: virtio_queue::Error| DeviceError(format!("bad rx ring: {e}"));
        let mut used = false;
        while self.muxer.has_rx() {
            let before = rxq.next_avail();
            let chain = rxq.iter(mem).map_err(ring_error)?.next();
            let Some(chain) = chain else {
                // Out of buffers: ask for a notification when the guest
                // adds some, unless it did while we looked.
                if rxq.enable_notification(mem).map_err(ring_error)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let Some(buffers) = Buffers::of(mem, chain, true).filter(|b| b.len() >= HEADER_LEN)
            else {
                rxq.add_used(mem, head, 0)
                    .map_err(|e| DeviceError(format!("bad used ring: {e}")))?;
                used = true;
                continue;
            };
            let room = (buffers.len() - HEADER_LEN).min(MAX_DATA);
            let header = self.muxer.next_rx(room, |stream, want| {
                let slices = buffers
                    .slices(mem, HEADER_LEN, want)
                    .map_err(|e| std::io::Error::other(e.0))?;
                super::readv(stream.as_raw_fd(), &slices)
            });
            let Some(header) = header else {
                // Nothing after all (a socket had no data): the buffer
                // stays the guest's.
                rxq.set_next_avail(before);
                break;
            };
            buffers.write_header(mem, &header)?;
            rxq.add_used(mem, head, (HEADER_LEN as u32).saturating_add(header.len))
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

impl VirtioDevice for Vsock {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let stats = self.muxer.stats();
        vec![
            ("conn_resets", stats.resets),
            ("rx_dropped_packets", stats.dropped),
            ("control_dropped_packets", stats.control_dropped),
        ]
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked_features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let queues: [Queue; 3] = queues
            .try_into()
            .map_err(|_| DeviceError("virtio-vsock needs three queues".into()))?;
        self.queues = Some(queues);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.muxer.reset();
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queues
            .iter()
            .flatten()
            .map(super::queue_position)
            .collect()
    }

    fn restored(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        // The host ends of the guest's connections stayed with the moat
        // that took the snapshot.
        self.transport_reset(mem, interrupt)
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.fd())
    }

    fn backend_wanted(&self) -> bool {
        self.queues.is_some()
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        self.muxer.process_host();
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
            TX => {
                if self.transmit(mem)? {
                    self.notify(TX, mem, interrupt);
                }
                // Answers (responses, resets, credit) go out at once.
                if self.receive(mem)? {
                    self.notify(RX, mem, interrupt);
                }
            }
            RX if self.receive(mem)? => self.notify(RX, mem, interrupt),
            // Event buffers wait for an event; nothing to do now.
            EVENT => {}
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
