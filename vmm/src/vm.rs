//! Building a VM, in boot order: KVM, guest memory, kernel and boot data,
//! devices, vCPUs. [`crate::run`] strings these together.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use moat_boot::cpu::EntryPoint;
use moat_boot::{acpi, gdt, layout, loader, mptable, paging, GuestMemoryMmap};
use moat_devices::legacy::{AcpiPower, BootTimer, Serial, I8042};
use moat_devices::trigger::EventFdTrigger;
use moat_devices::virtio::mmio::MMIO_WINDOW;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::boot_timer::{self, FirstRun};
use crate::bus::Bus;
use crate::config::{self, ConfigError, VmConfig};
use crate::console::{ConsoleOut, ConsoleSerial, OutputLimits};
use crate::error::{Error, KvmOp};

/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// COM1.
/// COM1, the guest's console.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA interrupt.
const COM1_IRQ: u32 = 4;
/// The i8042's data port; its command port is 4 above.
const I8042_PORT: u64 = 0x60;
/// The boot-timer port (`--boot-timer`): in the 0xf0-0xff range the PC
/// gave the x87 coprocessor, which no 64-bit guest touches.
pub const BOOT_TIMER_PORT: u64 = 0xf4;
/// The ACPI power registers (sleep control, sleep status, reset), where
/// PC chipsets usually put their ACPI PM block.
pub const ACPI_POWER_PORT: u16 = 0x600;
/// The ACPI reset register's reset value.
const ACPI_RESET_VALUE: u8 = 1;
/// The interrupt of the ACPI Generic Event Device, which reports power
/// button presses: the last IOAPIC pin, after the virtio devices' lines.
pub const GED_IRQ: u32 = mptable::IOAPIC_PINS as u32 - 1;

/// Opens a file the user named, with a message that names the option.
pub fn open_input(option: &'static str, path: &Path) -> Result<File, ConfigError> {
    let error = |reason: String| ConfigError::File {
        option,
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| error(e.to_string()))?;
    let meta = file.metadata().map_err(|e| error(e.to_string()))?;
    if meta.is_dir() {
        return Err(error("it is a directory".into()));
    }
    Ok(file)
}

/// Opens the KVM device and checks its API version.
pub fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::NotKvm {
        path: path.to_path_buf(),
        reason: "the path contains a NUL byte".into(),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| Error::KvmUnavailable {
        path: path.to_path_buf(),
        hint: match source.errno() {
            libc::ENOENT => " (is KVM enabled? load kvm_intel or kvm_amd)",
            libc::EACCES | libc::EPERM => " (run as root or add your user to the kvm group)",
            _ => "",
        },
        source,
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        v if v < 0 => Err(Error::NotKvm {
            path: path.to_path_buf(),
            reason: std::io::Error::from_raw_os_error(-v).to_string(),
        }),
        v => Err(Error::NotKvm {
            path: path.to_path_buf(),
            reason: format!("KVM API version {v}, moat needs {KVM_API_VERSION}"),
        }),
    }
}

/// The most vCPUs this host can give one VM.
pub fn max_vcpus(kvm: &Kvm) -> u64 {
    (kvm.get_max_vcpus() as u64).min(u64::from(mptable::MAX_CPUS))
}

/// Creates the VM with its in-kernel interrupt controllers and timer.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(KvmOp::CreateVm.err())?;
    // Intel VMX needs three pages for the real-mode TSS and one for the
    // identity map; they go in the hole below 4 GiB, away from RAM.
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(KvmOp::SetTss.err())?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(KvmOp::SetTss.err())?;
    vm.create_irq_chip().map_err(KvmOp::CreateIrqchip.err())?;
    set_gsi_routing(&vm, &std::collections::BTreeMap::new()).map_err(KvmOp::GsiRouting.err())?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(KvmOp::CreatePit.err())?;
    Ok(vm)
}

/// KVM's irqchip routes for GSIs 0-23: the 8259 pair takes 0-15, the IOAPIC
/// takes every GSI on the pin [`mptable::ioapic_pin`] gives.
///
/// KVM's default table also routes GSI 2 to IOAPIC pin 2, next to GSI 0 (the
/// PIT). An EOI on pin 2 then acknowledges GSI 2 instead of the PIT's GSI 0,
/// the in-kernel PIT waits forever for the ack of its first interrupt, and
/// the guest's timer stops after two ticks. Leaving GSI 2 off the IOAPIC
/// (as QEMU does) keeps the acks with the PIT.
pub fn gsi_routes() -> Vec<(u32, u32, u32)> {
    let pic = (0..16u32).map(|gsi| {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        (gsi, chip, gsi % 8)
    });
    let ioapic = (0..mptable::IOAPIC_PINS).filter_map(|irq| {
        Some((
            u32::from(irq),
            KVM_IRQCHIP_IOAPIC,
            u32::from(mptable::ioapic_pin(irq)?),
        ))
    });
    pic.chain(ioapic).collect()
}

