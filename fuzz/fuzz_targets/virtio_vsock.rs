//! virtio-vsock packets: headers of every op, port, length and credit on
//! the TX queue (requests to host ports nobody listens on, data for
//! connections that do not exist, shutdowns, credit updates), receive and
//! event queues of any shape.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::vsock::Vsock;
use moat_fuzz::{features, Bench};

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let path = std::env::temp_dir().join(format!(
        "moat-fuzz-vsock-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = UnixListener::bind(&path).expect("bind the vsock socket");
    let device = Vsock::new(3, path.clone(), listener).expect("vsock");
    let mut bench = Bench::new(Box::new(device));
    let wanted = features(&mut u);
    bench.init(&mut u, wanted, 3);
    bench.play_all(&mut u);
    drop(bench);
    let _ = std::fs::remove_file(&path);
});
