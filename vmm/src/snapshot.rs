//! Snapshots: a paused VM written to two files, and read back.
//!
//! The state file holds everything but guest RAM: each vCPU's registers,
//! FPU/XSAVE, MSRs (the TSC among them), LAPIC and pending events, the
//! VM's interrupt controllers, PIT and clock, every device, and the
//! machine's description (CPUs, memory, disks, network cards, ...). It is
//! a 24-byte header (magic `MOATSNAP`, format version, CRC-32 and length of
//! the rest) followed by JSON. The memory file is guest RAM as the guest
//! sees it, region after region, with pages of zeros left as holes.
//!
//! A restore reads and checks the state file whole before it touches KVM,
//! and maps the memory file privately: pages are read when the guest
//! first touches them, and its writes never reach the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use moat_boot::{layout, GuestMemoryMmap};
use moat_devices::legacy::SerialSnapshot;
use moat_devices::virtio::mmio::{MmioTransport, TransportState};
use serde::{Deserialize, Serialize};
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{
    DiskConfig, ForwardConfig, IoEngine, NetBackendConfig, NetConfig, RngConfig, VmConfig,
    VsockConfig,
};

/// The state file's first bytes.
pub const MAGIC: [u8; 8] = *b"MOATSNAP";
/// The state format this moat writes and reads.
pub const VERSION: u32 = 1;
/// Magic, version, CRC-32 of the payload, payload length.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// The largest state file moat reads (a 255-vCPU VM's is a few MiB).
const MAX_STATE: u64 = 64 << 20;
/// Pages of zeros are holes in the memory file.
const PAGE: usize = 4096;

/// A snapshot problem, as one line naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SnapshotError(pub String);

fn fail<T>(path: &Path, reason: impl std::fmt::Display) -> Result<T, SnapshotError> {
    Err(SnapshotError(format!("{}: {reason}", path.display())))
}

/// One vCPU, as KVM describes it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Every MSR KVM lists that could be read (the TSC's among them).
    pub msrs: Vec<kvm_msr_entry>,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency, if KVM told.
    pub tsc_khz: Option<u32>,
}

/// A disk of the snapshot's machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Where it was.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Its serial number.
    pub id: Option<String>,
    /// Its size in bytes, which the guest knows: a restored disk must have it.
    pub size: u64,
    /// Whether its requests went through io_uring (snapshots from before
    /// the asynchronous engine have no such field: synchronous).
    #[serde(default)]
    pub io_async: bool,
}

/// A network card of the snapshot's machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    /// Its TAP, if it was opened by name.
    pub tap: Option<String>,
    /// The MAC address the guest knows.
    pub mac: [u8; 6],
    /// Offloads offered.
    pub offload: bool,
    /// Its id (the API's iface_id).
    pub id: Option<String>,
}

/// What the snapshot's VM was built from: enough to build its twin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The kernel it booted (for the record; a restore loads none).
    pub kernel: PathBuf,
    /// Its command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Disks, in order.
    pub disks: Vec<DiskRecord>,
    /// Network cards, in order.
    pub nets: Vec<NetRecord>,
    /// vsock: the guest's CID and the host socket.
    pub vsock: Option<(u64, PathBuf)>,
    /// vsock forwards: host socket, guest port.
    pub forwards: Vec<(PathBuf, u32)>,
    /// The entropy device and its rate limit, if it had one.
    pub rng: Option<Option<u64>>,
    /// Nested virtualization offered.
    pub nested: bool,
    /// How long a SIGTERM waits for the guest, in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// The virtio transport (snapshots from before PCI: virtio-mmio).
    #[serde(default)]
    pub transport: crate::config::Transport,
}

/// The whole VM but its RAM.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// What it was built from.
    pub machine: Machine,
    /// Each vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The two 8259s and the IOAPIC, in KVM's chip order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Each virtio device's transport, in the guest's order.
    pub transports: Vec<TransportState>,
    /// On virtio-pci, each device's PCI function, in the same order.
    #[serde(default)]
    pub pci: Vec<moat_devices::virtio::pci::PciState>,
}

