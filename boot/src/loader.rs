//! Loading the kernel and initramfs, and writing the boot information the
//! kernel reads at entry: the zero page (Linux boot protocol) or
//! `hvm_start_info` (PVH).
//!
//! Parsing the kernel image is linux-loader's job; this module decides the
//! format, the entry point and where everything goes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, XLF_KERNEL_64};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::cpu::EntryPoint;
use crate::e820::{self, E820Entry};
use crate::layout::{self, CMDLINE_START, HIMEM_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::GuestMemoryMmap;

/// Errors while loading the kernel or writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be read.
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel image is neither an ELF vmlinux nor a bzImage.
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// linux-loader rejected the image or could not place it.
    #[error("cannot load the kernel: {}", without_prefix(.0))]
    Load(#[source] loader::Error),
    /// A bzImage that cannot be entered in 64-bit mode.
    #[error("the bzImage does not support the 64-bit boot protocol (XLF_KERNEL_64 not set)")]
    BzImageNot64Bit,
    /// PVH was asked for, but the ELF has no PVH note.
    #[error("the kernel has no PVH entry point (no XEN_ELFNOTE_PHYS32_ENTRY note)")]
    NoPvhEntry,
    /// PVH was asked for a bzImage.
    #[error("PVH boot needs an ELF vmlinux, not a bzImage")]
    PvhNeedsElf,
    /// The kernel's segments (with their zero-filled parts) reach past
    /// guest memory.
    #[error("the kernel claims memory up to {end:#x}, which does not fit in guest memory; give the guest more memory or check the image")]
    KernelTooLarge {
        /// Where the kernel says it ends.
        end: u64,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("the initramfs ({size} bytes) does not fit in guest memory above the kernel; give the guest more memory")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
    },
    /// The initramfs could not be read into guest memory.
    #[error("cannot read the initramfs: {0}")]
    ReadInitramfs(#[source] vm_memory::GuestMemoryError),
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(#[source] loader::Error),
    /// Writing the zero page or PVH start info failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// linux-loader prefixes every layer of its messages with "Kernel Loader: ".
fn without_prefix(e: &loader::Error) -> String {
    e.to_string().replace("Kernel Loader: ", "")
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Kernel image formats moat boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A compressed `bzImage`.
    BzImage,
}

/// Which entry protocol to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, otherwise the 64-bit Linux entry.
    #[default]
    Auto,
    /// The 64-bit Linux boot protocol.
    Linux,
    /// PVH.
    Pvh,
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The image format.
    pub format: KernelFormat,
    /// First guest address past the kernel image.
    pub end: u64,
    /// The 64-bit Linux entry point.
    pub linux_entry: u64,
    /// The PVH entry point, when the ELF has one.
    pub pvh_entry: Option<u64>,
    /// The bzImage setup header, to start the zero page from.
    pub setup_header: Option<setup_header>,
}

/// Tells the image format from its first bytes: ELF magic, or the "HdrS"
/// signature of the x86 boot protocol at offset 0x202.
pub fn detect_format(image: &mut File) -> Result<KernelFormat> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).map_err(Error::ReadKernel)?;
    let mut filled = 0;
    while filled < head.len() {
        match image.read(&mut head[filled..]).map_err(Error::ReadKernel)? {
            0 => break,
            n => filled += n,
        }
    }
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelFormat::Elf)
    } else if filled == head.len() && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(Error::UnknownKernelFormat)
    }
}

/// Loads an ELF vmlinux or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, image: &mut File) -> Result<LoadedKernel> {
    let kernel = load_any_kernel(mem, image)?;
    // linux-loader copies the file's bytes but does not check the
    // zero-filled rest of a segment (its memsz), which the kernel clears
    // itself: all of it must be RAM.
    let fits = kernel
        .end
        .checked_sub(1)
        .is_some_and(|last| mem.address_in_range(GuestAddress(last)));
    if !fits {
        return Err(Error::KernelTooLarge { end: kernel.end });
    }
    Ok(kernel)
}

