//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2).
//!
//! One 4 KiB window of registers per device: identification, feature
//! negotiation, queue setup, interrupt status and acknowledge, device status,
//! and the device's config space at 0x100. Queue notifications arrive on
//! eventfds (the VMM registers them with KVM as ioeventfds on QueueNotify,
//! so a kick costs no exit to moat), and interrupts leave through
//! [`Interrupt`]'s irqfd.
//!
//! A device may be reachable at more than one window ([`MmioWindow`]): moat
//! describes each device to the guest twice, in the ACPI DSDT and on the
//! kernel command line (`virtio_mmio.device=`), for kernels with and
//! without ACPI. A kernel with both would register the device twice; so the
//! first window whose DeviceID the guest reads owns the device, and every
//! other window then reads as the empty placeholder of virtio 1.2, 4.2.2
//! (magic and version, DeviceID 0), which Linux skips without a message.
//!
//! Reads need not exit at all. The transport keeps the guest's view of its
//! registers and config space in a [`RegisterPage`], rewritten after every
//! change (a register write, a reset, a failure, a config change; the
//! interrupt line sets its status word itself). Once a window owns the
//! device, it hands the page to the VMM ([`MmioWindow::set_mapper`]), which
//! maps it at the window as a read-only KVM memory slot: from then on the
//! guest's reads (InterruptStatus on every interrupt above all) are memory
//! reads, and its writes still exit here (or end in an ioeventfd).

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::INTERRUPT_STATUS;
use super::{GuestMemoryMmap, Interrupt, RegisterPage, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of a device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM places the ioeventfds.
pub const QUEUE_NOTIFY: u64 = 0x050;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
pub(super) const DEVICE_FEATURES: u64 = 0x010;
pub(super) const DEVICE_FEATURES_SEL: u64 = 0x014;
pub(super) const DRIVER_FEATURES: u64 = 0x020;
pub(super) const DRIVER_FEATURES_SEL: u64 = 0x024;
pub(super) const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
pub(super) const QUEUE_NUM: u64 = 0x038;
pub(super) const QUEUE_READY: u64 = 0x044;
/// Offset of InterruptACK, where the VMM may absorb acknowledgements
/// (see [`Interrupt`]).
pub const INTERRUPT_ACK: u64 = 0x064;
pub(super) const STATUS: u64 = 0x070;
pub(super) const QUEUE_DESC_LOW: u64 = 0x080;
pub(super) const QUEUE_DESC_HIGH: u64 = 0x084;
pub(super) const QUEUE_DRIVER_LOW: u64 = 0x090;
pub(super) const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(super) const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(super) const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
pub(super) const CONFIG: u64 = 0x100;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2: the non-legacy interface.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("MOAT" would not fit the usual
/// PCI-style IDs; virtio only requires consistency).
const VENDOR: u32 = 0x4d4f_4154;

/// What the driver has written for one queue so far.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct QueueConfig {
    max_size: u16,
    pub(super) size: u16,
    pub(super) ready: bool,
    pub(super) desc: u64,
    pub(super) driver: u64,
    pub(super) device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// A virtio-queue `Queue` with these settings, if they describe a queue
    /// that lies in guest memory.
    fn build(&self, mem: &GuestMemoryMmap) -> Option<Queue> {
        let mut queue = Queue::new(self.max_size).ok()?;
        queue.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.driver);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.device);
        queue.set_used_ring_address(lo, hi);
        queue.set_ready(true);
        // virtio-queue refuses (and logs) a size that is not a power of
        // two and addresses without the ring's alignment by keeping what it
        // had: a queue with another size, or at address 0. Any such
        // refusal fails the activation.
        let took = queue.size() == self.size
            && queue.desc_table() == self.desc
            && queue.avail_ring() == self.driver
            && queue.used_ring() == self.device;
        (took && queue.is_valid(mem)).then_some(queue)
    }
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One queue of a [`TransportState`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc: u64,
    /// The driver (available) ring's.
    pub driver: u64,
    /// The device (used) ring's.
    pub device: u64,
    /// Where the device resumes, if it was active: (next available, next
    /// used).
    pub position: Option<(u16, u16)>,
}

