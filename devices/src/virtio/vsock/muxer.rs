//! The host side of virtio-vsock: Unix sockets in Firecracker's "hybrid"
//! protocol, so tools written for it work with moat unchanged.
//!
//! - A host program connects to the socket at PATH and writes
//!   `CONNECT <port>\n`; moat asks the guest for a connection to that port
//!   and, once the guest accepts, answers `OK <local-port>\n` and splices
//!   the two streams. A guest that refuses (no listener) resets the
//!   connection and moat closes the Unix socket.
//! - A guest connecting to the host (CID 2) port P reaches the Unix socket
//!   listening at `PATH_P`; if none listens, the guest gets a reset.
//! - A forward (`--forward unix:HOSTPATH=vsock:PORT`) is a listener whose
//!   every client is connected to the guest's PORT, no CONNECT line needed.
//!
//! Every host descriptor is in the muxer's own epoll set, whose descriptor
//! the event loop watches. Interest follows what can be done: a socket is
//! read only while the guest has credit and moat has not queued it for the
//! receive queue already, written only while guest data waits for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Key, State};
use super::packet::{
    Header, HOST_CID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM,
};

/// The most connections at once (host- and guest-initiated together).
pub const MAX_CONNECTIONS: usize = 2048;
/// The most host clients that have not sent their CONNECT line yet.
const MAX_HANDSHAKES: usize = 256;
/// How long a host client has to send its CONNECT line, and the guest to
/// answer a connection request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest CONNECT line (`CONNECT 4294967295\n` is 19 bytes).
const MAX_LINE: usize = 32;
/// Control packets waiting for receive buffers: RSTs beyond this (a guest
/// flooding moat with requests and posting no buffers) are dropped.
const MAX_CONTROL: usize = 4096;
/// Host-side ports moat gives the connections host clients open, as
/// Firecracker does: from 2^30 up.
const LOCAL_PORTS: std::ops::Range<u32> = 1 << 30..1 << 31;
/// Epoll data of the listeners: their index plus this.
const LISTENER_TOKEN: u64 = 1 << 40;
/// Epoll data of the timer that expires handshakes.
const TIMER_TOKEN: u64 = 1 << 39;
/// How often the timer runs while something can expire.
const TIMER_PERIOD: Duration = Duration::from_secs(1);

/// What a listening Unix socket does with its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Clients write `CONNECT <port>\n` first.
    Hybrid,
    /// Clients are connected to this guest port.
    Forward(u32),
}

/// Why a listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The path holds something that is not a stale socket.
    #[error("{0}: exists and is not a socket moat may replace (remove it first)")]
    Exists(PathBuf),
    /// Another process listens there.
    #[error("{0}: another process is listening on it")]
    InUse(PathBuf),
    /// bind/listen failed.
    #[error("{path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Binds a listening Unix socket at `path`, replacing a stale socket file
