//! Placing virtio devices: each gets a 4 KiB virtio-mmio window in the MMIO
//! hole, an interrupt line, ioeventfds for its queues, a kernel command-line
//! entry so the guest finds it, and an event-loop handler for its queues.
//! Where KVM can map memory read-only, the window that owns a device gets
//! its register page as a read-only memory slot (see
//! [`moat_devices::virtio::mmio`]), so the guest reads registers without
//! exits; each device has a slot number of its own for it.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use moat_boot::{layout, GuestMemoryMmap};
use moat_devices::virtio::block::Block;
use moat_devices::virtio::mmio::{
    MmioTransport, MmioWindow, INTERRUPT_ACK, MMIO_WINDOW, QUEUE_NOTIFY,
};
use moat_devices::virtio::net::{default_mac, Net, Tap};
use moat_devices::virtio::pci::VirtioPci;
use moat_devices::virtio::rng::{PoolWaiter, Rng};
use moat_devices::virtio::vsock::{self, Vsock};
use moat_devices::virtio::{Interrupt, RegisterPage, VirtioDevice, INT_VRING};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::config::{
    ConfigError, DiskConfig, ForwardConfig, NetBackendConfig, NetConfig, RngConfig, Transport,
    VmConfig, VsockConfig,
};
use crate::error::{Error, KvmOp};

/// The first interrupt line for virtio devices (COM1 has 4).
const FIRST_IRQ: u32 = 5;
/// IRQs 5-22 are free on the IOAPIC (23 is the ACPI power button's, see
/// [`crate::vm::GED_IRQ`]): at most this many virtio devices.
pub const MAX_DEVICES: usize = 18;

/// Where the guest finds one virtio-mmio device: at two windows, one the
/// ACPI tables describe and one the kernel command line names (see
/// [`moat_devices::virtio::mmio`]: the first the guest probes owns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of the register window in the ACPI tables.
    pub base: u64,
    /// Base of the register window on the command line.
    pub cmdline_base: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// The KVM memory slot of the first device's register page; guest RAM
/// takes the slots below (one or two regions).
const FIRST_REGISTER_SLOT: u32 = 8;

/// Maps `page` at `base` as KVM memory slot `slot`, read-only: the guest's
/// reads of the window are then served from it, its writes still exit.
/// A failure is logged and leaves the window's reads exiting as before.
fn map_register_page(vm: &VmFd, slot: u32, base: u64, page: &RegisterPage) {
    let region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: base,
        memory_size: RegisterPage::SIZE,
        userspace_addr: page.host_address(),
        flags: KVM_MEM_READONLY,
    };
    // SAFETY: the page is page-aligned and lives as long as the window that
    // maps it, which stays on the MMIO bus while any vCPU can run; the
    // window's guest range overlaps no other slot (guest RAM ends below
    // the MMIO hole, and each device has its own slot number and window).
    if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
        log::warn!(
            "could not map a virtio register page at {base:#x} ({e}); its reads exit as before"
        );
    }
}

/// The slot of the `index`th virtio device.
pub fn slot(index: usize) -> MmioSlot {
    let offset = index as u64 * MMIO_WINDOW;
    MmioSlot {
        base: layout::MMIO_DEVICES_START + offset,
        cmdline_base: layout::MMIO_CMDLINE_DEVICES_START + offset,
        irq: FIRST_IRQ + index as u32,
    }
}