/// What a snapshot keeps of a transport: its registers, its queues and
/// where the device was in them, and the interrupt status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device's virtio ID, checked on restore.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel, DeviceFeaturesSel, DriverFeaturesSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Whether the device was running.
    pub active: bool,
    /// The window that owns the device.
    pub owner: Option<u8>,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues, in order.
    pub queues: Vec<QueueState>,
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    pub(super) queues: Vec<QueueConfig>,
    pub(super) queue_sel: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    active: bool,
    /// The window that owns the device, once the guest has read a DeviceID.
    owner: Option<u8>,
    /// The device's name in logs and metrics.
    name: String,
    /// Bumped when the device changes its config space.
    pub(super) config_generation: u32,
    /// Queue notifications served.
    notifications: u64,
    /// Times the device went to NEEDS_RESET, and the last reason.
    needs_reset: u64,
    last_error: Option<String>,
}

/// One of the windows a transport is reachable at (see the module notes).
///
/// The guest's interrupt handler reads InterruptStatus and writes
/// InterruptACK on every interrupt. Both are the interrupt line's atomic
/// bits, so the owning window serves them without the transport's lock:
/// the event loop holds that lock for a whole batch of queue work (many
/// frames read from a TAP), and a vCPU waiting on it would sit idle for
/// the batch instead of running the guest beside it.
pub struct MmioWindow {
    transport: Arc<std::sync::Mutex<MmioTransport>>,
    window: u8,
    /// Holds the register page the mapper maps for as long as the window
    /// is on the bus.
    interrupt: Arc<Interrupt>,
    /// This window owns the transport. Ownership, once taken, never moves
    /// (see [`MmioTransport::read_window`]), so this is learnt once, under
    /// the lock.
    owns: bool,
    /// Maps the register page at this window, called once when the window
    /// is found to own the device.
    mapper: Option<Mapper>,
}

/// What maps a device's [`RegisterPage`] into the guest at its window.
pub type Mapper = Box<dyn FnOnce(&RegisterPage) + Send>;

impl MmioWindow {
    /// Window `window` of `transport`.
    pub fn new(transport: Arc<std::sync::Mutex<MmioTransport>>, window: u8) -> Self {
        let interrupt = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interrupt
            .clone();
        Self {
            transport,
            window,
            interrupt,
            owns: false,
            mapper: None,
        }
    }

    /// Has `mapper` map the device's register page at this window once
    /// the window owns the device (see the module notes). The page
    /// outlives the mapping: the window holds it while on the bus.
    pub fn set_mapper(&mut self, mapper: Mapper) {
        self.mapper = Some(mapper);
    }

    /// Runs `f` on the transport under its lock, and learns whether this
    /// window owns it; an owner maps the register page the first time.
    fn locked(&mut self, f: impl FnOnce(&mut MmioTransport, u8)) {
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut transport, self.window);
        self.owns = transport.owner == Some(self.window);
        if self.owns {
            if let Some(map) = self.mapper.take() {
                map(self.interrupt.page());
            }
        }
    }
}

