//! Where things live in guest physical memory.
//!
//! The low megabyte follows the conventions Linux expects of a PC: boot data
//! structures in the first 64 KiB, the MP table in the last KiB of base memory
//! (one of the places the kernel scans, `arch/x86/kernel/mpparse.c`), and
//! kernels loaded at 1 MiB (bzImage) or 16 MiB (vmlinux). RAM above 3 GiB is
//! moved above 4 GiB to leave a hole for the IOAPIC, the LAPIC and MMIO
//! devices, as on real hardware.

use vm_memory::GuestAddress;

/// Global descriptor table used at boot.
pub const GDT_START: GuestAddress = GuestAddress(0x500);
/// Interrupt descriptor table used at boot (empty: the kernel installs its own).
pub const IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// Linux "zero page" (`struct boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity map.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// Page directory of the boot identity map.
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line moat passes; x86 Linux's `COMMAND_LINE_SIZE` is 2048.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// The BIOS area: ACPI tables go here ([`crate::acpi::RSDP_START`] on).
pub const BIOS_START: GuestAddress = GuestAddress(0xe_0000);
/// First byte above the legacy PC region; kernels load at or above it.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Start of the hole below 4 GiB that holds no RAM.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the hole below 4 GiB (exclusive).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, inside the hole (the windows the
/// ACPI tables describe).
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// Where the same devices' second windows go, the ones the kernel command
/// line names for kernels without ACPI: 1 MiB further.
pub const MMIO_CMDLINE_DEVICES_START: u64 = MMIO_GAP_START + 0x10_0000;
/// The PCI host bridge's memory window, where virtio-pci functions' BARs
/// go (with `--transport pci`), inside the hole.
pub const PCI_MMIO_START: u64 = 0xd000_0000;
/// End of the PCI memory window (exclusive).
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// IOAPIC registers (fixed by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS, three pages, placed just below the BIOS area inside the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page, one page below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The RAM regions for a guest with `mem_size` bytes of memory.
///
/// Memory up to [`MMIO_GAP_START`] is mapped at address 0; anything beyond
/// continues at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// The end (exclusive) of the RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_at_zero() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(low_ram_end(4 << 30), 3 << 30);
    }

    #[test]
    fn guest_of_exactly_three_gib_needs_no_high_region() {
        assert_eq!(ram_regions(3 << 30).len(), 1);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut spans = [
            (GDT_START.0, 0x20),
            (IDT_START.0, 8),
            (PVH_INFO_START.0, 0x1000),
            (ZERO_PAGE_START.0, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_START.0, 0x1000),
            (PDPTE_START.0, 0x1000),
            (PDE_START.0, 0x1000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
            (EBDA_START.0, 0x400),
        ];
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }
}
