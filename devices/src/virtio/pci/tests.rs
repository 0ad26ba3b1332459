use super::*;
use crate::virtio::{DeviceError, GuestMemoryMmap, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::Queue;
use vm_memory::GuestAddress;

const WINDOW: (u64, u64) = (0xd000_0000, 0xe000_0000);
const BAR: u64 = 0xd000_4000;

/// A two-queue device that logs its activation.
struct Dev(Arc<Mutex<Vec<String>>>);

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (at, byte) in (offset..).zip(data.iter_mut()) {
            *byte = 0x80 | at as u8;
        }
    }
    fn activate(&mut self, features: u64, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let line = format!("activate {features:#x} {}", queues.len());
        self.0.lock().unwrap().push(line);
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().push("reset".into());
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn process_queue(
        &mut self,
        _: usize,
        _: &GuestMemoryMmap,
        irq: &Interrupt,
    ) -> Result<(), DeviceError> {
        irq.signal_used_queue();
        Ok(())
    }
}

/// What the function told its host.
#[derive(Clone, Default)]
struct Told(Arc<Mutex<Vec<String>>>);

impl PciHost for Told {
    fn set_line(&mut self, line: usize, message: Option<MsiMessage>) {
        let text = match message {
            Some(m) => format!("line {line} -> {:#x}/{:#x}", m.address, m.data),
            None => format!("line {line} off"),
        };
        self.0.lock().unwrap().push(text);
    }
    fn map_notifications(&mut self, base: Option<u64>) {
        self.0.lock().unwrap().push(format!("notify {base:x?}"));
    }
}

impl Told {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A virtio capability: type, BAR, offset, length.
type Cap = (u8, u8, u32, u32);

struct Rig {
    io: PciConfigIo,
    mmio: PciMmio,
    told: Told,
    log: Arc<Mutex<Vec<String>>>,
    transport: Arc<Mutex<MmioTransport>>,
    function: Arc<Mutex<VirtioPci>>,
}

fn rig() -> Rig {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Interrupt::with_config_line().unwrap());
    let transport = MmioTransport::new(Box::new(Dev(log.clone())), mem, irq).unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let told = Told::default();
    let function = Arc::new(Mutex::new(VirtioPci::new(
        transport.clone(),
        BAR,
        WINDOW,
        Box::new(told.clone()),
    )));
    let bus = PciBus::new(vec![
        Arc::new(Mutex::new(HostBridge::new())),
        function.clone(),
    ]);
    Rig {
        io: PciConfigIo::new(bus.clone()),
        mmio: PciMmio::new(bus, WINDOW.0),
        told,
        log,
        transport,
        function,
    }
}

impl Rig {
    fn select(&mut self, device: u32, register: usize) {
        let address = ADDRESS_ENABLE | device << 11 | register as u32;
        self.io.write(0, &address.to_le_bytes());
    }