impl BusDevice for MmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.owns && offset == INTERRUPT_STATUS && data.len() == 4 {
            data.copy_from_slice(&self.interrupt.status().to_le_bytes());
            return;
        }
        self.locked(|t, window| t.read_window(window, offset, data));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (true, INTERRUPT_ACK, Ok(bytes)) = (self.owns, offset, <[u8; 4]>::try_from(data)) {
            self.interrupt.ack(u32::from_le_bytes(bytes));
            return;
        }
        self.locked(|t, window| t.write_window(window, offset, data));
    }
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|max| QueueConfig::new(*max))
            .collect();
        let queue_events = queues
            .iter()
            .map(|_| crate::trigger::new_eventfd())
            .collect::<std::io::Result<Vec<_>>>()?;
        let transport = Self {
            device,
            mem,
            interrupt,
            queue_events,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            owner: None,
            name: String::from("virtio"),
            config_generation: 0,
            notifications: 0,
            needs_reset: 0,
            last_error: None,
        };
        transport.render();
        Ok(transport)
    }

    /// Writes every register but InterruptStatus (the interrupt line's own
    /// word) and the config space into the register page, as a read
    /// through the transport would return them.
    fn render(&self) {
        self.render_registers();
        self.render_config();
    }

    /// The registers only: what a register write, a reset or a failure
    /// changes.
    fn render_registers(&self) {
        let page = self.interrupt.page();
        for offset in (0..CONFIG).step_by(4) {
            if offset != INTERRUPT_STATUS {
                page.set(offset, self.read_register(offset));
            }
        }
    }

    /// The config space only: what a config write changes.
    fn render_config(&self) {
        let page = self.interrupt.page();
        let mut config = [0u8; (MMIO_WINDOW - CONFIG) as usize];
        self.device.read_config(0, &mut config);
        for (offset, word) in (CONFIG..).step_by(4).zip(config.chunks_exact(4)) {
            let word: [u8; 4] = word.try_into().unwrap_or_default();
            page.set(offset, u32::from_le_bytes(word));
        }
    }

    /// Names the device for logs and metrics (`block_rootfs`, `net_eth0`).
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's counters and the transport's, for the metrics.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut counters = self.device.counters();
        counters.push(("queue_event_count", self.notifications));
        counters.push(("needs_reset_count", self.needs_reset));
        counters
    }

    /// Why the device last went to NEEDS_RESET.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The device model, for the VMM to reach its own methods.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device changed its config space: a new generation, and a
    /// config-change interrupt once the driver is up (virtio 1.2, 2.5.1).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.render();
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// The transport's state, for a snapshot. Call it between events (the
    /// event loop's thread, with the vCPUs paused), when no request is half
    /// done.
    pub fn state(&self) -> TransportState {
        let positions = if self.active {
            self.device.queue_positions()
        } else {
            Vec::new()
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            active: self.active,
            owner: self.owner,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueState {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    position: positions.get(i).copied(),
                })
                .collect(),
        }
    }

    /// Puts the transport back as `state` recorded it and, if the device
    /// was running, activates it with its queues where they were. The
    /// device must be the same kind with the same queues; guest memory must
    /// be the snapshot's.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let restored = self.restore_registers(state);
        self.render();
        restored
    }

    fn restore_registers(&mut self, state: &TransportState) -> Result<(), String> {
        if state.device_type != self.device.device_type() {
            return Err(format!(
                "{}: the snapshot has a device of type {} here, this VM one of type {}",
                self.name,
                state.device_type,
                self.device.device_type()
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "{}: the snapshot has {} queues, the device {}",
                self.name,
                state.queues.len(),
                self.queues.len()
            ));
        }
        self.reset();
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            queue.size = saved.size;
            queue.ready = saved.ready;
            queue.desc = saved.desc;
            queue.driver = saved.driver;
            queue.device = saved.device;
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.owner = state.owner;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        if !state.active {
            return Ok(());
        }
        let event_idx = self.driver_features & super::VIRTIO_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (config, saved)) in self.queues.iter().zip(&state.queues).enumerate() {
            let mut queue = config
                .build(&self.mem)
                .ok_or_else(|| format!("{}: queue {i} does not lie in guest memory", self.name))?;
            queue.set_event_idx(event_idx);
            if let Some((avail, used)) = saved.position {
                queue.set_next_avail(avail);
                queue.set_next_used(used);
            }
            queues.push(queue);
        }
        self.device
            .activate(self.driver_features, queues)
            .map_err(|e| format!("{}: {e}", self.name))?;
        self.active = true;
        self.device
            .restored(&self.mem, &self.interrupt)
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// One eventfd per queue, signalled when the driver notifies it.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver brought the device up and it is running.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The driver notified queue `index` (its eventfd fired): let the device
    /// process it. Notifications before DRIVER_OK or after a failure are
    /// dropped, as the spec allows.
    pub fn process_queue(&mut self, index: usize) {
        if !self.active || index >= self.queues.len() {
            return;
        }
        self.notifications += 1;
        if let Err(e) = self.device.process_queue(index, &self.mem, &self.interrupt) {
            self.fail(&e.0);
        } else if self.device.wants_more(index) {
            if let Some(event) = self.queue_events.get(index) {
                let _ = event.write(1);
            }
        }
    }

    /// The device's backend descriptor, if it has one.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// Whether the event loop should poll the backend descriptor now.
    pub fn backend_wanted(&self) -> bool {
        self.active && self.device.backend_wanted()
    }

    /// The backend descriptor is ready: let the device serve it.
    pub fn process_backend(&mut self) {
        self.finish_host_work(|device, mem, irq| device.process_backend(mem, irq));
    }

    /// Lets the device finish what the host is doing for it
    /// ([`VirtioDevice::quiesce`]).
    pub fn quiesce(&mut self) {
        self.finish_host_work(|device, mem, irq| device.quiesce(mem, irq));
    }

    /// Runs `work` on the active device; an error stops it (NEEDS_RESET),
    /// otherwise queues it took up again and left at their budget are
    /// signalled.
    fn finish_host_work(
        &mut self,
        work: impl FnOnce(
            &mut dyn VirtioDevice,
            &GuestMemoryMmap,
            &Interrupt,
        ) -> Result<(), super::DeviceError>,
    ) {
        if !self.active {
            return;
        }
        if let Err(e) = work(self.device.as_mut(), &self.mem, &self.interrupt) {
            self.fail(&e.0);
            return;
        }
        self.signal_queues_wanting_more();
    }

    /// Finishing in-flight work (from the backend, or a quiesce) may have
    /// taken up a queue again (a disk's completions making room) and
    /// stopped at its budget: come back to it as after a notification.
    fn signal_queues_wanting_more(&self) {
        for (index, event) in self.queue_events.iter().enumerate() {
            if self.device.wants_more(index) {
                let _ = event.write(1);
            }
        }
    }

    /// The device hit an error the driver caused: stop it and ask for a
    /// reset (virtio 1.2, 2.1.2).
    fn fail(&mut self, reason: &str) {
        // Once per failure: the device stays stopped until the driver
        // resets it.
        log::error!(
            "{}: the guest's driver broke the device ({reason}); it is stopped until the driver resets it (NEEDS_RESET)",
            self.name
        );
        self.needs_reset += 1;
        self.last_error = Some(reason.to_string());
        self.active = false;
        self.device.reset();
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.render_registers();
        self.interrupt.signal_config_change();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        self.interrupt.clear();
    }

    /// Features the driver may accept: those offered, VERSION_1 included.
    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only adds bits (virtio 1.2, 3.1.1); anything else,
        // other than FAILED, is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver we refuse.
            self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            self.activate();
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 && self.active {
            self.active = false;
            self.device.reset();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & super::VIRTIO_F_EVENT_IDX != 0;
        let queues: Option<Vec<Queue>> = self
            .queues
            .iter()
            .map(|q| q.ready.then(|| q.build(&self.mem)).flatten())
            .map(|q| {
                q.map(|mut q| {
                    q.set_event_idx(event_idx);
                    q
                })
            })
            .collect();
        let result = match queues {
            Some(queues) => self.device.activate(self.driver_features, queues),
            None => Err(super::DeviceError(
                "a queue is not ready or lies outside guest memory".into(),
            )),
        };
        match result {
            Ok(()) => self.active = true,
            Err(e) => self.fail(&e.0),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // Feature and queue setup is only allowed during initialisation.
        let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let configuring = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES if negotiating => match self.driver_features_sel {
                0 => set_low(&mut self.driver_features, value),
                1 => set_high(&mut self.driver_features, value),
                _ => {}
            },
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NOTIFY => {
                // Normally KVM's ioeventfd catches this write; without one,
                // forward it the same way.
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.set_status(value),
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
                if configuring =>
            {
                if let Some(queue) = self.selected_queue() {
                    match offset {
                        // A size beyond 16 bits is no size (0), not the
                        // low half of one.
                        QUEUE_NUM => queue.size = u16::try_from(value).unwrap_or(0),
                        QUEUE_READY => queue.ready = value == 1,
                        QUEUE_DESC_LOW => set_low(&mut queue.desc, value),
                        QUEUE_DESC_HIGH => set_high(&mut queue.desc, value),
                        QUEUE_DRIVER_LOW => set_low(&mut queue.driver, value),
                        QUEUE_DRIVER_HIGH => set_high(&mut queue.driver, value),
                        QUEUE_DEVICE_LOW => set_low(&mut queue.device, value),
                        _ => set_high(&mut queue.device, value),
                    }
                }
            }
            _ => {}
        }
    }
}