/// (one nobody listens on) but nothing else.
pub fn listen(path: &Path) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ListenError::Exists(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| ListenError::Bind {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(_) => return Err(ListenError::Exists(path.to_path_buf())),
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ListenError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

/// A host client that has not sent its CONNECT line yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Counters a test or the metrics can read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MuxerStats {
    /// Connections reset (by either side, or for a protocol error).
    pub resets: u64,
    /// Packets from the guest that were dropped (bad CIDs, lengths).
    pub dropped: u64,
    /// Control packets dropped because the guest posted no buffers.
    pub control_dropped: u64,
    /// epoll_ctl calls for connections' sockets (each a system call).
    pub poll_updates: u64,
}

/// The host side of the device.
pub struct Muxer {
    guest_cid: u64,
    /// `PATH`: guest-initiated connections go to `PATH_<port>`.
    path: PathBuf,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    listeners: Vec<(UnixListener, ListenerKind)>,
    handshakes: HashMap<RawFd, Handshake>,
    conns: BTreeMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    /// Control packets for the guest, in order.
    control: VecDeque<Header>,
    /// Connections whose host socket has data for the guest, in turn.
    ready: VecDeque<Key>,
    /// Host-initiated connections waiting for the guest's answer.
    connecting: HashMap<Key, Instant>,
    next_local_port: u32,
    stats: MuxerStats,
}

impl Muxer {
    /// A muxer for guest `guest_cid` whose hybrid socket listens at `path`.
    pub fn new(guest_cid: u64, path: PathBuf, hybrid: UnixListener) -> io::Result<Muxer> {
        let mut muxer = Muxer {
            guest_cid,
            path,
            epoll: Epoll::new()?,
            timer: TimerFd::new()?,
            timer_armed: false,
            listeners: Vec::new(),
            handshakes: HashMap::new(),
            conns: BTreeMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            connecting: HashMap::new(),
            next_local_port: LOCAL_PORTS.start,
            stats: MuxerStats::default(),
        };
        muxer.epoll.ctl(
            ControlOperation::Add,
            muxer.timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        muxer.add_listener(hybrid, ListenerKind::Hybrid)?;
        Ok(muxer)
    }

    /// Adds a listener; clients of a [`ListenerKind::Forward`] one go to
    /// the guest's port.
    pub fn add_listener(&mut self, listener: UnixListener, kind: ListenerKind) -> io::Result<()> {
        let token = LISTENER_TOKEN + self.listeners.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.listeners.push((listener, kind));
        Ok(())
    }

    /// The epoll descriptor the event loop watches.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        self.stats
    }

    /// Counts a packet from the guest that was not even well formed.
    pub fn count_dropped(&mut self) {
        self.stats.dropped += 1;
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait for the guest's receive buffers.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Drops every connection (device reset, transport reset).
    pub fn reset(&mut self) {
        for (_, conn) in std::mem::take(&mut self.conns) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (fd, _) in std::mem::take(&mut self.handshakes) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_fd.clear();
        self.control.clear();
        self.ready.clear();
        self.connecting.clear();
    }

    /// Serves what the host side has ready, without blocking.
    pub fn process_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let Ok(n) = self.epoll.wait(0, &mut events) else {
            return;
        };
        for event in &events[..n] {
            let token = event.data();
            if token == TIMER_TOKEN {
                let _ = self.timer.wait();
            } else if token >= LISTENER_TOKEN {
                self.accept((token - LISTENER_TOKEN) as usize);
                continue;
            }
            let fd = token as RawFd;
            if self.handshakes.contains_key(&fd) {
                self.read_handshake(fd);
            } else if let Some(key) = self.by_fd.get(&fd).copied() {
                self.stream_event(key, event.event_set());
            }
        }
        self.expire();
        self.arm_timer();
    }

    /// Runs the expiry timer exactly while something can expire.
    fn arm_timer(&mut self) {
        let wanted = !self.handshakes.is_empty() || !self.connecting.is_empty();
        if wanted != self.timer_armed {
            let armed = if wanted {
                self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD))
            } else {
                self.timer.clear()
            };
            self.timer_armed = wanted && armed.is_ok();
        }
    }

    fn accept(&mut self, index: usize) {
        // A bounded batch per wakeup; the listener stays readable.
        for _ in 0..64 {
            let Some((listener, kind)) = self.listeners.get(index) else {
                return;
            };
            let kind = *kind;
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            match kind {
                ListenerKind::Hybrid if self.handshakes.len() < MAX_HANDSHAKES => {
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.handshakes.insert(
                            fd,
                            Handshake {
                                stream,
                                line: Vec::new(),
                                since: Instant::now(),
                            },
                        );
                        self.arm_timer();
                    }
                }
                ListenerKind::Forward(port) => self.connect_guest(stream, port, None),
                // Too many half-open clients: this one is closed.
                ListenerKind::Hybrid => {}
            }
        }
    }

    /// Reads a host client's CONNECT line, a byte at a time so nothing
    /// after the newline is taken from the stream.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8];
        let done = loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break Some(true),
                Ok(1) if hs.line.len() < MAX_LINE => hs.line.push(byte[0]),
                Ok(_) => break Some(false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Some(false),
            }
        };
        let Some(complete) = done else {
            return;
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let port = complete.then(|| parse_connect(&hs.line)).flatten();
        match port {
            Some(port) => self.connect_guest(hs.stream, port, Some(())),
            None => {
                // Malformed, or the client went away: close it.
            }
        }
    }

    /// Starts a host-initiated connection to the guest's `port`: a REQUEST
    /// to the guest; `greet` says the client expects `OK <port>\n`.
    fn connect_guest(&mut self, stream: UnixStream, port: u32, greet: Option<()>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let Some(local) = self.free_local_port(port) else {
            return;
        };
        let key = Key { local, peer: port };
        let mut conn = Connection::new(stream, key, State::Connecting);
        if greet.is_some() {
            conn.greeting = Some(format!("OK {local}\n").into_bytes());
        }
        let request = conn.header(self.guest_cid, OP_REQUEST, 0, 0);
        // Not polled until the guest answers.
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.connecting.insert(key, Instant::now());
        self.control.push_back(request);
        self.arm_timer();
    }

    fn free_local_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..LOCAL_PORTS.len() {
            let port = self.next_local_port;
            self.next_local_port = if port + 1 >= LOCAL_PORTS.end {
                LOCAL_PORTS.start
            } else {
                port + 1
            };
            if !self.conns.contains_key(&Key { local: port, peer }) {
                return Some(port);
            }
        }
        None
    }

    /// Handles readiness of a connection's host socket.
    fn stream_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        // A hang up or error with guest data waiting: the flush finds out
        // whether the data can still go (it cannot: reset), so a dead
        // socket is not reported again and again.
        let flush_now = events.contains(EventSet::OUT)
            || (conn.has_pending() && events.intersects(EventSet::HANG_UP | EventSet::ERROR));
        if flush_now {
            match conn.flush() {
                Ok(_) => {
                    if conn.guest_shutdown & SHUTDOWN_SEND != 0 {
                        conn.shut_host_write_when_flushed();
                    }
                    if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && !conn.has_pending() {
                        self.reset_connection(key, true);
                        return;
                    }
                    if conn.credit_update_due() {
                        let update = conn.credit_update(self.guest_cid);
                        self.control.push_back(update);
                    }
                }
                // The host end is gone: the guest's data has nowhere to go.
                Err(_) => {
                    self.reset_connection(key, true);
                    return;
                }
            }
        }
        let readable = conn.state == State::Established
            && !conn.host_eof
            && conn.guest_shutdown & SHUTDOWN_RCV == 0;
        if readable
            && events.intersects(
                EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
            )
            && !self.ready.contains(&key)
        {
            // Read when the guest has buffers (see `next_rx`).
            self.ready.push_back(key);
        }
        self.update_interest(key);
    }

    /// Sets a connection's epoll interest from its state, with a system
    /// call only when it changes (a stream to the guest would otherwise
    /// make one per packet).
    fn update_interest(&mut self, key: Key) {
        let queued = self.ready.contains(&key);
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut events = EventSet::empty();
        let readable = conn.state == State::Established
            && !conn.host_eof
            && conn.guest_shutdown & SHUTDOWN_RCV == 0
            && conn.guest_credit() > 0
            && !queued;
        if readable {
            events |= EventSet::IN;
        }
        if conn.has_pending() {
            events |= EventSet::OUT;
        }
        if events == conn.polled {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let event = EpollEvent::new(events, fd as u64);
        // With no interest the socket leaves the set: epoll reports a hang
        // up even unasked, which would spin the loop while the guest has
        // no credit.
        let (op, fallback) = if events.is_empty() {
            (ControlOperation::Delete, None)
        } else if conn.polled.is_empty() {
            (ControlOperation::Add, Some(ControlOperation::Modify))
        } else {
            (ControlOperation::Modify, Some(ControlOperation::Add))
        };
        self.stats.poll_updates += 1;
        let mut done = self.epoll.ctl(op, fd, event).is_ok();
        if let (false, Some(op)) = (done, fallback) {
            self.stats.poll_updates += 1;
            done = self.epoll.ctl(op, fd, event).is_ok();
        }
        // A failed Delete leaves nothing registered either.
        conn.polled = if done { events } else { EventSet::empty() };
    }

    /// Closes a connection; with `tell_guest`, queues an RST for it.
    fn reset_connection(&mut self, key: Key, tell_guest: bool) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
            self.ready.retain(|k| *k != key);
            self.connecting.remove(&key);
            self.stats.resets += 1;
            if tell_guest {
                let rst = conn.header(self.guest_cid, OP_RST, 0, 0);
                self.push_control(rst);
            }
        }
    }

    fn push_control(&mut self, header: Header) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(header);
        } else {
            self.stats.control_dropped += 1;
        }
    }

    /// An RST for a packet that belongs to no connection.
    fn rst_for(&mut self, packet: &Header) {
        self.push_control(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: packet.dst_port,
            dst_port: packet.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Expires handshakes and connection requests the other side never
    /// completed.
    fn expire(&mut self) {
        let now = Instant::now();
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now.duration_since(h.since) > HANDSHAKE_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            self.handshakes.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let late: Vec<Key> = self
            .connecting
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > HANDSHAKE_TIMEOUT)
            .map(|(key, _)| *key)
            .collect();
        for key in late {
            self.reset_connection(key, true);
        }
    }

    /// A packet the guest sent; `data` is its payload (for `OP_RW`).
    pub fn from_guest(&mut self, header: &Header, data: &[vm_memory::VolatileSlice<'_, ()>]) {
        if header.dst_cid != HOST_CID || header.src_cid != self.guest_cid {
            self.stats.dropped += 1;
            return;
        }
        if header.kind != TYPE_STREAM {
            if header.op != OP_RST {
                self.rst_for(header);
            }
            return;
        }
        let key = Key {
            local: header.dst_port,
            peer: header.src_port,
        };
        if header.op == OP_REQUEST {
            self.guest_connects(header, key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != OP_RST {
                self.rst_for(header);
            }
            return;
        };
        conn.peer_credit(header);
        match (header.op, conn.state) {
            (OP_RST, _) => {
                self.reset_connection(key, false);
                return;
            }
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                self.connecting.remove(&key);
                if let Some(greeting) = conn.greeting.take() {
                    // The client expects this line before any data; a
                    // client that cannot take 20 bytes is gone.
                    use std::io::Write;
                    if conn.stream.write_all(&greeting).is_err() {
                        self.reset_connection(key, true);
                        return;
                    }
                }
            }
            (super::packet::OP_RW, State::Established) => {
                if conn.guest_shutdown & SHUTDOWN_SEND != 0
                    || conn.take_guest_data(data, header.len).is_err()
                {
                    // Data after its own SHUTDOWN_SEND, or beyond its credit.
                    self.reset_connection(key, true);
                    return;
                }
                // What the socket took frees credit; when nothing flows
                // back to carry moat's fwd_cnt, an update must.
                if conn.credit_update_due() {
                    let update = conn.credit_update(self.guest_cid);
                    self.push_control(update);
                }
            }
            (super::packet::OP_CREDIT_REQUEST, State::Established) => {
                let update = conn.credit_update(self.guest_cid);
                self.push_control(update);
            }
            (super::packet::OP_CREDIT_UPDATE, State::Established) => {}
            (OP_SHUTDOWN, State::Established) => {
                conn.guest_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.guest_shutdown & SHUTDOWN_SEND != 0 {
                    conn.shut_host_write_when_flushed();
                }
                if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && !conn.has_pending() {
                    // Both directions done (virtio 1.2, 5.10.6.6): reset.
                    self.reset_connection(key, true);
                    return;
                }
            }
            // Anything else is a protocol error.
            _ => {
                self.reset_connection(key, true);
                return;
            }
        }
        self.update_interest(key);
    }

    /// The guest connects to host port `key.local`: the Unix socket at
    /// `PATH_<port>`, if one listens.
    fn guest_connects(&mut self, header: &Header, key: Key) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.rst_for(header);
            return;
        }
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{}", key.local));
        let Ok(stream) = connect_nonblocking(Path::new(&path)) else {
            self.rst_for(header);
            return;
        };
        let mut conn = Connection::new(stream, key, State::Established);
        conn.peer_credit(header);
        let response = conn.header(self.guest_cid, OP_RESPONSE, 0, 0);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_control(response);
        self.update_interest(key);
    }

    /// The next packet for the guest, given a receive buffer with room for
    /// `room` data bytes: a control packet, or data read from a host socket
    /// by `read` (which reads into the buffer and returns the count).
    /// Returns `None` when nothing waits.
    pub fn next_rx(
        &mut self,
        room: usize,
        mut read: impl FnMut(&mut UnixStream, usize) -> io::Result<usize>,
    ) -> Option<Header> {
        if let Some(header) = self.control.pop_front() {
            return Some(header);
        }
        while let Some(key) = self.ready.pop_front() {
            let guest_cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let can_read = conn.state == State::Established
                && !conn.host_eof
                && conn.guest_shutdown & SHUTDOWN_RCV == 0;
            let want = (conn.guest_credit() as usize).min(room);
            if !can_read || want == 0 {
                self.update_interest(key);
                continue;
            }
            match read(&mut conn.stream, want) {
                Ok(0) => {
                    // End of file from the host: no more data for the guest.
                    conn.host_eof = true;
                    let header = conn.header(guest_cid, OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                    self.update_interest(key);
                    return Some(header);
                }
                Ok(n) => {
                    conn.sent_to_guest(n as u32);
                    let header = conn.header(guest_cid, super::packet::OP_RW, 0, n as u32);
                    // More may wait: read it after the others had a turn.
                    if conn.guest_credit() > 0 {
                        self.ready.push_back(key);
                    }
                    self.update_interest(key);
                    return Some(header);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.update_interest(key);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.ready.push_front(key),
                Err(_) => self.reset_connection(key, true),
            }
        }
        None
    }
}

/// Parses `CONNECT <port>` (any case; what follows the port is ignored).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Connects to a Unix socket without blocking: a listener whose backlog is
/// full fails with EAGAIN instead of stalling the event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed sockaddr_un is a valid value; we fill it below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: creates a new descriptor; checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor we own from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
