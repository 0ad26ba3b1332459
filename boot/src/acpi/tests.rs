//! The tables are read back the way a guest would find them (RSDP, then
//! the XSDT, then what it lists), checksums are summed here, and every
//! table is disassembled by ACPICA's `iasl -d` (Debian's acpica-tools, the
//! same ACPICA Linux uses), whose output is checked field by field.

use std::path::Path;
use std::process::Command;

use vm_memory::{Bytes, GuestAddress};

use super::*;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

const POWER: PowerRegisters = PowerRegisters {
    sleep_control: PortRegister { port: 0x600 },
    sleep_status: PortRegister { port: 0x601 },
    reset: PortRegister { port: 0x602 },
    reset_value: 1,
};

const VIRTIO: [VirtioMmio; 3] = [
    VirtioMmio {
        base: 0xc000_0000,
        size: 0x1000,
        irq: 5,
    },
    VirtioMmio {
        base: 0xc000_1000,
        size: 0x1000,
        irq: 6,
    },
    VirtioMmio {
        base: 0xc000_2000,
        size: 0x1000,
        irq: 7,
    },
];

fn platform(cpus: u8, virtio: &[VirtioMmio]) -> Platform<'_> {
    Platform {
        pci: None,
        cpus,
        uart: Uart {
            port: 0x3f8,
            irq: 4,
        },
        virtio,
        power: POWER,
        ged_irq: 23,
    }
}

/// `n` virtio-mmio devices laid out as moat places them.
fn virtio_devices(n: u64) -> Vec<VirtioMmio> {
    (0..n)
        .map(|i| VirtioMmio {
            base: 0xc000_0000 + i * 0x1000,
            size: 0x1000,
            irq: 5 + i as u32,
        })
        .collect()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// A table at `addr`, whole (its length is in its header), checksum checked.
fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let header = read(mem, addr, 36);
    assert_eq!(&header[0..4], signature, "table at {addr:#x}");
    let bytes = read(mem, addr, u32_at(&header, 4) as usize);
    assert!(
        sums_to_zero(&bytes),
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert!(addr + bytes.len() as u64 <= TABLES_END);
    bytes
}

/// Every table, found from the RSDP as a guest finds them: RSDP, XSDT,
/// FADT, MADT, DSDT.
struct Tables {
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
    let rsdp = read(mem, rsdp_addr.0, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert!(sums_to_zero(&rsdp[..20]), "RSDP v1 checksum");
    assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
    assert_eq!(entries.len(), 2);
    let fadt = table(mem, entries[0], b"FACP");
    let madt = table(mem, entries[1], b"APIC");
    // X_DSDT, at offset 140 of the FADT.
    let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
    Tables {
        xsdt,
        fadt,
        madt,
        dsdt,
    }
}

/// Disassembles one table with `iasl -d`; returns the listing.
fn iasl(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let input = dir.join(format!("{name}.dat"));
    std::fs::write(&input, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&input)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run iasl ({e}): install acpica-tools (resources/install-deps.sh does)")
        });
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl -d {name}: {log}");
    assert!(!log.contains("Error"), "iasl -d {name}: {log}");
    assert!(
        !log.to_lowercase().contains("checksum"),
        "iasl -d {name}: {log}"
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

/// Values of the listing's `Field : Value` lines, by field, in order.
fn fields<'a>(listing: &'a str, field: &str) -> Vec<&'a str> {
    listing
        .lines()
        .filter_map(|l| l.split_once(" : "))
        .filter(|(k, _)| k.trim_end().ends_with(field))
        .map(|(_, v)| v.trim())
        .collect()
}

/// A Generic Address Structure in a listing: (space ID, bit width,
/// address) of the register named `name`.
fn gas<'a>(listing: &'a str, name: &str) -> (&'a str, &'a str, &'a str) {
    let mut lines = listing
        .lines()
        .skip_while(|l| !l.contains(&format!("{name} : [Generic Address Structure]")));
    assert!(lines.next().is_some(), "no {name} in\n{listing}");
    let mut value = |field: &str| {
        lines
            .by_ref()
            .find_map(|l| l.split_once(" : ").filter(|(k, _)| k.ends_with(field)))
            .map(|(_, v)| v.trim())
            .unwrap_or_else(|| panic!("{name} has no {field}"))
    };
    (value("Space ID"), value("Bit Width"), value("Address"))
}