/// The record of `config`'s machine; `disk_sizes` and `macs` are what the
/// guest was told.
pub fn machine(config: &VmConfig, disk_sizes: &[u64], macs: &[[u8; 6]]) -> Machine {
    Machine {
        kernel: config.kernel.clone(),
        cmdline: config.cmdline.clone(),
        cpus: config.cpus,
        memory: config.memory,
        disks: config
            .disks
            .iter()
            .zip(disk_sizes)
            .map(|(d, size)| DiskRecord {
                path: d.path.clone(),
                read_only: d.read_only,
                id: d.id.clone(),
                size: *size,
                io_async: d.io_engine == IoEngine::Async,
            })
            .collect(),
        nets: config
            .nets
            .iter()
            .zip(macs)
            .map(|(n, mac)| NetRecord {
                tap: match &n.backend {
                    NetBackendConfig::Tap(name) => Some(name.clone()),
                    NetBackendConfig::Fd(_) => None,
                },
                mac: *mac,
                offload: n.offload,
                id: n.id.clone(),
            })
            .collect(),
        vsock: config.vsock.as_ref().map(|v| (v.cid, v.socket.clone())),
        forwards: config
            .forwards
            .iter()
            .map(|f| (f.host.clone(), f.port))
            .collect(),
        rng: match config.rng {
            RngConfig::Off => None,
            RngConfig::On(rate) => Some(rate),
        },
        nested: config.nested,
        shutdown_timeout_ms: config.shutdown_timeout.as_millis() as u64,
        transport: config.transport,
    }
}

/// What a restore may change: the host ends of the devices, so that two
/// clones of one snapshot each have their own disk copies, TAPs and
/// sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Disk paths by position (`None`: the snapshot's).
    pub disks: Vec<Option<PathBuf>>,
    /// TAP names by position.
    pub taps: Vec<Option<String>>,
    /// TAP names by the card's id (the API's `network_overrides`).
    pub taps_by_id: Vec<(String, String)>,
    /// The vsock device's host socket.
    pub vsock_socket: Option<PathBuf>,
}

/// The config of the snapshot's machine's twin: `base` gives what a
/// snapshot does not decide (the KVM device, seccomp, logging), `machine`
/// the rest, `overrides` the host ends.
pub fn restored_config(
    base: &VmConfig,
    machine: &Machine,
    overrides: &Overrides,
) -> Result<VmConfig, SnapshotError> {
    let too_many = |what: &str, given: usize, has: usize| {
        Err(SnapshotError(format!(
            "{given} {what} given for a snapshot whose machine has {has}"
        )))
    };
    if overrides.disks.len() > machine.disks.len() {
        return too_many("disks", overrides.disks.len(), machine.disks.len());
    }
    if overrides.taps.len() > machine.nets.len() {
        return too_many("network cards", overrides.taps.len(), machine.nets.len());
    }
    for (id, _) in &overrides.taps_by_id {
        if !machine.nets.iter().any(|n| n.id.as_deref() == Some(id)) {
            return Err(SnapshotError(format!(
                "the snapshot's machine has no network interface {id}"
            )));
        }
    }
    let disks = machine
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskConfig {
            path: overrides
                .disks
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| d.path.clone()),
            read_only: d.read_only,
            id: d.id.clone(),
            io_engine: if d.io_async {
                IoEngine::Async
            } else {
                IoEngine::Sync
            },
        })
        .collect();
    let nets = machine
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let by_id = overrides
                .taps_by_id
                .iter()
                .find(|(id, _)| n.id.as_deref() == Some(id))
                .map(|(_, tap)| tap.clone());
            let tap = overrides
                .taps
                .get(i)
                .cloned()
                .flatten()
                .or(by_id)
                .or_else(|| n.tap.clone())
                .ok_or_else(|| {
                    SnapshotError(format!(
                        "network card {} was given to moat as a descriptor; name its TAP for the restore",
                        i + 1
                    ))
                })?;
            Ok(NetConfig {
                backend: NetBackendConfig::Tap(tap),
                mac: Some(n.mac),
                offload: n.offload,
                id: n.id.clone(),
            })
        })
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    Ok(VmConfig {
        kernel: machine.kernel.clone(),
        initramfs: None,
        cmdline: machine.cmdline.clone(),
        cpus: machine.cpus,
        memory: machine.memory,
        disks,
        nets,
        vsock: machine.vsock.as_ref().map(|(cid, socket)| VsockConfig {
            cid: *cid,
            socket: overrides
                .vsock_socket
                .clone()
                .unwrap_or_else(|| socket.clone()),
        }),
        forwards: machine
            .forwards
            .iter()
            .map(|(host, port)| ForwardConfig {
                host: host.clone(),
                port: *port,
            })
            .collect(),
        rng: match machine.rng {
            None => RngConfig::Off,
            Some(rate) => RngConfig::On(rate),
        },
        nested: machine.nested,
        transport: machine.transport,
        ..base.clone()
    })
}