    fn config32(&mut self, device: u32, register: usize) -> u32 {
        self.select(device, register & !3);
        let mut b = [0u8; 4];
        self.io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn config_write(&mut self, device: u32, offset: usize, data: &[u8]) {
        self.select(device, offset & !3);
        self.io.write(4 + (offset % 4) as u64, data);
    }

    fn bar_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mmio.read(BAR - WINDOW.0 + offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn bar_write(&mut self, offset: u64, value: u64, len: usize) {
        self.mmio
            .write(BAR - WINDOW.0 + offset, &value.to_le_bytes()[..len]);
    }

    /// The virtio capabilities' (type, bar, offset, length), walked from
    /// the capabilities pointer as a driver does; and the MSI-X one's place.
    fn caps(&mut self) -> (Vec<Cap>, Option<usize>) {
        let mut at = self.config32(1, CAPABILITIES) as usize & 0xff;
        let (mut virtio, mut msix) = (Vec::new(), None);
        while at != 0 {
            let head = self.config32(1, at);
            match head as u8 {
                CAP_ID_MSIX => msix = Some(at),
                CAP_ID_VENDOR => virtio.push((
                    (head >> 24) as u8,
                    self.config32(1, at + 4) as u8,
                    self.config32(1, at + 8),
                    self.config32(1, at + 12),
                )),
                other => panic!("unexpected capability {other:#x}"),
            }
            at = (head >> 8) as usize & 0xff;
        }
        (virtio, msix)
    }

    /// Memory decoding on, as the guest's PCI core does.
    fn enable_memory(&mut self) {
        self.config_write(1, COMMAND, &COMMAND_MEMORY.to_le_bytes());
    }

    /// Brings the device up as Linux's virtio_pci does, with MSI-X: the
    /// config vector 0, both queues on vector 1.
    fn bring_up(&mut self) {
        self.enable_memory();
        self.bar_write(0x14, 0, 1);
        self.bar_write(0x14, 1 | 2, 1);
        self.bar_write(0x0c, 0, 4); // driver features, low half
        self.bar_write(0x08, 1, 4);
        self.bar_write(0x0c, 1, 4); // VERSION_1
        self.bar_write(0x14, 1 | 2 | 8, 1);
        assert_eq!(self.bar_read(0x14, 1), 1 | 2 | 8, "FEATURES_OK kept");
        self.bar_write(0x10, 0, 2);
        for q in 0..2u64 {
            self.bar_write(0x16, q, 2);
            self.bar_write(0x18, 8, 2);
            self.bar_write(0x1a, 1, 2);
            assert_eq!(self.bar_read(0x1a, 2), 1);
            let base = 0x1_0000 + q * 0x1000;
            self.bar_write(0x20, base, 8);
            self.bar_write(0x28, base + 0x400, 4);
            self.bar_write(0x30, base + 0x800, 4);
            self.bar_write(0x1c, 1, 2);
        }
        self.bar_write(0x14, 1 | 2 | 8 | 4, 1);
    }

    fn program_msix(&mut self, msix: usize) {
        self.enable_memory();
        for (v, address) in [(0u64, 0xfee0_0000u64), (1, 0xfee0_1000)] {
            self.bar_write(MSIX_TABLE + v * 16, address, 4);
            self.bar_write(MSIX_TABLE + v * 16 + 8, 0x40 + v, 4);
            self.bar_write(MSIX_TABLE + v * 16 + 12, 0, 4);
        }
        self.config_write(1, msix + 3, &[0x80]);
    }
}

#[test]
fn the_bus_shows_a_host_bridge_and_a_modern_virtio_function() {
    let mut r = rig();
    assert_eq!(r.config32(0, VENDOR_ID), 0x0008_1b36);
    assert_eq!(
        r.config32(0, REVISION) >> 8,
        0x06_00_00,
        "host bridge class"
    );
    assert_eq!(r.config32(1, VENDOR_ID), 0x1042_1af4, "virtio-blk, modern");
    assert_eq!(r.config32(1, SUBSYSTEM_VENDOR), 0x1042_1af4);
    assert_eq!(r.config32(1, STATUS & !3) >> 16, 1 << 4, "capability list");
    assert_eq!(r.config32(1, INTERRUPT_LINE) >> 8 & 0xff, 0, "no INTx pin");
    // No device 2, no other function, no other bus: all ones.
    assert_eq!(r.config32(2, VENDOR_ID), u32::MAX);
    r.io.write(0, &(ADDRESS_ENABLE | 1 << 11 | 1 << 8).to_le_bytes());
    let mut b = [0u8; 4];
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX);
    r.io.write(0, &(ADDRESS_ENABLE | 1 << 16).to_le_bytes());
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX);
    // Without the enable bit, nothing either.
    r.io.write(0, &(1u32 << 11).to_le_bytes());
    r.io.read(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), u32::MAX);
    // A byte access inside the data port.
    r.select(1, VENDOR_ID);
    let mut byte = [0u8; 1];
    r.io.read(4 + 3, &mut byte);
    assert_eq!(byte[0], 0x10);
}

#[test]
fn the_capabilities_describe_the_bar_layout() {
    let mut r = rig();
    let (virtio, msix) = r.caps();
    assert_eq!(
        virtio,
        vec![
            (TYPE_COMMON, 0, 0, 0x38),
            (TYPE_ISR, 0, 0x1000, 1),
            (TYPE_DEVICE, 0, 0x2000, 0x1000),
            (TYPE_NOTIFY, 0, 0x3000, 8),
            (TYPE_PCI_CFG, 0, 0, 0),
        ]
    );
    assert_eq!(r.config32(1, NOTIFY_CAP + 16), 4, "notify multiplier");
    let msix = msix.expect("an MSI-X capability");
    // Table size 2 (encoded as N-1), table at 0x3800 and PBA at 0x3c00 in BAR 0.
    assert_eq!(r.config32(1, msix) >> 16, 1);
    assert_eq!(r.config32(1, msix + 4), 0x3800);
    assert_eq!(r.config32(1, msix + 8), 0x3c00);
}

