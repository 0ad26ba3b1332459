//! ACPI tables: how a guest kernel built for real hardware (a distribution
//! kernel) finds moat's CPUs, devices and power controls.
//!
//! moat describes a hardware-reduced ACPI platform (ACPI 6.5, 4.1): no
//! PM1 blocks, no SCI, no fixed-feature buttons, only registers the FADT
//! names and devices the DSDT describes. The tables:
//!
//! - RSDP at [`RSDP_START`], in the BIOS area Linux scans for it
//!   (`acpi_find_root_pointer`), and handed over in the zero page
//!   (`acpi_rsdp_addr`) and PVH start info (`rsdp_paddr`);
//! - XSDT listing the FADT and the MADT;
//! - FADT: hardware-reduced, the sleep control and status registers (the
//!   guest writes `SLP_TYP(5) | SLP_EN` to power off) and the reset register;
//! - MADT: one local APIC per vCPU, the IOAPIC, the interrupt source
//!   override that matches moat's GSI routing (ISA IRQ 0, the PIT, arrives
//!   on IOAPIC pin 2, [`mptable::ioapic_pin`]) and LINT1 as NMI;
//! - DSDT: COM1, each virtio-mmio device (`LNRO0005`, Linux's
//!   `virtio_mmio` driver), a power button (`PNP0C0C`) notified through a
//!   Generic Event Device (`ACPI0013`) whose interrupt moat raises, and
//!   the `\_S5` sleep state; with virtio on PCI, a PCI host bridge
//!   (`PNP0A03`) instead of the virtio-mmio devices.
//!
//! acpi_tables (rust-vmm) lays out the tables and encodes the AML.

use acpi_tables::aml::{
    self, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Notify,
    Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{APIC_START, BIOS_START, HIMEM_START, IOAPIC_START};
use crate::mptable;
use crate::GuestMemoryMmap;

/// Where the RSDP goes: the start of the BIOS read-only area, the first
/// place Linux's legacy scan looks after the EBDA. The other tables follow.
pub const RSDP_START: GuestAddress = BIOS_START;
/// Where an x86 CPU starts after a reset (F000:FFF0, the last 16 bytes
/// below 1 MiB), and where Linux jumps, in real mode, to restart "through
/// the BIOS". moat has no firmware: [`write_tables`] puts code here that
/// writes the reset register instead.
pub const RESET_VECTOR: GuestAddress = GuestAddress(HIMEM_START.0 - 16);
/// End (exclusive) of the area the tables may use: the BIOS area up to the
/// reset vector.
pub const TABLES_END: u64 = RESET_VECTOR.0;
const _: () = assert!(TABLES_END <= RESET_VECTOR.0);

const OEM_ID: [u8; 6] = *b"MOAT  ";
const OEM_TABLE_ID: [u8; 8] = *b"MOATVM  ";
const OEM_REVISION: u32 = 1;

/// The sleep type moat's `\_S5` object names; the guest writes it, shifted
/// into SLP_TYP, to the sleep control register to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register (ACPI 6.5, 4.8.3.7).
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Where SLP_TYP sits in the sleep control register (bits 2-4).
pub const SLEEP_TYPE_SHIFT: u8 = 2;
/// What the guest writes to the sleep control register to power off.
pub const S5_SLEEP_CONTROL: u8 = (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE;

// FADT IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3).
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// The FADT's version; hardware-reduced ACPI needs 5 or later.
const FADT_MINOR_VERSION: u8 = 5;

/// MADT structure types moat writes that acpi_tables has no type for.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// "All processors" in a local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// Notify value for a power button press (ACPI 6.5, 4.8.3.1.1).
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// An I/O port register the FADT names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRegister {
    /// The port.
    pub port: u16,
}

impl PortRegister {
    /// The register as a one-byte Generic Address Structure.
    fn gas(self) -> GAS {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(self.port),
        )
    }
}

/// The power-control registers of a hardware-reduced platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerRegisters {
    /// Sleep control: the guest writes `SLP_TYP | SLP_EN` here.
    pub sleep_control: PortRegister,
    /// Sleep status: the guest reads (and clears) WAK_STS here.
    pub sleep_status: PortRegister,
    /// Reset: the guest writes `reset_value` here to reset the machine.
    pub reset: PortRegister,
    /// The value that resets.
    pub reset_value: u8,
}

/// A virtio-mmio device the guest should find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt (a GSI, edge-triggered, active high).
    pub irq: u32,
}

