//! The Intel MultiProcessor Specification 1.4 table that tells the guest how
//! many CPUs it has and how interrupts are wired.
//!
//! Without ACPI, Linux finds CPUs by scanning for the MP floating pointer
//! structure (`arch/x86/kernel/mpparse.c` scans the last KiB of base memory,
//! which is where moat puts it). The table is serialised by hand, field by
//! field, little-endian, so there is no unsafe reinterpretation of structs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::GuestMemoryMmap;

/// Most vCPUs an MP table can describe: APIC IDs are 8 bits and the IOAPIC
/// takes the ID after the last CPU.
pub const MAX_CPUS: u8 = 254;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;

const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
/// Family 6, as a CPU signature; Linux only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;

/// Why an MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vCPU count is 0 or above [`MAX_CPUS`].
    #[error("an MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// Guest memory does not hold the table.
    #[error("cannot write the MP table to guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// The IOAPIC pin an ISA/GSI interrupt line arrives on, as on PC hardware:
/// the PIT's IRQ 0 is wired to pin 2, and nothing else uses pin 2 (IRQ 2 is
/// the PIC cascade). The MP table tells the guest this wiring and the VMM
/// programs KVM's GSI routing to match, so both come from here.
pub fn ioapic_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        irq if irq < IOAPIC_PINS => Some(irq),
        _ => None,
    }
}

/// The IOAPIC's ID: the one after the last CPU's APIC ID (the MP table
/// and the ACPI MADT both say so).
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Two's complement of the byte sum, so the whole structure sums to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP configuration table (header and entries) for `cpus` CPUs,
/// with APIC IDs 0..cpus.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = ioapic_id(cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for (irq, pin) in (0..IOAPIC_PINS).filter_map(|irq| Some((irq, ioapic_pin(irq)?))) {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 carries the 8259's ExtINT, LINT1 the NMI, on every CPU (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = 44 + entries.len() as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, filled in below
    table.extend_from_slice(b"MOAT    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Builds the 16-byte floating pointer structure pointing at `table_addr`.
fn floating_pointer(table_addr: u32) -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte paragraphs
    mpf[9] = MP_SPEC_REV;
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the floating pointer at the EBDA and the configuration table
/// right after it. Returns the number of bytes written.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<usize, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::CpuCount(cpus));
    }
    let table_addr = EBDA_START.0 + 16;
    let table = config_table(cpus);
    mem.write_slice(&floating_pointer(table_addr as u32), EBDA_START)?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(16 + table.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the written table back the way Linux does, returning the
    /// entries as (type, bytes).
    fn parse(mem: &GuestMemoryMmap) -> Vec<(u8, Vec<u8>)> {
        let mpf = read(mem, EBDA_START.0, 16);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        let table_addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
        let header = read(mem, table_addr, 44);
        assert_eq!(&header[0..4], b"PCMP");
        let length = u16::from_le_bytes([header[4], header[5]]) as usize;
        let table = read(mem, table_addr, length);
        assert_eq!(sum(&table), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut entries = Vec::new();
        let mut off = 44;
        for _ in 0..count {
            let len = if table[off] == ENTRY_PROCESSOR { 20 } else { 8 };
            entries.push((table[off], table[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, length, "entry count matches length");
        entries
    }

    #[test]
    fn checksums_are_valid_for_every_cpu_count() {
        for cpus in [1, 2, 8, 64, MAX_CPUS] {
            let mem = memory();
            write_mptable(&mem, cpus).unwrap();
            parse(&mem);
        }
    }

    #[test]
    fn lists_each_cpu_once_with_cpu0_as_boot_processor() {
        let mem = memory();
        write_mptable(&mem, 4).unwrap();
        let cpus: Vec<_> = parse(&mem)
            .into_iter()
            .filter(|(t, _)| *t == ENTRY_PROCESSOR)
            .map(|(_, e)| (e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn ioapic_follows_the_cpus_and_timer_goes_to_pin_2() {
        let mem = memory();
        write_mptable(&mem, 2).unwrap();
        let entries = parse(&mem);
        let ioapic = entries.iter().find(|(t, _)| *t == ENTRY_IOAPIC).unwrap();
        assert_eq!(ioapic.1[1], 2);
        assert_eq!(
            u32::from_le_bytes(ioapic.1[4..8].try_into().unwrap()),
            0xfec0_0000
        );
        let routes: Vec<(u8, u8)> = entries
            .iter()
            .filter(|(t, _)| *t == ENTRY_IO_INTERRUPT)
            .map(|(_, e)| (e[5], e[7]))
            .collect();
        assert_eq!(routes.len(), 23);
        assert!(routes.contains(&(0, 2)));
        assert!(routes.contains(&(4, 4)));
        assert!(routes.iter().all(|(irq, _)| *irq != 2));
    }

    #[test]
    fn local_interrupts_are_extint_and_nmi() {
        let mem = memory();
        write_mptable(&mem, 1).unwrap();
        let lint: Vec<_> = parse(&mem)
            .into_iter()
            .filter(|(t, _)| *t == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[7]))
            .collect();
        assert_eq!(lint, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn pin_2_belongs_to_the_timer_alone() {
        assert_eq!(ioapic_pin(0), Some(2));
        assert_eq!(ioapic_pin(2), None);
        assert_eq!(ioapic_pin(5), Some(5));
        assert_eq!(ioapic_pin(23), Some(23));
        assert_eq!(ioapic_pin(24), None);
        let pins: Vec<u8> = (0..IOAPIC_PINS).filter_map(ioapic_pin).collect();
        assert_eq!(pins.iter().filter(|p| **p == 2).count(), 1);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        let mem = memory();
        assert!(matches!(write_mptable(&mem, 0), Err(Error::CpuCount(0))));
        assert!(matches!(
            write_mptable(&mem, 255),
            Err(Error::CpuCount(255))
        ));
    }

    #[test]
    fn fails_cleanly_when_memory_is_too_small() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(write_mptable(&mem, 1), Err(Error::Memory(_))));
    }
}