impl MmioTransport {
    /// Whether `window` serves the device for an access at `offset`:
    /// the owner does; before anyone owns it, reading DeviceID claims it.
    fn serves(&mut self, window: u8, offset: u64, read: bool) -> bool {
        match self.owner {
            Some(owner) => owner == window,
            None if read && offset == DEVICE_ID => {
                self.owner = Some(window);
                true
            }
            None => false,
        }
    }

    /// A read at `offset` of window `window`.
    pub fn read_window(&mut self, window: u8, offset: u64, data: &mut [u8]) {
        let aligned = data.len() == 4 && offset.is_multiple_of(4);
        if !self.serves(window, offset, aligned) {
            // The placeholder every other window shows.
            let value = match offset {
                MAGIC_VALUE => MAGIC,
                VERSION => MMIO_VERSION,
                _ => 0,
            };
            if aligned {
                data.copy_from_slice(&value.to_le_bytes());
            } else {
                data.fill(0);
            }
        } else if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
        } else if aligned {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32 bits wide and aligned (4.2.2.2).
            data.fill(0);
        }
    }

    /// A write at `offset` of window `window`.
    pub fn write_window(&mut self, window: u8, offset: u64, data: &[u8]) {
        if !self.serves(window, offset, false) {
            return;
        }
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
            self.render_config();
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(offset, u32::from_le_bytes(bytes));
            match offset {
                // Neither changes a register the page holds.
                QUEUE_NOTIFY | INTERRUPT_ACK => {}
                // A reset or activation may touch the device's config.
                STATUS => self.render(),
                _ => self.render_registers(),
            }
        }
    }
}