#[test]
fn the_bar_sizes_and_decodes_only_with_memory_on_inside_the_window() {
    let mut r = rig();
    assert_eq!(r.config32(1, BAR0), BAR as u32);
    r.config_write(1, BAR0, &u32::MAX.to_le_bytes());
    assert_eq!(r.config32(1, BAR0), !(BAR_SIZE as u32 - 1), "size probe");
    r.config_write(1, BAR0, &(BAR as u32).to_le_bytes());
    // Memory decoding is off until the guest turns it on.
    assert_eq!(r.bar_read(0x12, 2), 0xffff);
    assert!(r.told.take().is_empty());
    r.enable_memory();
    assert_eq!(r.bar_read(0x12, 2), 2, "num_queues");
    assert_eq!(r.told.take(), vec![format!("notify Some({BAR:x})")]);
    // Moved: the notifications follow.
    let moved = BAR + 0x10_0000;
    r.config_write(1, BAR0, &(moved as u32).to_le_bytes());
    assert_eq!(r.told.take(), vec![format!("notify Some({moved:x})")]);
    // Outside the window it decodes nothing.
    r.config_write(1, BAR0, &0x4000u32.to_le_bytes());
    assert_eq!(r.told.take(), vec!["notify None".to_string()]);
    // Read-only parts of configuration space stay put.
    r.config_write(1, VENDOR_ID, &0u32.to_le_bytes());
    assert_eq!(r.config32(1, VENDOR_ID), 0x1042_1af4);
}

#[test]
fn a_driver_brings_the_device_up_through_the_bar_with_msix() {
    let mut r = rig();
    let (_, msix) = r.caps();
    r.program_msix(msix.unwrap());
    r.told.take();
    r.bring_up();
    assert_eq!(r.log.lock().unwrap().as_slice(), ["activate 0x100000000 2"]);
    assert_eq!(
        r.told.take(),
        vec!["line 0 -> 0xfee00000/0x40", "line 1 -> 0xfee01000/0x41"]
    );
    // The common configuration reads back what was written.
    r.bar_write(0x16, 1, 2);
    assert_eq!(r.bar_read(0x20, 8), 0x1_1000);
    assert_eq!(r.bar_read(0x28, 8), 0x1_1400);
    assert_eq!(r.bar_read(0x1c, 2), 1);
    assert_eq!(r.bar_read(0x1e, 2), 1, "queue_notify_off");
    assert_eq!(r.bar_read(0x18, 2), 8);
    r.bar_write(0x00, 1, 4);
    assert_eq!(r.bar_read(0x04, 4), 1, "VERSION_1 in the high half");
    // Device configuration.
    assert_eq!(r.bar_read(0x2000 + 5, 1), 0x85);
    // A notification that did not go through an ioeventfd still arrives.
    r.bar_write(notify_offset(1), 1, 2);
    let t = r.transport.lock().unwrap();
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
}

#[test]
fn queues_share_one_vector_and_bad_vectors_read_back_as_none() {
    let mut r = rig();
    r.enable_memory();
    r.bar_write(0x10, 2, 2);
    assert_eq!(
        r.bar_read(0x10, 2),
        u64::from(NO_VECTOR),
        "beyond the table"
    );
    r.bar_write(0x16, 0, 2);
    r.bar_write(0x1a, 0, 2);
    assert_eq!(r.bar_read(0x1a, 2), 0);
    r.bar_write(0x16, 1, 2);
    r.bar_write(0x1a, 1, 2);
    assert_eq!(r.bar_read(0x1a, 2), u64::from(NO_VECTOR), "a second vector");
    r.bar_write(0x1a, 0, 2);
    assert_eq!(r.bar_read(0x1a, 2), 0, "the shared one");
}