/// Writes `state` to `path`.
pub fn write_state(path: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(state).or_else(|e| fail(path, e))?;
    std::fs::write(path, frame(&payload)).or_else(|e| fail(path, format!("cannot write it: {e}")))
}

/// A state file's bytes: the header (this format's version, the
/// payload's checksum and length), then `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Reads and checks the state file at `path`.
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    let file = File::open(path).or_else(|e| fail(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE + 1)
        .read_to_end(&mut bytes)
        .or_else(|e| fail(path, e))?;
    parse_state(&bytes).or_else(|reason| fail(path, reason))
}

/// Checks a state file's bytes and parses them.
pub fn parse_state(bytes: &[u8]) -> Result<VmState, String> {
    if bytes.len() as u64 > MAX_STATE {
        return Err(format!(
            "larger than the {} MiB a state file may be",
            MAX_STATE >> 20
        ));
    }
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err("not a moat snapshot state file".into());
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let version = word(8);
    if version != VERSION {
        return Err(format!(
            "snapshot format version {version}; this moat reads version {VERSION}"
        ));
    }
    let crc = word(12);
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "truncated or padded: the header says {len} bytes of state, the file has {}",
            payload.len()
        ));
    }
    if crc32fast::hash(payload) != crc {
        return Err("corrupt: the checksum does not match".into());
    }
    let state: VmState =
        serde_json::from_slice(payload).map_err(|e| format!("corrupt state: {e}"))?;
    check_consistent(&state)?;
    Ok(state)
}

/// What a well-formed state must agree with itself on.
fn check_consistent(state: &VmState) -> Result<(), String> {
    let m = &state.machine;
    if m.cpus == 0 || state.vcpus.len() != usize::from(m.cpus) {
        return Err(format!(
            "the machine has {} vCPUs and the state {}",
            m.cpus,
            state.vcpus.len()
        ));
    }
    if m.memory == 0 || !m.memory.is_multiple_of(PAGE as u64) {
        return Err(format!(
            "the machine's memory size {} is out of range",
            m.memory
        ));
    }
    if state.irqchips.len() != 3 {
        return Err(format!(
            "{} interrupt controllers, not 3",
            state.irqchips.len()
        ));
    }
    let devices = m.disks.len()
        + m.nets.len()
        + usize::from(m.vsock.is_some())
        + usize::from(m.rng.is_some());
    if state.transports.len() != devices {
        return Err(format!(
            "the machine has {devices} virtio devices and the state {}",
            state.transports.len()
        ));
    }
    Ok(())
}

