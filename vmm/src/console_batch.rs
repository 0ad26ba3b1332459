//! The console's bytes without a VM exit each.
//!
//! Linux's 8250 driver writes its console by polling, a byte at a time:
//! it reads the line status register until the transmitter is empty, then
//! writes the byte to the data register, two port exits per byte (a boot
//! log of 15 KB is some 30,000 exits). With `KVM_CAP_COALESCED_PIO`, KVM
//! instead appends writes to COM1's data port to a ring moat shares with
//! it, and the guest goes on; the status read that follows still exits,
//! and moat plays the ring to the UART before it answers, so the guest
//! sees the same UART, one exit per byte.
//!
//! Only while the guest has all of the UART's interrupts off (IER 0, as
//! during boot and while Linux writes a console message): a write left in
//! the ring raises no interrupt until it is played, and a guest waiting
//! for one could wait until some unrelated exit. Every write to IER
//! exits, and moat turns the batching on or off after it.
//!
//! A guest that writes its last byte and then exits no more (it polls the
//! status register before each byte, not after, and halts) leaves that
//! byte in the ring until the vCPU's next kick: the halt probe's, within
//! a second. Linux's console waits for the transmitter after every
//! message, which exits and plays the ring at once.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_coalesced_mmio, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};

use crate::bus::Bus;
use crate::console::ConsoleSerial;

/// The UART's interrupt enable register, from its base port.
const IER_OFFSET: u64 = 1;

/// Batched writes to COM1's data register.
pub struct ConsoleBatch {
    vm: Arc<VmFd>,
    serial: Arc<Mutex<ConsoleSerial>>,
    /// COM1's base port: its data register.
    port: u64,
    /// Whether KVM batches the data port now. Its lock also serialises
    /// playing the ring.
    on: Mutex<bool>,
    ring: Ring,
}

impl ConsoleBatch {
    /// Batching for the UART `serial` at `port`, if KVM can do it; `vcpu`
    /// is any of the VM's vCPUs (the ring is the VM's, mapped through a
    /// vCPU's descriptor).
    pub fn new(
        kvm: &Kvm,
        vm: Arc<VmFd>,
        vcpu: &VcpuFd,
        serial: Arc<Mutex<ConsoleSerial>>,
        port: u16,
    ) -> std::io::Result<Option<ConsoleBatch>> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        Ok(Some(ConsoleBatch {
            vm,
            serial,
            port: u64::from(port),
            on: Mutex::new(false),
            ring: Ring::map(vcpu)?,
        }))
    }

    /// Turns batching on while the UART's interrupts are all off, off
    /// otherwise: at the start, and after each guest write to IER.
    pub fn follow_uart(&self, pio: &Bus) -> Result<(), kvm_ioctls::Error> {
        let mut on = self.on.lock().unwrap_or_else(|e| e.into_inner());
        let want = !self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interrupts_enabled();
        let zone = IoEventAddress::Pio(self.port);
        match (*on, want) {
            (false, true) => {
                self.vm.register_coalesced_mmio(zone, 1)?;
            }
            (true, false) => {
                self.vm.unregister_coalesced_mmio(zone, 1)?;
                // What KVM took before it stopped goes to the UART now.
                self.ring.play(pio);
            }
            _ => {}
        }
        *on = want;
        Ok(())
    }

    /// Plays what the ring holds to the UART, in the guest's order. Every
    /// exit calls it before it is handled, so the guest never sees the
    /// UART without its earlier writes.
    pub fn drain(&self, pio: &Bus) {
        // Most exits find the ring empty: two loads, no lock. What this
        // vCPU wrote before its exit is in the ring already.
        if self.ring.is_empty() {
            return;
        }
        let _on = self.on.lock().unwrap_or_else(|e| e.into_inner());
        self.ring.play(pio);
    }

    /// Whether a port write at `port` may have changed the UART's IER.
    pub fn touches_ier(&self, port: u64) -> bool {
        port == self.port + IER_OFFSET
    }
}

/// KVM's coalesced I/O ring (`struct kvm_coalesced_mmio_ring`): a page of
/// the VM's, mapped through a vCPU descriptor, where KVM appends entries
/// at `last` and moat takes them at `first`.
struct Ring {
    page: NonNull<u8>,
    page_size: usize,
}

// SAFETY: the mapping is plain shared memory that stays valid until Drop;
// ConsoleBatch only reads and advances the ring under its lock.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// Where the entries start in the page: after `first` and `last`.
const ENTRIES_AT: usize = 8;

impl Ring {
    fn map(vcpu: &VcpuFd) -> std::io::Result<Ring> {
        // SAFETY: sysconf has no memory effects.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| std::io::Error::last_os_error())?;
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a new shared mapping of one page of the vCPU descriptor,
        // which KVM provides at this offset when it has the capability;
        // nothing else refers to the address range it returns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Ring { page, page_size })
    }

    /// `first` (index 0) or `last` (index 1), shared with KVM.
    fn index(&self, which: usize) -> &AtomicU32 {
        // SAFETY: the two u32s at the start of the mapped page, 4-aligned,
        // valid while the mapping lives; KVM writes `last`, moat `first`.
        unsafe { &*self.page.as_ptr().cast::<AtomicU32>().add(which) }
    }

    /// Whether KVM has appended nothing that was not played.
    fn is_empty(&self) -> bool {
        self.index(0).load(Ordering::Acquire) == self.index(1).load(Ordering::Acquire)
    }

    /// Writes every entry KVM has appended to the port bus, in order. The
    /// caller serialises calls.
    fn play(&self, pio: &Bus) {
        let size = std::mem::size_of::<kvm_coalesced_mmio>();
        let slots = (self.page_size - ENTRIES_AT) / size;
        let (first, last) = (self.index(0), self.index(1));
        loop {
            let at = first.load(Ordering::Relaxed) as usize;
            // Acquire: the entry KVM wrote before it moved `last`.
            if at == last.load(Ordering::Acquire) as usize || at >= slots {
                return;
            }
            // SAFETY: slot `at` is inside the page (at < slots) and KVM
            // finished writing it before it moved `last` past it.
            let entry = unsafe {
                self.page
                    .as_ptr()
                    .add(ENTRIES_AT + at * size)
                    .cast::<kvm_coalesced_mmio>()
                    .read_unaligned()
            };
            // Release: KVM may reuse the slot once it sees `first` past it.
            first.store(((at + 1) % slots) as u32, Ordering::Release);
            let len = (entry.len as usize).min(entry.data.len());
            pio.write(entry.phys_addr, &entry.data[..len]);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the page this Ring mapped and alone refers to.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}
