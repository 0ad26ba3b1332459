//! The i8042 keyboard controller, present for one reason: a guest booted with
//! `reboot=k` resets the machine by writing 0xfe (pulse reset line) to its
//! command port, and that is how a guest tells moat it is done.

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// i8042 at ports 0x60-0x64, signalling resets through an eventfd.
pub struct I8042(vm_superio::I8042Device<EventFdTrigger>);

impl I8042 {
    /// Port window size: data at offset 0, command/status at offset 4.
    pub const WINDOW: u64 = 5;

    /// A controller that triggers `reset` when the guest asks for a reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(vm_superio::I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // A failed eventfd write means the event loop is gone; nothing to do.
            let _ = self.0.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_triggers_the_reset_event() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        dev.write(4, &[0xfe]);
        assert_eq!(reset.drain(), 1);
    }

    #[test]
    fn other_writes_do_not_reset() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xad]);
        dev.write(4, &[]);
        dev.write(u64::MAX, &[0xfe]);
        assert_eq!(reset.drain(), 0);
        let mut buf = [0xffu8; 1];
        dev.read(4, &mut buf);
        assert_eq!(buf, [0]);
        dev.read(4, &mut []);
    }
}
