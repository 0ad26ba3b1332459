//! Kernel and initramfs loading: any bytes as the kernel image (ELF,
//! bzImage or neither: program headers pointing anywhere, sizes that wrap,
//! setup headers that lie), then as the initramfs, into 64 MiB of guest
//! memory laid out as moat lays it out.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use moat_boot::layout;
use moat_boot::loader::{self, BootProtocol};
use vm_memory::GuestMemoryMmap;

const MEM: u64 = 64 << 20;

/// An anonymous file holding `data`.
fn memfd(data: &[u8]) -> File {
    // SAFETY: a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"moat-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: the descriptor was just made and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).expect("write the memfd");
    file
}

fuzz_target!(|data: &[u8]| {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&layout::ram_regions(MEM)).expect("guest memory");
    let Ok(kernel) = loader::load_kernel(&mem, &mut memfd(data)) else {
        return;
    };
    for protocol in [BootProtocol::Auto, BootProtocol::Linux, BootProtocol::Pvh] {
        let _ = loader::entry_point(&kernel, protocol);
    }
    if let Ok((addr, size)) = loader::load_initramfs(&mem, &mut memfd(data), &kernel, MEM) {
        assert!(
            addr + size <= layout::low_ram_end(MEM),
            "initramfs past low RAM"
        );
        assert!(addr >= kernel.end, "initramfs over the kernel");
    }
});