#[test]
fn masking_holds_a_line_back_and_the_pba_shows_it_pending() {
    let mut r = rig();
    let msix = r.caps().1.unwrap();
    r.program_msix(msix);
    r.bring_up();
    r.told.take();
    // Mask vector 1: the queue line stops sending.
    r.bar_write(MSIX_TABLE + 16 + 12, 1, 4);
    assert_eq!(r.told.take(), vec!["line 1 off".to_string()]);
    let irq = r.transport.lock().unwrap().interrupt.clone();
    assert_eq!(r.bar_read(MSIX_PBA, 8), 0);
    irq.signal_used_queue();
    assert_eq!(r.bar_read(MSIX_PBA, 8), 0b10, "vector 1 pending");
    r.bar_write(MSIX_TABLE + 16 + 12, 0, 4);
    assert_eq!(r.told.take(), vec!["line 1 -> 0xfee01000/0x41".to_string()]);
    // The function mask holds both back.
    r.config_write(1, msix + 3, &[0xc0]);
    assert_eq!(
        r.told.take(),
        vec!["line 0 off".to_string(), "line 1 off".to_string()]
    );
    // And the table reads back what was written.
    assert_eq!(r.bar_read(MSIX_TABLE + 16, 4), 0xfee0_1000);
    assert_eq!(r.bar_read(MSIX_TABLE + 24, 4), 0x41);
}

#[test]
fn the_isr_reads_and_clears_the_status() {
    let mut r = rig();
    r.enable_memory();
    let irq = r.transport.lock().unwrap().interrupt.clone();
    irq.signal_used_queue();
    irq.signal_config_change();
    assert_eq!(r.bar_read(ISR, 1), 3);
    assert_eq!(r.bar_read(ISR, 1), 0);
}

#[test]
fn a_reset_unmaps_the_vectors_and_resets_the_device() {
    let mut r = rig();
    let msix = r.caps().1.unwrap();
    r.program_msix(msix);
    r.bring_up();
    r.told.take();
    r.bar_write(0x14, 0, 1);
    assert_eq!(r.bar_read(0x14, 1), 0);
    assert_eq!(r.bar_read(0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(r.told.take(), vec!["line 0 off", "line 1 off"]);
    assert_eq!(r.log.lock().unwrap().last().unwrap(), "reset");
}

#[test]
fn the_configuration_access_capability_reaches_the_bar() {
    let mut r = rig();
    r.config_write(1, PCI_CFG_OFFSET, &0x12u32.to_le_bytes());
    r.config_write(1, PCI_CFG_LENGTH, &2u32.to_le_bytes());
    assert_eq!(r.config32(1, PCI_CFG_DATA) & 0xffff, 2, "num_queues");
    // Writes go through too: the config vector.
    r.config_write(1, PCI_CFG_OFFSET, &0x10u32.to_le_bytes());
    r.config_write(1, PCI_CFG_DATA, &1u32.to_le_bytes());
    assert_eq!(r.config32(1, PCI_CFG_DATA) & 0xffff, 1);
    // A window outside the BAR reads as zero.
    r.config_write(1, PCI_CFG_OFFSET, &(BAR_SIZE as u32).to_le_bytes());
    assert_eq!(r.config32(1, PCI_CFG_DATA), 0);
}

#[test]
fn a_restored_function_tells_its_host_again() {
    let mut r = rig();
    let msix = r.caps().1.unwrap();
    r.program_msix(msix);
    r.bring_up();
    let state = r.function.lock().unwrap().state();

    let fresh = rig();
    fresh.function.lock().unwrap().restore(&state).unwrap();
    assert_eq!(
        fresh.told.take(),
        vec![
            "line 0 -> 0xfee00000/0x40".to_string(),
            "line 1 -> 0xfee01000/0x41".to_string(),
            format!("notify Some({BAR:x})"),
        ]
    );
    assert_eq!(fresh.function.lock().unwrap().state(), state);
    let mut bad = state.clone();
    bad.config.pop();
    assert!(fresh.function.lock().unwrap().restore(&bad).is_err());
}

#[test]
fn odd_accesses_do_not_panic() {
    let mut r = rig();
    r.enable_memory();
    for offset in [
        0u64, 1, 0x37, 0x38, 0xfff, 0x1001, 0x2fff, 0x3000, 0x37ff, 0x3801, 0x3fff,
    ] {
        for len in [1usize, 2, 3, 4, 8] {
            r.bar_read(offset, len);
            r.bar_write(offset, u64::MAX, len);
        }
    }
    for offset in 0..260 {
        r.config_write(1, offset, &[0xff]);
        r.config32(1, offset & 0xfc);
    }
    r.io.write(1, &[1]);
    r.io.read(2, &mut [0u8; 2]);
}
