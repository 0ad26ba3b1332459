//! HTTP/1.1 over a Unix socket, for the API: one thread, non-blocking
//! connections, `poll(2)`, and `httparse` to read request heads.
//!
//! A client can only hurt itself: requests and bodies have size limits, a
//! request that stalls half-way is answered 408 and closed, and at most
//! [`MAX_CONNECTIONS`] clients are served at once (the next is answered 429
//! and closed). Every refusal is a 4xx with a `fault_message`, as the API's
//! errors are.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Clients served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body (Firecracker's default payload limit).
pub const MAX_BODY: usize = 51_200;
/// Headers per request.
const MAX_HEADERS: usize = 32;
/// How long a started request may take to arrive in full.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// One request, read in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
}

/// One response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON text, or `None` (204).
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with a JSON body.
    pub fn json(body: String) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// An error: `status` with `{"fault_message": message}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Self {
            status,
            body: Some(body),
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: moat\r\n",
            self.status,
            reason(self.status)
        );
        if close {
            head.push_str("Connection: close\r\n");
        }
        if let Some(body) = &self.body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            head.push_str("\r\n");
        }
        head.into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

/// What parsing the start of a buffer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `continue_needed`: the head asked for
    /// `100 Continue` and the body has not started.
    Partial {
        /// Send `100 Continue` now.
        continue_needed: bool,
    },
    /// A whole request, `used` bytes long, and whether the client wants
    /// the connection closed after it.
    Complete {
        /// The request.
        request: Request,
        /// Bytes of the buffer it took.
        used: usize,
        /// `Connection: close` (or HTTP/1.0 without keep-alive).
        close: bool,
    },
    /// A request moat refuses: answer and close.
    Refused(Response),
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Parsed::Refused(Response::fault(431, "the request head is too large"))
            } else {
                Parsed::Partial {
                    continue_needed: false,
                }
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refused(Response::fault(
                431,
                &format!("too many headers (at most {MAX_HEADERS})"),
            ))
        }
        Err(e) => {
            return Parsed::Refused(Response::fault(
                400,
                &format!("malformed HTTP request: {e}"),
            ))
        }
    };
    let mut length = 0usize;
    let mut close = req.version == Some(0);
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = n,
                Err(_) => {
                    return Parsed::Refused(Response::fault(
                        400,
                        &format!("Content-Length '{value}' is not a number"),
                    ))
                }
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Refused(Response::fault(
                501,
                "chunked request bodies are not supported; send Content-Length",
            ));
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close")
                || (req.version == Some(0) && !value.eq_ignore_ascii_case("keep-alive"));
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    if length > MAX_BODY {
        return Parsed::Refused(Response::fault(
            413,
            &format!("the body is {length} bytes; the limit is {MAX_BODY}"),
        ));
    }
    let Some(body) = buf.get(head_len..head_len + length) else {
        return Parsed::Partial {
            continue_needed: expect_continue && buf.len() == head_len,
        };
    };
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target).to_string();
    Parsed::Complete {
        request: Request {
            method: req.method.unwrap_or("").to_string(),
            path,
            body: body.to_vec(),
        },
        used: head_len + length,
        close,
    }
}

