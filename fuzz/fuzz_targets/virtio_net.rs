//! virtio-net transmit and receive: chains of any shape on both queues,
//! frames for the guest of 0 bytes to over 64 KiB, a TAP that takes at most
//! 1024 iovecs and fails now and then, offloads acked or not.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::net::Net;
use moat_fuzz::{features, Bench, FakeTap, Fault};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let frame_lens: Vec<u16> = u.arbitrary().unwrap_or_default();
    let frames = frame_lens
        .iter()
        .take(8)
        .map(|len| {
            // Some beyond 64 KiB: what a TAP with GSO can hand over.
            let len = usize::from(*len) + if len % 7 == 0 { 0x1_0000 } else { 0 };
            (0..len).map(|i| i as u8).collect()
        })
        .collect();
    let faults: Vec<Fault> = u.arbitrary().unwrap_or_default();
    let offload: bool = u.arbitrary().unwrap_or(true);
    let device = Net::new(
        Box::new(FakeTap::new(frames, faults)),
        [2, 0, 0, 0, 0, 1],
        offload,
    );
    let mut bench = Bench::new(Box::new(device));
    let wanted = features(&mut u);
    bench.init(&mut u, wanted, 2);
    bench.play_all(&mut u);
});