fn load_any_kernel(mem: &GuestMemoryMmap, image: &mut File) -> Result<LoadedKernel> {
    let format = detect_format(image)?;
    match format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, image, Some(HIMEM_START)).map_err(Error::Load)?;
            let pvh_entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                end: res.kernel_end,
                linux_entry: res.kernel_load.0,
                pvh_entry,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, image, Some(HIMEM_START)).map_err(Error::Load)?;
            let header = res.setup_header.ok_or(Error::UnknownKernelFormat)?;
            if header.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::BzImageNot64Bit);
            }
            Ok(LoadedKernel {
                format,
                end: res.kernel_end,
                // The 64-bit entry of a bzImage is 0x200 past the protected
                // mode code (boot protocol, "64-bit boot protocol").
                linux_entry: res.kernel_load.0 + 0x200,
                pvh_entry: None,
                setup_header: Some(header),
            })
        }
    }
}

/// Picks the entry point for `kernel` under `protocol`.
pub fn entry_point(kernel: &LoadedKernel, protocol: BootProtocol) -> Result<EntryPoint> {
    let linux = EntryPoint::Linux64 {
        entry: kernel.linux_entry,
        zero_page: ZERO_PAGE_START.0,
    };
    let pvh = |entry| EntryPoint::Pvh {
        entry,
        start_info: PVH_INFO_START.0,
    };
    match (protocol, kernel.pvh_entry) {
        (BootProtocol::Linux, _) | (BootProtocol::Auto, None) => Ok(linux),
        (BootProtocol::Auto | BootProtocol::Pvh, Some(entry)) => Ok(pvh(entry)),
        (BootProtocol::Pvh, None) if kernel.format == KernelFormat::BzImage => {
            Err(Error::PvhNeedsElf)
        }
        (BootProtocol::Pvh, None) => Err(Error::NoPvhEntry),
    }
}

/// Where an initramfs of `size` bytes goes: as high as possible in low RAM
/// (below `addr_max`, the kernel's `initrd_addr_max`), page aligned, and
/// above the kernel.
pub fn initramfs_address(size: u64, kernel_end: u64, mem_size: u64, addr_max: u64) -> Result<u64> {
    let top = layout::low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let start = top
        .checked_sub(size)
        .map(|addr| addr & !0xfff)
        .filter(|addr| {
            kernel_end
                .checked_next_multiple_of(0x1000)
                .is_some_and(|end| *addr >= end)
        })
        .ok_or(Error::InitramfsTooLarge { size })?;
    Ok(start)
}

/// Copies the initramfs into guest memory; returns its address and size.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: &mut File,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(u64, u64)> {
    let size = initramfs
        .seek(SeekFrom::End(0))
        .and_then(|size| initramfs.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(|e| Error::ReadInitramfs(vm_memory::GuestMemoryError::IOError(e)))?;
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(0x7fff_ffff);
    let addr = initramfs_address(size, kernel.end, mem_size, addr_max)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initramfs, size as usize)
        .map_err(Error::ReadInitramfs)?;
    Ok((addr, size))
}

/// Writes the command line at [`CMDLINE_START`]; returns its length
/// without the terminating NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize> {
    let len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    if len >= layout::CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong(len));
    }
    loader::load_cmdline(mem, CMDLINE_START, cmdline).map_err(Error::Cmdline)?;
    Ok(len)
}

/// Boot information common to both protocols.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Length of the command line at [`CMDLINE_START`], without NUL.
    pub cmdline_len: usize,
    /// Address and size of the initramfs, if any.
    pub initramfs: Option<(u64, u64)>,
    /// Address of the ACPI RSDP, if the guest has ACPI tables.
    pub rsdp: Option<u64>,
}

/// Writes the zero page for the 64-bit Linux entry (boot protocol,
/// Documentation/arch/x86/zero-page.rst).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    info: &BootInfo,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff; // "undefined" boot loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    if kernel.setup_header.is_none() {
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    // Boot protocol 2.14; older kernels ignore it and scan the BIOS area.
    params.acpi_rsdp_addr = info.rsdp.unwrap_or(0);
    let map = e820::memory_map(info.mem_size);
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, ZERO_PAGE_START),
        mem,
    )
    .map_err(Error::BootParams)
}

