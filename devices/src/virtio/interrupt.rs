//! The virtio-mmio interrupt: a status register the guest reads and
//! acknowledges, and an eventfd the VMM registers with KVM as an irqfd, so
//! a device raises its interrupt from any thread without a vCPU exit.
//!
//! The status register is one word of the device's [`RegisterPage`]: the
//! guest's view of the whole register window, which the VMM may map into
//! the guest read-only, so that reading InterruptStatus on every interrupt
//! costs no exit.
//!
//! Acknowledging still writes InterruptACK, which exits. The VMM may have
//! KVM absorb the acknowledgements of the used-buffer bit alone (an
//! ioeventfd that matches the value [`INT_VRING`]): [`Interrupt::ack`]
//! then never sees them, and that bit stays set from the first used
//! buffer until a reset or an acknowledgement that includes
//! [`INT_CONFIG`]. Nothing here depends on the bit being cleared: every
//! interrupt is raised through the eventfd, whatever the bit was.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: a queue has used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Offset of InterruptStatus in the register window.
pub(crate) const INTERRUPT_STATUS: u64 = 0x060;

/// A virtio-mmio register window as the guest reads it: 4 KiB, page
/// aligned, little-endian 32-bit words. The transport writes every
/// register's current value here whenever one changes (see
/// [`crate::virtio::mmio`]); the VMM can give the page to KVM as a
/// read-only memory slot at the window's address, and then the guest's
/// reads are plain memory reads while its writes still exit to moat.
#[repr(C, align(4096))]
pub struct RegisterPage {
    words: [AtomicU32; 1024],
}

impl RegisterPage {
    /// The page's size.
    pub const SIZE: u64 = 4096;

    fn new() -> Box<Self> {
        Box::new(Self {
            words: std::array::from_fn(|_| AtomicU32::new(0)),
        })
    }

    fn word(&self, offset: u64) -> &AtomicU32 {
        &self.words[(offset / 4) as usize]
    }

    /// The word at `offset` (a multiple of 4 below 4096).
    pub fn get(&self, offset: u64) -> u32 {
        self.word(offset).load(Ordering::SeqCst)
    }

    /// Sets the word at `offset` (a multiple of 4 below 4096). The guest
    /// reads it after the exit that made the change returns to it, or
    /// after the interrupt that announces it: no stronger ordering needed.
    pub(crate) fn set(&self, offset: u64, value: u32) {
        self.word(offset).store(value, Ordering::Release);
    }

    /// Where the page is in moat's memory, for the VMM to map it.
    pub fn host_address(&self) -> u64 {
        self.words.as_ptr() as u64
    }
}

/// A virtio device's interrupt: one line on virtio-mmio; on virtio-pci
/// with MSI-X, a second line for configuration changes (see
/// [`Interrupt::with_config_line`]).
pub struct Interrupt {
    page: Box<RegisterPage>,
    irq: EventFd,
    config: Option<EventFd>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// A new interrupt with its own eventfd and register page.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            page: RegisterPage::new(),
            irq: crate::trigger::new_eventfd()?,
            config: None,
        })
    }

    /// A new interrupt whose configuration changes raise an eventfd of
    /// their own ([`Interrupt::config_fd`]), as MSI-X gives them a vector
    /// of their own. The status bits are kept all the same: a driver that
    /// reads the ISR sees them.
    pub fn with_config_line() -> std::io::Result<Self> {
        Ok(Self {
            config: Some(crate::trigger::new_eventfd()?),
            ..Self::new()?
        })
    }

    /// The eventfd to register as an irqfd: every interrupt, or with a
    /// configuration line, the used-buffer ones.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }

    /// The configuration-change eventfd, if it has one of its own.
    pub fn config_fd(&self) -> Option<&EventFd> {
        self.config.as_ref()
    }

    /// The device's register page, InterruptStatus included.
    pub fn page(&self) -> &RegisterPage {
        &self.page
    }

    fn status_word(&self) -> &AtomicU32 {
        self.page.word(INTERRUPT_STATUS)
    }

    /// Tells the driver a queue has used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// Tells the driver the config space or the device status changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bits: u32) {
        self.status_word().fetch_or(bits, Ordering::SeqCst);
        let line = match &self.config {
            Some(config) if bits == INT_CONFIG => config,
            _ => &self.irq,
        };
        // A full eventfd counter still means "interrupt pending".
        let _ = line.write(1);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status_word().load(Ordering::SeqCst)
    }

    /// The InterruptACK register: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status_word().fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register to what a snapshot recorded,
    /// without raising the line (the interrupt controller's own state,
    /// restored with the VM's, says whether it is pending).
    pub fn restore_status(&self, bits: u32) {
        self.status_word().store(bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status_word().store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bits_accumulate_until_acked() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert_eq!(irq.irq_fd().read().unwrap(), 2);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn a_config_line_takes_config_changes_and_only_them() {
        let irq = Interrupt::with_config_line().unwrap();
        irq.signal_config_change();
        irq.signal_used_queue();
        irq.signal_used_queue();
        let config = irq.config_fd().unwrap();
        assert_eq!(config.read().unwrap(), 1);
        assert_eq!(irq.irq_fd().read().unwrap(), 2);
        assert_eq!(irq.status(), INT_VRING | INT_CONFIG);
        assert!(Interrupt::new().unwrap().config_fd().is_none());
    }

    #[test]
    fn with_vring_acks_absorbed_every_raise_still_interrupts() {
        // The VMM may let KVM swallow acknowledgements of INT_VRING alone:
        // the bit then stays set, and each raise must still signal.
        let irq = Interrupt::new().unwrap();
        for _ in 0..3 {
            irq.signal_used_queue();
        }
        assert_eq!(irq.irq_fd().read().unwrap(), 3);
        assert_eq!(irq.status(), INT_VRING);
        // An acknowledgement with the config bit reaches the device and
        // clears both.
        irq.signal_config_change();
        irq.ack(INT_VRING | INT_CONFIG);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn the_status_is_the_register_pages_word_and_the_page_is_page_aligned() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_queue();
        assert_eq!(irq.page().get(INTERRUPT_STATUS), INT_VRING);
        irq.ack(INT_VRING);
        assert_eq!(irq.page().get(INTERRUPT_STATUS), 0);
        assert_eq!(irq.page().host_address() % RegisterPage::SIZE, 0);
        assert_eq!(
            std::mem::size_of::<RegisterPage>() as u64,
            RegisterPage::SIZE
        );
    }
}
