//! The 8250 UART on COM1: the guest's console.
//!
//! vm-superio does the register model. This wrapper places it on a bus,
//! feeds it input without ever dropping bytes (the FIFO holds 64; callers
//! check [`Serial::input_capacity`] and wait for the `input_space` event) and
//! signals its interrupt through an eventfd the VMM registers as an irqfd.

use std::io::Write;

use vm_superio::serial::SerialEvents;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Bytes the UART's receive FIFO holds.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// Signals `input_space` whenever the guest empties the receive FIFO.
struct InputSpace(EventFdTrigger);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = vm_superio::Trigger::trigger(&self.0);
    }
}

/// The UART's registers and receive FIFO, for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high bytes.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// An 8250 UART writing the guest's output to `W`.
pub struct Serial<W: Write + Send> {
    uart: vm_superio::Serial<EventFdTrigger, InputSpace, W>,
}

impl<W: Write + Send> Serial<W> {
    /// Port window size.
    pub const WINDOW: u64 = 8;

    /// A UART raising `interrupt`, writing output to `out`, and signalling
    /// `input_space` when its receive FIFO drains.
    pub fn new(interrupt: EventFdTrigger, input_space: EventFdTrigger, out: W) -> Self {
        Self {
            uart: vm_superio::Serial::with_events(interrupt, InputSpace(input_space), out),
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes typed by the user; returns how many were taken (at most
    /// [`Serial::input_capacity`]).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// The output sink.
    pub fn writer(&self) -> &W {
        self.uart.writer()
    }

    /// Whether any of the UART's interrupts is enabled (IER not 0). With
    /// none, a write to its registers raises nothing, so it may be played
    /// to the UART later, as long as it is before the guest's next access.
    pub fn interrupts_enabled(&self) -> bool {
        self.uart.state().interrupt_enable != 0
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the registers and receive FIFO back as `snapshot` has them,
    /// keeping the interrupt, events and output.
    pub fn restore(&mut self, snapshot: &SerialSnapshot) -> std::io::Result<()>
    where
        W: Clone,
    {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: snapshot.baud_divisor[0],
            baud_divisor_high: snapshot.baud_divisor[1],
            interrupt_enable: snapshot.interrupt_enable,
            interrupt_identification: snapshot.interrupt_identification,
            line_control: snapshot.line_control,
            line_status: snapshot.line_status,
            modem_control: snapshot.modem_control,
            modem_status: snapshot.modem_status,
            scratch: snapshot.scratch,
            in_buffer: snapshot.in_buffer.clone(),
        };
        let interrupt = self.uart.interrupt_evt().try_clone()?;
        let events = InputSpace(self.uart.events().0.try_clone()?);
        let out = self.uart.writer().clone();
        self.uart = vm_superio::Serial::from_state(&state, interrupt, events, out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(())
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // Output errors (a closed stdout) lose console output but must
            // not stop the guest.
            let _ = self.uart.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn serial() -> (Serial<Vec<u8>>, EventFdTrigger, EventFdTrigger) {
        let irq = EventFdTrigger::new().unwrap();
        let space = EventFdTrigger::new().unwrap();
        let dev = Serial::new(
            irq.try_clone().unwrap(),
            space.try_clone().unwrap(),
            Vec::new(),
        );
        (dev, irq, space)
    }

    fn read(dev: &mut Serial<Vec<u8>>, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn interrupts_enabled_follows_ier_and_not_the_divisor_latch() {
        let (mut dev, _, _) = serial();
        assert!(!dev.interrupts_enabled());
        dev.write(IER, &[0x2]);
        assert!(dev.interrupts_enabled());
        // With DLAB set, offset 1 is the divisor's high byte.
        dev.write(3, &[0x80]);
        dev.write(IER, &[0]);
        assert!(dev.interrupts_enabled());
        dev.write(3, &[0x03]);
        dev.write(IER, &[0]);
        assert!(!dev.interrupts_enabled());
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut dev, _, _) = serial();
        for b in b"hi\n" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(dev.writer(), b"hi\n");
    }

    #[test]
    fn input_is_read_by_the_guest_and_raises_an_interrupt() {
        let (mut dev, irq, space) = serial();
        dev.write(IER, &[0x1]); // receive-data interrupt on
        assert_eq!(dev.enqueue_input(b"ls"), 2);
        assert_eq!(irq.drain(), 1);
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 1);
        assert_eq!(read(&mut dev, DATA), b'l');
        assert_eq!(space.drain(), 0, "FIFO not empty yet");
        assert_eq!(read(&mut dev, DATA), b's');
        assert_eq!(space.drain(), 1, "FIFO drained");
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_the_fifo_is_not_taken() {
        let (mut dev, _, _) = serial();
        let typed = [b'x'; 100];
        assert_eq!(dev.enqueue_input(&typed), SERIAL_FIFO_SIZE);
        assert_eq!(dev.input_capacity(), 0);
        assert_eq!(dev.enqueue_input(&typed), 0);
    }

    #[test]
    fn odd_offsets_and_widths_are_harmless() {
        let (mut dev, _, _) = serial();
        dev.write(u64::MAX, &[1]);
        dev.write(3, &[]);
        let mut wide = [0u8; 8];
        dev.read(0x1_0000, &mut wide);
        dev.read(2, &mut []);
    }
}