/// Writes `hvm_start_info`, its module list (the initramfs) and its memory
/// map for the PVH entry (Xen's docs/misc/pvh.pandoc, as Linux implements it
/// in arch/x86/platform/pvh).
pub fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<()> {
    const MODLIST_OFFSET: u64 = 0x40;
    const MEMMAP_OFFSET: u64 = 0x80;
    let map: Vec<hvm_memmap_table_entry> = e820::memory_map(info.mem_size)
        .iter()
        .map(|E820Entry { addr, size, kind }| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        memmap_paddr: PVH_INFO_START.0 + MEMMAP_OFFSET,
        memmap_entries: map.len() as u32,
        rsdp_paddr: info.rsdp.unwrap_or(0),
        ..Default::default()
    };
    let modules = info.initramfs.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    if modules.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_INFO_START.0 + MODLIST_OFFSET;
    }
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&map, GuestAddress(start_info.memmap_paddr));
    if let Some(module) = modules {
        params.set_modules(&[module], GuestAddress(start_info.modlist_paddr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(Error::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "moat-boot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = moat_tests::file_with(&path, bytes);
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// A kernel that halts, for loader tests.
    fn tiny_elf(paddr: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        moat_tests::elf::tiny_elf(paddr, &[0xf4; 16], pvh_entry)
    }

    #[test]
    fn rejects_files_that_are_neither_elf_nor_bzimage() {
        let mem = memory(32 << 20);
        for junk in [&b""[..], b"hello", &[0u8; 4096]] {
            let err = load_kernel(&mem, &mut temp_file(junk)).unwrap_err();
            assert!(matches!(err, Error::UnknownKernelFormat), "{err}");
        }
    }

    #[test]
    fn detects_a_bzimage_by_its_header_signature() {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut temp_file(&image)).unwrap(),
            KernelFormat::BzImage
        );
    }

    #[test]
    fn truncated_bzimage_is_an_error_not_a_panic() {
        let mut image = vec![0u8; 0x300];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let mem = memory(32 << 20);
        assert!(load_kernel(&mem, &mut temp_file(&image)).is_err());
    }

    #[test]
    fn loads_an_elf_at_its_physical_address() {
        let mem = memory(32 << 20);
        let kernel = load_kernel(&mem, &mut temp_file(&tiny_elf(0x100_0000, None))).unwrap();
        assert_eq!(kernel.format, KernelFormat::Elf);
        assert_eq!(kernel.linux_entry, 0x100_0000);
        assert_eq!(kernel.pvh_entry, None);
        assert_eq!(kernel.end, 0x100_0010);
        let byte: u8 = mem.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(byte, 0xf4);
    }

    #[test]
    fn finds_the_pvh_note_and_prefers_pvh() {
        let mem = memory(32 << 20);
        let image = tiny_elf(0x100_0000, Some(0x100_0004));
        let kernel = load_kernel(&mem, &mut temp_file(&image)).unwrap();
        assert_eq!(kernel.pvh_entry, Some(0x100_0004));
        assert_eq!(
            entry_point(&kernel, BootProtocol::Auto).unwrap(),
            EntryPoint::Pvh {
                entry: 0x100_0004,
                start_info: 0x6000
            }
        );
        assert_eq!(
            entry_point(&kernel, BootProtocol::Linux).unwrap(),
            EntryPoint::Linux64 {
                entry: 0x100_0000,
                zero_page: 0x7000
            }
        );
    }

    #[test]
    fn pvh_without_a_note_is_an_error() {
        let mem = memory(32 << 20);
        let kernel = load_kernel(&mem, &mut temp_file(&tiny_elf(0x100_0000, None))).unwrap();
        assert!(matches!(
            entry_point(&kernel, BootProtocol::Pvh),
            Err(Error::NoPvhEntry)
        ));
    }

    #[test]
    fn elf_outside_guest_memory_is_an_error() {
        let mem = memory(8 << 20);
        assert!(matches!(
            load_kernel(&mem, &mut temp_file(&tiny_elf(0x100_0000, None))),
            Err(Error::Load(_))
        ));
    }

    #[test]
    fn an_elf_claiming_memory_past_guest_ram_is_an_error() {
        // Found by the kernel_loader fuzz target: a segment's memsz of
        // almost 2^64 (filesz 16). linux-loader reported an end past all
        // of guest memory, and the initramfs was placed over the "kernel".
        // (That input's segment was at physical address 0.)
        let mem = memory(64 << 20);
        for (paddr, memsz) in [
            (0u64, 0xffff_ffff_ffff_ff84u64),
            (0x100_0000, 64 << 20),
            (0x100_0000, 1 << 40),
        ] {
            let mut image = tiny_elf(0x100_0000, None);
            image[64 + 24..64 + 32].copy_from_slice(&paddr.to_le_bytes());
            image[64 + 40..64 + 48].copy_from_slice(&memsz.to_le_bytes());
            let err = load_kernel(&mem, &mut temp_file(&image)).unwrap_err();
            assert!(
                err.to_string().contains("does not fit in guest memory"),
                "memsz {memsz:#x}: {err}"
            );
        }
        // Where paddr + memsz overflows, linux-loader refuses it itself.
        let mut image = tiny_elf(0x100_0000, None);
        image[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_kernel(&mem, &mut temp_file(&image)).is_err());
    }

    #[test]
    fn initramfs_above_a_kernel_ending_near_2_64_is_too_large_not_wrapped() {
        assert!(initramfs_address(4096, u64::MAX - 10, 128 << 20, 0x7fff_ffff).is_err());
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let addr = initramfs_address(0x1800, 0x200_0000, 256 << 20, 0x7fff_ffff).unwrap();
        assert_eq!(addr, (256 << 20) - 0x2000);
        // Large guests: below the MMIO hole and below initrd_addr_max.
        let addr = initramfs_address(4096, 0x200_0000, 8 << 30, 0x7fff_ffff).unwrap();
        assert_eq!(addr, 0x8000_0000 - 4096);
    }

    #[test]
    fn initramfs_that_would_overlap_the_kernel_is_too_large() {
        let err = initramfs_address(100 << 20, 0x200_0000, 128 << 20, 0x7fff_ffff).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { size } if size == 100 << 20));
        assert!(initramfs_address(1 << 40, 0, 128 << 20, u64::MAX).is_err());
    }

    #[test]
    fn initramfs_bytes_land_in_guest_memory() {
        let mem = memory(64 << 20);
        let kernel = load_kernel(&mem, &mut temp_file(&tiny_elf(0x100_0000, None))).unwrap();
        let (addr, size) =
            load_initramfs(&mem, &mut temp_file(b"070701-cpio"), &kernel, 64 << 20).unwrap();
        assert_eq!(size, 11);
        let mut buf = [0u8; 11];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(&buf, b"070701-cpio");
    }

    #[test]
    fn zero_page_carries_cmdline_initramfs_and_e820() {
        let mem = memory(64 << 20);
        let kernel = load_kernel(&mem, &mut temp_file(&tiny_elf(0x100_0000, None))).unwrap();
        let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let len = write_cmdline(&mem, &cmdline).unwrap();
        assert_eq!(len, 13);
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_len: len,
            initramfs: Some((0x300_0000, 1234)),
            rsdp: Some(0xe_0000),
        };
        write_zero_page(&mem, &kernel, &info).unwrap();
        let params: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ hdr.ramdisk_size }, 1234);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries, 4);
        let last = params.e820_table[3];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x10_0000, (64 << 20) - 0x10_0000)
        );
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, CMDLINE_START).unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let mem = memory(1 << 20);
        let mut cmdline = Cmdline::new(8192).unwrap();
        cmdline.insert_str("x".repeat(3000)).unwrap();
        assert!(matches!(
            write_cmdline(&mem, &cmdline),
            Err(Error::CmdlineTooLong(3000))
        ));
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_modules_and_memmap() {
        let mem = memory(64 << 20);
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_len: 5,
            initramfs: Some((0x300_0000, 77)),
            rsdp: Some(0xe_0000),
        };
        write_pvh_start_info(&mem, &info).unwrap();
        let si: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(si.magic, 0x336e_c578);
        assert_eq!(si.version, 1);
        assert_eq!(si.cmdline_paddr, 0x20000);
        assert_eq!(si.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 77));
        assert_eq!(si.rsdp_paddr, 0xe_0000);
        assert_eq!(si.memmap_entries, 4);
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.size, first.type_), (0, 0x9fc00, 1));
    }

    #[test]
    fn pvh_start_info_without_initramfs_has_no_modules() {
        let mem = memory(64 << 20);
        let info = BootInfo {
            mem_size: 64 << 20,
            cmdline_len: 0,
            initramfs: None,
            rsdp: None,
        };
        write_pvh_start_info(&mem, &info).unwrap();
        let si: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
        assert_eq!(si.rsdp_paddr, 0);
    }
}
