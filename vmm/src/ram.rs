//! Guest RAM in the host: anonymous memory at host addresses that are 2 MiB
//! aligned like the guest addresses they back, so that ranges advised as
//! transparent huge pages are backed by 2 MiB host pages and KVM maps them
//! whole in the guest's nested page tables.
//!
//! Why it matters: every first touch of a guest page the nested page
//! tables do not map yet is a VM exit into the host's KVM (an EPT or NPT
//! violation). A booting kernel touches thousands of 4 KiB pages; with
//! 2 MiB mappings it takes one exit per 2 MiB instead of one per 4 KiB.
//! KVM maps a 2 MiB guest range with one entry only when the host page
//! behind it is a huge page and the host and guest addresses agree modulo
//! 2 MiB (`kvm_mmu_max_mapping_level`), which is why the mapping is
//! aligned here: mmap(2) guarantees only 4 KiB alignment (before Linux
//! 6.7, which aligns large anonymous mappings itself).

use std::io;

use moat_boot::GuestMemoryMmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::config::HugePages;

/// The host's huge page size on x86-64, and the guest's 2 MiB page.
pub const HUGE_PAGE: usize = 2 << 20;

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
// As vm-memory maps anonymous regions: memory is committed as the guest
// touches it, not at start.
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps guest RAM for the ranges of `layout`, each region 2 MiB aligned
/// in the host when the address space allows it, and with
/// [`HugePages::Transparent`] advised as huge pages.
pub fn map(layout: &[(GuestAddress, usize)], huge_pages: HugePages) -> io::Result<GuestMemoryMmap> {
    let regions = layout
        .iter()
        .map(|&(start, len)| {
            let mapping = map_region(len)?;
            if huge_pages == HugePages::Transparent && !advise_huge_pages(&mapping) {
                log::debug!(
                    "the host refused transparent huge pages ({}); guest RAM stays in 4 KiB pages",
                    io::Error::last_os_error()
                );
            }
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| io::Error::other("guest range wraps around"))
        })
        .collect::<io::Result<Vec<_>>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(io::Error::other)
}

/// Maps `len` bytes of anonymous memory, owned (and unmapped when dropped)
/// by the returned region, at a 2 MiB aligned address if it can.
///
/// vm-memory picks no address of its own (it refuses MAP_FIXED), so this
/// prepares the spot the kernel will pick: Linux's default top-down layout
/// places a mapping at the top of the highest free gap that holds it. A
/// reservation of `len` + 2 MiB is given back except for its part above
/// the aligned end, which bounds the gap from above; the region then lands
/// at the aligned start, and the rest of the reservation is freed.
///
/// A hole above the reservation that holds `len` but not `len` + 2 MiB
/// (the kind a freed thread stack or buffer leaves) defeats it, and so does
/// another thread mapping memory in between: the region lands elsewhere.
/// Then the spot it took is kept out of reach (an inaccessible mapping,
/// which costs no memory) and it tries again; each miss closes one such
/// hole. After [`ALIGN_TRIES`] tries, or with a bottom-up layout (`ulimit
/// -s unlimited`), it takes whatever address mmap gives, which is correct,
/// only slower.
fn map_region(len: usize) -> io::Result<MmapRegion> {
    let build = || {
        MmapRegionBuilder::new(len)
            .with_mmap_prot(PROT)
            .with_mmap_flags(FLAGS)
            .build()
            .map_err(|e| io::Error::other(e.to_string()))
    };
    let Some(reserve_len) = len.checked_add(HUGE_PAGE) else {
        return build();
    };
    let mut missed = Vec::new();
    for _ in 0..ALIGN_TRIES {
        let Some(reserved) = Reservation::new(reserve_len) else {
            break;
        };
        let start = reserved.addr.next_multiple_of(HUGE_PAGE);
        let end = start + len;
        // Never empty: `start` is less than 2 MiB past the reservation.
        let guard = reserved.keep_from(end);
        let region = build();
        drop(guard);
        let region = region?;
        let addr = region.as_ptr() as usize;
        if addr.is_multiple_of(HUGE_PAGE) {
            return Ok(region);
        }
        drop(region);
        missed.extend(Reservation::at(addr, len));
    }
    drop(missed);
    build()
}

/// How many times [`map_region`] tries for an aligned address.
const ALIGN_TRIES: usize = 16;

/// An inaccessible anonymous mapping of the process's address space,
/// unmapped when dropped.
struct Reservation {
    addr: usize,
    len: usize,
}

impl Reservation {
    /// Reserves `len` bytes where the kernel picks.
    fn new(len: usize) -> Option<Reservation> {
        Self::map(0, len, 0)
    }

