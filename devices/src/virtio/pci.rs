//! virtio over PCI (virtio 1.2, 4.1) with MSI-X: the transport whose
//! interrupts need no acknowledgement.
//!
//! On virtio-mmio every interrupt costs the guest a read of
//! InterruptStatus and a write of InterruptACK. On virtio-pci with MSI-X
//! a queue's interrupt is a message with a vector of its own: the guest's
//! handler touches no device register, and KVM delivers the message from
//! an irqfd. Queue notifications are ioeventfds, as on virtio-mmio. So a
//! request costs no exit to moat at all.
//!
//! The pieces, all without KVM (the VMM implements [`PciHost`]):
//! - [`PciBus`]: bus 0, one function per device number, device 0 a host
//!   bridge. The guest reaches configuration space through the legacy
//!   ports 0xcf8/0xcfc ([`PciConfigIo`], "configuration mechanism #1") and
//!   the functions' BARs through one MMIO window ([`PciMmio`]).
//! - [`VirtioPci`]: a modern-only virtio function (device ID 0x1040 + the
//!   virtio type). Its one BAR (32-bit memory, [`BAR_SIZE`]) holds the
//!   common configuration, the ISR, the device configuration, the
//!   notification registers and the MSI-X table and PBA. The virtio state
//!   machine itself is the [`MmioTransport`]'s: the common configuration's
//!   fields are virtio-mmio's registers under other offsets, so this
//!   function translates and the event loop serves the same transport.
//!
//! MSI-X has two vectors' worth of table: one for configuration changes,
//! one for all the queues (the device models raise one used-buffer
//! interrupt, not one per queue). A driver that gives two queues
//! different vectors reads back `NO_VECTOR` for the second, which the
//! spec allows and Linux answers by sharing one vector among the queues
//! (vp_find_vqs_msix). There is no INTx: the interrupt pin is 0.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::mmio::{self, MmioTransport};
use super::Interrupt;
use crate::BusDevice;

/// CONFIG_ADDRESS; CONFIG_DATA is the next four ports.
pub const CONFIG_PORT: u64 = 0xcf8;
/// The ports [`PciConfigIo`] takes.
pub const CONFIG_PORT_LEN: u64 = 8;
/// The size of a virtio function's BAR.
pub const BAR_SIZE: u64 = 0x4000;

/// The vector value that means "no vector" (virtio 1.2, 4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;
/// MSI-X table entries: configuration changes and queues.
const TABLE_SIZE: usize = 2;
/// The [`PciHost`] line configuration changes raise.
pub const CONFIG_LINE: usize = 0;
/// The [`PciHost`] line used buffers raise.
pub const QUEUE_LINE: usize = 1;

const VENDOR_VIRTIO: u16 = 0x1af4;
const DEVICE_VIRTIO_MODERN: u16 = 0x1040;
/// Red Hat's IDs for a generic PCI host bridge of a virtual machine.
const VENDOR_REDHAT: u16 = 0x1b36;
const DEVICE_HOST_BRIDGE: u16 = 0x0008;

// Configuration space header (PCI 3.0, 6.1).
const VENDOR_ID: usize = 0x00;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const CONFIG_SIZE: usize = 256;

// Capabilities: MSI-X, then the virtio structures.
const MSIX_CAP: usize = 0x40;
const CAP_ID_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_ENTRY_MASKED: u32 = 1;
const CAP_ID_VENDOR: u8 = 0x09;
const COMMON_CAP: usize = 0x4c;
const ISR_CAP: usize = 0x5c;
const DEVICE_CAP: usize = 0x6c;
const NOTIFY_CAP: usize = 0x7c;
const PCI_CFG_CAP: usize = 0x90;
/// The PCI configuration access capability's window onto the BAR.
const PCI_CFG_BAR: usize = PCI_CFG_CAP + 4;
const PCI_CFG_OFFSET: usize = PCI_CFG_CAP + 8;
const PCI_CFG_LENGTH: usize = PCI_CFG_CAP + 12;
const PCI_CFG_DATA: usize = PCI_CFG_CAP + 16;

