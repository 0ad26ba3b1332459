//! The boot GDT, and the KVM segment registers that match it.
//!
//! KVM needs both: the table in guest memory (the kernel may reload segment
//! registers from it before installing its own) and the hidden parts of the
//! segment registers, which `KVM_SET_SREGS` takes directly.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::GDT_START;
use crate::GuestMemoryMmap;

/// Encodes a segment descriptor from its flags (access byte in bits 0-7,
/// flags nibble in bits 12-15), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// Boot GDT for the 64-bit Linux entry: null, 64-bit code, data, TSS.
pub const GDT_64BIT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Boot GDT for the PVH entry (32-bit flat protected mode): null, 32-bit
/// code, data, TSS. The PVH ABI asks for flat 4 GiB segments.
pub const GDT_32BIT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0xfffff),
];

/// Index of the code segment in both tables.
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in both tables.
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS in both tables.
pub const TSS_INDEX: u8 = 3;

/// The segment register state for descriptor `index` of `table`.
pub fn segment_from_entry(table: &[u64], index: u8) -> kvm_segment {
    let entry = table[usize::from(index)];
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32) as u32 | (entry & 0xffff) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: u8::from(granular),
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes `table` at [`GDT_START`] and a null IDT after it.
pub fn write_gdt(mem: &GuestMemoryMmap, table: &[u64]) -> Result<(), GuestMemoryError> {
    for (i, entry) in table.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START.0 + 8 * i as u64))?;
    }
    mem.write_obj(0u64, crate::layout::IDT_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_classic_flat_descriptors() {
        // Values any OS developer recognises: flat 64-bit code and data.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn base_is_split_across_the_descriptor() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = segment_from_entry(&[entry], 0);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
    }

    #[test]
    fn code64_segment_is_long_mode_and_page_granular() {
        let cs = segment_from_entry(&GDT_64BIT, CODE_INDEX);
        assert_eq!(cs.selector, 0x8);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.g, 1);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.s, 1);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn code32_segment_is_default_32bit() {
        let cs = segment_from_entry(&GDT_32BIT, CODE_INDEX);
        assert_eq!(cs.l, 0);
        assert_eq!(cs.db, 1);
        let tss = segment_from_entry(&GDT_32BIT, TSS_INDEX);
        assert_eq!(tss.selector, 0x18);
        assert_eq!(tss.s, 0);
        assert_eq!(tss.type_, 0xb);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = segment_from_entry(&GDT_64BIT, 0);
        assert_eq!(seg.present, 0);
        assert_eq!(seg.unusable, 1);
    }

    #[test]
    fn gdt_is_written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt(&mem, &GDT_64BIT).unwrap();
        for (i, want) in GDT_64BIT.iter().enumerate() {
            let got: u64 = mem.read_obj(GuestAddress(0x500 + 8 * i as u64)).unwrap();
            assert_eq!(got, *want);
        }
        let idt: u64 = mem.read_obj(GuestAddress(0x520)).unwrap();
        assert_eq!(idt, 0);
    }
}