/// The MADT's subtables: the type's name, and the listing lines of each.
fn subtables(listing: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in listing.lines() {
        if let Some((_, kind)) = line.split_once("Subtable Type : ") {
            let name = kind
                .split_once('[')
                .map_or(kind, |(_, n)| n.trim_end_matches(']'));
            out.push((name.to_string(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("moat-acpi-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn tables_are_found_from_the_rsdp_and_sum_to_zero() {
    let mem = memory();
    let rsdp = write_tables(&mem, &platform(2, &VIRTIO)).unwrap();
    assert_eq!(rsdp, RSDP_START);
    let tables = walk(&mem, rsdp);
    assert_eq!(&tables.xsdt[10..16], b"MOAT  ");
}

#[test]
fn the_rsdp_is_on_a_16_byte_boundary_in_the_bios_area() {
    // Linux's legacy scan (acpi_find_root_pointer) looks at 0xe0000-0xfffff
    // in 16-byte steps.
    assert_eq!(RSDP_START.0 % 16, 0);
    assert!((0xe_0000..0x10_0000).contains(&RSDP_START.0));
}

#[test]
fn iasl_reads_the_xsdt() {
    let mem = memory();
    let tables = walk(&mem, write_tables(&mem, &platform(1, &VIRTIO)).unwrap());
    let dir = TempDir::new("xsdt");
    let xsdt = iasl(&dir.0, "xsdt", &tables.xsdt);
    assert_eq!(fields(&xsdt, "ACPI Table Address   0").len(), 1, "{xsdt}");
    assert_eq!(fields(&xsdt, "ACPI Table Address   1").len(), 1, "{xsdt}");
}

#[test]
fn iasl_reads_a_hardware_reduced_fadt_with_power_registers() {
    let mem = memory();
    let tables = walk(&mem, write_tables(&mem, &platform(1, &VIRTIO)).unwrap());
    let dir = TempDir::new("fadt");
    let fadt = iasl(&dir.0, "fadt", &tables.fadt);
    assert_eq!(fields(&fadt, "Hardware Reduced (V5)"), ["1"], "{fadt}");
    assert_eq!(
        fields(&fadt, "Reset Register Supported (V2)"),
        ["1"],
        "{fadt}"
    );
    assert_eq!(
        fields(&fadt, "Control Method Power Button (V1)"),
        ["1"],
        "{fadt}"
    );
    assert_eq!(fields(&fadt, "CMOS RTC Not Present (V5)"), ["1"], "{fadt}");
    assert_eq!(fields(&fadt, "Value to cause reset"), ["01"], "{fadt}");
    for (register, port) in [
        ("Reset Register", "0000000000000602"),
        ("Sleep Control Register", "0000000000000600"),
        ("Sleep Status Register", "0000000000000601"),
    ] {
        assert_eq!(
            gas(&fadt, register),
            ("01 [SystemIO]", "08", port),
            "{register}"
        );
    }
    let dsdt = format!("{:016X}", u64_at(&tables.fadt, 140));
    assert_eq!(fields(&fadt, "DSDT Address"), ["00000000", dsdt.as_str()]);
}

#[test]
fn iasl_reads_a_madt_with_one_local_apic_per_vcpu() {
    for cpus in [1u8, 4, 64, mptable::MAX_CPUS] {
        let mem = memory();
        let tables = walk(&mem, write_tables(&mem, &platform(cpus, &VIRTIO)).unwrap());
        let dir = TempDir::new(&format!("madt{cpus}"));
        let madt = iasl(&dir.0, "madt", &tables.madt);
        assert_eq!(fields(&madt, "Local Apic Address"), ["FEE00000"]);
        let subtables = subtables(&madt);
        let apics: Vec<&String> = subtables
            .iter()
            .filter(|(kind, _)| kind == "Processor Local APIC")
            .map(|(_, body)| body)
            .collect();
        assert_eq!(apics.len(), usize::from(cpus));
        for (id, body) in apics.iter().enumerate() {
            let id = format!("{id:02X}");
            assert_eq!(fields(body, "Processor ID"), [id.as_str()]);
            assert_eq!(fields(body, "Local Apic ID"), [id.as_str()]);
            assert_eq!(fields(body, "Processor Enabled"), ["1"]);
        }
        let ioapics: Vec<&String> = subtables
            .iter()
            .filter(|(kind, _)| kind == "I/O APIC")
            .map(|(_, body)| body)
            .collect();
        assert_eq!(ioapics.len(), 1, "{madt}");
        let ioapic_id = format!("{:02X}", mptable::ioapic_id(cpus));
        assert_eq!(fields(ioapics[0], "I/O Apic ID"), [ioapic_id.as_str()]);
        assert_eq!(fields(ioapics[0], "Address"), ["FEC00000"]);
        assert_eq!(fields(ioapics[0], "Interrupt"), ["00000000"], "GSI base");
    }
}

#[test]
fn the_madt_routes_isa_irq_0_to_ioapic_pin_2_like_the_mp_table() {
    let mem = memory();
    let tables = walk(&mem, write_tables(&mem, &platform(2, &VIRTIO)).unwrap());
    let dir = TempDir::new("madtiso");
    let madt = iasl(&dir.0, "madt", &tables.madt);
    let subtables = subtables(&madt);
    let overrides: Vec<(&str, &str)> = subtables
        .iter()
        .filter(|(kind, _)| kind == "Interrupt Source Override")
        .map(|(_, body)| (fields(body, "Source")[0], fields(body, "Interrupt")[0]))
        .collect();
    // Every ISA IRQ the MP table wires to another pin, and no other.
    let expected: Vec<(String, String)> = (0..16u8)
        .filter_map(|irq| Some((irq, mptable::ioapic_pin(irq)?)))
        .filter(|(irq, pin)| irq != pin)
        .map(|(irq, pin)| (format!("{irq:02X}"), format!("{pin:08X}")))
        .collect();
    let expected: Vec<(&str, &str)> = expected
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(overrides, expected);
    assert_eq!(overrides, [("00", "00000002")]);
    // LINT1 of every processor is the NMI.
    let nmi: Vec<&String> = subtables
        .iter()
        .filter(|(kind, _)| kind == "Local APIC NMI")
        .map(|(_, body)| body)
        .collect();
    assert_eq!(nmi.len(), 1, "{madt}");
    assert_eq!(fields(nmi[0], "Processor ID"), ["FF"]);
    assert_eq!(fields(nmi[0], "Interrupt Input LINT"), ["01"]);
}

/// The DSDT's ASL, as iasl gives it back.
fn dsdt_asl(cpus: u8, virtio: &[VirtioMmio]) -> String {
    let mem = memory();
    let tables = walk(&mem, write_tables(&mem, &platform(cpus, virtio)).unwrap());
    let dir = TempDir::new(&format!("dsdt{}", virtio.len()));
    iasl(&dir.0, "dsdt", &tables.dsdt)
}

/// The ASL without comments and with its whitespace squeezed, for
/// matching statements.
fn squeezed(asl: &str) -> String {
    let mut text = String::new();
    let mut rest = asl;
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .split_once("*/")
            .map_or("", |(_, after)| after);
    }
    text.push_str(rest);
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_dsdt_describes_each_virtio_mmio_device() {
    let asl = squeezed(&dsdt_asl(1, &VIRTIO));
    for (i, device) in VIRTIO.iter().enumerate() {
        let expected = format!(
            "Device (VR{i:02X}) {{ Name (_HID, \"LNRO0005\") Name (_UID, {}) Name (_CCA, One) \
             Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{:08X}, \
             0x00001000, ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) \
             {{ 0x{:08X}, }} }}) }}",
            match i {
                0 => "Zero".to_string(),
                1 => "One".to_string(),
                n => format!("0x{n:02X}"),
            },
            device.base,
            device.irq
        );
        assert!(asl.contains(&expected), "missing {expected}\nin {asl}");
    }
    assert_eq!(asl.matches("LNRO0005").count(), VIRTIO.len());
}

#[test]
fn the_dsdt_describes_com1_the_power_button_and_s5() {
    let asl = squeezed(&dsdt_asl(1, &[]));
    for expected in [
        "Scope (\\_SB) { Device (COM1) { Name (_HID, EisaId (\"PNP0501\") ) Name (_UID, Zero) \
         Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, ) \
         Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, } }) }",
        "Device (PWRB) { Name (_HID, EisaId (\"PNP0C0C\") ) Name (_UID, Zero) }",
        "Device (GED0) { Name (_HID, \"ACPI0013\" ) Name (_UID, Zero) \
         Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) \
         { 0x00000017, } }) Method (_EVT, 1, NotSerialized) { Notify (PWRB, 0x80) } }",
        "Name (_S5, Package (0x01) { 0x05 })",
    ] {
        assert!(asl.contains(expected), "missing {expected}\nin {asl}");
    }
    assert!(!asl.contains("LNRO0005"));
}

#[test]
fn with_pci_the_dsdt_describes_a_host_bridge_and_its_window() {
    let mem = memory();
    let pci = PciHostBridge {
        window_start: 0xd000_0000,
        window_last: 0xdfff_ffff,
    };
    let platform = Platform {
        pci: Some(pci),
        ..platform(1, &[])
    };
    let tables = walk(&mem, write_tables(&mem, &platform).unwrap());
    let dir = TempDir::new("dsdt-pci");
    let asl = squeezed(&iasl(&dir.0, "dsdt", &tables.dsdt));
    let expected = "Device (PCI0) { Name (_HID, EisaId (\"PNP0A03\") ) Name (_UID, Zero) \
         Name (_SEG, Zero) Name (_BBN, Zero) Name (_CRS, ResourceTemplate () { \
         WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, \
         0x0000, 0x0000, 0x0001, ,, ) IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, ) \
         DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, \
         0x00000000, 0xD0000000, 0xDFFFFFFF, 0x00000000, 0x10000000, ,, , AddressRangeMemory, \
         TypeStatic) }) }";
    assert!(asl.contains(expected), "missing {expected}\nin {asl}");
    assert!(!asl.contains("LNRO0005"));
}

#[test]
fn the_s5_sleep_type_is_what_the_power_device_expects() {
    // Linux writes ((type << 2) & 0x1c) | SLP_EN (acpi_hw_extended_sleep).
    assert_eq!(S5_SLEEP_CONTROL, 0x34);
}

#[test]
fn bad_platforms_are_refused() {
    let mem = memory();
    assert!(matches!(
        write_tables(&mem, &platform(0, &VIRTIO)),
        Err(Error::CpuCount(0))
    ));
    assert!(matches!(
        write_tables(&mem, &platform(255, &VIRTIO)),
        Err(Error::CpuCount(255))
    ));
    let high = [VirtioMmio {
        base: 0x1_0000_0000,
        size: 0x1000,
        irq: 5,
    }];
    assert!(matches!(
        write_tables(&mem, &platform(1, &high)),
        Err(Error::WindowAbove4G { .. })
    ));
    let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        write_tables(&small, &platform(1, &VIRTIO)),
        Err(Error::Memory(_))
    ));
}

#[test]
fn the_largest_machine_fits_the_bios_area() {
    let many = virtio_devices(64);
    let mem = memory();
    walk(
        &mem,
        write_tables(&mem, &platform(mptable::MAX_CPUS, &many)).unwrap(),
    );
}

/// `objdump`'s reading of 16-bit code: one "mnemonic operands" per line.
fn disassemble_16bit(dir: &Path, code: &[u8]) -> Vec<String> {
    let path = dir.join("code.bin");
    std::fs::write(&path, code).unwrap();
    let out = Command::new("objdump")
        .args(["-D", "-b", "binary", "-m", "i8086", "-M", "intel"])
        .arg(&path)
        .output()
        .expect("objdump (Debian package binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.splitn(3, '\t').nth(2))
        .map(|i| i.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn the_reset_vector_writes_the_reset_register_and_halts() {
    let mem = memory();
    write_tables(&mem, &platform(1, &VIRTIO)).unwrap();
    // Everything from the reset vector to 1 MiB: the CPU runs it in real
    // mode from F000:FFF0.
    let code = read(&mem, RESET_VECTOR.0, 16);
    let dir = TempDir::new("reset");
    let listing = disassemble_16bit(&dir.0, &code[..10]);
    assert_eq!(
        listing,
        [
            "cli",
            "mov dx,0x602",
            "mov al,0x1",
            "out dx,al",
            "hlt",
            "jmp 0x7",
        ],
        "{listing:?}"
    );
    assert_eq!(RESET_VECTOR.0, 0xf_fff0);
}

#[test]
fn the_tables_stop_short_of_the_reset_vector() {
    // Many virtio devices make a large DSDT; it still ends below.
    let many = virtio_devices(18);
    let mem = memory();
    write_tables(&mem, &platform(32, &many)).unwrap();
    assert_eq!(read(&mem, RESET_VECTOR.0, 1), [0xfa]);
}
