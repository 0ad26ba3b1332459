//! The moat VMM: builds a KVM virtual machine from a [`config::VmConfig`]
//! and runs it until the guest powers off.
//!
//! Read [`run`] first: it is the whole boot, top to bottom.

#![deny(missing_docs)]

pub mod api;
pub mod boot_timer;
pub mod bus;
pub mod cli;
pub mod config;
pub mod console;
pub mod console_batch;
pub mod error;
pub mod exit;
pub mod jail;
pub mod logger;
pub mod metrics;
pub mod pci;
pub mod ram;
pub mod seccomp;
pub mod shutdown;
pub mod signals;
pub mod snapshot;
pub mod terminal;
pub mod trace;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use moat_boot::GuestMemoryMmap;
use moat_devices::virtio::mmio::MmioTransport;

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::error::{Error, KvmOp};
use crate::exit::{ExitSignal, VmExit};
use crate::shutdown::{ExitEvents, ExitWatcher};
use crate::vcpu::{HaltProbe, VcpuThread};

/// How long moat waits, when the VM has ended, for the console's buffered
/// output to reach stdout.
const CONSOLE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// An event-loop subscriber moat's callers add (the API's).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Boots the VM described by `config` and runs it to the end. Returns why
/// it ended; errors are problems found before or while building it.
pub fn run(config: &VmConfig) -> Result<VmExit, Error> {
    Vm::build(config)?.run(Vec::new())
}

/// Resumes the snapshot in `state` and `memory` and runs it to the end.
/// `given` holds the command line's options: the host's (KVM device,
/// seccomp, logging) and any device overrides (its disks, cards and vsock
/// socket, which replace the snapshot's host ends in order).
pub fn restore(
    given: &VmConfig,
    state: &std::path::Path,
    memory: &std::path::Path,
) -> Result<VmExit, Error> {
    let (saved, config) = restored(given, state)?;
    Vm::restore(&config, &saved, memory)?.run(Vec::new())
}

/// As [`restore`], in the jail `jail` describes (see [`run_jailed`]): the
/// state file is read before the jail, the memory file is bound into it.
pub fn restore_jailed(
    given: &VmConfig,
    jail: &jail::JailConfig,
    state: &std::path::Path,
    memory: &std::path::Path,
) -> Result<VmExit, Error> {
    let (saved, config) = restored(given, state)?;
    let memory = jail::absolute("--restore", memory)?;
    let (config, binds) = jail::plan(&config, jail::Source::Snapshot { memory: &memory })?;
    let jailed = jail::enter(jail, &jail::Layout::Only(binds), &kept_fds(&config))?;
    let vm = Vm::restore(&config, &saved, &memory)?;
    jailed.drop_privileges()?;
    vm.run(Vec::new())
}

