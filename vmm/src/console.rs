//! The guest console: the user's stdin feeds COM1's receive FIFO, and the
//! guest's output goes to stdout through a writer thread.
//!
//! The FIFO holds 64 bytes, so input is paced: when the FIFO is full moat
//! stops reading stdin and waits for the UART's "input space" event, so a
//! paste or a piped script is never dropped or truncated.
//!
//! Output never blocks the vCPU writing it: the UART hands each byte to
//! [`ConsoleOut`], which buffers up to [`OUTPUT_BUFFER_BYTES`] for the
//! writer thread and lets [`OUTPUT_RATE_BYTES_PER_S`] through (after a
//! burst of [`OUTPUT_BURST_BYTES`]). A stdout that stops (a full pipe, a
//! suspended terminal) or a guest flooding the console loses output, counted
//! in the `uart` metrics and logged once per episode, instead of freezing
//! the vCPU and, through the UART's lock, the others.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use moat_devices::legacy::Serial;
use moat_devices::trigger::EventFdTrigger;

/// The UART type moat uses for the console.
pub type ConsoleSerial = Serial<ConsoleOut>;

/// Feeds stdin into the console UART.
pub struct ConsoleInput {
    serial: Arc<Mutex<ConsoleSerial>>,
    input_space: EventFdTrigger,
    stdin: std::io::Stdin,
    /// Bytes read from stdin that the FIFO has not taken yet.
    pending: Vec<u8>,
    /// stdin reached end of file or failed.
    done: bool,
    /// Whether stdin is currently in the epoll set.
    watching: bool,
    /// stdin cannot be polled (a regular file): read it whenever there is room.
    unpollable: bool,
}

impl ConsoleInput {
    /// An input pump for `serial`, woken by `input_space` when the guest
    /// drains the FIFO.
    pub fn new(serial: Arc<Mutex<ConsoleSerial>>, input_space: EventFdTrigger) -> Self {
        Self {
            serial,
            input_space,
            stdin: std::io::stdin(),
            pending: Vec::new(),
            done: false,
            watching: false,
            unpollable: false,
        }
    }

    /// Reads what stdin has (one read), unless it is finished.
    fn read_stdin(&mut self) {
        let mut buf = [0u8; 4096];
        match self.stdin.lock().read(&mut buf) {
            Ok(0) => self.done = true,
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.done = true,
        }
    }

    /// Moves pending bytes into the FIFO as far as it has room.
    fn push(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..taken);
    }

    /// Reads from an unpollable stdin until the FIFO is full or stdin ends.
    fn fill_unpollable(&mut self) {
        while self.pending.is_empty() && !self.done {
            self.read_stdin();
            self.push();
        }
    }

    /// Watches stdin only while there is nowhere to put more input.
    fn update_interest(&mut self, ops: &mut EventOps) {
        let want = !self.done && self.pending.is_empty() && !self.unpollable;
        let stdin = Events::new(&self.stdin, EventSet::IN);
        if want && !self.watching {
            self.watching = ops.add(stdin).is_ok();
        } else if !want && self.watching {
            let _ = ops.remove(stdin);
            self.watching = false;
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.input_space.event_fd(), EventSet::IN));
        match ops.add(Events::new(&self.stdin, EventSet::IN)) {
            Ok(()) => self.watching = true,
            // epoll refuses regular files (and /dev/null): they never block,
            // so read them directly whenever the FIFO has room.
            Err(_) => {
                self.unpollable = true;
                self.fill_unpollable();
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_space.as_raw_fd() {
            self.input_space.drain();
        } else if events.fd() == self.stdin.as_raw_fd()
            && events
                .event_set()
                .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read_stdin();
        }
        self.push();
        if self.unpollable {
            self.fill_unpollable();
        }
        self.update_interest(ops);
    }
}