/// Writes guest RAM to `path`, region after region; pages of zeros stay
/// holes. Returns the bytes written (the rest are holes).
pub fn write_memory(path: &Path, memory: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let mut file = File::create(path).or_else(|e| fail(path, format!("cannot create it: {e}")))?;
    let mut page = [0u8; PAGE];
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in memory.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(PAGE as u64) as usize;
            let slice = region
                .get_slice(vm_memory::MemoryRegionAddress(at), n)
                .or_else(|e| fail(path, e))?;
            slice.copy_to(&mut page[..n]);
            if page[..n].iter().any(|b| *b != 0) {
                file.seek(SeekFrom::Start(offset + at))
                    .and_then(|_| file.write_all(&page[..n]))
                    .or_else(|e| fail(path, format!("cannot write it: {e}")))?;
                written += n as u64;
            }
            at += n as u64;
        }
        offset += len;
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .or_else(|e| fail(path, format!("cannot write it: {e}")))?;
    Ok(written)
}

/// Maps the memory file at `path` as the guest RAM of a `size`-byte
/// machine: privately, so pages are read on first touch and the guest's
/// writes stay in moat.
pub fn map_memory(path: &Path, size: u64) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = File::open(path).or_else(|e| fail(path, e))?;
    let meta = file.metadata().or_else(|e| fail(path, e))?;
    if meta.is_dir() {
        return fail(path, "it is a directory");
    }
    if meta.len() != size {
        return fail(
            path,
            format!(
                "the memory file has {} bytes; the snapshot's guest has {size}",
                meta.len()
            ),
        );
    }
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in layout::ram_regions(size) {
        let mapping = vm_memory::mmap::MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .or_else(|e| fail(path, format!("cannot map it: {e}")))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| SnapshotError(format!("{}: bad region", path.display())))?,
        );
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).or_else(|e| fail(path, e))
}

/// The disks the restored VM opened must have the sizes the guest knows.
pub fn check_disks(
    transports: &[std::sync::Arc<std::sync::Mutex<MmioTransport>>],
    machine: &Machine,
) -> Result<(), SnapshotError> {
    let mut disks = machine.disks.iter();
    for transport in transports {
        let mut transport = transport.lock().unwrap_or_else(|e| e.into_inner());
        let device = transport.device_mut();
        if device.device_type() != virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK {
            continue;
        }
        let Some(record) = disks.next() else {
            break;
        };
        let mut capacity = [0u8; 8];
        device.read_config(0, &mut capacity);
        let size = u64::from_le_bytes(capacity) * 512;
        if size != record.size {
            return Err(SnapshotError(format!(
                "disk {} has {size} bytes; the snapshot's guest knows it as {} bytes",
                record.path.display(),
                record.size
            )));
        }
    }
    Ok(())
}

/// CPUID feature bits KVM sets in a vCPU's CPUID at run time (OSXSAVE,
/// OSPKE, the APIC's enable), or moat adds (TSC deadline, hypervisor, and
/// HTT for a guest of more than one vCPU: topology, not a feature): not
/// necessarily in KVM's supported list, and not a host feature.
const DYNAMIC_BITS: &[(u32, u32, char, u32)] = &[
    (1, 0, 'c', 1 << 27 | 1 << 24 | 1 << 31),
    (1, 0, 'd', 1 << 9 | 1 << 28),
    (7, 0, 'c', 1 << 4),
];

/// The feature words a restore compares: (leaf, index, register).
const FEATURE_WORDS: &[(u32, u32, char)] = &[
    (1, 0, 'c'),
    (1, 0, 'd'),
    (7, 0, 'b'),
    (7, 0, 'c'),
    (7, 0, 'd'),
    (0xd, 1, 'a'),
    (0x8000_0001, 0, 'c'),
    (0x8000_0001, 0, 'd'),
];

fn register(entry: &kvm_cpuid_entry2, reg: char) -> u32 {
    match reg {
        'a' => entry.eax,
        'b' => entry.ebx,
        'c' => entry.ecx,
        _ => entry.edx,
    }
}

