//! Device cost without a guest: a synthetic driver fills a device's queue
//! in guest memory and kicks, and the same I/O is also done directly in the
//! same process as the baseline: pread/pwrite for virtio-blk, write(2) to
//! the same TAP for virtio-net transmit (needs CAP_NET_ADMIN; skipped
//! without it).
//!
//!     cargo bench -p moat-devices --features test-driver --bench device_cost
//!
//! Prints a table and writes target/bench/device_cost.json. Figures are
//! ratios against the baseline measured in the same run; never assert on them.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_devices::virtio::block::{Block, QUEUE_SIZE};
use moat_devices::virtio::mmio::MmioTransport;
use moat_devices::virtio::net::{Net, NetBackend, Tap, NET_HDR_LEN};
use moat_devices::virtio::test_driver::{read32, write32, Driver};
use moat_devices::virtio::{GuestMemoryMmap, Interrupt};
use vm_memory::{Bytes, GuestAddress};

const DISK_SIZE: u64 = 256 << 20;
const HEADER: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;
/// How long each measurement runs.
const RUN_FOR: Duration = Duration::from_millis(700);

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (or zeroed if it failed).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

struct Measurement {
    requests: u64,
    wall: Duration,
    cpu: Duration,
}

impl Measurement {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests as f64
    }
}

/// Runs `op(i)` for RUN_FOR and measures it.
fn measure(mut op: impl FnMut(u64)) -> Measurement {
    for i in 0..16 {
        op(i); // warm up
    }
    let (start, cpu) = (Instant::now(), cpu_time());
    let mut requests = 0;
    while start.elapsed() < RUN_FOR {
        for _ in 0..16 {
            op(requests);
            requests += 1;
        }
    }
    Measurement {
        requests,
        wall: start.elapsed(),
        cpu: cpu_time() - cpu,
    }
}

/// Offset of request `i` of `size` bytes: a scattered walk over the disk.
fn offset(i: u64, size: u64) -> u64 {
    let slots = DISK_SIZE / size;
    (i.wrapping_mul(2_654_435_761) % slots) * size
}

/// virtio-net transmit of 1514-byte and 64 KiB frames through a TAP,
/// against writing the same frames to the same TAP directly.
fn net_rows() -> Result<Vec<(String, u64, Measurement, Measurement)>, String> {
    let name = format!("mtbench{}", std::process::id() % 100_000);
    let sizes = [1514u64, 64 << 10];
    let frame = |size: u64| {
        let mut frame = vec![0u8; NET_HDR_LEN + size as usize];
        frame[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
        frame
    };
    // A TAP takes one opener at a time: the baseline first, then the device.
    let mut direct = Tap::open(&name).map_err(|e| e.to_string())?;
    let baselines: Vec<Measurement> = sizes
        .iter()
        .map(|size| {
            let frame = frame(*size);
            // A full TAP queue refuses a frame; the device drops it the same way.
            measure(|_| {
                let _ = direct.send(&frame);
            })
        })
        .collect();
    drop(direct);

    let tap = Tap::open(&name).map_err(|e| e.to_string())?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let net = Net::new(Box::new(tap), [2, 0, 0, 0, 0, 1], false);
    let mut transport = MmioTransport::new(Box::new(net), mem.clone(), irq.clone()).unwrap();
    write32(&mut transport, 0x014, 1);
    let features = u64::from(read32(&mut transport, 0x010)) << 32;
    let mut driver = Driver::init(&mut transport, &mem, features, &[256, 256]).unwrap();
    let mut rows = Vec::new();
    for (size, baseline) in sizes.into_iter().zip(baselines) {
        let frame = frame(size);
        mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
        let device = measure(|_| {
            driver.queues[1].add_chain(&mem, &[(DATA, frame.len() as u32, false)]);
            transport.process_queue(1);
            driver.queues[1].take_used(&mem);
            irq.ack(1);
        });
        rows.push((format!("virtio-net tx {size} B"), size, device, baseline));
    }
    Ok(rows)
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("device_cost.img");
    let mut file = moat_tests::file_with(&path, &[]);
    // Real data, so reads are not served from holes.
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
    for _ in 0..DISK_SIZE >> 20 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let irq = Arc::new(Interrupt::new().unwrap());
    let block = Block::new(file.try_clone().unwrap(), DISK_SIZE, false, "bench");
    let mut transport = MmioTransport::new(Box::new(block), mem.clone(), irq.clone()).unwrap();
    write32(&mut transport, 0x014, 1);
    let features = u64::from(read32(&mut transport, 0x010)) << 32;
    let mut driver = Driver::init(&mut transport, &mem, features, &[QUEUE_SIZE]).unwrap();

    let mut rows = Vec::new();
    for size in [4u64 << 10, 64 << 10, 1 << 20] {
        for (name, kind, device_writes) in [("read", 0u32, true), ("write", 1u32, false)] {
            let device = measure(|i| {
                mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
                mem.write_obj(offset(i, size) / 512, GuestAddress(HEADER + 8))
                    .unwrap();
                driver.queues[0].add_chain(
                    &mem,
                    &[
                        (HEADER, 16, false),
                        (DATA, size as u32, device_writes),
                        (STATUS, 1, true),
                    ],
                );
                transport.process_queue(0);
                let used = driver.queues[0].take_used(&mem);
                assert_eq!(used.len(), 1);
                irq.ack(1);
            });
            let mut buf = vec![0u8; size as usize];
            let baseline = measure(|i| {
                if kind == 0 {
                    file.read_exact_at(&mut buf, offset(i, size)).unwrap();
                } else {
                    file.write_all_at(&buf, offset(i, size)).unwrap();
                }
            });
            rows.push((
                format!("virtio-blk {name} {} KiB", size >> 10),
                size,
                device,
                baseline,
            ));
        }
    }
    let _ = std::fs::remove_file(&path);
    match net_rows() {
        Ok(mut net) => rows.append(&mut net),
        Err(e) => println!("virtio-net skipped: {e}"),
    }

    println!(
        "{:<26} {:>12} {:>10} {:>11} {:>12} {:>10} {:>11} {:>8}",
        "case",
        "dev req/s",
        "dev MB/s",
        "dev cpu/req",
        "base req/s",
        "base MB/s",
        "base cpu/req",
        "dev/base"
    );
    let mut json = Vec::new();
    for (name, size, dev, base) in &rows {
        let mb = |m: &Measurement| m.per_second() * *size as f64 / 1e6;
        println!(
            "{:<26} {:>12.0} {:>10.1} {:>9.1}us {:>12.0} {:>10.1} {:>10.1}us {:>8.2}",
            name,
            dev.per_second(),
            mb(dev),
            dev.cpu_us_per_request(),
            base.per_second(),
            mb(base),
            base.cpu_us_per_request(),
            dev.per_second() / base.per_second()
        );
        json.push(format!(
            "{{\"case\":\"{name}\",\"bytes\":{size},\"device_req_per_s\":{:.1},\"device_cpu_us_per_req\":{:.2},\"baseline_req_per_s\":{:.1},\"baseline_cpu_us_per_req\":{:.2},\"device_over_baseline\":{:.3}}}",
            dev.per_second(),
            dev.cpu_us_per_request(),
            base.per_second(),
            base.cpu_us_per_request(),
            dev.per_second() / base.per_second()
        ));
    }
    let out = dir.join("device_cost.json");
    std::fs::write(&out, format!("[\n{}\n]\n", json.join(",\n"))).unwrap();
    println!("wrote {}", out.display());
}