/// A legacy UART.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    /// First I/O port (8 ports).
    pub port: u16,
    /// Its interrupt.
    pub irq: u32,
}

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct Platform<'a> {
    /// vCPUs; their APIC IDs are 0..cpus.
    pub cpus: u8,
    /// The console UART.
    pub uart: Uart,
    /// virtio-mmio devices.
    pub virtio: &'a [VirtioMmio],
    /// Power-control registers.
    pub power: PowerRegisters,
    /// The interrupt of the Generic Event Device that reports power button
    /// presses.
    pub ged_irq: u32,
    /// A PCI host bridge, when the virtio devices are on PCI.
    pub pci: Option<PciHostBridge>,
}

/// A PCI host bridge (`PNP0A03`): bus 0, configuration space through the
/// ports 0xcf8-0xcff, and a memory window below 4 GiB for the functions'
/// BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// Start of the memory window.
    pub window_start: u32,
    /// Its last byte.
    pub window_last: u32,
}

/// The configuration ports (PCI 3.0, 3.2.2.3.2).
const PCI_CONFIG_PORT: u16 = 0xcf8;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count is 0 or above what APIC IDs allow.
    #[error("ACPI tables describe 1 to {max} vCPUs, not {0}", max = mptable::MAX_CPUS)]
    CpuCount(u8),
    /// A virtio-mmio window does not fit the 32-bit memory descriptor.
    #[error("virtio-mmio window {base:#x}+{size:#x} is above 4 GiB")]
    WindowAbove4G {
        /// Base of the window.
        base: u64,
        /// Size of the window.
        size: u64,
    },
    /// More virtio devices than four-character AML names moat gives them.
    #[error("{0} virtio devices are more than the DSDT can name")]
    TooManyDevices(usize),
    /// The tables do not fit the BIOS area.
    #[error("the ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    /// Guest memory does not hold the tables.
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// MADT Interrupt Source Override (ACPI 6.5, 5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

