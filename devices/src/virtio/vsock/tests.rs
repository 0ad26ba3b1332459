//! virtio-vsock against real Unix sockets, with the guest played by the
//! test driver in plain memory: handshakes both ways, data, credit, close
//! and reset paths, hostile packets and many connections.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::*;
use crate::virtio::test_driver::{indirect, DriverQueue};

const GUEST_CID: u64 = 42;
/// Where the test puts packets the guest sends.
const TX_AREA: u64 = 0x10_0000;
/// Where receive buffers go, 4 KiB each (Linux's size).
const RX_AREA: u64 = 0x40_0000;
const RX_BUF: u32 = 4096;
/// The first port moat gives a host-initiated connection.
const FIRST_LOCAL: u32 = 1 << 30;

struct Rig {
    dev: Vsock,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
    rx: DriverQueue,
    tx: DriverQueue,
    events: DriverQueue,
    dir: PathBuf,
    path: PathBuf,
    rx_slot: u64,
    tx_slot: u64,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("moat-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let listener = listen(&path).unwrap();
    let mut dev = Vsock::new(GUEST_CID, path.clone(), listener).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let (rx, rxq) = DriverQueue::standalone(&mem, 0, QUEUE_SIZE, false);
    let (tx, txq) = DriverQueue::standalone(&mem, 1, QUEUE_SIZE, false);
    let (events, evq) = DriverQueue::standalone(&mem, 2, EVENT_QUEUE_SIZE, false);
    dev.activate(VIRTIO_F_VERSION_1, vec![rxq, txq, evq])
        .unwrap();
    Rig {
        dev,
        mem,
        irq: Arc::new(Interrupt::new().unwrap()),
        rx,
        tx,
        events,
        dir,
        path,
        rx_slot: 0,
        tx_slot: 0,
    }
}

/// A packet the guest received.
#[derive(Debug)]
struct Got {
    header: Header,
    data: Vec<u8>,
}

impl Rig {
    fn header(&self, op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    /// The guest sends `header` and `data` (in one descriptor).
    fn send(&mut self, header: Header, data: &[u8]) {
        let addr = TX_AREA + (self.tx_slot % 200) * 0x1_1000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        let len = (HEADER_LEN + data.len()) as u32;
        self.tx.add_chain(&self.mem, &[(addr, len, false)]);
        self.dev.process_queue(TX, &self.mem, &self.irq).unwrap();
        assert_eq!(self.tx.take_used(&self.mem).len(), 1, "TX chain returned");
    }

    fn op(&mut self, op: u16, src_port: u32, dst_port: u32) {
        let h = self.header(op, src_port, dst_port, 0);
        self.send(h, &[]);
    }

    /// Posts `n` receive buffers.
    fn post_rx(&mut self, n: u64) {
        for _ in 0..n {
            let addr = RX_AREA + (self.rx_slot % 256) * u64::from(RX_BUF);
            self.rx_slot += 1;
            self.rx.add_chain(&self.mem, &[(addr, RX_BUF, true)]);
        }
        self.dev.process_queue(RX, &self.mem, &self.irq).unwrap();
    }

    /// Lets the host side run (sockets are local: readiness is immediate).
    fn pump(&mut self) {
        for _ in 0..4 {
            self.dev.process_backend(&self.mem, &self.irq).unwrap();
        }
    }

    /// Pumps until `step` returns something, for a host peer in another
    /// thread that runs at its own pace; fails after 10 s rather than hang.
    fn pump_until<T>(&mut self, what: &str, mut step: impl FnMut(&mut Rig) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.pump();
            if let Some(found) = step(self) {
                return found;
            }
            assert!(Instant::now() < deadline, "no {what} within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Packets the guest received since the last call.
    fn received(&mut self) -> Vec<Got> {
        self.rx
            .take_used(&self.mem)
            .into_iter()
            .map(|(head, len)| {
                let addr = RX_AREA + (u64::from(head) % 256) * u64::from(RX_BUF);
                let mut raw = [0u8; HEADER_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let header = Header::from_bytes(&raw);
                assert_eq!(len as usize, HEADER_LEN + header.len as usize);
                let mut data = vec![0u8; header.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_LEN as u64))
                    .unwrap();
                Got { header, data }
            })
            .collect()
    }

    /// A host client that completed the hybrid handshake with the guest's
    /// `port` (the guest accepting); returns it and moat's local port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.path).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.pump();
        self.post_rx(1);
        let got = self.received();
        let request = got
            .iter()
            .find(|g| g.header.op == OP_REQUEST)
            .unwrap_or_else(|| panic!("no REQUEST: {got:?}"));
        assert_eq!(request.header.dst_port, port);
        assert_eq!(request.header.dst_cid, GUEST_CID);
        assert_eq!(request.header.src_cid, HOST_CID);
        let local = request.header.src_port;
        self.op(OP_RESPONSE, port, local);
        let mut line = [0u8; 64];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {local}\n").as_bytes());
        (client, local)
    }

    /// Data the guest receives now, with buffers posted for it.
    fn data_to_guest(&mut self) -> Vec<u8> {
        self.post_rx(8);
        self.pump();
        self.received()
            .into_iter()
            .filter(|g| g.header.op == OP_RW)
            .flat_map(|g| g.data)
            .collect()
    }
}

fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the host end was closed by moat (end of file, or reset).
fn closed(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 16];
    matches!(stream.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn a_host_client_connects_with_connect_and_data_flows_both_ways() {
    let mut r = rig("hostconn");
    let (mut client, local) = r.host_connect(1234);
    assert_eq!(local, FIRST_LOCAL);
    client.write_all(b"hello from host").unwrap();
    assert_eq!(r.data_to_guest(), b"hello from host");
    let h = r.header(OP_RW, 1234, local, 15);
    r.send(h, b"hello from vm!!");
    assert_eq!(read_exactly(&mut client, 15), b"hello from vm!!");
    assert_eq!(r.dev.connection_count(), 1);
}

#[test]
fn the_connect_line_is_case_insensitive_and_bytes_after_it_are_data() {
    let mut r = rig("connectcase");
    let mut client = UnixStream::connect(&r.path).unwrap();
    client.write_all(b"connect 77\nearly").unwrap();
    r.pump();
    r.post_rx(4);
    let got = r.received();
    let local = got
        .iter()
        .find(|g| g.header.op == OP_REQUEST)
        .unwrap()
        .header
        .src_port;
    r.op(OP_RESPONSE, 77, local);
    assert_eq!(r.data_to_guest(), b"early");
}

#[test]
fn a_malformed_connect_line_closes_the_client() {
    for line in [&b"HELLO 1\n"[..], b"CONNECT\n", b"CONNECT x\n", &[b'C'; 64]] {
        let mut r = rig("badline");
        let mut client = UnixStream::connect(&r.path).unwrap();
        client.write_all(line).unwrap();
        r.pump();
        assert!(closed(&mut client), "{:?}", String::from_utf8_lossy(line));
        r.post_rx(2);
        assert!(r.received().is_empty());
    }
}

#[test]
fn a_guest_without_a_listener_resets_and_the_client_is_closed() {
    let mut r = rig("guestrst");
    let mut client = UnixStream::connect(&r.path).unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    r.pump();
    r.post_rx(1);
    let local = r.received()[0].header.src_port;
    r.op(OP_RST, 99, local);
    assert!(closed(&mut client));
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn the_guest_reaches_a_host_listener_at_path_underscore_port() {
    let mut r = rig("guestconn");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_5000");
    let listener = UnixListener::bind(&port_path).unwrap();
    r.post_rx(4);
    r.op(OP_REQUEST, 3333, 5000);
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header.op, OP_RESPONSE);
    assert_eq!(
        (got[0].header.src_port, got[0].header.dst_port),
        (5000, 3333)
    );
    let (mut server, _) = listener.accept().unwrap();
    let h = r.header(OP_RW, 3333, 5000, 4);
    r.send(h, b"ping");
    assert_eq!(read_exactly(&mut server, 4), b"ping");
    server.write_all(b"pong").unwrap();
    assert_eq!(r.data_to_guest(), b"pong");
}

#[test]
fn a_guest_connecting_to_a_port_nobody_listens_on_gets_a_reset() {
    let mut r = rig("noport");
    r.post_rx(1);
    r.op(OP_REQUEST, 3333, 6000);
    let got = r.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header.op, OP_RST);
    assert_eq!(
        (got[0].header.src_port, got[0].header.dst_port),
        (6000, 3333)
    );
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn data_to_the_guest_never_exceeds_its_credit() {
    let mut r = rig("credit");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_7000");
    let listener = UnixListener::bind(&port_path).unwrap();
    let mut req = r.header(OP_REQUEST, 1, 7000, 0);
    req.buf_alloc = 1000;
    r.post_rx(1);
    r.send(req, &[]);
    assert_eq!(r.received()[0].header.op, OP_RESPONSE);
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(&[7u8; 5000]).unwrap();
    r.post_rx(16);
    assert_eq!(r.data_to_guest().len(), 1000, "only the guest's credit");
    // The guest consumed it: a credit update lets the next 1000 through.
    let mut update = r.header(OP_CREDIT_UPDATE, 1, 7000, 0);
    update.buf_alloc = 1000;
    update.fwd_cnt = 1000;
    r.send(update, &[]);
    assert_eq!(r.data_to_guest().len(), 1000);
}

#[test]
fn guest_data_beyond_moats_credit_resets_the_connection() {
    let mut r = rig("overrun");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_7100");
    let listener = UnixListener::bind(&port_path).unwrap();
    r.post_rx(8);
    r.op(OP_REQUEST, 5, 7100);
    let got = r.received();
    assert_eq!(got[0].header.buf_alloc, BUF_ALLOC);
    // The host side never reads: moat buffers up to its credit, then the
    // guest is over the limit.
    let (_server, _) = listener.accept().unwrap();
    let chunk = vec![1u8; MAX_DATA];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..(BUF_ALLOC as usize / MAX_DATA + 40) {
        let h = r.header(OP_RW, 5, 7100, MAX_DATA as u32);
        r.send(h, &chunk);
        sent += MAX_DATA;
        if r.received().iter().any(|g| g.header.op == OP_RST) {
            reset = true;
            break;
        }
        r.post_rx(1);
    }
    assert!(reset, "no reset after {sent} bytes");
    assert!(
        sent > BUF_ALLOC as usize,
        "reset only past the credit ({sent} bytes)"
    );
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn moat_sends_a_credit_update_when_the_host_drains_what_it_buffered() {
    let mut r = rig("creditupdate");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_7200");
    let listener = UnixListener::bind(&port_path).unwrap();
    r.post_rx(8);
    r.op(OP_REQUEST, 6, 7200);
    r.received();
    let (mut server, _) = listener.accept().unwrap();
    // Fill the socket buffer so moat has to keep data, then drain it.
    let chunk = vec![2u8; MAX_DATA];
    for _ in 0..(BUF_ALLOC as usize / MAX_DATA) {
        let h = r.header(OP_RW, 6, 7200, MAX_DATA as u32);
        r.send(h, &chunk);
    }
    assert!(r.received().iter().all(|g| g.header.op != OP_RST));
    let total = BUF_ALLOC as usize;
    let mut got = 0;
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut updates = Vec::new();
    while got < total {
        if let Ok(n) = server.read(&mut buf) {
            got += n;
        }
        r.pump();
        r.post_rx(1);
        updates.extend(
            r.received()
                .into_iter()
                .filter(|g| g.header.op == OP_CREDIT_UPDATE),
        );
    }
    let last = updates.last().expect("a credit update");
    assert!(last.header.fwd_cnt >= BUF_ALLOC / 4, "{:?}", last.header);
}

#[test]
fn half_close_works_both_ways() {
    let mut r = rig("halfclose");
    let (mut client, local) = r.host_connect(800);
    // The guest stops sending: the host reads end of file, but can write.
    let mut shut = r.header(OP_SHUTDOWN, 800, local, 0);
    shut.flags = SHUTDOWN_SEND;
    r.send(shut, &[]);
    assert!(closed(&mut client));
    client.write_all(b"still here").unwrap();
    r.post_rx(4);
    assert_eq!(r.data_to_guest(), b"still here");
    // The host stops sending: the guest hears SHUTDOWN_SEND.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    r.pump();
    r.post_rx(2);
    r.pump();
    let got = r.received();
    let shutdown = got.iter().find(|g| g.header.op == OP_SHUTDOWN).unwrap();
    assert_eq!(shutdown.header.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
}

#[test]
fn a_full_shutdown_from_the_guest_is_answered_with_a_reset() {
    let mut r = rig("fullshut");
    let (mut client, local) = r.host_connect(801);
    let mut shut = r.header(OP_SHUTDOWN, 801, local, 0);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    r.send(shut, &[]);
    r.post_rx(1);
    let got = r.received();
    assert_eq!(got[0].header.op, OP_RST);
    assert!(closed(&mut client));
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_leak_nothing() {
    let mut r = rig("hostile");
    r.post_rx(64);
    // Wrong destination or source CID: dropped.
    let mut h = r.header(OP_REQUEST, 1, 2, 0);
    h.dst_cid = 7;
    r.send(h, &[]);
    let mut h = r.header(OP_REQUEST, 1, 2, 0);
    h.src_cid = 3;
    r.send(h, &[]);
    assert!(r.received().is_empty());
    assert_eq!(r.dev.stats().dropped, 2);
    // A packet shorter than a header, and a length beyond the chain.
    let addr = TX_AREA;
    r.tx.add_chain(&r.mem, &[(addr, 10, false)]);
    let mut h = r.header(OP_RW, 1, 2, 5000);
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(addr + 0x100))
        .unwrap();
    r.tx.add_chain(&r.mem, &[(addr + 0x100, 100, false)]);
    // A writable descriptor in a transmit chain.
    r.tx.add_chain(&r.mem, &[(addr + 0x200, 64, true)]);
    r.dev.process_queue(TX, &r.mem, &r.irq).unwrap();
    assert_eq!(r.tx.take_used(&r.mem).len(), 3);
    assert_eq!(r.dev.stats().dropped, 5);
    // Seqpacket, unknown operations, data for no connection: reset.
    h = r.header(OP_REQUEST, 1, 2, 0);
    h.kind = 2;
    r.send(h, &[]);
    r.op(99, 1, 2);
    let h = r.header(OP_RW, 1, 2, 3);
    r.send(h, b"abc");
    let got = r.received();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|g| g.header.op == OP_RST));
    // An RST for nothing is not answered.
    r.op(OP_RST, 1, 2);
    assert!(r.received().is_empty());
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn a_packet_behind_an_indirect_table_is_dropped_not_followed() {
    let mut r = rig("indirect");
    r.post_rx(4);
    // A request for a port nobody listens on: followed, it would be
    // answered with a reset.
    let h = r.header(OP_REQUEST, 1, 2, 0);
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_AREA))
        .unwrap();
    let desc = indirect(&r.mem, TX_AREA + 0x1000, TX_AREA, HEADER_LEN as u32, 0);
    r.tx.add_raw(&r.mem, &[desc]);
    r.dev.process_queue(TX, &r.mem, &r.irq).unwrap();
    assert_eq!(r.tx.take_used(&r.mem).len(), 1, "the chain goes back");
    assert_eq!(r.dev.stats().dropped, 1);
    assert!(
        r.received().is_empty(),
        "the packet was read through the table"
    );
}

#[test]
fn a_flood_of_requests_without_receive_buffers_is_bounded() {
    let mut r = rig("flood");
    for i in 0..6000 {
        r.op(OP_REQUEST, i, 9999);
    }
    // RSTs wait for buffers, but only so many.
    assert!(r.dev.stats().control_dropped > 0);
    r.post_rx(256);
    assert_eq!(r.received().len(), 256);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn a_thousand_connections_at_once_all_carry_data() {
    raise_fd_limit(4096);
    let mut r = rig("many");
    let mut clients = Vec::new();
    for _ in 0..1000 {
        let mut client = UnixStream::connect(&r.path).unwrap();
        client.write_all(b"CONNECT 555\n").unwrap();
        clients.push(client);
        r.pump();
    }
    let mut requests = Vec::new();
    while requests.len() < 1000 {
        r.post_rx(64);
        r.pump();
        requests.extend(
            r.received()
                .into_iter()
                .filter(|g| g.header.op == OP_REQUEST),
        );
        assert!(requests.len() <= 1000);
        if r.rx_slot > 100_000 {
            panic!("only {} requests", requests.len());
        }
    }
    for req in &requests {
        r.op(OP_RESPONSE, 555, req.header.src_port);
    }
    assert_eq!(r.dev.connection_count(), 1000);
    for (i, client) in clients.iter_mut().enumerate() {
        let mut line = String::new();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8];
        while !line.ends_with('\n') {
            client.read_exact(&mut byte).unwrap();
            line.push(byte[0] as char);
        }
        assert!(line.starts_with("OK "), "client {i}: {line}");
        client.write_all(&(i as u32).to_le_bytes()).unwrap();
    }
    let mut total = 0;
    for _ in 0..100 {
        r.post_rx(64);
        total += r.data_to_guest().len();
        if total == 4000 {
            break;
        }
    }
    assert_eq!(total, 4000);
}

#[test]
fn a_forward_listener_connects_each_client_to_the_guest_port() {
    let mut r = rig("forward");
    let fwd_path = r.dir.join("fwd.sock");
    r.dev.add_forward(listen(&fwd_path).unwrap(), 2375).unwrap();
    let mut client = UnixStream::connect(&fwd_path).unwrap();
    r.pump();
    r.post_rx(2);
    let got = r.received();
    let req = got.iter().find(|g| g.header.op == OP_REQUEST).unwrap();
    assert_eq!(req.header.dst_port, 2375);
    r.op(OP_RESPONSE, 2375, req.header.src_port);
    // No OK line on a forward: data is data.
    client.write_all(b"GET /").unwrap();
    r.post_rx(2);
    assert_eq!(r.data_to_guest(), b"GET /");
}

#[test]
fn a_transport_reset_tells_the_guest_and_closes_every_connection() {
    let mut r = rig("transportreset");
    let (mut client, _) = r.host_connect(900);
    let addr = 0x80_0000;
    r.events.add_chain(&r.mem, &[(addr, 4, true)]);
    r.mem.write_obj(0xffff_ffffu32, GuestAddress(addr)).unwrap();
    r.dev.transport_reset(&r.mem, &r.irq).unwrap();
    let used = r.events.take_used(&r.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(r.mem.read_obj::<u32>(GuestAddress(addr)).unwrap(), 0);
    assert!(closed(&mut client));
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn an_existing_socket_path_is_replaced_only_when_stale() {
    let dir = std::env::temp_dir().join(format!("moat-vsock-{}-paths", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(
        listen(&stale).is_ok(),
        "a socket nobody listens on is replaced"
    );
    let live = dir.join("live.sock");
    let _held = UnixListener::bind(&live).unwrap();
    assert!(matches!(listen(&live), Err(ListenError::InUse(_))));
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(listen(&file), Err(ListenError::Exists(_))));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    let _ = std::fs::remove_dir_all(&dir);
}

fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(want.max(limit.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[test]
fn a_host_that_closes_with_guest_data_pending_gets_the_connection_reset() {
    let mut r = rig("closepending");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_7300");
    let listener = UnixListener::bind(&port_path).unwrap();
    r.post_rx(8);
    r.op(OP_REQUEST, 9, 7300);
    r.received();
    let (server, _) = listener.accept().unwrap();
    // More than the socket buffer holds, so some waits in moat.
    let chunk = vec![3u8; MAX_DATA];
    for _ in 0..3 {
        let h = r.header(OP_RW, 9, 7300, MAX_DATA as u32);
        r.send(h, &chunk);
    }
    drop(server);
    r.pump();
    r.post_rx(2);
    let got = r.received();
    assert!(got.iter().any(|g| g.header.op == OP_RST), "{got:?}");
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn a_guest_sending_to_a_prompt_host_reader_gets_credit_updates() {
    // One direction only: nothing flows to the guest to carry moat's
    // fwd_cnt, so moat must send credit updates or the guest stalls after
    // BUF_ALLOC bytes.
    let mut r = rig("creditoneway");
    let mut port_path = r.path.clone().into_os_string();
    port_path.push("_7400");
    let listener = UnixListener::bind(&port_path).unwrap();
    r.post_rx(8);
    r.op(OP_REQUEST, 11, 7400);
    r.received();
    let (mut server, _) = listener.accept().unwrap();
    // A reader that stalls ends the count short instead of hanging the test.
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        while let Ok(n) = server.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let chunk = vec![5u8; 4096];
    let mut sent = 0u32;
    let mut fwd_cnt_seen = 0u32;
    // Send twice the buffer, never more than the credit moat advertised.
    while sent < 2 * BUF_ALLOC {
        while sent.wrapping_sub(fwd_cnt_seen) + 4096 > BUF_ALLOC {
            r.post_rx(4);
            let what = format!("credit update at {sent} bytes (fwd_cnt {fwd_cnt_seen})");
            let updates = r.pump_until(&what, |r| Some(r.received()).filter(|u| !u.is_empty()));
            for g in updates {
                fwd_cnt_seen = fwd_cnt_seen.max(g.header.fwd_cnt);
            }
        }
        let h = r.header(OP_RW, 11, 7400, 4096);
        r.send(h, &chunk);
        sent += 4096;
    }
    let mut shut = r.header(OP_SHUTDOWN, 11, 7400, 0);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    r.send(shut, &[]);
    // moat closes the host end once the last byte is out.
    r.pump_until("close after the data", |r| {
        (r.dev.connection_count() == 0).then_some(())
    });
    assert_eq!(reader.join().unwrap(), 2 * BUF_ALLOC as usize);
}

#[test]
fn streaming_to_the_guest_does_not_touch_epoll_per_packet() {
    let mut r = rig("pollcalls");
    let (mut client, _) = r.host_connect(1234);
    // A burst fills the eight 4 KiB buffers `data_to_guest` posts.
    let chunk = [3u8; RX_BUF as usize - HEADER_LEN];
    let mut got = 0;
    let before = r.dev.stats().poll_updates;
    // Eight bursts stay within the 256 KiB credit the guest gave.
    for _ in 0..8 {
        for _ in 0..8 {
            client.write_all(&chunk).unwrap();
        }
        got += r.data_to_guest().len();
    }
    assert_eq!(got, 8 * 8 * chunk.len());
    // A packet per buffer: 64 packets. The socket's epoll interest only
    // changes when it goes from "read when the guest has buffers" to
    // "wait for data" and back, once per burst at most.
    let updates = r.dev.stats().poll_updates - before;
    assert!(updates <= 2 * 8, "{updates} epoll updates for 8 bursts");
}

#[test]
fn data_both_ways_allocates_nothing_once_warm() {
    let mut r = rig("noalloc");
    let (mut client, local) = r.host_connect(1234);
    let data = vec![0x5a_u8; 4096];
    for round in 0..3 {
        // Host to guest: the client writes, the guest has buffers posted.
        client.write_all(&data).unwrap();
        for _ in 0..4 {
            let addr = RX_AREA + (r.rx_slot % 256) * u64::from(RX_BUF);
            r.rx_slot += 1;
            r.rx.add_chain(&r.mem, &[(addr, RX_BUF, true)]);
        }
        let (mem, irq) = (r.mem.clone(), r.irq.clone());
        let rx = crate::alloc_count::allocations(|| {
            r.dev.process_queue(RX, &mem, &irq).unwrap();
            for _ in 0..4 {
                r.dev.process_backend(&mem, &irq).unwrap();
            }
        });
        let got: usize = r.received().iter().map(|g| g.data.len()).sum();
        assert_eq!(got, data.len());
        // Guest to host.
        let addr = TX_AREA;
        let header = r.header(OP_RW, 1234, local, data.len() as u32);
        r.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        r.mem
            .write_slice(&data, GuestAddress(addr + HEADER_LEN as u64))
            .unwrap();
        r.tx.add_chain(&r.mem, &[(addr, (HEADER_LEN + data.len()) as u32, false)]);
        let tx = crate::alloc_count::allocations(|| r.dev.process_queue(TX, &mem, &irq).unwrap());
        assert_eq!(r.tx.take_used(&r.mem).len(), 1);
        assert_eq!(read_exactly(&mut client, data.len()), data);
        if round > 0 {
            assert_eq!((rx, tx), (0, 0), "round {round}");
        }
    }
}