/// Opens a disk image as the user asked: read-only or read-write, with an
/// advisory lock (shared for read-only, exclusive otherwise) so two moats
/// cannot write one image. Returns the file and its size.
pub fn open_disk(disk: &DiskConfig) -> Result<(File, u64), ConfigError> {
    let error = |reason: String| ConfigError::File {
        option: "--disk",
        path: disk.path.clone(),
        reason,
    };
    // Checked first: opening a directory for writing fails with a less
    // helpful error.
    if std::fs::metadata(&disk.path).is_ok_and(|m| m.is_dir()) {
        return Err(error("it is a directory".into()));
    }
    let mut file = File::options()
        .read(true)
        .write(!disk.read_only)
        .open(&disk.path)
        .map_err(|e| error(e.to_string()))?;
    let lock = if disk.read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(error(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            "it is locked by another process (is another moat using it?)".into()
        } else {
            format!("cannot lock it: {e}")
        }));
    }
    // st_size is 0 for block devices; the end offset is right for both.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| error(e.to_string()))?;
    Ok((file, size))
}

/// A device and its name in logs and metrics.
pub type Named = (String, Box<dyn VirtioDevice>);

/// The names of `config`'s devices, in [`devices`]' order: `block_<id>`
/// (or `block_vda`, ...), `net_<id>` (or `net_eth0`, ...), `vsock`,
/// `entropy`.
pub fn device_names(config: &VmConfig) -> Vec<String> {
    let mut names: Vec<String> = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.id {
            Some(id) => format!("block_{id}"),
            None => format!("block_vd{}", char::from(b'a' + (i % 26) as u8)),
        })
        .collect();
    names.extend(config.nets.iter().enumerate().map(|(i, n)| match &n.id {
        Some(id) => format!("net_{id}"),
        None => format!("net_eth{i}"),
    }));
    if config.vsock.is_some() {
        names.push("vsock".into());
    }
    if config.rng != RngConfig::Off {
        names.push("entropy".into());
    }
    names
}

/// Every virtio device `config` asks for, with its host side opened, in
/// the order the guest finds them: disks, network cards, vsock, rng.
///
/// If the host's random pool is not ready yet, the rng device comes with
/// the [`PoolWaiter`] that must run (see [`wait_for_entropy`]) before it
/// serves: started with the VM's other threads, once privileges are
/// dropped (glibc's setresuid makes every thread of the process call it,
/// which the waiter's seccomp filter would not allow).
pub fn devices(config: &VmConfig) -> Result<(Vec<Named>, Option<PoolWaiter>), ConfigError> {
    let count = config.disks.len()
        + config.nets.len()
        + usize::from(config.vsock.is_some())
        + usize::from(config.rng != RngConfig::Off);
    if count > MAX_DEVICES {
        return Err(ConfigError::TooManyDevices {
            max: MAX_DEVICES,
            count,
        });
    }
    let mut devices = block_devices(&config.disks)?;
    let mut waiter = None;
    devices.extend(net_devices(&config.nets, devices.len())?);
    if let Some(vsock) = &config.vsock {
        devices.push(vsock_device(vsock, &config.forwards)?);
    }
    if let RngConfig::On(rate) = config.rng {
        let rng_error = |e: std::io::Error| ConfigError::Syntax {
            option: "--rng",
            problem: format!("cannot create its timer: {e}"),
        };
        let rng = Rng::new(rate).map_err(rng_error)?;
        waiter = rng.pool_waiter().map_err(rng_error)?;
        devices.push(Box::new(rng));
    }
    Ok((
        device_names(config).into_iter().zip(devices).collect(),
        waiter,
    ))
}

/// Waits for the host's random pool in a thread of its own (under the
/// seccomp program `filter`, if any), so that neither start-up nor the
/// event loop waits on it: the rng device serves once the pool is ready.
pub fn wait_for_entropy(
    waiter: PoolWaiter,
    filter: Option<Arc<seccompiler::BpfProgram>>,
) -> std::io::Result<()> {
    use crate::seccomp::{self, ThreadKind};
    log::info!("virtio-rng: the host's random pool is not ready; the device waits for it");
    std::thread::Builder::new()
        .name("entropy-wait".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = seccomp::install(ThreadKind::Entropy, &filter) {
                    log::error!("{e}; virtio-rng stays silent");
                    return;
                }
            }
            waiter.wait();
            log::info!("virtio-rng: the host's random pool is ready");
        })
        .map(drop)
}

