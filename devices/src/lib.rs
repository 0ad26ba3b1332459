//! Device models for moat.
//!
//! A device here knows nothing about KVM or about which bus it sits on: it
//! answers `read`/`write` at an offset inside its own register window and
//! raises interrupts through a [`trigger::EventFdTrigger`]. The VMM places
//! devices on its port-I/O or MMIO bus and wires the eventfds to KVM.

#![deny(missing_docs)]

#[cfg(test)]
mod alloc_count;
pub mod bus;
pub mod legacy;
pub mod trigger;
pub mod virtio;

pub use bus::BusDevice;
