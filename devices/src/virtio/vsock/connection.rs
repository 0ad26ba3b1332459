//! One vsock stream between a guest socket and a host Unix socket, with the
//! credit-based flow control of virtio 1.2, 5.10.6.3: each side tells the
//! other how much it can buffer (`buf_alloc`) and how much it has consumed
//! (`fwd_cnt`), and never sends more than the other can take.
//!
//! Guest to host: data goes from guest memory straight to the Unix socket;
//! what the socket does not take waits in a buffer that the credit moat
//! gave the guest bounds ([`BUF_ALLOC`]). Host to guest: data is read from
//! the socket straight into the guest's receive buffers, no more than the
//! guest's credit allows, so moat buffers nothing on that side.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, HOST_CID, OP_CREDIT_UPDATE, TYPE_STREAM};

/// The receive buffer moat offers the guest per connection: the most
/// guest data moat ever holds for one connection.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// moat sent the guest a REQUEST for a host client and waits for its
    /// RESPONSE (or RST).
    Connecting,
    /// Both ends are open.
    Established,
}

/// The connection's ports: moat's (the host side, the guest's peer port)
/// and the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The host side's port.
    pub local: u32,
    /// The guest side's port.
    pub peer: u32,
}

/// One stream.
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// The ports.
    pub key: Key,
    /// Where the connection is.
    pub state: State,
    /// Sent to the host client once the guest accepts (hybrid CONNECT).
    pub greeting: Option<Vec<u8>>,
    /// The guest's receive buffer and how much of what moat sent it has
    /// consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Data bytes moat has sent the guest.
    tx_cnt: u32,
    /// Data bytes the guest has sent moat.
    rx_cnt: u32,
    /// Of those, bytes written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// Guest data the host socket has not taken yet.
    pending: VecDeque<u8>,
    /// Shutdown flags the guest sent (`SHUTDOWN_RCV`, `SHUTDOWN_SEND`).
    pub guest_shutdown: u32,
    /// The host socket reached end of file (moat told the guest).
    pub host_eof: bool,
    /// The host end's write side is shut (after the guest's SHUTDOWN_SEND).
    host_write_shut: bool,
    /// What the muxer's epoll set watches the host end for (empty: the
    /// socket is not in the set).
    pub polled: EventSet,
}

/// The guest broke the credit rules: the connection must be reset.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

impl Connection {
    /// A connection over `stream` (non-blocking).
    pub fn new(stream: UnixStream, key: Key, state: State) -> Connection {
        Connection {
            stream,
            key,
            state,
            greeting: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            pending: VecDeque::new(),
            guest_shutdown: 0,
            host_eof: false,
            host_write_shut: false,
            polled: EventSet::empty(),
        }
    }

    /// Takes the guest's credit information from one of its packets.
    pub fn peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes the guest can take now.
    pub fn guest_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A header from moat's side of this connection, carrying moat's credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local,
            dst_port: self.key.peer,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Counts `n` data bytes moat put in the guest's buffers.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Whether the guest ought to hear of moat's credit: it has consumed a
    /// good part of the buffer since moat last said.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= BUF_ALLOC / 4
    }

    /// A CREDIT_UPDATE packet.
    pub fn credit_update(&mut self, guest_cid: u64) -> Header {
        self.header(guest_cid, OP_CREDIT_UPDATE, 0, 0)
    }

    /// Takes `len` data bytes from the guest (in `data`): writes what the
    /// socket takes now, keeps the rest.
    pub fn take_guest_data(
        &mut self,
        data: &[VolatileSlice<'_, ()>],
        len: u32,
    ) -> Result<(), CreditViolation> {
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        if u64::from(buffered) + u64::from(len) > u64::from(BUF_ALLOC) {
            return Err(CreditViolation);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        let written = if self.pending.is_empty() && !self.host_write_shut {
            crate::virtio::writev(self.stream.as_raw_fd(), data).unwrap_or(0)
        } else {
            0
        };
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        // What the socket did not take, copied out of guest memory.
        let mut skip = written;
        for slice in data {
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let mut bytes = vec![0u8; slice.len() - skip];
            slice.offset(skip).map(|s| s.copy_to(&mut bytes[..])).ok();
            self.pending.extend(bytes);
            skip = 0;
        }
        Ok(())
    }

    /// Writes buffered guest data to the host socket. Returns whether any
    /// was written.
    pub fn flush(&mut self) -> io::Result<bool> {
        let mut any = false;
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(any)
    }

    /// Whether guest data waits for the host socket.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// After the guest's SHUTDOWN_SEND, once its data is out: shuts the
    /// host end's write side, so the host client reads end of file.
    pub fn shut_host_write_when_flushed(&mut self) {
        if self.pending.is_empty() && !self.host_write_shut {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
    }
}