/// The vsock device, listening at its socket and at each forward's.
fn vsock_device(
    config: &VsockConfig,
    forwards: &[ForwardConfig],
) -> Result<Box<dyn VirtioDevice>, ConfigError> {
    let listener = vsock::listen(&config.socket).map_err(|e| ConfigError::Vsock(e.to_string()))?;
    let mut device = Vsock::new(config.cid, config.socket.clone(), listener)
        .map_err(|e| ConfigError::Vsock(format!("cannot set up its event loop: {e}")))?;
    for forward in forwards {
        let listener =
            vsock::listen(&forward.host).map_err(|e| ConfigError::Forward(e.to_string()))?;
        device
            .add_forward(listener, forward.port)
            .map_err(|e| ConfigError::Forward(format!("{}: {e}", forward.host.display())))?;
    }
    Ok(Box::new(device))
}

/// The block devices for `disks`, opened and locked.
pub fn block_devices(disks: &[DiskConfig]) -> Result<Vec<Box<dyn VirtioDevice>>, ConfigError> {
    disks
        .iter()
        .map(|disk| {
            let (file, size) = open_disk(disk)?;
            let id = disk.id.as_deref().unwrap_or("");
            let block = Block::with_engine(file, size, disk.read_only, id, disk.io_engine)
                .map_err(|e| ConfigError::NoIoUring {
                    path: disk.path.clone(),
                    reason: e.to_string(),
                })?;
            Ok(Box::new(block) as Box<dyn VirtioDevice>)
        })
        .collect()
}

/// The network cards for `nets`, with their TAPs open. `first_index` is
/// the device index of the first card, which default MACs derive from.
pub fn net_devices(
    nets: &[NetConfig],
    first_index: usize,
) -> Result<Vec<Box<dyn VirtioDevice>>, ConfigError> {
    nets.iter()
        .enumerate()
        .map(|(i, net)| {
            let mut tap = match &net.backend {
                NetBackendConfig::Tap(name) => Tap::open(name),
                NetBackendConfig::Fd(fd) => Tap::from_fd(*fd),
            }
            .map_err(|e| ConfigError::Net(e.to_string()))?;
            let mac = net
                .mac
                .unwrap_or_else(|| default_mac(tap.name(), first_index + i));
            let offload = net.offload && tap.supports_offload();
            Ok(Box::new(Net::new(Box::new(tap), mac, offload)) as Box<dyn VirtioDevice>)
        })
        .collect()
}

/// A virtio device placed on the MMIO bus or on PCI, with the handler that
/// serves its queues from the event loop.
pub struct Attached {
    /// Where the guest finds it on virtio-mmio.
    pub slot: Option<MmioSlot>,
    /// Its event-loop handler.
    pub handler: QueueHandler,
    /// The transport, for the API and the metrics.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Its PCI function, on virtio-pci.
    pub pci: Option<Arc<Mutex<VirtioPci>>>,
    /// Where KVM puts the guest's used-buffer acknowledgements on
    /// virtio-mmio (see [`absorb_vring_acks`]); held for as long as the
    /// VM, never read.
    pub ack_sink: Option<EventFd>,
}

/// Puts the devices on `transport`: see [`attach_mmio`] and
/// [`crate::pci::attach`].
pub fn attach(
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    pio: &mut Bus,
    mmio: &mut Bus,
    devices: Vec<Named>,
    transport: Transport,
) -> Result<Vec<Attached>, Error> {
    match transport {
        Transport::Mmio => attach_mmio(vm, memory, mmio, devices),
        Transport::Pci => crate::pci::attach(vm, memory, pio, mmio, devices),
    }
}