/// Guest output held for a slow stdout; bytes beyond it are dropped.
pub const OUTPUT_BUFFER_BYTES: usize = 256 * 1024;
/// Guest output let through per second once a burst is spent.
pub const OUTPUT_RATE_BYTES_PER_S: u64 = 1 << 20;
/// Guest output let through at once, above the rate.
pub const OUTPUT_BURST_BYTES: u64 = 4 << 20;
/// How long the writer lets output gather once woken, so that a guest
/// writing a byte per exit wakes it about once per this, not per byte.
pub const COALESCE: Duration = Duration::from_millis(1);

/// Counters of the console's output, for metrics.
#[derive(Debug, Default)]
pub struct OutputCounters {
    /// Bytes the guest wrote to the UART.
    pub written: AtomicU64,
    /// Of those, bytes dropped: the buffer was full or the guest was over
    /// the rate.
    pub dropped: AtomicU64,
}

impl OutputCounters {
    /// The `uart` metrics group's counters (Firecracker's names).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("write_count", self.written.load(Ordering::Relaxed)),
            ("missed_write_count", self.dropped.load(Ordering::Relaxed)),
        ]
    }
}

/// How much output the sink takes.
#[derive(Clone, Copy, Debug)]
pub struct OutputLimits {
    /// Bytes held for the writer.
    pub buffer: usize,
    /// Sustained bytes per second.
    pub rate: u64,
    /// Bytes let through at once.
    pub burst: u64,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            buffer: OUTPUT_BUFFER_BYTES,
            rate: OUTPUT_RATE_BYTES_PER_S,
            burst: OUTPUT_BURST_BYTES,
        }
    }
}

/// What the UART side and the writer thread share.
struct OutputState {
    bytes: VecDeque<u8>,
    /// Bytes the rate lets through now.
    tokens: u64,
    /// When `tokens` was last refilled.
    refilled: Instant,
    /// The last byte was dropped (a warning is logged when dropping starts).
    dropping: bool,
    /// No more output is coming: the writer ends once the buffer is empty.
    closed: bool,
}

struct OutputShared {
    state: Mutex<OutputState>,
    ready: Condvar,
    limits: OutputLimits,
    counters: Arc<OutputCounters>,
}

/// The UART's output: takes bytes without ever blocking the vCPU that
/// writes them, and hands them to a writer thread. Bytes that do not fit
/// in the buffer (stdout is not keeping up) or exceed the rate are
/// dropped and counted.
#[derive(Clone)]
pub struct ConsoleOut {
    shared: Arc<OutputShared>,
}

impl ConsoleOut {
    /// A sink with `limits`; nothing is written until
    /// [`ConsoleOut::start_writer`].
    pub fn new(limits: OutputLimits) -> Self {
        Self {
            shared: Arc::new(OutputShared {
                state: Mutex::new(OutputState {
                    bytes: VecDeque::new(),
                    tokens: limits.burst,
                    refilled: Instant::now(),
                    dropping: false,
                    closed: false,
                }),
                ready: Condvar::new(),
                limits,
                counters: Arc::new(OutputCounters::default()),
            }),
        }
    }

    /// The sink's counters.
    pub fn counters(&self) -> Arc<OutputCounters> {
        self.shared.counters.clone()
    }

    /// Starts the thread that writes the buffered output to `out`, with
    /// the `filter` seccomp program installed on it.
    pub fn start_writer<W: Write + Send + 'static>(
        &self,
        out: W,
        filter: Option<Arc<seccompiler::BpfProgram>>,
    ) -> std::io::Result<ConsoleWriter> {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || {
                if let Some(filter) = filter {
                    if let Err(e) =
                        crate::seccomp::install(crate::seccomp::ThreadKind::Console, &filter)
                    {
                        log::error!("{e}; the console's output is lost");
                        return;
                    }
                }
                write_until_closed(&shared, out);
            })?;
        Ok(ConsoleWriter {
            shared: self.shared.clone(),
            handle,
        })
    }

    /// Takes one byte, or drops it.
    fn take(&self, byte: u8) {
        let shared = &*self.shared;
        shared.counters.written.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        refill(&mut state, &shared.limits);
        let full = state.bytes.len() >= shared.limits.buffer;
        if full || state.tokens == 0 {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if !state.dropping {
                state.dropping = true;
                let why = if full {
                    "stdout is not keeping up"
                } else {
                    "the guest writes faster than the console's rate limit"
                };
                log::warn!("console: dropping guest output: {why}");
            }
            return;
        }
        state.dropping = false;
        state.tokens -= 1;
        state.bytes.push_back(byte);
        if state.bytes.len() == 1 {
            shared.ready.notify_one();
        }
    }
}