/// A snapshot's state, and the configuration of its machine with the
/// host ends `given` replaces.
fn restored(
    given: &VmConfig,
    state: &std::path::Path,
) -> Result<(snapshot::VmState, VmConfig), Error> {
    let saved = snapshot::read_state(state)?;
    let overrides = snapshot::Overrides {
        disks: given.disks.iter().map(|d| Some(d.path.clone())).collect(),
        taps: given
            .nets
            .iter()
            .map(|n| match &n.backend {
                config::NetBackendConfig::Tap(name) => Ok(Some(name.clone())),
                config::NetBackendConfig::Fd(_) => Err(snapshot::SnapshotError(
                    "a restore takes TAPs by name (--net tap=NAME)".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        taps_by_id: Vec::new(),
        vsock_socket: given.vsock.as_ref().map(|v| v.socket.clone()),
    };
    let config = snapshot::restored_config(given, &saved.machine, &overrides)?;
    Ok((saved, config))
}

/// As [`run`], in the jail `jail` describes (see [`jail`]): the process
/// that calls this waits for the jailed moat and exits with its status.
pub fn run_jailed(config: &VmConfig, jail: &jail::JailConfig) -> Result<VmExit, Error> {
    let (config, binds) = jail::plan(config, jail::Source::Boot)?;
    let jailed = jail::enter(jail, &jail::Layout::Only(binds), &kept_fds(&config))?;
    let vm = Vm::build(&config)?;
    jailed.drop_privileges()?;
    vm.run(Vec::new())
}

/// The descriptors a jailed moat keeps: TAPs given as descriptors, and
/// the log file.
fn kept_fds(config: &VmConfig) -> Vec<i32> {
    config
        .nets
        .iter()
        .filter_map(|n| match n.backend {
            config::NetBackendConfig::Fd(fd) => Some(fd),
            config::NetBackendConfig::Tap(_) => None,
        })
        .chain(logger::file_fd())
        .collect()
}

/// A VM built and ready to run: memory loaded, devices attached, vCPUs
/// configured but not started.
pub struct Vm {
    config: VmConfig,
    // Kept open for the VM's life.
    _kvm: Kvm,
    _vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    vcpu_fds: Vec<VcpuFd>,
    shared: vcpu::Shared,
    legacy: vm::LegacyDevices,
    handlers: Vec<virtio::QueueHandler>,
    handle: VmHandle,
    filters: Option<Filters>,
    /// The rng device's wait for the host's random pool, if it must.
    entropy_waiter: Option<moat_devices::virtio::rng::PoolWaiter>,
}

/// The seccomp programs of moat's VM threads.
struct Filters {
    vcpu: Arc<seccompiler::BpfProgram>,
    vmm: Arc<seccompiler::BpfProgram>,
    console: Arc<seccompiler::BpfProgram>,
    /// Only when the rng device must wait for the host's pool.
    entropy: Option<Arc<seccompiler::BpfProgram>>,
}

/// What the API needs to reach in a running VM.
#[derive(Clone)]
pub struct VmHandle {
    /// The vCPU threads (empty until the VM runs).
    pub vcpus: Arc<Mutex<Vec<VcpuThread>>>,
    /// Pauses and resumes them.
    pub pause: Arc<vcpu::PauseGate>,
    /// Exits by kind.
    pub exits: Arc<vcpu::ExitCounters>,
    /// Presses the guest's ACPI power button.
    pub power_button: Arc<moat_devices::trigger::EventFdTrigger>,
    /// The virtio devices by name, in the guest's order.
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// Their PCI functions, on virtio-pci.
    pub pci: Vec<Arc<Mutex<moat_devices::virtio::pci::VirtioPci>>>,
    /// The console's output counters.
    pub console: Arc<console::OutputCounters>,
    /// What a snapshot reads.
    pub snapshot: Arc<SnapshotSource>,
}

/// What a snapshot reads of a running VM besides its vCPUs and devices.
pub struct SnapshotSource {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    serial: Arc<Mutex<console::ConsoleSerial>>,
    config: VmConfig,
}

/// What [`VmHandle::snapshot`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotReport {
    /// The state file's size.
    pub state_bytes: u64,
    /// Bytes of guest RAM written (the rest are holes).
    pub memory_bytes: u64,
}

/// The VM's own state from a snapshot: the interrupt controllers, the PIT,
/// the clock (where it was: the guest does not see the time it spent on
/// disk).
fn restore_vm_state(vm: &VmFd, state: &snapshot::VmState) -> Result<(), Error> {
    let e = |what: &'static str| {
        move |err: kvm_ioctls::Error| Error::Internal(format!("restoring the VM: {what}: {err}"))
    };
    vm.set_pit2(&state.pit).map_err(e("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(e("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(e("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

impl VmHandle {
    /// Every counter group, for a metrics line.
    pub fn metric_groups(&self) -> Vec<metrics::Group> {
        let mut groups = vec![
            ("vcpu".to_string(), self.exits.snapshot()),
            ("uart".to_string(), self.console.snapshot()),
        ];
        for device in &self.devices {
            let device = device.lock().unwrap_or_else(|e| e.into_inner());
            groups.push((device.name().to_string(), device.counters()));
        }
        groups
    }

    /// Writes a snapshot of the paused VM: its state to `state_path`, guest
    /// RAM to `memory_path`. Runs on the event loop's thread (the API's
    /// handler), so no device is mid-request; the vCPUs save their own
    /// state where they are parked.
    pub fn snapshot(
        &self,
        state_path: &std::path::Path,
        memory_path: &std::path::Path,
    ) -> Result<SnapshotReport, String> {
        let source = &self.snapshot;
        // First the devices hand back what the host is still doing for
        // them (a disk's requests in io_uring), so the guest's memory and
        // rings are whole when they are saved.
        for device in &self.devices {
            device.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
        }
        let vcpus = self.pause.save_states(usize::from(source.config.cpus))?;
        let kvm = |what: &'static str| move |e: kvm_ioctls::Error| format!("{what}: {e}");
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
            kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
            kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            source
                .vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = source.vm_fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let clock = source.vm_fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let serial = source
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        let mut transports = Vec::with_capacity(self.devices.len());
        let mut disk_sizes = Vec::new();
        let mut macs = Vec::new();
        for device in &self.devices {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            transports.push(device.state());
            let model = device.device_mut();
            match model.device_type() {
                virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => {
                    let mut capacity = [0u8; 8];
                    model.read_config(0, &mut capacity);
                    disk_sizes.push(u64::from_le_bytes(capacity) * 512);
                }
                virtio_bindings::virtio_ids::VIRTIO_ID_NET => {
                    let mut mac = [0u8; 6];
                    model.read_config(0, &mut mac);
                    macs.push(mac);
                }
                _ => {}
            }
        }
        let state = snapshot::VmState {
            machine: snapshot::machine(&source.config, &disk_sizes, &macs),
            vcpus,
            irqchips,
            pit,
            clock,
            serial,
            transports,
            pci: self
                .pci
                .iter()
                .map(|f| f.lock().unwrap_or_else(|e| e.into_inner()).state())
                .collect(),
        };
        snapshot::write_state(state_path, &state).map_err(|e| e.to_string())?;
        let memory_bytes =
            snapshot::write_memory(memory_path, &source.memory).map_err(|e| e.to_string())?;
        let state_bytes = std::fs::metadata(state_path).map_or(0, |m| m.len());
        Ok(SnapshotReport {
            state_bytes,
            memory_bytes,
        })
    }

    /// Why devices last needed a reset, for a metrics line.
    pub fn metric_notes(&self) -> Vec<(String, &'static str, String)> {
        self.devices
            .iter()
            .filter_map(|d| {
                let d = d.lock().unwrap_or_else(|e| e.into_inner());
                let reason = d.last_error()?.to_string();
                Some((d.name().to_string(), "needs_reset_reason", reason))
            })
            .collect()
    }
}

/// How a VM starts: booting a kernel, or from a snapshot.
pub enum Start<'a> {
    /// Load the config's kernel (and initramfs) and boot it.
    Boot,
    /// Resume the VM `state` describes, its RAM mapped from `memory`.
    Restore {
        /// The checked state file.
        state: &'a snapshot::VmState,
        /// The memory file.
        memory: &'a std::path::Path,
    },
}

impl Vm {
    /// Checks `config` against the host and builds the VM.
    pub fn build(config: &VmConfig) -> Result<Vm, Error> {
        Self::make(config, Start::Boot)
    }

    /// Builds the twin of the VM a snapshot describes: `state` (read and
    /// checked with [`snapshot::read_state`]) and the memory file at
    /// `memory`. `config` is the machine's, from
    /// [`snapshot::restored_config`].
    pub fn restore(
        config: &VmConfig,
        state: &snapshot::VmState,
        memory: &std::path::Path,
    ) -> Result<Vm, Error> {
        Self::make(config, Start::Restore { state, memory })
    }

    fn make(config: &VmConfig, start: Start<'_>) -> Result<Vm, Error> {
        // Check everything the user gave before creating anything.
        let mut boot_files = match start {
            Start::Boot => {
                let mut kernel = vm::open_input("--kernel", &config.kernel)?;
                moat_boot::loader::detect_format(&mut kernel)?;
                let initramfs = config
                    .initramfs
                    .as_deref()
                    .map(|path| vm::open_input("--initramfs", path))
                    .transpose()?;
                Some((kernel, initramfs))
            }
            Start::Restore { .. } => None,
        };
        let (virtio_devices, entropy_waiter) = virtio::devices(config)?;
        config::check_memory(config.memory, config::host_memory_limit())?;
        let restored_memory = match start {
            Start::Boot => None,
            Start::Restore { memory, .. } => Some(snapshot::map_memory(memory, config.memory)?),
        };
        let kvm = vm::open_kvm(&config.kvm_device)?;
        config::check_cpus(u64::from(config.cpus), vm::max_vcpus(&kvm))?;
        if let Start::Restore { state, .. } = start {
            snapshot::check_host_cpuid(&kvm, state)?;
        }

        // The machine: VM and RAM.
        let vm_fd = Arc::new(vm::create_vm(&kvm)?);
        let memory = match restored_memory {
            None => vm::create_memory(&vm_fd, config.memory, config.huge_pages)?,
            Some(mapped) => {
                vm::register_memory(&vm_fd, &mapped)?;
                mapped
            }
        };

        // Devices.
        let mut pio = Bus::default();
        let legacy = vm::attach_legacy_devices(&vm_fd, &mut pio)?;
        let first_run = boot_timer::FirstRun::default();
        if config.boot_timer {
            vm::attach_boot_timer(&mut pio, first_run.clone())?;
        }
        let mut mmio = Bus::default();
        let virtio_devices = virtio::attach(
            &vm_fd,
            &memory,
            &mut pio,
            &mut mmio,
            virtio_devices,
            config.transport,
        )?;
        let pci_functions: Vec<_> = virtio_devices
            .iter()
            .filter_map(|d| d.pci.clone())
            .collect();

        // The guest's kernel and boot data, which name the devices' slots.
        let slots: Vec<_> = virtio_devices.iter().filter_map(|d| d.slot).collect();
        let boot = match boot_files.as_mut() {
            Some((kernel, initramfs)) => Some(vm::load_guest(
                &memory,
                config,
                kernel,
                initramfs.as_mut(),
                &slots,
            )?),
            None => None,
        };

        // The seccomp filters, compiled before anything runs.
        let filters = if config.seccomp {
            seccomp::install_sigsys_handler().map_err(|e| Error::Internal(e.to_string()))?;
            let program = |kind| seccomp::program(kind).map_err(|e| Error::Internal(e.to_string()));
            Some(Filters {
                vcpu: Arc::new(program(seccomp::ThreadKind::Vcpu)?),
                vmm: Arc::new(program(seccomp::ThreadKind::Vmm)?),
                console: Arc::new(program(seccomp::ThreadKind::Console)?),
                entropy: entropy_waiter
                    .as_ref()
                    .map(|_| program(seccomp::ThreadKind::Entropy).map(Arc::new))
                    .transpose()?,
            })
        } else {
            None
        };

        // vCPUs, all configured before any starts; for a restore, the VM's
        // own state first (the interrupt controllers before the LAPICs
        // that talk to them), then the devices'.
        let vcpu_fds = match (start, boot) {
            (Start::Restore { state, .. }, _) => {
                restore_vm_state(&vm_fd, state)?;
                let fds = state
                    .vcpus
                    .iter()
                    .enumerate()
                    .map(|(index, s)| vcpu::restore(&vm_fd, index as u8, s))
                    .collect::<Result<Vec<_>, _>>()?;
                legacy
                    .serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore(&state.serial)
                    .map_err(|e| {
                        Error::Snapshot(snapshot::SnapshotError(format!("serial: {e}")))
                    })?;
                let transports: Vec<_> =
                    virtio_devices.iter().map(|d| d.transport.clone()).collect();
                snapshot::check_disks(&transports, &state.machine)?;
                for (device, saved) in transports.iter().zip(&state.transports) {
                    let mut transport = device.lock().unwrap_or_else(|e| e.into_inner());
                    transport
                        .restore(saved)
                        .map_err(|e| Error::Snapshot(snapshot::SnapshotError(e)))?;
                }
                if pci_functions.len() != state.pci.len() {
                    return Err(Error::Snapshot(snapshot::SnapshotError(format!(
                        "the state has {} PCI functions for {} devices on PCI",
                        state.pci.len(),
                        pci_functions.len()
                    ))));
                }
                for (function, saved) in pci_functions.iter().zip(&state.pci) {
                    let mut function = function.lock().unwrap_or_else(|e| e.into_inner());
                    function
                        .restore(saved)
                        .map_err(|e| Error::Snapshot(snapshot::SnapshotError(e)))?;
                }
                fds
            }
            (Start::Boot, Some((entry, page_table))) => (0..config.cpus)
                .map(|index| {
                    vcpu::create(
                        &kvm,
                        &vm_fd,
                        index,
                        config.cpus,
                        entry,
                        page_table,
                        config.nested,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?,
            (Start::Boot, None) => return Err(Error::Internal("no kernel loaded".into())),
        };
        let trace = config
            .trace_exits
            .as_ref()
            .map(|t| trace::ExitTrace::new(t, &mmio.names()).map(Arc::new))
            .transpose()
            .map_err(Error::Config)?;
        let exit = Arc::new(ExitSignal::new().map_err(|e| Error::Io("create an eventfd", e))?);
        let console_batch = match vcpu_fds.first() {
            Some(fd) => console_batch::ConsoleBatch::new(
                &kvm,
                vm_fd.clone(),
                fd,
                legacy.serial.clone(),
                vm::COM1_PORT,
            )
            .map_err(|e| Error::Io("map KVM's coalesced I/O ring", e))?
            .map(Arc::new),
            None => None,
        };
        let shared = vcpu::Shared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            stop: Arc::new(AtomicBool::new(false)),
            first_run,
            halt_probe: Arc::new(HaltProbe::new(vcpu_fds.len())),
            pause: Arc::new(vcpu::PauseGate::default()),
            exits: Arc::new(vcpu::ExitCounters::default()),
            seccomp: filters.as_ref().map(|f| f.vcpu.clone()),
            trace,
            msr_indices: Arc::new(vcpu::snapshot_msrs(&kvm)?),
            reset: Arc::new(
                legacy
                    .reset
                    .try_clone()
                    .map_err(|e| Error::Io("clone an eventfd", e))?,
            ),
            console_batch,
        };
        if let Some(batch) = &shared.console_batch {
            batch
                .follow_uart(&shared.pio)
                .map_err(KvmOp::CoalescedPio.err())?;
        }
        let handle = VmHandle {
            vcpus: Arc::new(Mutex::new(Vec::with_capacity(vcpu_fds.len()))),
            pause: shared.pause.clone(),
            exits: shared.exits.clone(),
            power_button: Arc::new(
                legacy
                    .power_button
                    .try_clone()
                    .map_err(|e| Error::Io("clone an eventfd", e))?,
            ),
            devices: virtio_devices.iter().map(|d| d.transport.clone()).collect(),
            pci: pci_functions,
            console: legacy.console_out.counters(),
            snapshot: Arc::new(SnapshotSource {
                vm_fd: vm_fd.clone(),
                memory: memory.clone(),
                serial: legacy.serial.clone(),
                config: config.clone(),
            }),
        };
        Ok(Vm {
            config: config.clone(),
            _kvm: kvm,
            _vm_fd: vm_fd,
            memory,
            vcpu_fds,
            shared,
            legacy,
            handlers: virtio_devices.into_iter().map(|d| d.handler).collect(),
            handle,
            filters,
            entropy_waiter,
        })
    }

    /// What the API reaches while the VM runs.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Starts the vCPUs and serves the devices, and `extra` subscribers,
    /// until the guest or a signal ends the VM.
    pub fn run(self, extra: Vec<Subscriber>) -> Result<VmExit, Error> {
        let Vm {
            config,
            memory,
            vcpu_fds,
            shared,
            legacy,
            handlers,
            handle,
            filters,
            entropy_waiter,
            ..
        } = self;
        let exit = shared.exit.clone();
        // The event loop, then the console, then go.
        let mut events = EventManager::<Subscriber>::new().map_err(|e| {
            Error::Io(
                "create the event loop",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let vcpus = handle.vcpus.clone();
        let watcher = ExitWatcher::new(ExitEvents {
            exit: exit.clone(),
            reset: legacy.reset,
            power_off: legacy.power_off,
            power_button: legacy.power_button,
            termination: signals::install()?,
            shutdown_timeout: config.shutdown_timeout,
            halt_probe: shared.halt_probe.clone(),
            vcpus: vcpus.clone(),
        })
        .map_err(|e| Error::Io("create a timer", e))?;
        events.add_subscriber(Arc::new(Mutex::new(watcher)));
        for handler in handlers {
            events.add_subscriber(Arc::new(Mutex::new(handler)));
        }
        for subscriber in extra {
            events.add_subscriber(subscriber);
        }
        let raw_mode =
            terminal::RawMode::enter().map_err(|e| Error::Io("set the terminal to raw mode", e))?;
        events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            legacy.serial.clone(),
            legacy.serial_input_space,
        ))));

        if let Some(waiter) = entropy_waiter {
            virtio::wait_for_entropy(waiter, filters.as_ref().and_then(|f| f.entropy.clone()))
                .map_err(|e| Error::Io("start the entropy wait thread", e))?;
        }
        let console_writer = legacy
            .console_out
            .start_writer(
                std::io::stdout(),
                filters.as_ref().map(|f| f.console.clone()),
            )
            .map_err(|e| Error::Io("start the console output thread", e))?;
        vcpu::install_kick_handler()?;
        for (index, fd) in vcpu_fds.into_iter().enumerate() {
            let spawned = vcpu::spawn(index as u8, fd, shared.clone());
            let mut threads = vcpus.lock().unwrap_or_else(|e| e.into_inner());
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop_vcpus(std::mem::take(&mut threads), &shared.stop, memory);
                    return Err(e);
                }
            }
        }

        // From here on the VMM thread only serves the VM.
        if let Some(filters) = &filters {
            if let Err(e) = seccomp::install(seccomp::ThreadKind::Vmm, &filters.vmm) {
                let threads = std::mem::take(&mut *vcpus.lock().unwrap_or_else(|e| e.into_inner()));
                stop_vcpus(threads, &shared.stop, memory);
                return Err(Error::Internal(e.to_string()));
            }
        }
        let outcome = loop {
            if let Some(reason) = exit.reason() {
                break Ok(reason);
            }
            if let Err(e) = events.run() {
                break Err(Error::Io(
                    "wait for events",
                    std::io::Error::other(e.to_string()),
                ));
            }
        };
        let threads = std::mem::take(&mut *vcpus.lock().unwrap_or_else(|e| e.into_inner()));
        stop_vcpus(threads, &shared.stop, memory);
        // The guest's last words, unless stdout has stopped taking them.
        console_writer.finish(CONSOLE_FLUSH_TIMEOUT);
        drop(raw_mode);
        if let Some(trace) = &shared.trace {
            eprint!("{}", trace.table());
            if let Err(e) = trace.write_summary() {
                log::error!("--trace-exits: cannot write the summary: {e}");
            }
        }
        outcome
    }
}

/// Stops the vCPU threads, then lets go of guest memory, unless one of
/// them did not stop: it may still touch that memory, so the mapping then
/// stays until moat exits.
fn stop_vcpus(threads: Vec<VcpuThread>, stop: &AtomicBool, memory: GuestMemoryMmap) {
    if !vcpu::stop_all(threads, stop) {
        log::warn!(
            "a vCPU thread did not stop within {:?}; it ends with moat",
            vcpu::STOP_TIMEOUT
        );
        std::mem::forget(memory);
    }
}
