//! virtio-rng (virtio 1.2, 5.4): the guest's entropy source, filled from
//! getrandom(2), optionally at a bounded rate.
//!
//! One queue of device-writable buffers. With a rate limit the device hands
//! out bytes from a token bucket (a second's worth at most): when it runs
//! dry, the device stops and arms a timer for when enough tokens are back;
//! the timer is its backend descriptor, so the event loop wakes it.
//!
//! getrandom(2) blocks until the host's random pool is initialised, which
//! on a freshly booted host can be seconds after moat starts. The event
//! loop must never wait on it: when the pool is not ready at creation, the
//! device holds its requests and a [`PoolWaiter`], run in a thread of its
//! own, waits for the pool with a blocking getrandom (which also makes the
//! kernel gather entropy; a non-blocking probe would not) and then fires
//! the device's timer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use super::ring::{self, Ring};
use super::{
    DeviceError, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 64;
/// The most bytes one request gets (Linux asks for at most a page or so).
const MAX_REQUEST: usize = 64 * 1024;

/// A byte budget that refills at `rate` bytes a second, up to a second's
/// worth.
struct TokenBucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.rate);
            self.last = now;
        }
    }

    /// Takes `want` bytes' worth (at most the bucket's size) if they are
    /// there; returns how many were taken, 0 if too few are there.
    fn take_whole(&mut self, want: u64, now: Instant) -> u64 {
        self.refill(now);
        let want = want.min(self.rate);
        if self.tokens < want {
            return 0;
        }
        self.tokens -= want;
        want
    }

    /// How long until `want` tokens (at most the bucket's size) are there.
    fn wait_for(&self, want: u64) -> Duration {
        let want = want.min(self.rate);
        let missing = want.saturating_sub(self.tokens).max(1);
        Duration::from_nanos(
            (u128::from(missing) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64,
        )
    }
}

/// A virtio-rng device.
pub struct Rng {
    queue: Option<Queue>,
    limit: Option<TokenBucket>,
    timer: TimerFd,
    /// Requests wait for the timer: the rate limit's, or the pool waiter's.
    waiting: bool,
    /// Whether the host's random pool is initialised.
    pool_ready: Arc<AtomicBool>,
    /// Bytes handed to the guest so far.
    bytes: u64,
}

impl Rng {
    /// A device; `rate` limits it to that many bytes a second. If the
    /// host's pool is not ready yet, run [`Rng::pool_waiter`]'s waiter.
    pub fn new(rate: Option<u64>) -> std::io::Result<Self> {
        Self::with_pool_ready(rate, pool_is_ready())
    }

    fn with_pool_ready(rate: Option<u64>, ready: bool) -> std::io::Result<Self> {
        Ok(Self {
            queue: None,
            limit: rate.map(TokenBucket::new),
            timer: TimerFd::new()?,
            waiting: false,
            pool_ready: Arc::new(AtomicBool::new(ready)),
            bytes: 0,
        })
    }

