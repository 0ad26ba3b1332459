//! The moat VMM: builds a KVM virtual machine from a [`config::VmConfig`]
//! and runs it until the guest powers off.
//!
//! Read [`run`] first: it is the whole boot, top to bottom.

#![deny(missing_docs)]

pub mod boot_timer;
pub mod bus;
pub mod cli;
pub mod config;
pub mod console;
pub mod error;
pub mod exit;
pub mod shutdown;
pub mod signals;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::console::ConsoleInput;
use crate::error::Error;
use crate::exit::{ExitSignal, VmExit};
use crate::shutdown::{ExitEvents, ExitWatcher};
use crate::vcpu::HaltProbe;

/// Boots the VM described by `config` and runs it to the end. Returns why
/// it ended; errors are problems found before or while building it.
pub fn run(config: &VmConfig) -> Result<VmExit, Error> {
    // Check everything the user gave before creating anything.
    let mut kernel = vm::open_input("--kernel", &config.kernel)?;
    moat_boot::loader::detect_format(&mut kernel)?;
    let mut initramfs = config
        .initramfs
        .as_deref()
        .map(|path| vm::open_input("--initramfs", path))
        .transpose()?;
    let virtio_devices = virtio::devices(config)?;
    config::check_memory(config.memory, config::host_memory_limit())?;
    let kvm = vm::open_kvm(&config.kvm_device)?;
    config::check_cpus(u64::from(config.cpus), vm::max_vcpus(&kvm))?;

    // The machine: VM and RAM.
    let vm_fd = vm::create_vm(&kvm)?;
    let memory = vm::create_memory(&vm_fd, config.memory)?;

    // Devices.
    let mut pio = Bus::default();
    let legacy = vm::attach_legacy_devices(&vm_fd, &mut pio)?;
    let first_run = boot_timer::FirstRun::default();
    if config.boot_timer {
        vm::attach_boot_timer(&mut pio, first_run.clone())?;
    }
    let mut mmio = Bus::default();
    let virtio_devices = virtio::attach(&vm_fd, &memory, &mut mmio, virtio_devices)?;

    // The guest's kernel and boot data, which name the devices' slots.
    let slots: Vec<_> = virtio_devices.iter().map(|d| d.slot).collect();
    let (entry, page_table) =
        vm::load_guest(&memory, config, &mut kernel, initramfs.as_mut(), &slots)?;

    // vCPUs, all configured before any starts.
    let vcpu_fds = (0..config.cpus)
        .map(|index| vcpu::create(&kvm, &vm_fd, index, config.cpus, entry, page_table))
        .collect::<Result<Vec<_>, _>>()?;
    let exit = Arc::new(ExitSignal::new().map_err(|e| Error::Io("create an eventfd", e))?);
    let shared = vcpu::Shared {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit: exit.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        first_run,
        halt_probe: Arc::new(HaltProbe::new(vcpu_fds.len())),
    };

    // The event loop, then the console, then go.
    let mut events =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(|e| {
            Error::Io(
                "create the event loop",
                std::io::Error::other(e.to_string()),
            )
        })?;
    let vcpus = Arc::new(Mutex::new(Vec::with_capacity(vcpu_fds.len())));
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
    for device in virtio_devices {
        events.add_subscriber(Arc::new(Mutex::new(device.handler)));
    }
    let raw_mode =
        terminal::RawMode::enter().map_err(|e| Error::Io("set the terminal to raw mode", e))?;
    events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
        legacy.serial.clone(),
        legacy.serial_input_space,
    ))));

    vcpu::install_kick_handler()?;
    for (index, fd) in vcpu_fds.into_iter().enumerate() {
        let spawned = vcpu::spawn(index as u8, fd, shared.clone());
        let mut threads = vcpus.lock().unwrap_or_else(|e| e.into_inner());
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                vcpu::stop_all(std::mem::take(&mut threads), &shared.stop);
                return Err(e);
            }
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
    vcpu::stop_all(threads, &shared.stop);
    drop(raw_mode);
    // Guest memory must outlive the vCPUs that map it.
    drop(memory);
    outcome
}