/// Feature bits the guest's CPUID (vCPU 0's) has and `supported` lacks:
/// (leaf, index, register, bits).
pub fn missing_features(
    guest: &[kvm_cpuid_entry2],
    supported: &[kvm_cpuid_entry2],
) -> Vec<(u32, u32, char, u32)> {
    let find = |entries: &[kvm_cpuid_entry2], leaf: u32, index: u32| {
        entries
            .iter()
            .find(|e| e.function == leaf && e.index == index)
            .copied()
    };
    let mut missing = Vec::new();
    for &(leaf, index, reg) in FEATURE_WORDS {
        let Some(wanted) = find(guest, leaf, index).map(|e| register(&e, reg)) else {
            continue;
        };
        let have = find(supported, leaf, index).map_or(0, |e| register(&e, reg));
        let dynamic = DYNAMIC_BITS
            .iter()
            .filter(|d| (d.0, d.1, d.2) == (leaf, index, reg))
            .fold(0, |bits, d| bits | d.3);
        let lacking = wanted & !have & !dynamic;
        if lacking != 0 {
            missing.push((leaf, index, reg, lacking));
        }
    }
    missing
}

/// Whether this host can run the snapshot's guest: every CPU feature the
/// guest was shown must be one KVM offers here.
pub fn check_host_cpuid(kvm: &kvm_ioctls::Kvm, state: &VmState) -> Result<(), SnapshotError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| SnapshotError(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let Some(vcpu) = state.vcpus.first() else {
        return Ok(());
    };
    let missing = missing_features(&vcpu.cpuid, supported.as_slice());
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(leaf, index, reg, bits)| format!("leaf {leaf:#x}.{index} e{reg}x bits {bits:#x}"))
        .collect();
    Err(SnapshotError(format!(
        "this host's CPU lacks features the snapshot's guest uses: {}",
        list.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn features_the_host_lacks_are_named_and_run_time_bits_are_not() {
        let host = [
            cpuid(1, 0, [0, 0, 0x0000_00ff, 0xff]),
            cpuid(7, 0, [0, 0b1010, 0, 0]),
        ];
        // OSXSAVE, the hypervisor bit and HTT (more than one vCPU) are
        // KVM's and moat's, not the host's.
        let guest = [
            cpuid(1, 0, [0, 0, 0x8800_000f, 0x1000_020f]),
            cpuid(7, 0, [0, 0b0010, 0, 0]),
        ];
        assert!(missing_features(&guest, &host).is_empty());
        let guest = [
            cpuid(1, 0, [0, 0, 0x100, 0]),
            cpuid(7, 0, [0, 0b0111, 0, 0]),
        ];
        assert_eq!(
            missing_features(&guest, &host),
            vec![(1, 0, 'c', 0x100), (7, 0, 'b', 0b0101)]
        );
    }

    fn header(version: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = frame(payload);
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        bytes
    }

    fn error_of(bytes: &[u8]) -> String {
        match parse_state(bytes) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_state_files_get_a_reason() {
        assert!(error_of(b"").contains("not a moat snapshot"));
        assert!(error_of(b"ELF\x7f and more bytes than a header").contains("not a moat"));
        let good = header(VERSION, b"{}");
        assert!(error_of(&good[..good.len() - 1]).contains("truncated"));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() = b']';
        assert!(error_of(&flipped).contains("checksum"));
        assert!(error_of(&header(7, b"{}")).contains("version 7"));
        assert!(error_of(&good).contains("corrupt state"));
        let mut huge = header(VERSION, b"{}");
        huge.resize(MAX_STATE as usize + 1, 0);
        assert!(error_of(&huge).contains("larger than"));
    }

    fn machine_with_devices() -> Machine {
        Machine {
            kernel: "/k".into(),
            cmdline: "console=ttyS0".into(),
            cpus: 2,
            memory: 128 << 20,
            disks: vec![DiskRecord {
                path: "/a.img".into(),
                read_only: true,
                id: Some("root".into()),
                size: 1 << 20,
                io_async: true,
            }],
            nets: vec![NetRecord {
                tap: Some("tap0".into()),
                mac: [6, 0, 0, 0, 0, 1],
                offload: true,
                id: Some("eth0".into()),
            }],
            vsock: Some((3, "/v.sock".into())),
            forwards: vec![],
            rng: Some(None),
            nested: false,
            shutdown_timeout_ms: 10_000,
            transport: crate::config::Transport::Pci,
        }
    }

    #[test]
    fn a_machine_recorded_before_pci_restores_on_virtio_mmio() {
        let mut m = serde_json::to_value(machine_with_devices()).unwrap();
        m.as_object_mut().unwrap().remove("transport");
        let m: Machine = serde_json::from_value(m).unwrap();
        assert_eq!(m.transport, crate::config::Transport::Mmio);
    }

    #[test]
    fn a_disk_recorded_before_the_async_engine_restores_synchronous() {
        let old = r#"{"path": "/a.img", "read_only": false, "id": null, "size": 512}"#;
        let disk: DiskRecord = serde_json::from_str(old).unwrap();
        assert!(!disk.io_async);
    }

    #[test]
    fn a_restore_takes_the_machine_and_the_given_host_ends() {
        let base = VmConfig::for_restore("/dev/kvm".into(), false, true);
        let m = machine_with_devices();
        let same = restored_config(&base, &m, &Overrides::default()).unwrap();
        assert_eq!((same.cpus, same.memory), (2, 128 << 20));
        assert_eq!(same.disks[0].path, PathBuf::from("/a.img"));
        assert!(same.disks[0].read_only);
        assert_eq!(same.disks[0].io_engine, IoEngine::Async);
        assert_eq!(same.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        assert!(same.seccomp);
        assert_eq!(same.transport, crate::config::Transport::Pci);

        let clone = Overrides {
            disks: vec![Some("/b.img".into())],
            taps: vec![Some("tap9".into())],
            vsock_socket: Some("/w.sock".into()),
            ..Default::default()
        };
        let c = restored_config(&base, &m, &clone).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/b.img"));
        assert!(c.disks[0].read_only, "the guest's read-only disk stays so");
        assert_eq!(c.nets[0].backend, NetBackendConfig::Tap("tap9".into()));
        assert_eq!(c.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        assert_eq!(c.vsock.unwrap().socket, PathBuf::from("/w.sock"));

        let by_id = Overrides {
            taps_by_id: vec![("eth0".into(), "tap7".into())],
            ..Default::default()
        };
        let c = restored_config(&base, &m, &by_id).unwrap();
        assert_eq!(c.nets[0].backend, NetBackendConfig::Tap("tap7".into()));

        let too_many = Overrides {
            disks: vec![None, Some("/c.img".into())],
            ..Default::default()
        };
        assert!(restored_config(&base, &m, &too_many)
            .unwrap_err()
            .0
            .contains("2 disks"));
        let no_such = Overrides {
            taps_by_id: vec![("eth1".into(), "tap7".into())],
            ..Default::default()
        };
        assert!(restored_config(&base, &m, &no_such)
            .unwrap_err()
            .0
            .contains("eth1"));
    }

    #[test]
    fn guest_memory_round_trips_through_a_file_with_holes() {
        let dir = std::env::temp_dir().join(format!("moat-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let size = 4 << 20;
        let memory = GuestMemoryMmap::from_ranges(&layout::ram_regions(size)).unwrap();
        use vm_memory::Bytes;
        memory
            .write_slice(b"first page", vm_memory::GuestAddress(0))
            .unwrap();
        memory
            .write_slice(b"last page", vm_memory::GuestAddress(size - 9))
            .unwrap();
        let written = write_memory(&path, &memory).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let mapped = map_memory(&path, size).unwrap();
        let mut buf = [0u8; 10];
        mapped
            .read_slice(&mut buf, vm_memory::GuestAddress(0))
            .unwrap();
        assert_eq!(&buf, b"first page");
        // Private: the guest's writes stay out of the file.
        mapped
            .write_slice(b"changed", vm_memory::GuestAddress(0))
            .unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..10], b"first page");
        assert!(map_memory(&path, size * 2).unwrap_err().0.contains("bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