/// Sets KVM's GSI routing table: the irqchip routes of [`gsi_routes`] and
/// an MSI route for each GSI in `msi` (virtio-pci's lines, see
/// [`crate::pci`]). The table is replaced whole, so every change passes
/// every route.
pub fn set_gsi_routing(
    vm: &VmFd,
    msi: &std::collections::BTreeMap<u32, moat_devices::virtio::pci::MsiMessage>,
) -> Result<(), kvm_ioctls::Error> {
    let msi = msi.iter().map(|(gsi, message)| {
        let mut entry = kvm_irq_routing_entry {
            gsi: *gsi,
            type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = message.address as u32;
        entry.u.msi.address_hi = (message.address >> 32) as u32;
        entry.u.msi.data = message.data;
        entry
    });
    let entries: Vec<kvm_irq_routing_entry> = gsi_routes()
        .into_iter()
        .map(|(gsi, irqchip, pin)| {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            entry.u.irqchip.irqchip = irqchip;
            entry.u.irqchip.pin = pin;
            entry
        })
        .chain(msi)
        .collect();
    // At most 24 + 16 + 2 per device: far below KVM_MAX_IRQ_ROUTES.
    let routing =
        KvmIrqRouting::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    vm.set_gsi_routing(&routing)
}

/// Maps guest RAM in moat and registers it with KVM.
pub fn create_memory(
    vm: &VmFd,
    size: u64,
    huge_pages: config::HugePages,
) -> Result<GuestMemoryMmap, Error> {
    let memory = crate::ram::map(&layout::ram_regions(size), huge_pages).map_err(|e| {
        Error::GuestMemory {
            size: config::format_size(size),
            reason: e.to_string(),
        }
    })?;
    register_memory(vm, &memory)?;
    Ok(memory)
}

/// Registers guest RAM with KVM, a memory slot per region.
pub fn register_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `memory`, which the caller keeps
        // alive for as long as the VM runs (it is dropped after the vCPUs
        // have stopped), and the guest ranges do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(KvmOp::SetMemory.err())?;
    }
    Ok(())
}

/// Loads the kernel, initramfs and command line, and writes the boot data
/// the chosen entry point needs. Returns the entry and CR3.
pub fn load_guest(
    memory: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &mut File,
    initramfs: Option<&mut File>,
    virtio_slots: &[crate::virtio::MmioSlot],
) -> Result<(EntryPoint, u64), Error> {
    let kernel_info = loader::load_kernel(memory, kernel)?;
    let entry = loader::entry_point(&kernel_info, config.boot_protocol)?;
    let initramfs = initramfs
        .map(|file| loader::load_initramfs(memory, file, &kernel_info, config.memory))
        .transpose()?;

    let cmdline_error = |e: linux_loader::cmdline::Error| {
        Error::Config(ConfigError::Syntax {
            option: "--cmdline",
            problem: e.to_string(),
        })
    };
    let mut cmdline =
        Cmdline::try_from(&config.cmdline, layout::CMDLINE_MAX_SIZE).map_err(cmdline_error)?;
    // Kernels without ACPI find virtio-mmio devices through the command
    // line (virtio_mmio.device=4K@BASE:IRQ), at their second windows.
    for slot in virtio_slots {
        let base = vm_memory::GuestAddress(slot.cmdline_base);
        cmdline
            .add_virtio_mmio_device(MMIO_WINDOW, base, slot.irq, None)
            .map_err(cmdline_error)?;
    }
    let cmdline_len = loader::write_cmdline(memory, &cmdline)?;

    let internal = |what: &str, e: &dyn std::fmt::Display| Error::Internal(format!("{what}: {e}"));
    // Both ways of describing the machine: the MP table for kernels
    // without ACPI (or booted with acpi=off), ACPI tables for the rest.
    mptable::write_mptable(memory, config.cpus).map_err(|e| internal("MP table", &e))?;
    let rsdp = write_acpi_tables(memory, config.cpus, virtio_slots, config.transport)
        .map_err(|e| internal("ACPI tables", &e))?;
    let info = loader::BootInfo {
        mem_size: config.memory,
        cmdline_len,
        initramfs,
        rsdp: Some(rsdp.0),
    };
    gdt::write_gdt(memory, moat_boot::cpu::boot_gdt(entry)).map_err(|e| internal("GDT", &e))?;
    let cr3 = paging::write_identity_map(memory).map_err(|e| internal("page tables", &e))?;
    match entry {
        EntryPoint::Linux64 { .. } => loader::write_zero_page(memory, &kernel_info, &info)?,
        EntryPoint::Pvh { .. } => loader::write_pvh_start_info(memory, &info)?,
    }
    Ok((entry, cr3))
}

