//! The virtio-mmio transport: register accesses of every width and offset
//! in any order (resets and ready toggles in flight, queues configured
//! with any size and address, features never offered), interleaved with
//! guest memory writes and queue notifications, for each kind of device.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::block::Block;
use moat_devices::virtio::net::Net;
use moat_devices::virtio::rng::Rng;
use moat_devices::virtio::VirtioDevice;
use moat_fuzz::{Bench, FakeDisk, FakeTap};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let device: Box<dyn VirtioDevice> = match u.int_in_range(0u8..=2).unwrap_or(0) {
        0 => Box::new(Block::with_backend(
            Box::new(FakeDisk::new(64 * 1024, Vec::new(), false)),
            64 * 1024,
            false,
            "fuzz",
        )),
        1 => Box::new(Net::new(
            Box::new(FakeTap::new(Vec::new(), Vec::new())),
            [2, 0, 0, 0, 0, 1],
            true,
        )),
        _ => Box::new(Rng::new(Some(4096)).expect("rng timer")),
    };
    // From the first register access on: no driver set-up.
    let mut bench = Bench::new(device);
    bench.play_all(&mut u);
});