// virtio_pci_cap cfg_type values.
const TYPE_COMMON: u8 = 1;
const TYPE_NOTIFY: u8 = 2;
const TYPE_ISR: u8 = 3;
const TYPE_DEVICE: u8 = 4;
const TYPE_PCI_CFG: u8 = 5;

// Where the structures are in the BAR.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
/// Each queue's notification register is this many bytes after the last.
pub const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x3800;
const MSIX_PBA: u64 = 0x3c00;
const MSIX_ENTRY_SIZE: u64 = 16;

/// Where a queue's notification register is, from the start of the BAR.
pub fn notify_offset(queue: usize) -> u64 {
    NOTIFY + queue as u64 * NOTIFY_MULTIPLIER
}

/// An MSI message: what the function writes, where, to interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// The message address.
    pub address: u64,
    /// The message data.
    pub data: u32,
}

/// What a virtio function needs from the VMM, which owns KVM.
pub trait PciHost: Send {
    /// From now on line `line` ([`CONFIG_LINE`] or [`QUEUE_LINE`]) sends
    /// `message`; `None` while its vector is masked or unset, when the
    /// line's interrupts must wait (and then be delivered) or be dropped.
    fn set_line(&mut self, line: usize, message: Option<MsiMessage>);
    /// The queues' notification registers are now at `base` +
    /// [`notify_offset`], or nowhere (`None`: the BAR decodes nothing).
    fn map_notifications(&mut self, base: Option<u64>);
}

/// A PCI function as the bus sees it.
pub trait PciFunction: Send {
    /// Reads configuration space at `offset` (within one dword).
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space at `offset` (within one dword).
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Reads memory at guest address `addr` if a BAR of this function
    /// decodes it; returns whether one did.
    fn read_bar(&mut self, _addr: u64, _data: &mut [u8]) -> bool {
        false
    }
    /// Writes memory at `addr` if a BAR of this function decodes it.
    fn write_bar(&mut self, _addr: u64, _data: &[u8]) -> bool {
        false
    }
}

/// A configuration space: its bytes, and which bits the guest may write.
#[derive(Clone)]
struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
}

