//! virtio-blk with its asynchronous engine (io_uring): the chains of the
//! virtio_blk target (same input format, so its corpus seeds this one), on
//! a disk in a memfd, with the event loop's completion handling among the
//! fuzzer's moves. The run fails if the device grew the disk (wrote past
//! its end), changed a read-only one, or left the engine with requests it
//! never finished (dropping the device waits for them).
#![no_main]

use std::io::{Read, Seek, Write};
use std::os::fd::FromRawFd;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::block::{Block, IoEngine};
use moat_fuzz::{features, Bench, Fault};

/// 64 KiB and a partial sector, which the device must not expose.
const DISK: usize = 64 * 1024 + 100;

fn pattern() -> Vec<u8> {
    (0..DISK).map(|i| (i / 512) as u8).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let read_only: bool = u.arbitrary().unwrap_or(false);
    // The virtio_blk target's faults: read and ignored (a real file).
    let _: Vec<Fault> = u.arbitrary().unwrap_or_default();
    // SAFETY: memfd_create makes a descriptor we then own.
    let fd = unsafe { libc::memfd_create(c"moat-fuzz-disk".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and nothing else owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&pattern()).unwrap();
    let disk = file.try_clone().unwrap();
    let device = Block::with_engine(disk, DISK as u64, read_only, "fuzz", IoEngine::Async)
        .expect("io_uring for the asynchronous engine");
    let mut bench = Bench::new(Box::new(device));
    let wanted = features(&mut u);
    bench.init(&mut u, wanted, 1);
    bench.play_all(&mut u);
    drop(bench);
    assert_eq!(file.metadata().unwrap().len(), DISK as u64, "the disk grew");
    if read_only {
        let mut now = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut now).unwrap();
        assert!(now == pattern(), "a read-only disk changed");
    }
});