/// Adds the tokens earned since the last refill, up to the burst.
fn refill(state: &mut OutputState, limits: &OutputLimits) {
    if state.tokens >= limits.burst {
        state.refilled = Instant::now();
        return;
    }
    let elapsed = state.refilled.elapsed();
    let earned = elapsed.as_nanos() * u128::from(limits.rate) / 1_000_000_000;
    if earned == 0 {
        return;
    }
    let earned = u64::try_from(earned).unwrap_or(u64::MAX);
    state.tokens = state.tokens.saturating_add(earned).min(limits.burst);
    // Keep the remainder of a token for the next refill.
    let spent = Duration::from_nanos(
        u64::try_from(u128::from(earned) * 1_000_000_000 / u128::from(limits.rate.max(1)))
            .unwrap_or(u64::MAX),
    );
    state.refilled += spent.min(elapsed);
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for byte in buf {
            self.take(*byte);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes what the sink holds to `out` until the sink is closed and empty.
fn write_until_closed<W: Write>(shared: &OutputShared, mut out: W) {
    let mut chunk = Vec::with_capacity(4096);
    loop {
        {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.bytes.is_empty() && !state.closed {
                while state.bytes.is_empty() && !state.closed {
                    state = shared.ready.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                // Let the rest of the line come: the UART writing into a
                // buffer that is not empty wakes nobody.
                drop(state);
                std::thread::sleep(COALESCE);
                state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            }
            if state.bytes.is_empty() {
                return;
            }
            let n = state.bytes.len().min(chunk.capacity());
            chunk.extend(state.bytes.drain(..n));
            if state.bytes.is_empty() && state.bytes.capacity() > 64 * 1024 {
                state.bytes.shrink_to(4096);
            }
        }
        // A closed stdout loses the output, not the VM.
        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
            log::warn!("console: cannot write the guest's output to stdout");
        }
        chunk.clear();
    }
}

/// The thread writing the console's output.
pub struct ConsoleWriter {
    shared: Arc<OutputShared>,
    handle: std::thread::JoinHandle<()>,
}

impl ConsoleWriter {
    /// Closes the sink and waits up to `timeout` for what it holds to be
    /// written; returns whether it was. (A stdout that blocks for longer
    /// keeps the rest.)
    pub fn finish(self, timeout: Duration) -> bool {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.closed = true;
            self.shared.ready.notify_all();
        }
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.handle.join();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(buffer: usize, rate: u64, burst: u64) -> OutputLimits {
        OutputLimits {
            buffer,
            rate,
            burst,
        }
    }

    /// A writer that keeps what it is given, and counts its writes.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>, Arc<std::sync::atomic::AtomicUsize>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that never returns, like a pipe nobody reads.
    struct Stuck;

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_beyond_the_buffer_is_dropped_and_counted_without_blocking() {
        let mut out = ConsoleOut::new(limits(16, 1 << 30, 1 << 30));
        // No writer yet: nothing drains the buffer.
        assert_eq!(out.write(&[b'x'; 100]).unwrap(), 100);
        let counters = out.counters();
        assert_eq!(
            counters.snapshot(),
            vec![("write_count", 100), ("missed_write_count", 84)]
        );
    }

    #[test]
    fn a_stuck_stdout_never_blocks_the_writer_of_guest_output() {
        let mut out = ConsoleOut::new(limits(1024, 1 << 30, 1 << 30));
        let writer = out.start_writer(Stuck, None).unwrap();
        let start = Instant::now();
        for _ in 0..100 {
            out.write_all(&[b'y'; 100]).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // The writer took its first chunk and is stuck in it; the rest
        // filled the buffer and then was dropped.
        let dropped = out.counters().dropped.load(Ordering::Relaxed);
        assert!(
            (10_000 - 1024 - 4096..=10_000 - 1024).contains(&dropped),
            "{dropped}"
        );
        let start = Instant::now();
        assert!(!writer.finish(Duration::from_millis(50)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_rate_limit_lets_a_burst_through_then_the_rate() {
        // 100 bytes per second, 10 at once.
        let mut out = ConsoleOut::new(limits(1 << 20, 100, 10));
        out.write_all(&[b'z'; 25]).unwrap();
        assert_eq!(out.counters().dropped.load(Ordering::Relaxed), 15);
        // 150 ms earn 15 tokens, of which the burst keeps 10.
        std::thread::sleep(Duration::from_millis(150));
        out.write_all(&[b'z'; 10]).unwrap();
        assert_eq!(out.counters().dropped.load(Ordering::Relaxed), 15);
        out.write_all(&[b'z'; 5]).unwrap();
        assert!(out.counters().dropped.load(Ordering::Relaxed) >= 19);
    }

    #[test]
    fn tokens_accrue_from_writes_closer_together_than_one_token() {
        // 1,000 bytes per second is one per millisecond; writes every
        // 0.1 ms must still earn them (the remainder is kept).
        let mut out = ConsoleOut::new(limits(1 << 20, 1000, 1));
        let start = Instant::now();
        let (mut tries, mut taken) = (0, 0);
        while start.elapsed() < Duration::from_millis(200) {
            let before = out.counters().dropped.load(Ordering::Relaxed);
            out.write_all(b"a").unwrap();
            tries += 1;
            if out.counters().dropped.load(Ordering::Relaxed) == before {
                taken += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let elapsed_ms = start.elapsed().as_millis() as u64;
        assert!(
            taken >= tries.min(150) && taken <= elapsed_ms + 2,
            "{taken} of {tries} bytes taken in {elapsed_ms} ms at 1000/s"
        );
    }

    #[test]
    fn the_writer_delivers_everything_in_order_and_finish_drains_it() {
        let mut out = ConsoleOut::new(OutputLimits::default());
        let kept = Kept::default();
        let writer = out.start_writer(kept.clone(), None).unwrap();
        let text: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for byte in &text {
            out.write_all(std::slice::from_ref(byte)).unwrap();
        }
        assert!(writer.finish(Duration::from_secs(5)));
        assert_eq!(*kept.0.lock().unwrap(), text);
        assert_eq!(out.counters().dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_guest_writing_byte_by_byte_wakes_the_writer_about_once_a_millisecond() {
        // A wakeup per byte costs the vCPU a futex call and the writer a
        // write(2) per byte: 300 µs an exit in the nested test rig
        // (--trace-exits showed the UART's writes at half the boot).
        let mut out = ConsoleOut::new(OutputLimits::default());
        let kept = Kept::default();
        let writer = out.start_writer(kept.clone(), None).unwrap();
        let start = Instant::now();
        for _ in 0..2000 {
            out.write_all(b"x").unwrap();
            let paced = Instant::now();
            while paced.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            }
        }
        let elapsed_ms = start.elapsed().as_millis();
        assert!(writer.finish(Duration::from_secs(5)));
        assert_eq!(kept.0.lock().unwrap().len(), 2000);
        // About 20 bytes a millisecond come in; a write per byte was the
        // bug. Allow a second write per wakeup (bytes that came during the
        // first) and a loaded machine's late sleeps: 8 bytes a write.
        let writes = kept.1.load(Ordering::Relaxed);
        assert!(
            writes * 8 <= 2000,
            "{writes} writes for 2000 bytes in {elapsed_ms} ms"
        );
    }
}
