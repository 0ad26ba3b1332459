//! Placing virtio devices on PCI (`--transport pci`): bus 0 behind the
//! configuration ports 0xcf8-0xcff, a host bridge at device 0, each virtio
//! device a function with its BAR in the memory window the ACPI tables
//! give the host bridge ([`layout::PCI_MMIO_START`]), and KVM doing the
//! interrupt and notification work (see [`moat_devices::virtio::pci`]).
//!
//! Each device has two MSI lines, configuration changes and queues, each
//! an eventfd bound as an irqfd to a GSI of its own from
//! [`FIRST_MSI_GSI`] on. When the guest programs its MSI-X table, the
//! function tells [`KvmPciHost`], which points the GSI's route at the
//! message. A masked vector's irqfd is unbound: the eventfd keeps counting,
//! and binding it again delivers what waited (KVM checks an irqfd's
//! eventfd when it is bound). Queue notifications are ioeventfds at the
//! BAR's notification registers, moved when the guest moves the BAR.
//!
//! These calls come from a vCPU thread (the guest's write to the BAR or to
//! configuration space), so its seccomp filter allows KVM_SET_GSI_ROUTING,
//! KVM_IRQFD and KVM_IOEVENTFD.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use moat_boot::{layout, GuestMemoryMmap};
use moat_devices::virtio::mmio::MmioTransport;
use moat_devices::virtio::pci::{
    self, HostBridge, MsiMessage, PciBus, PciConfigIo, PciHost, PciMmio, SharedFunction, VirtioPci,
    CONFIG_LINE, QUEUE_LINE,
};
use moat_devices::virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::error::Error;
use crate::virtio::{Attached, Named, QueueHandler};

/// The first GSI of the MSI lines: the IOAPIC's 24 pins come first.
pub const FIRST_MSI_GSI: u32 = 24;

/// The MSI routes the functions asked for, and KVM's table kept in step.
pub struct MsiRoutes {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl MsiRoutes {
    /// No MSI routes yet.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(Self {
            vm,
            routes: Mutex::new(BTreeMap::new()),
        })
    }

    /// Routes `gsi` to `message`, or nowhere.
    fn set(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        match message {
            Some(m) => routes.insert(gsi, m),
            None => routes.remove(&gsi),
        };
        crate::vm::set_gsi_routing(&self.vm, &routes)
    }
}

/// A function's KVM side: its lines' GSIs and irqfds, its ioeventfds.
struct KvmPciHost {
    vm: Arc<VmFd>,
    routes: Arc<MsiRoutes>,
    name: String,
    gsis: [u32; 2],
    lines: [EventFd; 2],
    bound: [bool; 2],
    queue_events: Vec<EventFd>,
    notifications: Option<u64>,
}

impl KvmPciHost {
    fn route(&mut self, line: usize, message: Option<MsiMessage>) -> Result<(), kvm_ioctls::Error> {
        let (gsi, fd) = (self.gsis[line], &self.lines[line]);
        match message {
            Some(message) => {
                self.routes.set(gsi, Some(message))?;
                if !self.bound[line] {
                    self.vm.register_irqfd(fd, gsi)?;
                    self.bound[line] = true;
                }
            }
            None => {
                if self.bound[line] {
                    self.vm.unregister_irqfd(fd, gsi)?;
                    self.bound[line] = false;
                }
                self.routes.set(gsi, None)?;
            }
        }
        Ok(())
    }

    /// Registers the queues' ioeventfds at `base`, all or none: a guest
    /// that placed two BARs on each other gets the second's refused
    /// (EEXIST), and nothing of it stays behind.
    fn register_notifications(&self, base: u64) -> Result<(), kvm_ioctls::Error> {
        for (queue, event) in self.queue_events.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + pci::notify_offset(queue));
            // Linux writes the queue's index, 16 bits (vp_notify).
            if let Err(e) = self.vm.register_ioevent(event, &addr, queue as u16) {
                self.unregister_notifications(base, queue);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unregisters the first `queues` queues' ioeventfds at `base`.
    fn unregister_notifications(&self, base: u64, queues: usize) {
        for (queue, event) in self.queue_events.iter().enumerate().take(queues) {
            let addr = IoEventAddress::Mmio(base + pci::notify_offset(queue));
            if let Err(e) = self.vm.unregister_ioevent(event, &addr, queue as u16) {
                log::warn!("{}: queue {queue}'s notification: {e}", self.name);
            }
        }
    }
}

impl PciHost for KvmPciHost {
    fn set_line(&mut self, line: usize, message: Option<MsiMessage>) {
        if let Err(e) = self.route(line, message) {
            log::warn!("{}: MSI-X line {line}: {e}", self.name);
        }
    }