impl ConfigSpace {
    fn new(vendor: u16, device: u16, class: u32) -> Self {
        let mut space = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
        };
        space.set(VENDOR_ID, &vendor.to_le_bytes());
        space.set(VENDOR_ID + 2, &device.to_le_bytes());
        // Revision, then the class code (programming interface, subclass,
        // class).
        space.set(REVISION, &(class << 8 | 1).to_le_bytes());
        space.set(HEADER_TYPE, &[0]);
        space
    }

    fn set(&mut self, offset: usize, value: &[u8]) {
        self.bytes[offset..offset + value.len()].copy_from_slice(value);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(
            self.bytes[offset..offset + 4]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// An access the bus may pass: 1, 2 or 4 bytes inside one dword.
    fn fits(offset: usize, len: usize) -> bool {
        matches!(len, 1 | 2 | 4) && offset % 4 + len <= 4 && offset + len <= CONFIG_SIZE
    }

    fn read(&self, offset: usize, data: &mut [u8]) {
        if Self::fits(offset, data.len()) {
            data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        if !Self::fits(offset, data.len()) {
            return;
        }
        for (i, value) in data.iter().enumerate() {
            let mask = self.writable[offset + i];
            let byte = &mut self.bytes[offset + i];
            *byte = (*byte & !mask) | (value & mask);
        }
    }
}

/// The little-endian value of an access of 1 to 8 bytes.
fn le_value(data: &[u8]) -> Option<u64> {
    let mut bytes = [0u8; 8];
    bytes.get_mut(..data.len())?.copy_from_slice(data);
    Some(u64::from_le_bytes(bytes))
}

/// Whether `[offset, offset + len)` meets `[start, start + size)`.
fn touches(offset: usize, len: usize, start: usize, size: usize) -> bool {
    offset < start + size && start < offset + len
}

/// Device 0: a host bridge, which tells the guest there is a PCI bus
/// (Linux's check of configuration mechanism #1 looks for one).
pub struct HostBridge(ConfigSpace);

impl HostBridge {
    /// A host bridge.
    pub fn new() -> Self {
        Self(ConfigSpace::new(
            VENDOR_REDHAT,
            DEVICE_HOST_BRIDGE,
            0x06_00_00,
        ))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
}

/// A function shared between the bus and whoever else drives it.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Bus 0: device `n` is `functions[n]`, function 0 of each.
pub struct PciBus {
    functions: Vec<SharedFunction>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// A bus with `functions` as devices 0, 1, ...: the first should be
    /// the [`HostBridge`]. At most 32.
    pub fn new(functions: Vec<SharedFunction>) -> Arc<Self> {
        Arc::new(Self { functions })
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at
/// 0xcfc-0xcff (PCI 3.0, 3.2.2.3.2). Put it on the port-I/O bus at
/// [`CONFIG_PORT`].
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

const ADDRESS_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// The configuration ports of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// The function CONFIG_ADDRESS selects and the register's offset.
    fn selected(&self) -> Option<(&SharedFunction, usize)> {
        let a = self.address;
        let (bus, device, function) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7);
        if a & ADDRESS_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let f = self.bus.functions.get(device as usize)?;
        Some((f, (a & 0xfc) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.selected() {
                Some((f, register)) => lock(f).read_config(register + offset as usize - 4, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            // Port 0xcf9 (a byte at offset 1) is the PC reset register,
            // which moat does not have; only dword writes set the address.
            (0, Ok(bytes)) => self.address = u32::from_le_bytes(bytes) & !3,
            (4..=7, _) => {
                if let Some((f, register)) = self.selected() {
                    lock(f).write_config(register + offset as usize - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// The MMIO window the functions' BARs lie in: put it on the MMIO bus at
/// `base`. An access goes to the function whose BAR decodes it; nothing
/// there reads as all ones.
pub struct PciMmio {
    bus: Arc<PciBus>,
    base: u64,
}

impl PciMmio {
    /// The window of `bus` at guest address `base`.
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        Self { bus, base }
    }
}

impl BusDevice for PciMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        if !self
            .bus
            .functions
            .iter()
            .any(|f| lock(f).read_bar(addr, data))
        {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = self.base + offset;
        self.bus
            .functions
            .iter()
            .any(|f| lock(f).write_bar(addr, data));
    }
}

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    /// Masked, as after reset (PCI 3.0, 6.8.2.9).
    fn default() -> Self {
        Self {
            address: 0,
            data: 0,
            control: MSIX_ENTRY_MASKED,
        }
    }
}

/// What a snapshot keeps of a virtio function beyond its transport: the
/// guest-written parts of configuration space and the MSI-X state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    /// The configuration space, whole.
    pub config: Vec<u8>,
    /// The MSI-X table.
    pub table: Vec<MsixEntry>,
    /// The configuration change vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
}

/// A virtio device as a PCI function (see the module notes).
pub struct VirtioPci {
    config: ConfigSpace,
    transport: Arc<Mutex<MmioTransport>>,
    interrupt: Arc<Interrupt>,
    /// Where the BAR may decode: inside the window the guest was told of.
    window: (u64, u64),
    table: [MsixEntry; TABLE_SIZE],
    config_vector: u16,
    queue_vectors: Vec<u16>,
    /// What `host` was last told.
    lines: [Option<MsiMessage>; 2],
    notifications: Option<u64>,
    host: Box<dyn PciHost>,
}

/// The PCI class of a virtio device type (the spec leaves it free; these
/// are what the device is).
fn class(device_type: u32) -> u32 {
    use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
    match device_type {
        VIRTIO_ID_NET => 0x02_00_00,   // network controller, Ethernet
        VIRTIO_ID_BLOCK => 0x01_80_00, // mass storage, other
        _ => 0xff_00_00,               // unassigned
    }
}

/// A virtio_pci_cap (virtio 1.2, 4.1.4).
fn virtio_cap(space: &mut ConfigSpace, at: usize, next: usize, kind: u8, offset: u64, len: u64) {
    let cap_len: u8 = match kind {
        TYPE_NOTIFY | TYPE_PCI_CFG => 20,
        _ => 16,
    };
    space.set(at, &[CAP_ID_VENDOR, next as u8, cap_len, kind, 0, 0, 0, 0]);
    space.set(at + 8, &(offset as u32).to_le_bytes());
    space.set(at + 12, &(len as u32).to_le_bytes());
}

impl VirtioPci {
    /// `transport`'s device as a function whose BAR is at `bar` (a
    /// multiple of [`BAR_SIZE`]) inside `window` (start, end). `interrupt`
    /// is the transport's, made with [`Interrupt::with_config_line`].
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        bar: u64,
        window: (u64, u64),
        host: Box<dyn PciHost>,
    ) -> Self {
        let (device_type, queues, interrupt) = {
            let t = lock(&transport);
            (t.device.device_type(), t.queues.len(), t.interrupt.clone())
        };
        let device_id = DEVICE_VIRTIO_MODERN + device_type as u16;
        let mut space = ConfigSpace::new(VENDOR_VIRTIO, device_id, class(device_type));
        space.set(STATUS, &STATUS_CAPABILITIES.to_le_bytes());
        // Memory space and bus master enable; INTx disable.
        space.allow(COMMAND, &[0x06, 0x04]);
        space.set(BAR0, &(bar as u32).to_le_bytes());
        space.allow(BAR0, &(!(BAR_SIZE as u32 - 1)).to_le_bytes());
        space.set(SUBSYSTEM_VENDOR, &VENDOR_VIRTIO.to_le_bytes());
        space.set(SUBSYSTEM_VENDOR + 2, &device_id.to_le_bytes());
        space.set(CAPABILITIES, &[MSIX_CAP as u8]);
        // Interrupt line (scratch for the guest), pin 0: no INTx.
        space.set(INTERRUPT_LINE, &[0xff, 0]);
        space.allow(INTERRUPT_LINE, &[0xff]);

        space.set(MSIX_CAP, &[CAP_ID_MSIX, COMMON_CAP as u8]);
        space.set(MSIX_CAP + 2, &(TABLE_SIZE as u16 - 1).to_le_bytes());
        space.allow(MSIX_CAP + 3, &[0xc0]);
        // Table and PBA in BAR 0.
        space.set(MSIX_CAP + 4, &(MSIX_TABLE as u32).to_le_bytes());
        space.set(MSIX_CAP + 8, &(MSIX_PBA as u32).to_le_bytes());

        virtio_cap(
            &mut space,
            COMMON_CAP,
            ISR_CAP,
            TYPE_COMMON,
            COMMON,
            COMMON_LEN,
        );
        virtio_cap(&mut space, ISR_CAP, DEVICE_CAP, TYPE_ISR, ISR, 1);
        virtio_cap(
            &mut space,
            DEVICE_CAP,
            NOTIFY_CAP,
            TYPE_DEVICE,
            DEVICE,
            DEVICE_LEN,
        );
        let notify_len = (queues as u64 * NOTIFY_MULTIPLIER).max(2);
        virtio_cap(
            &mut space,
            NOTIFY_CAP,
            PCI_CFG_CAP,
            TYPE_NOTIFY,
            NOTIFY,
            notify_len,
        );
        space.set(NOTIFY_CAP + 16, &(NOTIFY_MULTIPLIER as u32).to_le_bytes());
        virtio_cap(&mut space, PCI_CFG_CAP, 0, TYPE_PCI_CFG, 0, 0);
        space.allow(PCI_CFG_BAR, &[0xff]);
        space.allow(PCI_CFG_OFFSET, &[0xff; 12]);

        Self {
            config: space,
            transport,
            interrupt,
            window,
            table: [MsixEntry::default(); TABLE_SIZE],
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
            lines: [None; 2],
            notifications: None,
            host,
        }
    }

    /// The guest address the BAR decodes at, if memory decoding is on and
    /// the BAR lies inside the window.
    pub fn bar_base(&self) -> Option<u64> {
        let base = u64::from(self.config.u32(BAR0) & !0xf);
        let on = self.config.u16(COMMAND) & COMMAND_MEMORY != 0;
        (on && base >= self.window.0 && base + BAR_SIZE <= self.window.1).then_some(base)
    }

    fn msix_control(&self) -> u16 {
        self.config.u16(MSIX_CAP + 2)
    }

    /// The message vector `vector` sends now, if any.
    fn message(&self, vector: u16) -> Option<MsiMessage> {
        let control = self.msix_control();
        if control & MSIX_ENABLE == 0 || control & MSIX_FUNCTION_MASK != 0 {
            return None;
        }
        let entry = self.table.get(usize::from(vector))?;
        (entry.control & MSIX_ENTRY_MASKED == 0).then_some(MsiMessage {
            address: entry.address,
            data: entry.data,
        })
    }

    /// The vector the queues share, if they have one.
    fn queue_vector(&self) -> u16 {
        let mut set = self.queue_vectors.iter().filter(|v| **v != NO_VECTOR);
        set.next().copied().unwrap_or(NO_VECTOR)
    }

    /// Tells the host what changed: the lines' messages, the BAR's place.
    fn update(&mut self) {
        let lines = [
            self.message(self.config_vector),
            self.message(self.queue_vector()),
        ];
        for (line, message) in lines.into_iter().enumerate() {
            if self.lines[line] != message {
                self.lines[line] = message;
                self.host.set_line(line, message);
            }
        }
        let notifications = self.bar_base();
        if notifications != self.notifications {
            self.notifications = notifications;
            self.host.map_notifications(notifications);
        }
    }

    /// Whether vector `vector` has an interrupt waiting behind its mask.
    fn pending(&self, vector: u16) -> bool {
        let waiting = |fd: Option<&EventFd>| {
            fd.is_some_and(|fd| {
                let mut poll = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, no timeout.
                unsafe { libc::poll(&mut poll, 1, 0) == 1 }
            })
        };
        (self.config_vector == vector
            && self.lines[CONFIG_LINE].is_none()
            && waiting(self.interrupt.config_fd()))
            || (self.queue_vector() == vector
                && self.lines[QUEUE_LINE].is_none()
                && waiting(Some(self.interrupt.irq_fd())))
    }

    /// A vector the driver asks for: kept if it names a table entry (and,
    /// for a queue, matches the other queues'), else refused.
    fn accept_vector(&self, vector: u16, queue: Option<usize>) -> u16 {
        let in_table = usize::from(vector) < TABLE_SIZE;
        let shared = queue.is_none_or(|q| {
            self.queue_vectors
                .iter()
                .enumerate()
                .all(|(i, v)| i == q || *v == NO_VECTOR || *v == vector)
        });
        if in_table && shared {
            vector
        } else {
            NO_VECTOR
        }
    }

    /// The common configuration structure as the guest reads it.
    fn common(&self, t: &MmioTransport) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        let features = t.device.features();
        let half = |value: u64, select: u32| match select {
            0 => value as u32,
            1 => (value >> 32) as u32,
            _ => 0,
        };
        put(0x00, &t.device_features_sel.to_le_bytes());
        put(0x04, &half(features, t.device_features_sel).to_le_bytes());
        put(0x08, &t.driver_features_sel.to_le_bytes());
        put(
            0x0c,
            &half(t.driver_features, t.driver_features_sel).to_le_bytes(),
        );
        put(0x10, &self.config_vector.to_le_bytes());
        put(0x12, &(t.queues.len() as u16).to_le_bytes());
        put(0x14, &[t.status as u8, t.config_generation as u8]);
        put(0x16, &(t.queue_sel as u16).to_le_bytes());
        let sel = t.queue_sel as usize;
        if let Some(q) = t.queues.get(sel) {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &self.queue_vectors[sel].to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            put(0x1e, &(sel as u16).to_le_bytes());
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.driver.to_le_bytes());
            put(0x30, &q.device.to_le_bytes());
        }
        b
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = le_value(data) else {
            return;
        };
        let transport = self.transport.clone();
        let mut t = lock(&transport);
        let register = |t: &mut MmioTransport, offset: u64, value: u64| {
            t.write(offset, &(value as u32).to_le_bytes());
        };
        match (offset, data.len()) {
            (0x00, 4) => register(&mut t, mmio::DEVICE_FEATURES_SEL, value),
            (0x08, 4) => register(&mut t, mmio::DRIVER_FEATURES_SEL, value),
            (0x0c, 4) => register(&mut t, mmio::DRIVER_FEATURES, value),
            (0x10, 2) => self.config_vector = self.accept_vector(value as u16, None),
            (0x14, 1) => {
                register(&mut t, mmio::STATUS, value);
                if t.status == 0 {
                    // A reset unmaps every vector (as the driver expects
                    // to set them again).
                    self.config_vector = NO_VECTOR;
                    self.queue_vectors.fill(NO_VECTOR);
                }
            }
            (0x16, 2) => register(&mut t, mmio::QUEUE_SEL, value),
            (0x18, 2) => register(&mut t, mmio::QUEUE_NUM, value),
            (0x1a, 2) => {
                let sel = t.queue_sel as usize;
                if sel < self.queue_vectors.len() {
                    self.queue_vectors[sel] = self.accept_vector(value as u16, Some(sel));
                }
            }
            (0x1c, 2) => register(&mut t, mmio::QUEUE_READY, value),
            (0x20..=0x37, 4 | 8) if offset.is_multiple_of(4) => {
                let low = match offset & !7 {
                    0x20 => mmio::QUEUE_DESC_LOW,
                    0x28 => mmio::QUEUE_DRIVER_LOW,
                    _ => mmio::QUEUE_DEVICE_LOW,
                };
                let register_of = |high: bool| if high { low + 4 } else { low };
                register(&mut t, register_of(offset % 8 == 4), value);
                if data.len() == 8 {
                    register(&mut t, register_of(true), value >> 32);
                }
            }
            _ => {}
        }
        drop(t);
        self.update();
    }

    fn read_table(&self, offset: u64, data: &mut [u8]) {
        let entry = self.table.get((offset / MSIX_ENTRY_SIZE) as usize);
        let value = match (entry, offset % MSIX_ENTRY_SIZE, data.len()) {
            (Some(e), 0, 8) => e.address,
            (Some(e), 0, 4) => e.address & 0xffff_ffff,
            (Some(e), 4, 4) => e.address >> 32,
            (Some(e), 8, 4) => u64::from(e.data),
            (Some(e), 12, 4) => u64::from(e.control),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(entry) = self.table.get_mut(index) else {
            return;
        };
        let Some(value) = le_value(data) else {
            return;
        };
        match (offset % MSIX_ENTRY_SIZE, data.len()) {
            (0, 8) => entry.address = value,
            (0, 4) => entry.address = (entry.address & !0xffff_ffff) | value,
            (4, 4) => entry.address = (entry.address & 0xffff_ffff) | value << 32,
            (8, 4) => entry.data = value as u32,
            (12, 4) => entry.control = value as u32 & MSIX_ENTRY_MASKED,
            _ => return,
        }
        self.update();
    }

    /// A read at `offset` into the BAR.
    fn read_region(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON + COMMON_LEN => {
                let image = self.common(&lock(&self.transport));
                data.copy_from_slice(&image[o as usize..(o + len) as usize]);
            }
            ISR => {
                // Reading the ISR acknowledges it (virtio 1.2, 4.1.4.5).
                let status = self.interrupt.status();
                self.interrupt.ack(status);
                data[0] = status as u8;
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                lock(&self.transport).read(mmio::CONFIG + o - DEVICE, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.read_table(o - MSIX_TABLE, data),
            MSIX_PBA => {
                let bits = (0..TABLE_SIZE as u16)
                    .filter(|v| self.pending(*v))
                    .fold(0u8, |bits, v| bits | 1 << v);
                data[0] = bits;
            }
            _ => {}
        }
    }

    /// A write at `offset` into the BAR.
    fn write_region(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                lock(&self.transport).write(mmio::CONFIG + o - DEVICE, data);
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                // KVM's ioeventfds take the 16-bit writes Linux makes;
                // anything else arrives here and is forwarded the same way.
                let queue = (o - NOTIFY) / NOTIFY_MULTIPLIER;
                let t = lock(&self.transport);
                if let Some(event) = t.queue_events().get(queue as usize) {
                    let _ = event.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }

    /// The PCI configuration access capability's BAR access, if its
    /// fields describe one inside BAR 0.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let offset = u64::from(self.config.u32(PCI_CFG_OFFSET));
        let len = self.config.u32(PCI_CFG_LENGTH) as usize;
        let ok = self.config.bytes[PCI_CFG_BAR] == 0
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= BAR_SIZE;
        ok.then_some((offset, len))
    }

    /// The state a snapshot keeps.
    pub fn state(&self) -> PciState {
        PciState {
            config: self.config.bytes.to_vec(),
            table: self.table.to_vec(),
            config_vector: self.config_vector,
            queue_vectors: self.queue_vectors.clone(),
        }
    }

    /// Puts back what [`VirtioPci::state`] kept, and tells the host.
    pub fn restore(&mut self, state: &PciState) -> Result<(), String> {
        let config: [u8; CONFIG_SIZE] = state
            .config
            .as_slice()
            .try_into()
            .map_err(|_| "a PCI configuration space is not 256 bytes".to_string())?;
        let table: [MsixEntry; TABLE_SIZE] = state
            .table
            .as_slice()
            .try_into()
            .map_err(|_| format!("an MSI-X table has not {TABLE_SIZE} entries"))?;
        if state.queue_vectors.len() != self.queue_vectors.len() {
            return Err("a PCI function's queue count differs".into());
        }
        // Only what the guest can write comes from the snapshot.
        for (i, byte) in config.iter().enumerate() {
            let mask = self.config.writable[i];
            self.config.bytes[i] = (self.config.bytes[i] & !mask) | (byte & mask);
        }
        self.table = table;
        self.config_vector = state.config_vector;
        self.queue_vectors.clone_from(&state.queue_vectors);
        self.update();
        Ok(())
    }
}

impl PciFunction for VirtioPci {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if offset == PCI_CFG_DATA && data.len() == 4 {
            data.fill(0);
            if let Some((at, len)) = self.cfg_window() {
                self.read_region(at, &mut data[..len]);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if touches(offset, data.len(), PCI_CFG_DATA, 4) {
            if let (PCI_CFG_DATA, Some((at, len))) = (offset, self.cfg_window()) {
                if data.len() >= len {
                    self.write_region(at, &data[..len]);
                }
            }
            return;
        }
        self.config.write(offset, data);
        self.update();
    }

    fn read_bar(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.bar_base() {
            Some(base) if (base..base + BAR_SIZE).contains(&addr) => {
                self.read_region(addr - base, data);
                true
            }
            _ => false,
        }
    }

    fn write_bar(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.bar_base() {
            Some(base) if (base..base + BAR_SIZE).contains(&addr) => {
                self.write_region(addr - base, data);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
