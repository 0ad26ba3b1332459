//! Legacy PC devices: the 8250 UART, the i8042 controller, the ACPI power
//! registers, and moat's boot timer port.

mod acpi_power;
mod boot_timer;
mod i8042;
mod serial;

pub use acpi_power::AcpiPower;
pub use boot_timer::{BootTimer, BootTimerReport};
pub use i8042::I8042;
pub use serial::{Serial, SerialSnapshot, SERIAL_FIFO_SIZE};