    fn map_notifications(&mut self, base: Option<u64>) {
        if let Some(old) = self.notifications.take() {
            self.unregister_notifications(old, self.queue_events.len());
        }
        let Some(new) = base else {
            return;
        };
        match self.register_notifications(new) {
            Ok(()) => self.notifications = Some(new),
            // Notifications still arrive, as writes to the BAR that exit.
            Err(e) => log::warn!(
                "{}: queue notifications at {new:#x}: {e}; they exit to moat",
                self.name
            ),
        }
    }
}

/// Puts each device behind a virtio-pci function on bus 0, the bus's
/// configuration ports on `pio` and its memory window on `mmio`.
pub fn attach(
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &mut Bus,
    devices: Vec<Named>,
) -> Result<Vec<Attached>, Error> {
    let io = |what| move |e| Error::Io(what, e);
    let routes = MsiRoutes::new(vm.clone());
    let window = (layout::PCI_MMIO_START, layout::PCI_MMIO_END);
    let mut functions: Vec<SharedFunction> = vec![Arc::new(Mutex::new(HostBridge::new()))];
    let mut attached = Vec::with_capacity(devices.len());
    for (index, (name, device)) in devices.into_iter().enumerate() {
        let interrupt = Arc::new(Interrupt::with_config_line().map_err(io("create an eventfd"))?);
        let clone = |fd: &EventFd| fd.try_clone().map_err(io("clone an eventfd"));
        let config_fd = interrupt
            .config_fd()
            .ok_or_else(|| Error::Internal("an interrupt without a config line".into()))?;
        let lines = [clone(config_fd)?, clone(interrupt.irq_fd())?];
        let mut transport = MmioTransport::new(device, memory.clone(), interrupt)
            .map_err(io("create an eventfd"))?;
        transport.set_name(&name);
        let events = transport
            .queue_events()
            .iter()
            .map(clone)
            .collect::<Result<Vec<_>, _>>()?;
        let first_gsi = FIRST_MSI_GSI + 2 * index as u32;
        let mut gsis = [0; 2];
        gsis[CONFIG_LINE] = first_gsi;
        gsis[QUEUE_LINE] = first_gsi + 1;
        let host = KvmPciHost {
            vm: vm.clone(),
            routes: routes.clone(),
            name: name.clone(),
            gsis,
            lines,
            bound: [false; 2],
            queue_events: events.iter().map(clone).collect::<Result<Vec<_>, _>>()?,
            notifications: None,
        };
        let transport = Arc::new(Mutex::new(transport));
        let bar = window.0 + index as u64 * pci::BAR_SIZE;
        let function = Arc::new(Mutex::new(VirtioPci::new(
            transport.clone(),
            bar,
            window,
            Box::new(host),
        )));
        functions.push(function.clone());
        attached.push(Attached {
            slot: None,
            handler: QueueHandler::new(transport.clone(), events),
            transport,
            pci: Some(function),
            ack_sink: None,
        });
    }
    let bus = PciBus::new(functions);
    let internal = |e: crate::bus::OverlapError| Error::Internal(e.to_string());
    pio.insert(
        pci::CONFIG_PORT,
        pci::CONFIG_PORT_LEN,
        "pci-config",
        Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
    )
    .map_err(internal)?;
    mmio.insert(
        window.0,
        window.1 - window.0,
        "pci",
        Arc::new(Mutex::new(PciMmio::new(bus, window.0))),
    )
    .map_err(internal)?;
    Ok(attached)
}