/// Writes the ACPI tables: the guest's CPUs, COM1, the virtio devices, the
/// power registers and the power button's interrupt. Returns the RSDP's
/// address.
fn write_acpi_tables(
    memory: &GuestMemoryMmap,
    cpus: u8,
    virtio_slots: &[crate::virtio::MmioSlot],
    transport: crate::config::Transport,
) -> Result<vm_memory::GuestAddress, acpi::Error> {
    let port = |offset: u64| acpi::PortRegister {
        port: ACPI_POWER_PORT + offset as u16,
    };
    let virtio: Vec<acpi::VirtioMmio> = virtio_slots
        .iter()
        .map(|slot| acpi::VirtioMmio {
            base: slot.base,
            size: MMIO_WINDOW,
            irq: slot.irq,
        })
        .collect();
    let platform = acpi::Platform {
        cpus,
        uart: acpi::Uart {
            port: COM1_PORT,
            irq: COM1_IRQ,
        },
        virtio: &virtio,
        power: acpi::PowerRegisters {
            sleep_control: port(AcpiPower::SLEEP_CONTROL),
            sleep_status: port(AcpiPower::SLEEP_STATUS),
            reset: port(AcpiPower::RESET),
            reset_value: ACPI_RESET_VALUE,
        },
        ged_irq: GED_IRQ,
        pci: (transport == crate::config::Transport::Pci).then_some(acpi::PciHostBridge {
            window_start: layout::PCI_MMIO_START as u32,
            window_last: (layout::PCI_MMIO_END - 1) as u32,
        }),
    };
    acpi::write_tables(memory, &platform)
}

/// The legacy devices and the eventfds the event loop needs from them.
pub struct LegacyDevices {
    /// COM1, shared with the console input pump.
    pub serial: Arc<Mutex<ConsoleSerial>>,
    /// COM1's output, for the writer thread.
    pub console_out: ConsoleOut,
    /// Signalled when the guest drains COM1's receive FIFO.
    pub serial_input_space: EventFdTrigger,
    /// Signalled when the guest resets (the i8042's reset line, or the
    /// ACPI reset register).
    pub reset: EventFdTrigger,
    /// Signalled when the guest powers off (ACPI S5).
    pub power_off: EventFdTrigger,
    /// Raises the ACPI power button's interrupt (an irqfd).
    pub power_button: EventFdTrigger,
}

/// Places COM1, the i8042 and the ACPI power registers on the port-I/O
/// bus; COM1's and the power button's interrupts go to KVM through irqfds.
pub fn attach_legacy_devices(vm: &VmFd, pio: &mut Bus) -> Result<LegacyDevices, Error> {
    let eventfd = || EventFdTrigger::new().map_err(|e| Error::Io("create an eventfd", e));
    let clone = |t: &EventFdTrigger| t.try_clone().map_err(|e| Error::Io("clone an eventfd", e));
    let serial_irq = eventfd()?;
    vm.register_irqfd(serial_irq.event_fd(), COM1_IRQ)
        .map_err(KvmOp::Irqfd.err())?;
    let serial_input_space = eventfd()?;
    let console_out = ConsoleOut::new(OutputLimits::default());
    let serial = Arc::new(Mutex::new(Serial::new(
        serial_irq,
        clone(&serial_input_space)?,
        console_out.clone(),
    )));
    let reset = eventfd()?;
    let i8042 = Arc::new(Mutex::new(I8042::new(clone(&reset)?)));
    let power_off = eventfd()?;
    let acpi_power = Arc::new(Mutex::new(AcpiPower::new(
        clone(&power_off)?,
        clone(&reset)?,
        acpi::S5_SLEEP_CONTROL,
        ACPI_RESET_VALUE,
    )));
    let power_button = eventfd()?;
    vm.register_irqfd(power_button.event_fd(), GED_IRQ)
        .map_err(KvmOp::Irqfd.err())?;
    let overlap = |e: crate::bus::OverlapError| Error::Internal(e.to_string());
    pio.insert(
        u64::from(COM1_PORT),
        ConsoleSerial::WINDOW,
        "serial",
        serial.clone(),
    )
    .map_err(overlap)?;
    pio.insert(I8042_PORT, I8042::WINDOW, "i8042", i8042)
        .map_err(overlap)?;
    pio.insert(
        u64::from(ACPI_POWER_PORT),
        AcpiPower::WINDOW,
        "acpi-pm",
        acpi_power,
    )
    .map_err(overlap)?;
    Ok(LegacyDevices {
        serial,
        console_out,
        serial_input_space,
        reset,
        power_off,
        power_button,
    })
}

/// Places the boot timer (`--boot-timer`) on the port-I/O bus.
pub fn attach_boot_timer(pio: &mut Bus, first_run: FirstRun) -> Result<(), Error> {
    let timer = Arc::new(Mutex::new(boot_timer::device(first_run)));
    pio.insert(BOOT_TIMER_PORT, BootTimer::WINDOW, "boot-timer", timer)
        .map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pit_reaches_ioapic_pin_2() {
        let routes = gsi_routes();
        let pin2: Vec<u32> = routes
            .iter()
            .filter(|(_, chip, pin)| *chip == KVM_IRQCHIP_IOAPIC && *pin == 2)
            .map(|(gsi, _, _)| *gsi)
            .collect();
        assert_eq!(pin2, vec![0]);
    }

    #[test]
    fn legacy_gsis_reach_both_pics_and_the_ioapic() {
        let routes = gsi_routes();
        assert!(routes.contains(&(4, KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(routes.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(routes.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(routes.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert_eq!(routes.len(), 16 + 23);
    }
}
