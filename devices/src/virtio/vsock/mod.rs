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
use virtio_queue::Queue;

pub use connection::BUF_ALLOC;
pub use muxer::{listen, ListenError, ListenerKind, Muxer, MuxerStats};
use packet::{Buffers, HEADER_LEN, MAX_DATA};

use super::ring::{self, Ring};
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
        if self.queues.is_none() {
            return Err(DeviceError("not activated".into()));
        }
        ring::serve(
            self,
            |v| v.queue(EVENT),
            mem,
            interrupt,
            |_, ring| {
                let Some(head) = ring.pop()? else {
                    return Ok(());
                };
                let len = match chain_buffers(ring, mem, head, true) {
                    Some(buffers) if buffers.len() >= 4 => {
                        buffers.write_at(mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
                        4
                    }
                    _ => 0,
                };
                Ok(ring.add_used(head, len)?)
            },
        )
    }

    fn queue(&mut self, index: usize) -> Option<&mut Queue> {
        self.queues.as_mut().map(|queues| &mut queues[index])
    }

    /// Takes every packet the guest queued, then interrupts the driver if
    /// it asked to hear of their buffers.
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        if self.queues.is_none() {
            return Ok(());
        }
        let work = |v: &mut Vsock, ring: &mut Ring<'_>| v.transmit_on(ring, mem);
        ring::serve(self, |v| v.queue(TX), mem, interrupt, work)
    }

    /// [`Self::transmit`]'s work on the transmit queue's `ring`.
    fn transmit_on(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        ring.disable_notification()?;
        loop {
            let Some(head) = ring.pop_or_notify()? else {
                return Ok(());
            };
            // A packet is the chain's readable bytes: the header, then
            // exactly `len` bytes of data. Anything else is dropped.
            let packet = chain_buffers(ring, mem, head, false).and_then(|buffers| {
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
            ring.add_used(head, 0)?;
        }
    }

    /// Fills the guest's receive buffers with what the muxer has for it,
    /// then interrupts the driver if it asked to hear of them.
    fn receive(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> Result<(), DeviceError> {
        if self.queues.is_none() {
            return Ok(());
        }
        let work = |v: &mut Vsock, ring: &mut Ring<'_>| v.receive_on(ring, mem);
        ring::serve(self, |v| v.queue(RX), mem, interrupt, work)
    }

    /// [`Self::receive`]'s work on the receive queue's `ring`.
    fn receive_on(
        &mut self,
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        while self.muxer.has_rx() {
            let Some(head) = ring.pop()? else {
                // Out of buffers: ask for a notification when the guest
                // adds some, unless it did while we looked.
                if ring.enable_notification()? {
                    continue;
                }
                break;
            };
            let Some(buffers) =
                chain_buffers(ring, mem, head, true).filter(|b| b.len() >= HEADER_LEN)
            else {
                ring.add_used(head, 0)?;
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
                ring.give_back();
                break;
            };
            buffers.write_header(mem, &header)?;
            ring.add_used(head, (HEADER_LEN as u32).saturating_add(header.len))?;
        }
        Ok(())
    }
}

/// The device-readable (`writable == false`) or device-writable buffers of
/// the chain at `head`; `None` for a chain [`Buffers::of`] refuses, or one
/// with an indirect descriptor, which the device never offered.
fn chain_buffers(
    ring: &Ring<'_>,
    mem: &GuestMemoryMmap,
    head: u16,
    writable: bool,
) -> Option<Buffers> {
    let mut chain = ring.chain(head);
    Buffers::of(mem, chain.by_ref(), writable).filter(|_| !chain.uses_indirect())
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
        self.receive(mem, interrupt)
    }

    fn process_queue(
        &mut self,
        index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        match index {
            TX => {
                self.transmit(mem, interrupt)?;
                // Answers (responses, resets, credit) go out at once.
                self.receive(mem, interrupt)?;
            }
            RX => self.receive(mem, interrupt)?,
            // Event buffers wait for an event; nothing to do now.
            EVENT => {}
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
