//! Guest memory layout and the x86_64 Linux boot setup for moat.
//!
//! Everything here is a pure function over guest memory or over KVM data
//! structures: no ioctls, no devices. The VMM calls these in boot order:
//! [`layout`] decides where RAM lives, [`loader`] puts the kernel, initramfs,
//! command line and boot parameters into memory, [`mptable`] and [`acpi`]
//! describe the CPUs and devices, and [`cpu`] computes the CPUID, MSR, register, FPU and LAPIC state
//! every vCPU starts with.

#![deny(missing_docs)]

pub mod acpi;
pub mod cpu;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod paging;

/// The guest memory type moat uses everywhere: anonymous mmap regions.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