/// Has KVM take the guest's InterruptACK writes of exactly
/// VIRTIO_MMIO_INT_VRING at both of a device's windows, as an ioeventfd
/// write to `sink`, instead of exiting to moat.
///
/// Linux's virtio-mmio interrupt handler reads InterruptStatus (a memory
/// read once the register page is mapped) and writes the value back to
/// InterruptACK on every interrupt: that write was the last exit per
/// interrupt. Absorbed, it no longer clears the used-buffer bit, which
/// then reads as set from the device's first interrupt until a reset or
/// an acknowledgement that includes the configuration bit (that one still
/// exits and clears both). The handler reacts to the bit by looking at
/// every queue's used ring, which it does on each of its interrupts
/// anyway; and the device's interrupts come from its irqfd, never from
/// the bit. Applying the acknowledgements later instead (reading `sink`)
/// would be wrong: one applied after the device raised the bit again
/// would clear an interrupt the guest has not read yet.
fn absorb_vring_acks(vm: &VmFd, sink: &EventFd, slot: &MmioSlot) -> Result<(), Error> {
    for base in [slot.base, slot.cmdline_base] {
        let addr = IoEventAddress::Mmio(base + INTERRUPT_ACK);
        vm.register_ioevent(sink, &addr, INT_VRING)
            .map_err(KvmOp::Ioeventfd.err())?;
    }
    Ok(())
}

