//! The port devices a guest reaches with in/out: the UART (any register,
//! width and value, with input typed meanwhile), the i8042 and the ACPI
//! power registers.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use moat_devices::legacy::{AcpiPower, Serial, I8042};
use moat_devices::trigger::EventFdTrigger;
use moat_devices::BusDevice;

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        device: u8,
        offset: u8,
        width: u8,
    },
    Write {
        device: u8,
        offset: u8,
        width: u8,
        value: u64,
    },
    Type(Vec<u8>),
}

fn trigger() -> EventFdTrigger {
    EventFdTrigger::new().expect("eventfd")
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut serial = Serial::new(trigger(), trigger(), std::io::sink());
    let mut i8042 = I8042::new(trigger());
    let mut acpi = AcpiPower::new(trigger(), trigger(), 0x34, 0x0f);
    // An exhausted input still yields values: stop at its end.
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        match op {
            Op::Read {
                device,
                offset,
                width,
            } => {
                let mut buf = [0u8; 8];
                let data = &mut buf[..1 << (width % 4)];
                let dev: &mut dyn BusDevice = match device % 3 {
                    0 => &mut serial,
                    1 => &mut i8042,
                    _ => &mut acpi,
                };
                dev.read(u64::from(offset), data);
            }
            Op::Write {
                device,
                offset,
                width,
                value,
            } => {
                let bytes = value.to_le_bytes();
                let data = &bytes[..1 << (width % 4)];
                let dev: &mut dyn BusDevice = match device % 3 {
                    0 => &mut serial,
                    1 => &mut i8042,
                    _ => &mut acpi,
                };
                dev.write(u64::from(offset), data);
            }
            Op::Type(bytes) => {
                let taken = serial.enqueue_input(&bytes);
                assert!(taken <= bytes.len());
            }
        }
    }
});
