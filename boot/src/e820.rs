//! The guest's physical memory map, as the BIOS e820 call would report it.
//!
//! The same map is written into the zero page (Linux boot protocol) and into
//! the PVH memory map table, so it is computed once here.

use crate::layout::{self, BIOS_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Usable RAM (`E820_TYPE_RAM`).
pub const E820_RAM: u32 = 1;
/// Reserved, not to be used by the OS (`E820_TYPE_RESERVED`).
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map of a guest with `mem_size` bytes of RAM.
///
/// Base memory stops at the EBDA, which holds the MP table and is reported
/// reserved so the kernel leaves it alone; the legacy VGA area is not RAM;
/// the BIOS area (0xe0000 to 1 MiB), which holds the ACPI tables, is
/// reserved; extended memory runs from 1 MiB to the MMIO hole and resumes
/// at 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START.0,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START.0,
            size: 0x400,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: BIOS_START.0,
            size: HIMEM_START.0 - BIOS_START.0,
            kind: E820_RESERVED,
        },
    ];
    let low_end = layout::low_ram_end(mem_size);
    if low_end > HIMEM_START.0 {
        map.push(E820Entry {
            addr: HIMEM_START.0,
            size: low_end - HIMEM_START.0,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_map_has_base_and_extended_memory() {
        let map = memory_map(128 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0xe_0000,
                size: 0x2_0000,
                kind: E820_RESERVED
            }
        );
        assert_eq!(map[3].addr, 0x10_0000);
        assert_eq!(map[3].addr + map[3].size, 128 << 20);
    }

    #[test]
    fn large_guest_map_resumes_above_four_gib() {
        let map = memory_map(6 << 30);
        let high = map.last().copied().unwrap();
        assert_eq!(high.addr, 4 << 30);
        assert_eq!(high.size, 3 << 30);
        // Everything but the legacy hole (640 KiB - 1 MiB, including the EBDA) is RAM.
        assert_eq!(ram_total(&map), (6 << 30) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [64 << 20, 3 << 30, (3 << 30) + 4096, 8 << 30] {
            let map = memory_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr);
            }
        }
    }
}