/// Puts each device behind a virtio-mmio transport on `mmio`, wires its
/// interrupt (irqfd) and queue notifications (ioeventfds) into KVM.
fn attach_mmio(
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    mmio: &mut Bus,
    devices: Vec<Named>,
) -> Result<Vec<Attached>, Error> {
    let io = |what| move |e| Error::Io(what, e);
    let mut attached = Vec::with_capacity(devices.len());
    let read_only_memory = vm.check_extension(Cap::ReadonlyMem);
    for (index, (name, device)) in devices.into_iter().enumerate() {
        let slot = slot(index);
        let interrupt = Arc::new(Interrupt::new().map_err(io("create an eventfd"))?);
        vm.register_irqfd(interrupt.irq_fd(), slot.irq)
            .map_err(KvmOp::Irqfd.err())?;
        let mut transport = MmioTransport::new(device, memory.clone(), interrupt)
            .map_err(io("create an eventfd"))?;
        transport.set_name(&name);
        let mut events = Vec::new();
        for (queue, event) in transport.queue_events().iter().enumerate() {
            for base in [slot.base, slot.cmdline_base] {
                let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
                vm.register_ioevent(event, &addr, queue as u32)
                    .map_err(KvmOp::Ioeventfd.err())?;
            }
            events.push(event.try_clone().map_err(io("clone an eventfd"))?);
        }
        let ack_sink = moat_devices::trigger::new_eventfd().map_err(io("create an eventfd"))?;
        absorb_vring_acks(vm, &ack_sink, &slot)?;
        let transport = Arc::new(Mutex::new(transport));
        for (window, base) in [slot.base, slot.cmdline_base].into_iter().enumerate() {
            let mut window = MmioWindow::new(transport.clone(), window as u8);
            if read_only_memory {
                let (vm, slot) = (vm.clone(), FIRST_REGISTER_SLOT + index as u32);
                window.set_mapper(Box::new(move |page: &RegisterPage| {
                    map_register_page(&vm, slot, base, page)
                }));
            }
            let window = Arc::new(Mutex::new(window));
            mmio.insert(base, MMIO_WINDOW, &name, window)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        attached.push(Attached {
            slot: Some(slot),
            handler: QueueHandler::new(transport.clone(), events),
            transport,
            pci: None,
            ack_sink: Some(ack_sink),
        });
    }
    Ok(attached)
}

/// Serves a device's queues when the guest notifies them.
pub struct QueueHandler {
    transport: Arc<Mutex<MmioTransport>>,
    events: Vec<EventFd>,
    /// Whether the device's backend descriptor (a TAP) is in the epoll set.
    watching_backend: bool,
}

/// The event data that marks the backend descriptor (queues use 0..n).
const BACKEND: u32 = u32::MAX;

impl QueueHandler {
    /// Serves `transport`'s queues when `events` (one per queue) fire.
    pub fn new(transport: Arc<Mutex<MmioTransport>>, events: Vec<EventFd>) -> Self {
        Self {
            transport,
            events,
            watching_backend: false,
        }
    }

    /// Polls the backend descriptor exactly while the device can take its
    /// input, so a full guest never makes the event loop spin.
    fn update_backend_interest(&mut self, transport: &MmioTransport, ops: &mut EventOps) {
        let Some(fd) = transport.backend_fd() else {
            return;
        };
        let wanted = transport.backend_wanted();
        let events = Events::with_data_raw(fd, BACKEND, EventSet::IN);
        if wanted && !self.watching_backend {
            self.watching_backend = ops.add(events).is_ok();
        } else if !wanted && self.watching_backend {
            let _ = ops.remove(events);
            self.watching_backend = false;
        }
    }
}

impl MutEventSubscriber for QueueHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.events.iter().enumerate() {
            let _ = ops.add(Events::with_data(event, index as u32, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let transport = self.transport.clone();
        let mut transport = transport.lock().unwrap_or_else(|e| e.into_inner());
        match events.data() {
            BACKEND => transport.process_backend(),
            index => {
                if let Some(event) = self.events.get(index as usize) {
                    let _ = event.read();
                }
                transport.process_queue(index as usize);
            }
        }
        self.update_backend_interest(&transport, ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("moat-vmm-disk-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        path
    }

    fn disk(path: &std::path::Path, read_only: bool) -> DiskConfig {
        DiskConfig {
            path: path.to_path_buf(),
            read_only,
            id: None,
            io_engine: crate::config::IoEngine::Sync,
        }
    }

    #[test]
    fn register_pages_take_memory_slots_guest_ram_never_does() {
        for size in [128 << 20, 4 << 30, 1 << 40] {
            assert!(layout::ram_regions(size).len() as u32 <= FIRST_REGISTER_SLOT);
        }
        // KVM on x86 has had 509 user slots since Linux 4.x, 32 before.
        assert!(FIRST_REGISTER_SLOT + MAX_DEVICES as u32 <= 32);
    }

    #[test]
    fn slots_are_4k_apart_from_irq_5() {
        assert_eq!(
            slot(0),
            MmioSlot {
                base: 0xc000_0000,
                cmdline_base: 0xc010_0000,
                irq: 5
            }
        );
        assert_eq!(
            slot(2),
            MmioSlot {
                base: 0xc000_2000,
                cmdline_base: 0xc010_2000,
                irq: 7
            }
        );
        // The two sets of windows never meet.
        assert!(slot(MAX_DEVICES - 1).base + MMIO_WINDOW <= slot(0).cmdline_base);
        assert_eq!(slot(MAX_DEVICES - 1).irq, 22);
        assert!(slot(MAX_DEVICES - 1).irq < crate::vm::GED_IRQ);
    }

    #[test]
    fn a_locked_disk_is_refused() {
        let path = scratch("locked");
        let _first = open_disk(&disk(&path, false)).unwrap();
        let err = open_disk(&disk(&path, false)).unwrap_err().to_string();
        assert!(err.contains("locked by another process"), "{err}");
        let err = open_disk(&disk(&path, true)).unwrap_err().to_string();
        assert!(err.contains("locked by another process"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_can_be_shared() {
        let path = scratch("shared");
        let (_a, size) = open_disk(&disk(&path, true)).unwrap();
        let _b = open_disk(&disk(&path, true)).unwrap();
        assert_eq!(size, 4096);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_and_directory_disks_are_refused() {
        let err = open_disk(&disk(std::path::Path::new("/nonexistent.img"), false)).unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
        let err = open_disk(&disk(&std::env::temp_dir(), true)).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
    }
}
