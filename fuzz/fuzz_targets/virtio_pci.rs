//! The virtio-pci transport: configuration-space accesses through the
//! 0xcf8/0xcfc ports and BAR accesses of every width and offset, in any
//! order (BARs moved, sized and switched off, MSI-X tables written,
//! vectors set, resets and queue set-up through the common configuration,
//! the configuration access capability aimed anywhere), interleaved with
//! the event loop serving the device's queues. The host end checks what
//! the function asks of KVM: only its two lines, and notifications only
//! inside the window the guest was given.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::block::Block;
use moat_devices::virtio::mmio::MmioTransport;
use moat_devices::virtio::pci::{
    HostBridge, MsiMessage, PciBus, PciConfigIo, PciHost, PciMmio, VirtioPci, BAR_SIZE,
};
use moat_devices::virtio::rng::Rng;
use moat_devices::virtio::{Interrupt, VirtioDevice};
use moat_devices::BusDevice;
use moat_fuzz::{guest_memory, FakeDisk};

/// The window the functions' BARs may decode in (as moat's).
const WINDOW: (u64, u64) = (0xd000_0000, 0xe000_0000);

/// What the function asked for; checked as it asks.
struct Host;

impl PciHost for Host {
    fn set_line(&mut self, line: usize, _: Option<MsiMessage>) {
        assert!(line < 2, "line {line}");
    }

    fn map_notifications(&mut self, base: Option<u64>) {
        if let Some(base) = base {
            assert!(
                base >= WINDOW.0 && base + BAR_SIZE <= WINDOW.1,
                "notifications at {base:#x}"
            );
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// CONFIG_ADDRESS: enable bit, bus 0, device, function, register.
    Select {
        device: u8,
        function: u8,
        register: u8,
        enable: bool,
    },
    /// Any CONFIG_ADDRESS value.
    Address(u32),
    /// An access at port 0xcf8 + `port % 8`.
    PortRead {
        port: u8,
        width: u8,
    },
    PortWrite {
        port: u8,
        width: u8,
        value: u32,
    },
    /// An access at `offset` from the window's start (three BARs' worth).
    MemRead {
        offset: u16,
        width: u8,
    },
    MemWrite {
        offset: u16,
        width: u8,
        value: u64,
    },
    /// The event loop serves a queue, as after a notification.
    Serve {
        device: bool,
        queue: u8,
    },
    /// The device raises an interrupt.
    Signal {
        device: bool,
        config: bool,
    },
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8, 3][usize::from(w % 5)]
}

/// A device behind a function, its transport and its interrupt.
struct Function {
    transport: Arc<Mutex<MmioTransport>>,
    pci: Arc<Mutex<VirtioPci>>,
    interrupt: Arc<Interrupt>,
}

fn function(device: Box<dyn VirtioDevice>, bar: u64) -> Function {
    let interrupt = Arc::new(Interrupt::with_config_line().expect("eventfd"));
    let transport =
        MmioTransport::new(device, guest_memory(), interrupt.clone()).expect("transport");
    let transport = Arc::new(Mutex::new(transport));
    let pci = VirtioPci::new(transport.clone(), bar, WINDOW, Box::new(Host));
    Function {
        transport,
        pci: Arc::new(Mutex::new(pci)),
        interrupt,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let disk = Block::with_backend(
        Box::new(FakeDisk::new(64 * 1024, Vec::new(), false)),
        64 * 1024,
        false,
        "fuzz",
    );
    let blk = function(Box::new(disk), WINDOW.0);
    let rng = Rng::new(Some(4096)).expect("rng timer");
    let rng = function(Box::new(rng), WINDOW.0 + BAR_SIZE);
    let bus = PciBus::new(vec![
        Arc::new(Mutex::new(HostBridge::new())),
        blk.pci.clone(),
        rng.pci.clone(),
    ]);
    let mut io = PciConfigIo::new(bus.clone());
    let mut mmio = PciMmio::new(bus, WINDOW.0);
    let mut buf = [0u8; 8];
    // An exhausted input still yields values: stop at its end.
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        match op {
            Op::Select {
                device,
                function,
                register,
                enable,
            } => {
                let address = u32::from(enable) << 31
                    | u32::from(device % 32) << 11
                    | u32::from(function % 8) << 8
                    | u32::from(register);
                io.write(0, &address.to_le_bytes());
            }
            Op::Address(a) => io.write(0, &a.to_le_bytes()),
            Op::PortRead { port, width: w } => io.read(u64::from(port % 8), &mut buf[..width(w)]),
            Op::PortWrite {
                port,
                width: w,
                value,
            } => {
                let bytes = u64::from(value).to_le_bytes();
                io.write(u64::from(port % 8), &bytes[..width(w)]);
            }
            Op::MemRead { offset, width: w } => {
                let at = u64::from(offset) % (3 * BAR_SIZE);
                mmio.read(at, &mut buf[..width(w)]);
            }
            Op::MemWrite {
                offset,
                width: w,
                value,
            } => {
                let at = u64::from(offset) % (3 * BAR_SIZE);
                mmio.write(at, &value.to_le_bytes()[..width(w)]);
            }
            Op::Serve { device, queue } => {
                let f = if device { &blk } else { &rng };
                let mut t = f.transport.lock().unwrap();
                t.process_queue(usize::from(queue % 4));
            }
            Op::Signal { device, config } => {
                let f = if device { &blk } else { &rng };
                if config {
                    f.transport.lock().unwrap().config_changed();
                } else {
                    f.interrupt.signal_used_queue();
                }
            }
        }
    }
    // Whatever happened, the function still reads as itself.
    io.write(0, &(1u32 << 31 | 1 << 11).to_le_bytes());
    io.read(4, &mut buf[..4]);
    assert_eq!(
        u32::from_le_bytes(buf[..4].try_into().unwrap()),
        0x1042_1af4
    );
});
