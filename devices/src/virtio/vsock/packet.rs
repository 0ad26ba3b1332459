//! virtio-vsock packets (virtio 1.2, 5.10.6): a 44-byte header, then for
//! `OP_RW` the data. The guest sends them on the transmit queue and
//! receives them in buffers it puts on the receive queue.

use smallvec::SmallVec;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use crate::virtio::{DeviceError, GuestMemoryMmap, Slices};

/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type moat offers (no SEQPACKET feature).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2, 5.10.6).
pub const OP_REQUEST: u16 = 1;
/// Accepts a connection request.
pub const OP_RESPONSE: u16 = 2;
/// Refuses or tears down a connection.
pub const OP_RST: u16 = 3;
/// One side will not receive (`SHUTDOWN_RCV`) or send (`SHUTDOWN_SEND`).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Tells the peer the sender's credit.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// The sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Size of the header.
pub const HEADER_LEN: usize = 44;
/// The most data one packet carries (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_DATA: usize = 64 * 1024;

/// `struct virtio_vsock_hdr`, little-endian on the wire. Kept as bytes so
/// the packed layout needs no unsafe reinterpretation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Bytes of data after the header.
    pub len: u32,
    /// Socket type.
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (shutdown bits).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the wire format.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default());
        let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A descriptor chain's guest memory: its parts in order, each checked to
/// lie in guest memory, and whether the device may write them.
pub struct Buffers {
    /// On the stack for up to 4 parts: Linux uses one or two.
    parts: SmallVec<[(GuestAddress, usize); 4]>,
    len: usize,
}

impl Buffers {
    /// The device-readable (`writable == false`) or device-writable parts
    /// of a chain. `None` if a part lies outside guest memory, the
    /// directions are mixed the wrong way, or the lengths overflow.
    pub fn of<I>(mem: &GuestMemoryMmap, descriptors: I, writable: bool) -> Option<Buffers>
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut parts = SmallVec::new();
        let mut len = 0usize;
        for d in descriptors {
            if d.is_write_only() != writable {
                return None;
            }
            let part = (d.addr(), d.len() as usize);
            mem.get_slice(part.0, part.1).ok()?;
            len = len.checked_add(part.1)?;
            parts.push(part);
        }
        Some(Buffers { parts, len })
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest memory of bytes `offset..offset + len`, as slices.
    pub fn slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        mut offset: usize,
        mut len: usize,
    ) -> Result<Slices<'m>, DeviceError> {
        let mut out = Slices::new();
        for &(addr, part_len) in &self.parts {
            if len == 0 {
                break;
            }
            if offset >= part_len {
                offset -= part_len;
                continue;
            }
            let n = (part_len - offset).min(len);
            let at = addr
                .checked_add(offset as u64)
                .ok_or_else(|| DeviceError("vsock buffer address overflows".into()))?;
            out.push(
                mem.get_slice(at, n)
                    .map_err(|e| DeviceError(format!("vsock buffer: {e}")))?,
            );
            (offset, len) = (0, len - n);
        }
        Ok(out)
    }

    /// Reads the header from the first [`HEADER_LEN`] bytes.
    pub fn read_header(&self, mem: &GuestMemoryMmap) -> Option<Header> {
        let mut raw = [0u8; HEADER_LEN];
        let mut filled = 0;
        for slice in self.slices(mem, 0, HEADER_LEN).ok()? {
            let n = slice.len();
            slice.copy_to(&mut raw[filled..filled + n]);
            filled += n;
        }
        (filled == HEADER_LEN).then(|| Header::from_bytes(&raw))
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes.
    pub fn write_header(&self, mem: &GuestMemoryMmap, header: &Header) -> Result<(), DeviceError> {
        let bytes = header.to_bytes();
        let mut done = 0;
        for slice in self.slices(mem, 0, HEADER_LEN)? {
            let n = slice.len();
            slice.copy_from(&bytes[done..done + n]);
            done += n;
        }
        if done == HEADER_LEN {
            Ok(())
        } else {
            Err(DeviceError(
                "vsock receive buffer shorter than a header".into(),
            ))
        }
    }

    /// Writes `bytes` at byte `offset`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), DeviceError> {
        let mut done = 0;
        for slice in self.slices(mem, offset, bytes.len())? {
            let n = slice.len();
            slice.copy_from(&bytes[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_wire_format() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 0xdead_beef,
            len: 17,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let bytes = h.to_bytes();
        assert_eq!(bytes[0], 3);
        assert_eq!(&bytes[20..24], &0xdead_beef_u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), h);
    }
}