    /// What waits for the host's pool, if it was not ready when the device
    /// was made: the device serves nothing until the waiter has run.
    pub fn pool_waiter(&self) -> std::io::Result<Option<PoolWaiter>> {
        if self.pool_ready.load(Ordering::Acquire) {
            return Ok(None);
        }
        // SAFETY: dup of a descriptor this device owns; the result is
        // checked and owned by the waiter alone.
        let fd = unsafe { libc::dup(self.timer.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(PoolWaiter {
            ready: self.pool_ready.clone(),
            // SAFETY: `fd` was just opened and nothing else owns it.
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    /// Bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes
    }

    /// Serves requests until the queue is empty or the rate limit stops
    /// it, then interrupts the driver if it asked to hear of them.
    fn serve(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> Result<(), DeviceError> {
        if self.queue.is_none() {
            return Ok(());
        }
        if !self.pool_ready.load(Ordering::Acquire) {
            // The pool waiter fires the timer when the pool is ready.
            self.waiting = true;
            return Ok(());
        }
        ring::serve(
            self,
            |rng| rng.queue.as_mut(),
            mem,
            interrupt,
            |rng, ring| rng.serve_on(ring, mem),
        )
    }

    /// [`Self::serve`]'s work on the queue's `ring`.
    fn serve_on(&mut self, ring: &mut Ring<'_>, mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        ring.disable_notification()?;
        loop {
            let Some(head) = ring.pop_or_notify()? else {
                return Ok(());
            };
            let mut chain = ring.chain(head);
            let parts: Vec<_> = chain
                .by_ref()
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            // An indirect table (never offered) gets nothing.
            let room: usize = if chain.uses_indirect() {
                0
            } else {
                let total = parts.iter().fold(0usize, |sum, p| sum.saturating_add(p.1));
                total.min(MAX_REQUEST)
            };
            // A request is served whole (up to a second's worth).
            // Answered with the few bytes the bucket had at each kick,
            // Linux 6.1's driver (64-byte requests) stopped asking after
            // some 80 requests in the rig; whole answers also cost fewer
            // interrupts.
            let grant = match self.limit.as_mut() {
                Some(bucket) => {
                    let got = bucket.take_whole(room as u64, Instant::now());
                    if got == 0 && room > 0 {
                        // Not enough tokens: this request waits for the
                        // timer.
                        ring.give_back();
                        let wait = bucket.wait_for(room as u64);
                        if self.timer.reset(wait, None).is_ok() {
                            self.waiting = true;
                        }
                        return Ok(());
                    }
                    got as usize
                }
                None => room,
            };
            let written = fill(mem, &parts, grant)?;
            self.bytes += written as u64;
            ring.add_used(head, written as u32)?;
        }
    }
}

/// Writes `len` random bytes into the guest memory `parts`; returns how
/// many were written (fewer if a part lies outside guest memory).
fn fill(
    mem: &GuestMemoryMmap,
    parts: &[(vm_memory::GuestAddress, usize)],
    mut len: usize,
) -> Result<usize, DeviceError> {
    let mut buf = [0u8; 4096];
    let mut written = 0;
    for &(addr, part_len) in parts {
        let mut done = 0;
        while done < part_len.min(len) {
            let n = (part_len.min(len) - done).min(buf.len());
            getrandom(&mut buf[..n])?;
            let Some(at) = vm_memory::Address::checked_add(&addr, done as u64) else {
                return Ok(written);
            };
            if mem.write_slice(&buf[..n], at).is_err() {
                return Ok(written);
            }
            done += n;
            written += n;
        }
        len -= part_len.min(len);
        if len == 0 {
            break;
        }
        if mem.get_slice(addr, part_len).is_err() {
            break;
        }
    }
    Ok(written)
}

/// Waits, in a thread of its own, for the host's random pool, then wakes
/// the device it came from.
pub struct PoolWaiter {
    ready: Arc<AtomicBool>,
    /// The device's timer (a second descriptor of it).
    timer: OwnedFd,
}

impl PoolWaiter {
    /// Blocks until the host's pool is initialised, then wakes the device.
    pub fn wait(self) {
        let mut byte = [0u8; 1];
        // Blocking: only a blocking getrandom makes the kernel generate
        // entropy when nothing else does. An error other than EINTR cannot
        // be waited out either; the device then reports it per request.
        while getrandom_once(&mut byte, 0) == Err(libc::EINTR) {}
        self.mark_ready();
    }

    /// Marks the pool ready and fires the device's timer.
    fn mark_ready(self) {
        self.ready.store(true, Ordering::Release);
        let soon = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 1,
            },
        };
        // SAFETY: a timerfd this waiter owns and a valid itimerspec.
        let armed = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &soon, std::ptr::null_mut())
        };
        if armed != 0 {
            log::error!(
                "virtio-rng: cannot wake the device once the host's pool is ready: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One getrandom(2) call into `buf` with `flags`: bytes written or errno.
fn getrandom_once(buf: &mut [u8], flags: u32) -> Result<usize, i32> {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(n as usize)
    }
}

/// Whether getrandom(2) would return without blocking.
fn pool_is_ready() -> bool {
    let mut byte = [0u8; 1];
    loop {
        match getrandom_once(&mut byte, libc::GRND_NONBLOCK) {
            Err(libc::EINTR) => continue,
            result => return result != Err(libc::EAGAIN),
        }
    }
}

/// Fills `buf` from the kernel's random pool (getrandom(2); the device
/// calls it only once the pool is initialised, so it does not block).
fn getrandom(buf: &mut [u8]) -> Result<(), DeviceError> {
    let mut done = 0;
    while done < buf.len() {
        match getrandom_once(&mut buf[done..], 0) {
            Ok(n) => done += n,
            Err(libc::EINTR) => continue,
            Err(e) => {
                let e = std::io::Error::from_raw_os_error(e);
                return Err(DeviceError(format!("getrandom: {e}")));
            }
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("entropy_bytes", self.bytes)]
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // No config space.
        super::read_config_bytes(&[], offset, data);
    }

    fn activate(&mut self, _acked_features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
        self.queue = Some(
            queues
                .into_iter()
                .next()
                .ok_or_else(|| DeviceError("no request queue".into()))?,
        );
        Ok(())
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queue.iter().map(super::queue_position).collect()
    }

    fn reset(&mut self) {
        self.queue = None;
        self.waiting = false;
        let _ = self.timer.clear();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.timer.as_raw_fd())
    }

    fn backend_wanted(&self) -> bool {
        self.waiting
    }

    fn process_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let _ = self.timer.wait();
        self.waiting = false;
        self.serve(mem, interrupt)
    }

    fn process_queue(
        &mut self,
        _index: usize,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        if self.waiting {
            // The timer will serve the queue.
            return Ok(());
        }
        self.serve(mem, interrupt)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::test_driver::{indirect, Driver, DESC_WRITE};

    const BUFFERS: u64 = 0x8_0000;

    struct Rig {
        transport: MmioTransport,
        driver: Driver,
        mem: GuestMemoryMmap,
    }

    fn rig(rate: Option<u64>) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let rng = Rng::new(rate).unwrap();
        let mut transport = MmioTransport::new(Box::new(rng), mem.clone(), irq).unwrap();
        let driver = Driver::init(&mut transport, &mem, VIRTIO_F_VERSION_1, &[QUEUE_SIZE]).unwrap();
        Rig {
            transport,
            driver,
            mem,
        }
    }

    impl Rig {
        /// Posts `count` writable buffers of `len` bytes; returns their addresses.
        fn post(&mut self, count: u64, len: u32) -> Vec<u64> {
            (0..count)
                .map(|i| {
                    let addr = BUFFERS + i * 0x1_0000;
                    self.driver.queues[0].add_chain(&self.mem, &[(addr, len, true)]);
                    addr
                })
                .collect()
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn used_bytes(&mut self) -> u32 {
            self.driver.queues[0]
                .take_used(&self.mem)
                .iter()
                .map(|(_, len)| len)
                .sum()
        }
    }

    #[test]
    fn a_restored_transport_serves_the_ring_from_where_the_snapshot_left_it() {
        let mut r = rig(None);
        r.post(3, 64);
        r.transport.process_queue(0);
        assert_eq!(r.used_bytes(), 192);
        r.post(1, 16);
        r.transport.process_queue(0);
        let state = r.transport.state();
        assert!(state.active);
        assert_eq!(state.queues[0].position, Some((4, 4)));

        // A new moat: the same guest memory, a fresh device, the state put
        // back. It goes on with the ring, not from its start.
        let irq = Arc::new(Interrupt::new().unwrap());
        let rng = Rng::new(None).unwrap();
        let mut restored = MmioTransport::new(Box::new(rng), r.mem.clone(), irq).unwrap();
        restored.restore(&state).unwrap();
        assert!(restored.is_active());
        assert_eq!(restored.status(), state.status);
        assert_eq!(restored.state(), state);
        assert_eq!(r.used_bytes(), 16);
        r.post(2, 32);
        restored.process_queue(0);
        assert_eq!(r.used_bytes(), 64);
        assert_eq!(restored.state().queues[0].position, Some((6, 6)));
    }

    #[test]
    fn a_state_for_another_kind_of_device_is_refused() {
        let r = rig(None);
        let mut state = r.transport.state();
        state.device_type = 2;
        let irq = Arc::new(Interrupt::new().unwrap());
        let mut other =
            MmioTransport::new(Box::new(Rng::new(None).unwrap()), r.mem.clone(), irq).unwrap();
        assert!(other.restore(&state).unwrap_err().contains("type 2"));
        state.device_type = 4;
        state.queues.push(state.queues[0].clone());
        assert!(other.restore(&state).unwrap_err().contains("2 queues"));
    }

    #[test]
    fn requests_get_random_bytes() {
        let mut r = rig(None);
        let bufs = r.post(4, 512);
        r.transport.process_queue(0);
        let used = r.driver.queues[0].take_used(&r.mem);
        assert_eq!(used.len(), 4);
        assert!(used.iter().all(|(_, len)| *len == 512), "{used:?}");
        let (first, second) = (r.bytes(bufs[0], 512), r.bytes(bufs[1], 512));
        assert_ne!(first, vec![0u8; 512]);
        assert_ne!(first, second);
    }

    #[test]
    fn a_buffer_behind_an_indirect_table_gets_nothing() {
        let mut r = rig(None);
        let desc = indirect(&r.mem, BUFFERS, BUFFERS + 0x1000, 64, DESC_WRITE);
        r.driver.queues[0].add_raw(&r.mem, &[desc]);
        r.transport.process_queue(0);
        assert_eq!(r.used_bytes(), 0);
        assert_eq!(r.bytes(BUFFERS + 0x1000, 64), vec![0; 64]);
    }

    #[test]
    fn readable_parts_of_a_chain_are_not_written() {
        let mut r = rig(None);
        r.mem
            .write_slice(&[0xaa; 64], GuestAddress(BUFFERS))
            .unwrap();
        r.driver.queues[0].add_chain(
            &r.mem,
            &[(BUFFERS, 64, false), (BUFFERS + 0x1000, 32, true)],
        );
        r.transport.process_queue(0);
        assert_eq!(r.used_bytes(), 32);
        assert_eq!(r.bytes(BUFFERS, 64), vec![0xaa; 64]);
    }

    #[test]
    fn the_rate_limit_holds_and_the_timer_resumes() {
        let mut r = rig(Some(1000));
        assert!(r.transport.backend_fd().is_some());
        r.post(3, 600);
        r.transport.process_queue(0);
        // The bucket starts with a second's worth: one whole 600-byte
        // request; the 400 left are not enough for the next.
        assert_eq!(r.used_bytes(), 600);
        assert!(r.transport.backend_wanted(), "waits for its timer");
        // A notification meanwhile does not bypass the limit.
        r.transport.process_queue(0);
        assert_eq!(r.used_bytes(), 0);
        std::thread::sleep(Duration::from_millis(250));
        r.transport.process_backend();
        assert_eq!(r.used_bytes(), 600, "200 more tokens after 200 ms make 600");
        assert!(r.transport.backend_wanted());
    }

    #[test]
    fn a_rate_limited_guest_keeps_getting_bytes_one_request_at_a_time() {
        // Like Linux's driver: one 64-byte request outstanding, the next
        // posted (and kicked) when the last completes; EVENT_IDX on.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let mut t =
            MmioTransport::new(Box::new(Rng::new(Some(2000)).unwrap()), mem.clone(), irq).unwrap();
        let mut d = Driver::init(
            &mut t,
            &mem,
            VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX,
            &[QUEUE_SIZE],
        )
        .unwrap();
        let mut total = 0u32;
        let start = Instant::now();
        d.queues[0].add_chain(&mem, &[(BUFFERS, 64, true)]);
        t.process_queue(0);
        while total < 4000 && start.elapsed() < Duration::from_secs(5) {
            let used: u32 = d.queues[0].take_used(&mem).iter().map(|(_, l)| l).sum();
            if used > 0 {
                total += used;
                d.queues[0].add_chain(&mem, &[(BUFFERS, 64, true)]);
                t.process_queue(0);
            } else if t.backend_wanted() {
                std::thread::sleep(Duration::from_millis(10));
                t.process_backend();
            } else {
                panic!("stuck after {total} bytes: no request served and no timer armed");
            }
        }
        assert!(total >= 4000, "only {total} bytes in 5 s at 2000 B/s");
        assert!(
            start.elapsed() >= Duration::from_millis(800),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn without_a_limit_a_ready_device_never_wants_its_backend() {
        let mut r = rig(None);
        r.post(2, 64);
        r.transport.process_queue(0);
        assert_eq!(r.used_bytes(), 128);
        assert!(!r.transport.backend_wanted());
    }

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
    }

    #[test]
    fn until_the_hosts_pool_is_ready_requests_wait_without_blocking_the_loop() {
        // getrandom(2) blocks until the host's pool is initialised (a
        // freshly booted host: 14 s in the rig's L1). The event loop must
        // not wait on it: the device holds the requests, and a thread
        // waiting for the pool wakes it through its backend descriptor.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let rng = Rng::with_pool_ready(None, false).unwrap();
        let waiter = rng
            .pool_waiter()
            .unwrap()
            .expect("a waiter while the pool is not ready");
        let mut t = MmioTransport::new(Box::new(rng), mem.clone(), irq).unwrap();
        let mut d = Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[QUEUE_SIZE]).unwrap();
        d.queues[0].add_chain(&mem, &[(BUFFERS, 64, true)]);
        t.process_queue(0);
        assert!(
            d.queues[0].take_used(&mem).is_empty(),
            "served before the pool was ready"
        );
        assert!(t.backend_wanted(), "waits for the pool");
        let fd = t.backend_fd().expect("a backend descriptor to wake it");
        assert!(!readable(fd, 0));
        // What the waiting thread does once its getrandom returns.
        waiter.mark_ready();
        assert!(readable(fd, 1000), "the waiter did not wake the device");
        t.process_backend();
        let used = d.queues[0].take_used(&mem);
        assert_eq!(used.iter().map(|(_, l)| l).sum::<u32>(), 64, "{used:?}");
        assert!(!t.backend_wanted());
    }

    #[test]
    fn a_ready_pool_needs_no_waiter_and_the_waiter_returns_at_once_here() {
        let rng = Rng::with_pool_ready(None, true).unwrap();
        assert!(rng.pool_waiter().unwrap().is_none());
        let rng = Rng::with_pool_ready(Some(1000), false).unwrap();
        let waiter = rng.pool_waiter().unwrap().unwrap();
        // This host's pool is ready: the blocking wait returns.
        waiter.wait();
        assert!(rng.pool_ready.load(Ordering::Acquire));
    }
}
