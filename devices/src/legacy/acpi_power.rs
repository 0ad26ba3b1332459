//! The power registers of a hardware-reduced ACPI platform (ACPI 6.5,
//! 4.8.3.7-4.8.3.8 and 4.8.4.6): sleep control, sleep status and reset, one
//! byte each on consecutive I/O ports. The FADT names them; a guest powers
//! off by writing `SLP_TYP | SLP_EN` for its S5 state to sleep control, and
//! resets by writing the reset value to the reset register.

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Bits of the sleep control register that say what to do: SLP_TYP
/// (bits 2-4) and SLP_EN (bit 5). The others are reserved.
const SLEEP_CONTROL_COMMAND: u8 = 0x3c;

/// Sleep control, sleep status and reset, on consecutive ports.
pub struct AcpiPower {
    power_off: EventFdTrigger,
    reset: EventFdTrigger,
    s5_command: u8,
    reset_value: u8,
}

impl AcpiPower {
    /// Offset of the sleep control register.
    pub const SLEEP_CONTROL: u64 = 0;
    /// Offset of the sleep status register.
    pub const SLEEP_STATUS: u64 = 1;
    /// Offset of the reset register.
    pub const RESET: u64 = 2;
    /// Port window size.
    pub const WINDOW: u64 = 3;

    /// Triggers `power_off` when the guest writes `s5_command` (its S5
    /// sleep type shifted into SLP_TYP, with SLP_EN) to sleep control, and
    /// `reset` when it writes `reset_value` to the reset register.
    pub fn new(
        power_off: EventFdTrigger,
        reset: EventFdTrigger,
        s5_command: u8,
        reset_value: u8,
    ) -> Self {
        Self {
            power_off,
            reset,
            s5_command,
            reset_value,
        }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set (moat does not resume from a
        // sleep state); the write-only registers read 0 too.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        // A failed eventfd write means the event loop is gone; nothing to do.
        match offset {
            Self::SLEEP_CONTROL if value & SLEEP_CONTROL_COMMAND == self.s5_command => {
                let _ = self.power_off.trigger();
            }
            Self::RESET if *value == self.reset_value => {
                let _ = self.reset.trigger();
            }
            // Other sleep states (none is offered), WAK_STS clears, other
            // values: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's S5 write for a `\_S5` of type 5: (5 << 2) | SLP_EN.
    const S5: u8 = 0x34;

    fn device() -> (AcpiPower, EventFdTrigger, EventFdTrigger) {
        let off = EventFdTrigger::new().unwrap();
        let reset = EventFdTrigger::new().unwrap();
        let dev = AcpiPower::new(off.try_clone().unwrap(), reset.try_clone().unwrap(), S5, 1);
        (dev, off, reset)
    }

    #[test]
    fn the_s5_command_powers_off() {
        let (mut dev, off, reset) = device();
        dev.write(AcpiPower::SLEEP_CONTROL, &[S5]);
        assert_eq!((off.drain(), reset.drain()), (1, 0));
        // Reserved bits do not change the command.
        dev.write(AcpiPower::SLEEP_CONTROL, &[S5 | 0x81]);
        assert_eq!(off.drain(), 1);
    }

    #[test]
    fn other_sleep_commands_and_status_writes_do_nothing() {
        let (mut dev, off, reset) = device();
        for value in [0x00, 0x14, 0x20, S5 & !0x20, 0x80] {
            dev.write(AcpiPower::SLEEP_CONTROL, &[value]);
        }
        dev.write(AcpiPower::SLEEP_STATUS, &[0x80]);
        assert_eq!((off.drain(), reset.drain()), (0, 0));
    }

    #[test]
    fn the_reset_value_resets() {
        let (mut dev, off, reset) = device();
        dev.write(AcpiPower::RESET, &[2]);
        assert_eq!(reset.drain(), 0);
        dev.write(AcpiPower::RESET, &[1]);
        assert_eq!((off.drain(), reset.drain()), (0, 1));
    }

    #[test]
    fn wide_and_odd_accesses_are_harmless() {
        let (mut dev, off, reset) = device();
        dev.write(AcpiPower::SLEEP_CONTROL, &[S5, 0]);
        dev.write(AcpiPower::RESET, &[]);
        dev.write(u64::MAX, &[S5]);
        assert_eq!((off.drain(), reset.drain()), (0, 0));
        let mut status = [0xffu8; 4];
        dev.read(AcpiPower::SLEEP_STATUS, &mut status);
        assert_eq!(status, [0; 4]);
    }
}
