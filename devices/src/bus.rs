//! The interface between a device and the bus it is placed on.

/// A device with a window of registers.
///
/// `offset` is relative to the start of the window the device was placed at;
/// `data` has the access width (1, 2, 4 or 8 bytes). A device must accept any
/// offset and width without panicking: the guest chooses both.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
