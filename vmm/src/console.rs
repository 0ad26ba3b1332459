//! The guest console: the user's stdin feeds COM1's receive FIFO, and the
//! guest's output goes straight to stdout from the UART model.
//!
//! The FIFO holds 64 bytes, so input is paced: when the FIFO is full moat
//! stops reading stdin and waits for the UART's "input space" event, so a
//! paste or a piped script is never dropped or truncated.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use moat_devices::legacy::Serial;
use moat_devices::trigger::EventFdTrigger;

/// The UART type moat uses for the console.
pub type ConsoleSerial = Serial<std::io::Stdout>;

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
