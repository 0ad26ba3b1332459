//! virtio-blk requests: chains of any shape (looping, longer than the
//! queue, indirect, outside RAM or in the hole, lengths that wrap), headers
//! of every type and sector, on a disk that fails with EIO, ENOSPC or short
//! transfers. The fake disk fails the run if the device reaches past the
//! disk's end or writes to a read-only one.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::block::Block;
use moat_fuzz::{features, Bench, FakeDisk, Fault};

/// 64 KiB and a partial sector, which the device must not expose.
const DISK: usize = 64 * 1024 + 100;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let read_only: bool = u.arbitrary().unwrap_or(false);
    let faults: Vec<Fault> = u.arbitrary().unwrap_or_default();
    let disk = FakeDisk::new(DISK, faults, read_only);
    let device = Block::with_backend(Box::new(disk), DISK as u64, read_only, "fuzz");
    let mut bench = Bench::new(Box::new(device));
    let wanted = features(&mut u);
    bench.init(&mut u, wanted, 1);
    bench.play_all(&mut u);
});