/// One client.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// When the current partial request started arriving.
    started: Option<Instant>,
    last_active: Instant,
    /// `100 Continue` was sent for the current request.
    continued: bool,
    /// Close once `output` is written.
    closing: bool,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            started: None,
            last_active: Instant::now(),
            continued: false,
            closing: false,
        }
    }

    /// Reads what is there; false when the client is gone.
    fn read_some(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    if self.started.is_none() {
                        self.started = Some(Instant::now());
                    }
                    self.last_active = Instant::now();
                    self.input.extend_from_slice(&chunk[..n]);
                    if self.input.len() > MAX_HEAD + MAX_BODY {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Writes what it can; false when the client is gone.
    fn write_some(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return false,
                Ok(n) => {
                    self.output.drain(..n);
                    self.last_active = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Answers every whole request in the input, in order.
    fn serve(&mut self, handler: &mut dyn FnMut(Request) -> Response) {
        while !self.closing && self.output.is_empty() && !self.input.is_empty() {
            match parse(&self.input) {
                Parsed::Partial { continue_needed } => {
                    if continue_needed && !self.continued {
                        self.continued = true;
                        self.output
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    return;
                }
                Parsed::Complete {
                    request,
                    used,
                    close,
                } => {
                    self.input.drain(..used);
                    self.started = (!self.input.is_empty()).then(Instant::now);
                    self.continued = false;
                    let response = handler(request);
                    self.output.extend(response.to_bytes(close));
                    self.closing = close;
                }
                Parsed::Refused(response) => {
                    self.output.extend(response.to_bytes(true));
                    self.closing = true;
                }
            }
        }
    }
}

/// Serves `listener` until the process ends, passing each request to
/// `handler` and writing back what it returns.
pub fn serve(listener: UnixListener, mut handler: impl FnMut(Request) -> Response) {
    let _ = listener.set_nonblocking(true);
    let mut connections: Vec<Connection> = Vec::new();
    loop {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for c in &connections {
            let events = if c.output.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                log::error!("API server: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let now = Instant::now();
        let mut keep = vec![true; connections.len()];
        for (i, c) in connections.iter_mut().enumerate() {
            let revents = fds[i + 1].revents;
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                && c.output.is_empty()
                && !c.read_some()
            {
                keep[i] = false;
                continue;
            }
            c.serve(&mut handler);
            if c.started
                .is_some_and(|t| now.duration_since(t) > REQUEST_TIMEOUT)
                && c.output.is_empty()
                && !c.closing
            {
                c.output.extend(
                    Response::fault(408, "the request did not arrive in time").to_bytes(true),
                );
                c.closing = true;
            }
            if !c.write_some()
                || (c.closing && c.output.is_empty())
                || now.duration_since(c.last_active) > IDLE_TIMEOUT
            {
                keep[i] = false;
            }
        }
        let mut keep = keep.into_iter();
        connections.retain(|_| keep.next().unwrap_or(false));
        if fds[0].revents & libc::POLLIN != 0 {
            accept_all(&listener, &mut connections);
        }
    }
}

fn accept_all(listener: &UnixListener, connections: &mut Vec<Connection>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(true);
                if connections.len() >= MAX_CONNECTIONS {
                    // Clients that keep a connection per URL (requests'
                    // pools do) leave many idle: the longest idle one
                    // makes room. Only when every client is mid-request
                    // is the new one refused.
                    let idle = connections
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.input.is_empty() && c.output.is_empty())
                        .min_by_key(|(_, c)| c.last_active)
                        .map(|(i, _)| i);
                    match idle {
                        Some(i) => {
                            connections.remove(i);
                        }
                        None => {
                            let message =
                                format!("too many API connections (at most {MAX_CONNECTIONS})");
                            let _ = (&stream).write(&Response::fault(429, &message).to_bytes(true));
                            continue;
                        }
                    }
                }
                connections.push(Connection::new(stream));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize, bool) {
        match parse(buf) {
            Parsed::Complete {
                request,
                used,
                close,
            } => (request, used, close),
            other => panic!("{other:?}"),
        }
    }

    fn refused(buf: &[u8]) -> u16 {
        match parse(buf) {
            Parsed::Refused(r) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_with_a_body_is_read_whole() {
        let text = b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}GET";
        let (req, used, close) = complete(text);
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/machine-config");
        assert_eq!(req.body, b"{}");
        assert_eq!(used, text.len() - 3);
        assert!(!close);
    }

    #[test]
    fn partial_heads_and_bodies_wait() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost"),
            Parsed::Partial {
                continue_needed: false
            }
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Parsed::Partial {
                continue_needed: false
            }
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
            Parsed::Partial {
                continue_needed: true
            }
        );
    }

    #[test]
    fn connection_close_and_http_1_0_close() {
        assert!(complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").2);
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n").2);
        assert!(!complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").2);
    }

    #[test]
    fn bad_requests_are_refused_with_4xx() {
        assert_eq!(refused(b"GARBAGE\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            refused(b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            413
        );
        assert_eq!(
            refused(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(refused(&many), 431);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(refused(&long), 431);
    }

    #[test]
    fn responses_carry_a_length_and_faults_are_json() {
        let r = Response::fault(400, "bad \"thing\"");
        let text = String::from_utf8(r.to_bytes(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(value["fault_message"], "bad \"thing\"");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        let text = String::from_utf8(Response::no_content().to_bytes(true)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: moat\r\nConnection: close\r\n\r\n"
        );
    }

    fn roundtrip(stream: &mut UnixStream, request: &[u8]) -> String {
        try_roundtrip(stream, request).unwrap()
    }

    fn try_roundtrip(stream: &mut UnixStream, request: &[u8]) -> std::io::Result<String> {
        stream.write_all(request)?;
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn a_server_answers_pipelined_requests_and_survives_bad_clients() {
        let path = std::env::temp_dir().join(format!("moat-http-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            serve(listener, |req| {
                Response::json(format!("{{\"path\":\"{}\"}}", req.path))
            })
        });
        // Clients that open and stall, or send garbage, hurt no one.
        let _stalled = UnixStream::connect(&path).unwrap();
        let mut garbage = UnixStream::connect(&path).unwrap();
        assert!(roundtrip(&mut garbage, b"\x00\x01\x02\r\n\r\n").starts_with("HTTP/1.1 400"));
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains("/b") {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0);
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(
            seen.find("/a").unwrap() < seen.find("/b").unwrap(),
            "{seen}"
        );
        // Idle clients make room for new ones.
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut fresh = UnixStream::connect(&path).unwrap();
        assert!(roundtrip(&mut fresh, b"GET /idle HTTP/1.1\r\n\r\n").contains("/idle"));
        drop(idle);
        drop(fresh);
        drop(_stalled);
        // Clients that all hold a started request: a new one is told no.
        std::thread::sleep(Duration::from_millis(100));
        let mut busy: Vec<UnixStream> = (0..MAX_CONNECTIONS + 1)
            .map(|_| {
                let mut s = UnixStream::connect(&path).unwrap();
                // The server may already have refused this one.
                let _ = s.write_all(b"GET /slow HTTP/1.1\r\n");
                std::thread::sleep(Duration::from_millis(20));
                s
            })
            .collect();
        let last = busy.last_mut().unwrap();
        let mut reply = String::new();
        let _ = last.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
        // A child forked meanwhile (the seccomp tests fork) holds copies
        // of them for a while: the server sees them go only then.
        let copies: Vec<UnixStream> = busy.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(copies);
        });
        drop(busy);
        // Once the server has seen them go, a new client is served; until
        // then one is refused, and may find itself closed on before it
        // has written its request or read the answer.
        let deadline = Instant::now() + Duration::from_secs(10);
        let served = loop {
            let mut client = UnixStream::connect(&path).unwrap();
            match try_roundtrip(&mut client, b"GET /c HTTP/1.1\r\n\r\n") {
                Ok(reply) if reply.contains("/c") => break true,
                _ if Instant::now() > deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(served);
        let _ = std::fs::remove_file(&path);
    }
}
