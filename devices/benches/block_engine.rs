//! Should virtio-blk's backend use io_uring? 4 KiB reads at scattered
//! offsets of a 256 MiB file, with pread(2) (what the device does, one
//! request at a time on the event loop) as the baseline, against io_uring
//! with one read in flight and with eight, each both ways a VMM could
//! wait for completions: in `io_uring_enter` itself, or as an event loop
//! does, on an eventfd the ring signals, through epoll. Once with the file
//! in the page cache (the benchmark guests' disks), once with O_DIRECT
//! (every read goes to the host's disk).
//!
//!     cargo bench -p moat-devices --bench block_engine
//!
//! Prints a table; figures are ratios against pread in the same round.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
/// Most reads in flight at once.
const DEPTH: usize = 8;
const RUN_FOR: Duration = Duration::from_millis(700);

/// The byte offset of read `i`: scattered, block-aligned (for O_DIRECT).
fn offset(i: u64) -> u64 {
    (i.wrapping_mul(2_654_435_761) % (FILE_SIZE / BLOCK as u64)) * BLOCK as u64
}

/// Reads per second of `op`, which does some reads starting with read
/// number `i` and returns how many.
fn rate(mut op: impl FnMut(u64) -> u64) -> f64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < RUN_FOR {
        n += op(n);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A page-aligned buffer (O_DIRECT needs the alignment).
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// One buffer per read in flight.
struct Buffers(Vec<Block>);

impl Buffers {
    fn new() -> Buffers {
        Buffers((0..DEPTH).map(|_| Block([0; BLOCK])).collect())
    }
}

/// How the VMM learns that reads finished.
enum Wait<'a> {
    /// `io_uring_enter` waits for them.
    InEnter,
    /// The ring signals this eventfd; the event loop waits in epoll.
    EventLoop(&'a EventFd, &'a Epoll),
}

/// `depth` reads starting with read number `first`, submitted at once;
/// returns when all are done.
fn ring_reads(
    ring: &mut IoUring,
    fd: RawFd,
    bufs: &mut Buffers,
    first: u64,
    depth: usize,
    wait: &Wait,
) -> u64 {
    for (k, buf) in bufs.0.iter_mut().take(depth).enumerate() {
        let read = opcode::Read::new(types::Fd(fd), buf.0.as_mut_ptr(), BLOCK as u32)
            .offset(offset(first + k as u64))
            .build();
        // SAFETY: the buffer outlives the read: it is reaped below before
        // this function returns.
        unsafe { ring.submission().push(&read) }.expect("the ring has room for DEPTH reads");
    }
    let mut done = 0;
    match wait {
        Wait::InEnter => {
            ring.submit_and_wait(depth).expect("io_uring_enter");
        }
        Wait::EventLoop(eventfd, epoll) => {
            ring.submit().expect("io_uring_enter");
            let mut events = [EpollEvent::default()];
            while ring.completion().is_empty() {
                // The ring's completion work interrupts epoll_wait
                // (EINTR) unless the ring is set up otherwise.
                match epoll.wait(-1, &mut events) {
                    Ok(_) => {
                        let _ = eventfd.read();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("epoll_wait: {e}"),
                }
            }
        }
    }
    while done < depth {
        for cqe in ring.completion() {
            assert_eq!(cqe.result(), BLOCK as i32, "a short or failed read");
            done += 1;
        }
        if done < depth {
            ring.submit_and_wait(1).expect("io_uring_enter");
        }
    }
    depth as u64
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("block_engine.img");
    drop(moat_tests::bench_disk(&path, FILE_SIZE >> 20));
    let mut bufs = Buffers::new();
    println!(
        "{:<11} {:>5} {:>12} {:>9} {:>10} {:>9} {:>10}",
        "file", "round", "pread req/s", "uring 1", "uring 1 ev", "uring 8", "uring 8 ev"
    );
    for (name, flags) in [("page cache", 0), ("O_DIRECT", libc::O_DIRECT)] {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&path)
            .unwrap();
        let fd = file.as_raw_fd();
        let (mut ring, mut ring_ev) = match (IoUring::new(64), IoUring::new(64)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                println!("io_uring is not available here: {e}");
                break;
            }
        };
        let eventfd = EventFd::new(EFD_NONBLOCK).unwrap();
        ring_ev
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .unwrap();
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                eventfd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let event_loop = Wait::EventLoop(&eventfd, &epoll);
        for round in 0..3 {
            let pread = rate(|i| {
                file.read_exact_at(&mut bufs.0[0].0, offset(i)).unwrap();
                1
            });
            let mut of_pread = |ring: &mut IoUring, depth, wait: &Wait| {
                rate(|i| ring_reads(ring, fd, &mut bufs, i, depth, wait)) / pread
            };
            let one = of_pread(&mut ring, 1, &Wait::InEnter);
            let one_ev = of_pread(&mut ring_ev, 1, &event_loop);
            let many = of_pread(&mut ring, DEPTH, &Wait::InEnter);
            let many_ev = of_pread(&mut ring_ev, DEPTH, &event_loop);
            println!(
                "{name:<11} {round:>5} {pread:>12.0} {one:>9.2} {one_ev:>10.2} {many:>9.2} {many_ev:>10.2}"
            );
        }
    }
    let _ = std::fs::remove_file(&path);
    println!(
        "uring N: N reads in flight, waited for in io_uring_enter; ev: waited for as an \
         event loop does (the ring's eventfd, epoll). Ratios against pread, one at a time."
    );
}
