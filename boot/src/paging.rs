//! Identity page tables for the 64-bit Linux entry.
//!
//! The x86 boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot
//! protocol") requires paging on with the kernel, the zero page and the
//! command line identity mapped. moat maps the first 1 GiB with 2 MiB pages,
//! which covers all of them; the kernel builds its own tables right away.

use vm_memory::{Bytes, GuestMemoryError};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::GuestMemoryMmap;

/// Present + writable.
const PRESENT_RW: u64 = 0x3;
/// Present + writable + 2 MiB page.
const PRESENT_RW_HUGE: u64 = 0x83;

/// Bytes mapped by the boot identity map.
pub const IDENTITY_MAPPED: u64 = 512 * (2 << 20);

/// Writes PML4, PDPT and PD at their fixed addresses and returns the value
/// for CR3.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPTE_START.0 | PRESENT_RW, PML4_START)?;
    mem.write_obj(PDE_START.0 | PRESENT_RW, PDPTE_START)?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PRESENT_RW_HUGE,
            vm_memory::GuestAddress(PDE_START.0 + i * 8),
        )?;
    }
    Ok(PML4_START.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// Walks the tables like the MMU would for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8))
            .ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .ok()?;
        if pde & 1 == 0 || pde & 0x80 == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) + (va & 0x1f_ffff))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let cr3 = write_identity_map(&mem).unwrap();
        assert_eq!(cr3, 0x9000);
        for va in [0, 0x7000, 0x100_0000, 0x1234_5678, IDENTITY_MAPPED - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "{va:#x}");
        }
    }

    #[test]
    fn nothing_past_the_first_gib_is_mapped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let cr3 = write_identity_map(&mem).unwrap();
        assert_eq!(translate(&mem, cr3, IDENTITY_MAPPED), None);
    }
}