    /// Reserves `len` bytes at `addr` if nothing is mapped there.
    fn at(addr: usize, len: usize) -> Option<Reservation> {
        // MAP_FIXED_NOREPLACE fails rather than replace a mapping; a
        // kernel older than 4.17 takes the address as a hint.
        Self::map(addr, len, libc::MAP_FIXED_NOREPLACE)
    }

    fn map(addr: usize, len: usize, flags: i32) -> Option<Reservation> {
        // SAFETY: a new mapping that replaces nothing (no MAP_FIXED), so
        // it overlaps nothing of ours; it is owned by the returned value.
        let got = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_NONE,
                FLAGS | flags,
                -1,
                0,
            )
        };
        (got != libc::MAP_FAILED).then_some(Reservation {
            addr: got as usize,
            len,
        })
    }

    /// Gives back the part below `from` and keeps the rest.
    fn keep_from(self, from: usize) -> Reservation {
        let end = self.addr + self.len;
        let kept = Reservation {
            addr: from,
            len: end - from,
        };
        // SAFETY: [addr, from) is part of this reservation, which nothing
        // else uses; the rest stays owned by `kept`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, from - self.addr) };
        std::mem::forget(self);
        kept
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the reservation is ours and nothing was placed in it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Asks the host to back `region` with transparent huge pages
/// (madvise(MADV_HUGEPAGE)). Returns whether the host took the advice: a
/// kernel without transparent huge pages refuses it, and then the region
/// stays in 4 KiB pages, which is correct, only slower.
fn advise_huge_pages(region: &MmapRegion) -> bool {
    // SAFETY: the range is the region's own mapping; MADV_HUGEPAGE changes
    // how its pages are backed, never their contents.
    unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    /// The VmFlags of the mapping around `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
                let (a, b) = (
                    usize::from_str_radix(a, 16).unwrap(),
                    usize::from_str_radix(b, 16).unwrap(),
                );
                inside = a <= addr && addr < b;
            } else if inside && first == "VmFlags:" {
                return line.split_whitespace().skip(1).map(String::from).collect();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    fn advised(memory: &GuestMemoryMmap) -> Vec<bool> {
        memory
            .iter()
            .map(|r| vm_flags(r.as_ptr() as usize).iter().any(|f| f == "hg"))
            .collect()
    }

    #[test]
    fn guest_ram_is_aligned_like_the_guest_addresses() {
        let layout = [
            (GuestAddress(0), 64 << 20),
            (GuestAddress(4 << 30), 3 << 20),
        ];
        let memory = map(&layout, HugePages::None).unwrap();
        for (region, (start, len)) in memory.iter().zip(layout) {
            assert_eq!(region.start_addr(), start);
            assert_eq!(region.len(), len as u64);
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
    }

    #[test]
    fn guest_ram_is_aligned_among_holes_of_every_size() {
        // A long-running process (or a test harness) leaves holes between
        // its mappings, of any size and alignment; the kernel puts a new
        // mapping into the highest hole that holds it, which may be one
        // too small for the aligning reservation.
        let holes: Vec<Reservation> = (0..48)
            .filter_map(|i| Reservation::new(((1 + i % 9) << 20) + (i % 5) * 4096))
            .collect();
        let _between: Vec<Reservation> = holes.into_iter().step_by(2).collect();
        for len in [3 << 20, 5 << 20, 1 << 20, 64 << 20, (2 << 20) + 4096] {
            let memory = map(&[(GuestAddress(0), len)], HugePages::None).unwrap();
            let region = memory.iter().next().unwrap();
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0, "{len:#x}");
        }
    }

    #[test]
    fn guest_ram_reads_zero_and_keeps_what_is_written() {
        use vm_memory::Bytes;
        let memory = map(&[(GuestAddress(0), 4 << 20)], HugePages::Transparent).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x1234)).unwrap(), 0);
        memory
            .write_obj(0xfeed_u64, GuestAddress((4 << 20) - 8))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u64>(GuestAddress((4 << 20) - 8)).unwrap(),
            0xfeed
        );
    }

    #[test]
    fn transparent_huge_pages_are_advised_for_every_region_and_none_for_none() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let layout = [(GuestAddress(0), 8 << 20), (GuestAddress(1 << 30), 2 << 20)];
        assert_eq!(
            advised(&map(&layout, HugePages::Transparent).unwrap()),
            [true, true]
        );
        assert_eq!(
            advised(&map(&layout, HugePages::None).unwrap()),
            [false, false]
        );
    }
}
