//! Tiny hand-made ELF kernels, for tests of the loader and of how moat
//! handles guests that misbehave.

/// A minimal ELF64 executable whose one PT_LOAD segment puts `code` at
/// physical address `paddr` (also the entry point), with a PVH note when
/// `pvh_entry` is given.
pub fn tiny_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let note: Vec<u8> = match pvh_entry {
        Some(entry) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let phnum: u16 = if note.is_empty() { 1 } else { 2 };
    let phoff = 64u64;
    let data_off = phoff + 56 * u64::from(phnum);
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&paddr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&56u16.to_le_bytes());
    elf.extend_from_slice(&phnum.to_le_bytes());
    elf.extend_from_slice(&[0; 6]);
    let mut phdr = |ptype: u32, off: u64, addr: u64, size: u64| {
        elf.extend_from_slice(&ptype.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes());
        elf.extend_from_slice(&off.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&4u64.to_le_bytes());
    };
    phdr(1, data_off, paddr, code.len() as u64);
    if !note.is_empty() {
        phdr(4, data_off + code.len() as u64, 0, note.len() as u64);
    }
    elf.extend_from_slice(code);
    elf.extend_from_slice(&note);
    elf
}
