//! Legacy PC devices: the 8250 UART and the i8042 controller.

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{Serial, SERIAL_FIFO_SIZE};