/// A transport on the bus directly is its own only window, which owns it.
impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.owner.get_or_insert(0);
        self.read_window(0, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.owner.get_or_insert(0);
        self.write_window(0, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_driver::{self, Driver};
    use crate::virtio::DeviceError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        fail_activate: bool,
        fail_process: bool,
    }

    impl VirtioDevice for Recorder {
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }

        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (at, byte) in (offset..).zip(data.iter_mut()) {
                *byte = at as u8;
            }
        }
        fn activate(&mut self, features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("activate {features:#x} {}", queues.len()));
            if self.fail_activate {
                return Err(DeviceError("no".into()));
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset".into());
        }
        fn process_queue(
            &mut self,
            index: usize,
            _: &GuestMemoryMmap,
            irq: &Interrupt,
        ) -> Result<(), DeviceError> {
            self.log.lock().unwrap().push(format!("process {index}"));
            if self.fail_process {
                return Err(DeviceError("bad chain".into()));
            }
            irq.signal_used_queue();
            Ok(())
        }
    }

    fn setup(dev: Recorder) -> (MmioTransport, Arc<Mutex<Vec<String>>>, GuestMemoryMmap) {
        let log = dev.log.clone();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        (
            MmioTransport::new(Box::new(dev), mem.clone(), irq).unwrap(),
            log,
            mem,
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        test_driver::read32(t, offset)
    }

    /// The guest's view of a window whose register page is mapped: reads
    /// come from the page, writes reach the transport.
    struct Mapped<'a>(&'a mut MmioTransport);

    impl BusDevice for Mapped<'_> {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let page = self.0.interrupt.page();
            for (at, byte) in (offset..).zip(data.iter_mut()) {
                *byte = page.get(at & !3).to_le_bytes()[(at % 4) as usize];
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.write(offset, data);
        }
    }

    /// Every word of the page is what a read through the transport returns.
    fn assert_page_matches(t: &mut MmioTransport) {
        for offset in (0..MMIO_WINDOW).step_by(4) {
            let page = t.interrupt.page().get(offset);
            assert_eq!(page, read(t, offset), "register page at {offset:#x}");
        }
    }

    #[test]
    fn a_driver_reading_only_the_register_page_brings_the_device_up_and_down() {
        let (mut t, log, mem) = setup(Recorder::default());
        assert_page_matches(&mut t);
        assert_eq!(read(&mut t, DEVICE_ID), 42);
        // Features the device does not offer: FEATURES_OK must read back
        // clear from the page.
        let refused = Driver::init(
            &mut Mapped(&mut t),
            &mem,
            1 << 40 | VIRTIO_F_VERSION_1,
            &[4],
        );
        assert_eq!(refused.err().as_deref(), Some("device refused FEATURES_OK"));
        // QueueNumMax follows QueueSel: the page is rewritten on the write.
        Driver::init(&mut Mapped(&mut t), &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        assert!(t.is_active());
        assert_page_matches(&mut t);
        t.process_queue(1);
        let vring = super::super::interrupt::INT_VRING;
        assert_eq!(
            test_driver::read32(&mut Mapped(&mut t), INTERRUPT_STATUS),
            vring
        );
        test_driver::write32(&mut Mapped(&mut t), INTERRUPT_ACK, vring);
        assert_eq!(
            test_driver::read32(&mut Mapped(&mut t), INTERRUPT_STATUS),
            0
        );
        t.config_changed();
        assert_eq!(
            test_driver::read32(&mut Mapped(&mut t), CONFIG_GENERATION),
            1
        );
        let mut mac = [0u8; 3];
        Mapped(&mut t).read(CONFIG + 5, &mut mac);
        assert_eq!(mac, [5, 6, 7]);
        assert_page_matches(&mut t);
        test_driver::write32(&mut Mapped(&mut t), STATUS, 0);
        assert_eq!(test_driver::read32(&mut Mapped(&mut t), STATUS), 0);
        assert!(log.lock().unwrap().contains(&"reset".to_string()));
        assert_page_matches(&mut t);
    }

    #[test]
    fn a_failing_device_shows_needs_reset_in_the_register_page() {
        let (mut t, _, mem) = setup(Recorder {
            fail_process: true,
            ..Default::default()
        });
        assert_eq!(read(&mut t, DEVICE_ID), 42);
        Driver::init(&mut Mapped(&mut t), &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        t.process_queue(0);
        let status = test_driver::read32(&mut Mapped(&mut t), STATUS);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_page_matches(&mut t);
    }

    #[test]
    fn a_restored_transport_shows_its_registers_in_the_page() {
        let (mut t, _, mem) = setup(Recorder::default());
        Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        test_driver::write32(&mut t, QUEUE_SEL, 1);
        t.config_changed();
        let state = t.state();
        let irq = Arc::new(Interrupt::new().unwrap());
        let mut restored =
            MmioTransport::new(Box::new(Recorder::default()), mem.clone(), irq).unwrap();
        restored.restore(&state).unwrap();
        assert_eq!(restored.interrupt.page().get(STATUS), 0xf);
        assert_eq!(restored.interrupt.page().get(QUEUE_NUM_MAX), 8);
        assert_page_matches(&mut restored);
    }

    #[test]
    fn the_owning_window_maps_the_page_once_and_the_other_never() {
        let (t, _, mem) = setup(Recorder::default());
        let page = t.interrupt.page().host_address();
        let shared = Arc::new(Mutex::new(t));
        let mapped = Arc::new(Mutex::new(Vec::new()));
        let mut windows: Vec<MmioWindow> = (0..2)
            .map(|index| {
                let mut window = MmioWindow::new(shared.clone(), index);
                let mapped = mapped.clone();
                window.set_mapper(Box::new(move |page: &RegisterPage| {
                    mapped.lock().unwrap().push((index, page.host_address()));
                }));
                window
            })
            .collect();
        for window in &mut windows {
            test_driver::read32(window, MAGIC_VALUE);
            test_driver::write32(window, STATUS, 1);
        }
        assert!(
            mapped.lock().unwrap().is_empty(),
            "mapped before a window owns it"
        );
        let (cmdline, rest) = windows.split_last_mut().unwrap();
        Driver::init(cmdline, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        test_driver::read32(&mut rest[0], DEVICE_ID);
        test_driver::read32(cmdline, STATUS);
        assert_eq!(*mapped.lock().unwrap(), vec![(1, page)]);
    }

    #[test]
    fn identifies_as_a_version_2_virtio_mmio_device() {
        let (mut t, _, _) = setup(Recorder::default());
        assert_eq!(read(&mut t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(&mut t, VERSION), 2);
        assert_eq!(read(&mut t, DEVICE_ID), 42);
        assert_eq!(read(&mut t, VENDOR_ID), VENDOR);
    }

    #[test]
    fn the_first_window_to_read_the_device_id_owns_the_device() {
        let (t, _, mem) = setup(Recorder::default());
        let shared = Arc::new(Mutex::new(t));
        let mut acpi = MmioWindow::new(shared.clone(), 0);
        let mut cmdline = MmioWindow::new(shared.clone(), 1);
        // Before anyone owns it, both identify as virtio-mmio; writes to
        // either are ignored until a DeviceID read.
        for w in [&mut acpi, &mut cmdline] {
            assert_eq!(test_driver::read32(w, MAGIC_VALUE), 0x7472_6976);
            assert_eq!(test_driver::read32(w, VERSION), 2);
        }
        test_driver::write32(&mut cmdline, STATUS, 1);
        assert_eq!(shared.lock().unwrap().status(), 0);
        // The ACPI window's probe comes first and claims it.
        assert_eq!(test_driver::read32(&mut acpi, DEVICE_ID), 42);
        // The other window is a placeholder from now on: Linux's probe
        // sees DeviceID 0 and leaves it.
        assert_eq!(test_driver::read32(&mut cmdline, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(test_driver::read32(&mut cmdline, DEVICE_ID), 0);
        assert_eq!(test_driver::read32(&mut cmdline, QUEUE_NUM_MAX), 0);
        assert!(Driver::init(&mut cmdline, &mem, VIRTIO_F_VERSION_1, &[16, 8]).is_err());
        assert_eq!(shared.lock().unwrap().status(), 0);
        // The owner drives it normally.
        Driver::init(&mut acpi, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        assert!(shared.lock().unwrap().is_active());
        test_driver::write32(&mut cmdline, STATUS, 0);
        assert!(
            shared.lock().unwrap().is_active(),
            "the placeholder cannot reset it"
        );
    }

    #[test]
    fn the_interrupt_registers_answer_while_the_event_loop_holds_the_device() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(Interrupt::new().unwrap());
        let t =
            MmioTransport::new(Box::new(Recorder::default()), mem.clone(), irq.clone()).unwrap();
        let shared = Arc::new(Mutex::new(t));
        let mut window = MmioWindow::new(shared.clone(), 0);
        Driver::init(&mut window, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        irq.signal_used_queue();
        // The event loop is in the middle of a long batch of queue work.
        let busy = shared.lock().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let status = test_driver::read32(&mut window, INTERRUPT_STATUS);
            test_driver::write32(&mut window, INTERRUPT_ACK, status);
            let _ = done.send((status, test_driver::read32(&mut window, INTERRUPT_STATUS)));
        });
        let answer = finished.recv_timeout(std::time::Duration::from_secs(5));
        drop(busy);
        let vring = super::super::interrupt::INT_VRING;
        assert_eq!(answer, Ok((vring, 0)), "the vCPU waited for the event loop");
    }

    #[test]
    fn offers_features_in_two_halves() {
        let (mut t, _, _) = setup(Recorder::default());
        test_driver::write32(&mut t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, DEVICE_FEATURES), 1 << 5);
        test_driver::write32(&mut t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, DEVICE_FEATURES), 1);
        test_driver::write32(&mut t, DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(&mut t, DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_initialisation_activates_the_device_with_the_accepted_features() {
        let (mut t, log, mem) = setup(Recorder::default());
        let driver = Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        assert!(t.is_active());
        assert_eq!(t.status(), 0xf);
        assert_eq!(log.lock().unwrap().as_slice(), ["activate 0x100000000 2"]);
        drop(driver);
    }

    #[test]
    fn features_not_offered_are_refused_at_features_ok() {
        let (mut t, _, mem) = setup(Recorder::default());
        let err = Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1 | 1 << 7, &[16, 8]).unwrap_err();
        assert!(err.contains("FEATURES_OK"), "{err}");
        assert!(!t.is_active());
    }

    #[test]
    fn a_driver_without_version_1_is_refused() {
        let (mut t, _, mem) = setup(Recorder::default());
        assert!(Driver::init(&mut t, &mem, 1 << 5, &[16, 8]).is_err());
    }

    /// Sets up both queues with `size` entries at `desc`, `avail` and
    /// `used` (inside guest memory), then writes DRIVER_OK.
    fn configure_queues(t: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) {
        test_driver::write32(t, STATUS, 1);
        test_driver::write32(t, STATUS, 3);
        test_driver::write32(t, DRIVER_FEATURES_SEL, 1);
        test_driver::write32(t, DRIVER_FEATURES, 1);
        test_driver::write32(t, STATUS, 0xb);
        for q in 0..2u64 {
            let at = |base: u64| base + q * 0x1_0000;
            test_driver::write32(t, QUEUE_SEL, q as u32);
            test_driver::write32(t, QUEUE_NUM, size);
            test_driver::write32(t, QUEUE_DESC_LOW, at(desc) as u32);
            test_driver::write32(t, QUEUE_DRIVER_LOW, at(avail) as u32);
            test_driver::write32(t, QUEUE_DEVICE_LOW, at(used) as u32);
            test_driver::write32(t, QUEUE_READY, 1);
        }
        test_driver::write32(t, STATUS, 0xf);
    }

    #[test]
    fn well_placed_queues_activate() {
        let (mut t, _, _) = setup(Recorder::default());
        configure_queues(&mut t, 8, 0x2_0000, 0x2_1000, 0x2_2000);
        assert!(t.is_active());
    }

    #[test]
    fn misaligned_rings_fail_activation_instead_of_running_at_address_0() {
        // Descriptor tables need 16-byte alignment, used rings 4 (virtio
        // 1.2, 2.7): virtio-queue refuses these addresses, and the queue
        // must not then run at the address it had (0).
        for (desc, avail, used) in [
            (0x2_0000, 0x2_1000, 0x2_2002),
            (0x2_0008, 0x2_1000, 0x2_2000),
            (0x2_0000, 0x2_1001, 0x2_2000),
        ] {
            let (mut t, log, _) = setup(Recorder::default());
            configure_queues(&mut t, 8, desc, avail, used);
            assert!(!t.is_active(), "{desc:#x} {avail:#x} {used:#x}");
            assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            assert!(log
                .lock()
                .unwrap()
                .iter()
                .all(|l| !l.starts_with("activate")));
        }
    }

    #[test]
    fn a_queue_size_beyond_16_bits_is_not_cut_to_a_valid_one() {
        // 0x10008 must not run as an 8-entry queue.
        let (mut t, _, _) = setup(Recorder::default());
        configure_queues(&mut t, 0x1_0008, 0x2_0000, 0x2_1000, 0x2_2000);
        assert!(!t.is_active());
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_fails_activation_with_needs_reset() {
        let (mut t, log, mem) = setup(Recorder::default());
        test_driver::write32(&mut t, STATUS, 1);
        test_driver::write32(&mut t, STATUS, 3);
        test_driver::write32(&mut t, DRIVER_FEATURES_SEL, 1);
        test_driver::write32(&mut t, DRIVER_FEATURES, 1);
        test_driver::write32(&mut t, STATUS, 0xb);
        for q in 0..2 {
            test_driver::write32(&mut t, QUEUE_SEL, q);
            test_driver::write32(&mut t, QUEUE_NUM, 8);
            test_driver::write32(&mut t, QUEUE_DESC_LOW, 0xffff_0000);
            test_driver::write32(&mut t, QUEUE_DESC_HIGH, 0x10);
            test_driver::write32(&mut t, QUEUE_READY, 1);
        }
        test_driver::write32(&mut t, STATUS, 0xf);
        assert!(!t.is_active());
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(
            !log.lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("activate")),
            "device never activated"
        );
        assert_ne!(
            read(&mut t, INTERRUPT_STATUS) & super::super::interrupt::INT_CONFIG,
            0
        );
        drop(mem);
    }

    #[test]
    fn a_failed_activation_sets_needs_reset_and_reset_recovers() {
        let (mut t, log, mem) = setup(Recorder {
            fail_activate: true,
            ..Default::default()
        });
        assert!(Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[16, 8]).is_err());
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        test_driver::write32(&mut t, STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(read(&mut t, INTERRUPT_STATUS), 0);
        assert!(log.lock().unwrap().contains(&"reset".to_string()));
    }

    #[test]
    fn queue_errors_put_the_device_in_needs_reset() {
        let (mut t, log, mem) = setup(Recorder {
            fail_process: true,
            ..Default::default()
        });
        Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        t.process_queue(0);
        assert!(!t.is_active());
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        t.process_queue(0);
        assert_eq!(
            log.lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("process"))
                .count(),
            1
        );
    }

    #[test]
    fn notifications_before_driver_ok_are_ignored() {
        let (mut t, log, _) = setup(Recorder::default());
        t.process_queue(0);
        t.process_queue(99);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn interrupt_status_is_read_and_acknowledged() {
        let (mut t, _, mem) = setup(Recorder::default());
        Driver::init(&mut t, &mem, VIRTIO_F_VERSION_1, &[16, 8]).unwrap();
        t.process_queue(1);
        assert_eq!(read(&mut t, INTERRUPT_STATUS), 1);
        test_driver::write32(&mut t, INTERRUPT_ACK, 1);
        assert_eq!(read(&mut t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_writes_reach_the_queue_eventfd() {
        let (mut t, _, _) = setup(Recorder::default());
        test_driver::write32(&mut t, QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        test_driver::write32(&mut t, QUEUE_NOTIFY, 7);
    }

    #[test]
    fn queue_setup_is_ignored_outside_initialisation() {
        let (mut t, _, _) = setup(Recorder::default());
        test_driver::write32(&mut t, QUEUE_SEL, 0);
        test_driver::write32(&mut t, QUEUE_READY, 1);
        assert_eq!(read(&mut t, QUEUE_READY), 0);
        test_driver::write32(&mut t, QUEUE_SEL, 9);
        assert_eq!(read(&mut t, QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn status_bits_cannot_be_cleared_except_by_reset() {
        let (mut t, _, _) = setup(Recorder::default());
        test_driver::write32(&mut t, STATUS, 3);
        test_driver::write32(&mut t, STATUS, 1);
        assert_eq!(t.status(), 3);
    }

    #[test]
    fn config_space_and_odd_accesses() {
        let (mut t, _, _) = setup(Recorder::default());
        let mut b = [0u8; 1];
        t.read(CONFIG + 3, &mut b);
        assert_eq!(b, [3]);
        let mut two = [0xffu8; 2];
        t.read(STATUS, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(STATUS + 1, &[1, 2, 3, 4]);
        t.write(STATUS, &[1]);
        assert_eq!(t.status(), 0);
        t.read(0xfff, &mut b);
    }
}