/// MADT Local APIC NMI (ACPI 6.5, 5.2.12.7).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// AML that is already encoded: lets a scope hold a list of devices built
/// one by one (acpi_tables' objects borrow their children).
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Serialises anything acpi_tables can encode.
fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The MADT: the CPUs, the IOAPIC and how ISA interrupts reach it.
fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        mptable::ioapic_id(cpus),
        IOAPIC_START as u32,
        0,
    ));
    // ISA IRQs that do not arrive on the IOAPIC pin of the same number;
    // flags 0: the ISA bus's own polarity and trigger (high, edge).
    for irq in 0..16u8 {
        if let Some(pin) = mptable::ioapic_pin(irq).filter(|pin| *pin != irq) {
            madt.add_structure(InterruptSourceOverride {
                kind: MADT_INTERRUPT_SOURCE_OVERRIDE,
                length: 10,
                bus: 0,
                source: irq,
                gsi: u32::from(pin),
                flags: 0,
            });
        }
    }
    madt.add_structure(LocalApicNmi {
        kind: MADT_LOCAL_APIC_NMI,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: 0,
        lint: 1,
    });
    bytes(&madt)
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt`.
fn fadt(dsdt: u64, power: &PowerRegisters) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // The power button is a control-method device (the DSDT's PWRB);
        // there is no sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.fadt_minor_version = FADT_MINOR_VERSION;
    fadt.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.reset_reg = power.reset.gas();
    fadt.reset_value = power.reset_value;
    fadt.sleep_control_reg = power.sleep_control.gas();
    fadt.sleep_status_reg = power.sleep_status.gas();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"MOATKVM ").into();
    bytes(&fadt.finalize())
}

/// An edge-triggered, active-high interrupt the device alone uses.
fn edge_irq(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

/// The DSDT: the devices and the S5 sleep state.
fn dsdt(platform: &Platform<'_>) -> Result<Vec<u8>, Error> {
    if platform.virtio.len() > 0x100 {
        return Err(Error::TooManyDevices(platform.virtio.len()));
    }
    let mut sb: Vec<Encoded> = Vec::new();

    let uart = platform.uart;
    sb.push(Encoded(bytes(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &IO::new(uart.port, uart.port, 1, 8),
                    &edge_irq(uart.irq),
                ]),
            ),
        ],
    ))));

    for (index, device) in platform.virtio.iter().enumerate() {
        let base = u32::try_from(device.base)
            .ok()
            .zip(u32::try_from(device.size).ok())
            .filter(|(base, size)| base.checked_add(*size).is_some())
            .ok_or(Error::WindowAbove4G {
                base: device.base,
                size: device.size,
            })?;
        let name = format!("VR{index:02X}");
        sb.push(Encoded(bytes(&Device::new(
            Path::new(&name),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &(index as u32)),
                // Cache-coherent DMA: the device sees what the CPU wrote.
                &Name::new(Path::new("_CCA"), &aml::ONE),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, base.0, base.1),
                        &edge_irq(device.irq),
                    ]),
                ),
            ],
        ))));
    }

    if let Some(pci) = &platform.pci {
        // Conventional PCI (not PCIe's PNP0A08): Linux then asks for no
        // _OSC handshake. No _PRT: the functions have no INTx pin, only
        // MSI-X.
        sb.push(Encoded(bytes(&Device::new(
            Path::new("PCI0"),
            vec![
                &Name::new(Path::new("_HID"), &EISAName::new("PNP0A03")),
                &Name::new(Path::new("_UID"), &aml::ZERO),
                &Name::new(Path::new("_SEG"), &aml::ZERO),
                &Name::new(Path::new("_BBN"), &aml::ZERO),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![
                        &aml::AddressSpace::new_bus_number(0u16, 0u16),
                        &IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8),
                        &aml::AddressSpace::new_memory(
                            AddressSpaceCacheable::NotCacheable,
                            true,
                            pci.window_start,
                            pci.window_last,
                            None,
                        ),
                    ]),
                ),
            ],
        ))));
    }

    sb.push(Encoded(bytes(&Device::new(
        Path::new("PWRB"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
        ],
    ))));
    // Linux's GED driver (drivers/acpi/evged.c) calls _EVT with the GSI
    // that fired; the power button is its only event.
    sb.push(Encoded(bytes(&Device::new(
        Path::new("GED0"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![&edge_irq(platform.ged_irq)]),
            ),
            &Method::new(
                Path::new("_EVT"),
                1,
                false,
                vec![&Notify::new(&Path::new("PWRB"), &NOTIFY_BUTTON_PRESSED)],
            ),
        ],
    ))));

    let children: Vec<&dyn Aml> = sb.iter().map(|d| d as &dyn Aml).collect();
    let mut body = bytes(&Scope::new(Path::new("\\_SB_"), children));
    body.extend(bytes(&Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLEEP_TYPE]),
    )));

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// 16-bit code for the reset vector: write the reset value to the reset
/// register, which ends the VM as a reset does, and halt. Linux comes here
/// when it restarts after a panic on a hardware-reduced ACPI machine: it
/// then prefers the EFI reset (arch/x86/kernel/reboot.c, reboot_init), which
/// does nothing without EFI, and falls back to the BIOS's reset vector
/// before it ever tries the reset register.
fn reset_code(power: &PowerRegisters) -> [u8; 10] {
    let [port_lo, port_hi] = power.reset.port.to_le_bytes();
    [
        0xfa, // cli
        0xba,
        port_lo,
        port_hi, // mov dx, port
        0xb0,
        power.reset_value, // mov al, value
        0xee,              // out dx, al
        0xf4,              // hlt
        0xeb,
        0xfd, // jmp back to the hlt
    ]
}

/// Writes the tables for `platform` from [`RSDP_START`] on, and the code
/// at the [`RESET_VECTOR`]; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, platform: &Platform<'_>) -> Result<GuestAddress, Error> {
    if platform.cpus == 0 || platform.cpus > mptable::MAX_CPUS {
        return Err(Error::CpuCount(platform.cpus));
    }
    // Each table 16-byte aligned after the RSDP, in the order they point
    // at each other: DSDT, FADT (names the DSDT), MADT, XSDT (names both).
    let mut next = RSDP_START.0 + Rsdp::len() as u64;
    let mut place = |table: &[u8]| -> Result<u64, Error> {
        let at = next.next_multiple_of(16);
        next = at + table.len() as u64;
        if next > TABLES_END {
            return Err(Error::TooLarge(next - RSDP_START.0));
        }
        mem.write_slice(table, GuestAddress(at))?;
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(platform)?)?;
    let fadt_addr = place(&fadt(dsdt_addr, &platform.power))?;
    let madt_addr = place(&madt(platform.cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;
    mem.write_slice(&bytes(&Rsdp::new(OEM_ID, xsdt_addr)), RSDP_START)?;
    mem.write_slice(&reset_code(&platform.power), RESET_VECTOR)?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests;
