//! The state every vCPU starts with: CPUID, MSRs, registers, FPU and LAPIC.
//!
//! All functions take KVM's data structures and return modified copies, so
//! they can be tested without /dev/kvm; the VMM does the ioctls.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId,
};
use vmm_sys_util::fam::Error as FamError;

use crate::gdt::{self, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64 {
        /// Guest address of the 64-bit entry.
        entry: u64,
        /// Guest address of `struct boot_params`.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Guest address of the PVH entry (from the ELF note).
        entry: u64,
        /// Guest address of `struct hvm_start_info`.
        start_info: u64,
    },
}

// CPUID bits (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
/// Leaf 1 ECX: Intel VMX.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Thermal and power management.
const LEAF_POWER: u32 = 0x6;
/// Leaf 6 EAX: the APIC timer keeps running in deep C-states.
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// Architectural performance monitoring.
const LEAF_PMU: u32 = 0xa;
/// Extended features (AMD and Intel).
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Leaf 0x80000001 ECX: AMD SVM.
const LEAF_EXT_ECX_SVM: u32 = 1 << 2;
/// AMD SVM revision and features.
const LEAF_SVM_FEATURES: u32 = 0x8000_000a;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Smallest shift such that `1 << shift >= count`.
fn id_shift(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Rewrites the CPUID entries KVM supports into the ones vCPU `index` of
/// `count` should see: one socket of `count` single-threaded cores, APIC ID
/// equal to the vCPU index, and the hypervisor bit set.
pub fn configure_cpuid(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors
                // per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26] cores per package - 1; EAX[25:14] logical
                // processors sharing this cache - 1 (only the L3 is shared).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                // Six bits: above 64 vCPUs the field says 64, not count
                // modulo 64.
                let cores = (count - 1).min(0x3f);
                entry.eax = (entry.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_shift(count);
                        entry.ebx = count;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS => {
                // ECX[15:12] APIC ID size, ECX[7:0] cores - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | (id_shift(count) << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = apic_id;
                entry.ebx = (entry.ebx & !0xffff) | apic_id;
                entry.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
}

/// moat's CPUID policy, on top of what KVM supports (the rest passes
/// through as KVM reports it, with the topology leaves rewritten by
/// [`configure_cpuid`]):
///
/// - nested virtualization (Intel VMX, AMD SVM and its leaf 0x8000000A) is
///   hidden unless `nested`: a guest hypervisor is attack surface in the
///   host's KVM most guests never need;
/// - the architectural PMU (leaf 0xA) is hidden: performance counters leak
///   timing about the host and moat does not set up their MSRs;
/// - of thermal and power management (leaf 6) only ARAT stays: the guest
///   controls no power states.
pub fn apply_cpuid_policy(entries: &mut [kvm_cpuid_entry2], nested: bool) {
    for entry in entries.iter_mut() {
        match entry.function {
            1 if !nested => entry.ecx &= !LEAF1_ECX_VMX,
            LEAF_EXT_FEATURES if !nested => entry.ecx &= !LEAF_EXT_ECX_SVM,
            LEAF_SVM_FEATURES if !nested => {
                (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0);
            }
            LEAF_PMU => (entry.eax, entry.ebx, entry.ecx, entry.edx) = (0, 0, 0, 0),
            LEAF_POWER => {
                entry.eax &= LEAF6_EAX_ARAT;
                (entry.ebx, entry.ecx, entry.edx) = (0, 0, 0);
            }
            _ => {}
        }
    }
}

/// Tells the guest its LAPIC timer has TSC-deadline mode. KVM emulates it
/// in the in-kernel LAPIC but leaves the bit out of its supported CPUID
/// (the VMM checks KVM_CAP_TSC_DEADLINE_TIMER). Without it Linux
/// calibrates the LAPIC timer against the PIT at boot, which costs
/// about a tenth of a second.
pub fn set_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries.iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
    }
}

/// The first of the three leaves (0x80000002-0x80000004) that hold the
/// 48-byte processor brand string.
pub const LEAF_BRAND_STRING: u32 = 0x8000_0002;

/// Gives the guest `brand`: the registers (eax, ebx, ecx, edx) of the three
/// brand-string leaves, as the host's CPUID instruction returns them.
/// KVM's supported CPUID leaves these leaves zero (or out), and the guest's
/// /proc/cpuinfo then has no model name.
pub fn set_brand_string(cpuid: &mut CpuId, brand: &[[u32; 4]; 3]) -> Result<(), FamError> {
    for (leaf, regs) in (LEAF_BRAND_STRING..).zip(brand) {
        let [eax, ebx, ecx, edx] = *regs;
        match cpuid.as_mut_slice().iter_mut().find(|e| e.function == leaf) {
            Some(entry) => (entry.eax, entry.ebx, entry.ecx, entry.edx) = (eax, ebx, ecx, edx),
            None => cpuid.push(kvm_cpuid_entry2 {
                function: leaf,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            })?,
        }
    }
    Ok(())
}

// MSR numbers (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSR values at boot: syscall MSRs cleared, fast strings on, and MTRRs
/// enabled with write-back as the default type (otherwise Linux maps all
/// memory uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        EntryPoint::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The GDT a given entry point needs in guest memory.
pub fn boot_gdt(entry: EntryPoint) -> &'static [u64; 4] {
    match entry {
        EntryPoint::Linux64 { .. } => &gdt::GDT_64BIT,
        EntryPoint::Pvh { .. } => &gdt::GDT_32BIT,
    }
}

/// Special registers for the boot vCPU, starting from KVM's reset state
/// `base` (which carries the APIC base and other values to keep).
/// `page_table` is CR3 for the 64-bit entry.
pub fn boot_sregs(base: &kvm_sregs, entry: EntryPoint, page_table: u64) -> kvm_sregs {
    let mut sregs = *base;
    let table = boot_gdt(entry);
    let code = gdt::segment_from_entry(table, CODE_INDEX);
    let data = gdt::segment_from_entry(table, DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment_from_entry(table, TSS_INDEX);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = 7;
    match entry {
        EntryPoint::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = page_table;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// FPU state at boot: x87 control word and MXCSR at their reset defaults
/// (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = b as _;
    }
}

/// Wires LINT0 as ExtINT (the 8259 PIC) and LINT1 as NMI, as a PC BIOS
/// would; Linux relies on this for the legacy timer path and NMIs.
pub fn configure_lint(state: &kvm_lapic_state) -> kvm_lapic_state {
    let mut out = *state;
    let lvt0 = lapic_reg(&out, APIC_LVT0);
    set_lapic_reg(
        &mut out,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&out, APIC_LVT1);
    set_lapic_reg(&mut out, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        let mut leaf1 = entry(1, 0);
        leaf1.ecx = LEAF1_ECX_VMX | 1;
        let mut ext = entry(LEAF_EXT_FEATURES, 0);
        ext.ecx = LEAF_EXT_ECX_SVM | 1;
        let mut svm = entry(LEAF_SVM_FEATURES, 0);
        svm.eax = 1;
        svm.edx = 0xff;
        let mut pmu = entry(LEAF_PMU, 0);
        pmu.eax = 0x0703_0805;
        let mut power = entry(LEAF_POWER, 0);
        power.eax = LEAF6_EAX_ARAT | 0b11;
        power.ecx = 0b1001;
        vec![leaf1, ext, svm, pmu, power]
    }

    #[test]
    fn nested_virtualization_pmu_and_power_leaves_are_hidden_by_default() {
        let mut entries = host_like();
        apply_cpuid_policy(&mut entries, false);
        let get = |f| entries.iter().find(|e| e.function == f).unwrap();
        assert_eq!(get(1).ecx & LEAF1_ECX_VMX, 0, "VMX");
        assert_eq!(get(1).ecx & 1, 1, "other leaf 1 bits stay");
        assert_eq!(get(LEAF_EXT_FEATURES).ecx & LEAF_EXT_ECX_SVM, 0, "SVM");
        assert_eq!(get(LEAF_EXT_FEATURES).ecx & 1, 1);
        let svm = get(LEAF_SVM_FEATURES);
        assert_eq!((svm.eax, svm.ebx, svm.ecx, svm.edx), (0, 0, 0, 0));
        let pmu = get(LEAF_PMU);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        let power = get(LEAF_POWER);
        assert_eq!((power.eax, power.ecx), (LEAF6_EAX_ARAT, 0), "only ARAT");
    }

    #[test]
    fn nested_keeps_vmx_and_svm() {
        let mut entries = host_like();
        apply_cpuid_policy(&mut entries, true);
        let get = |f| entries.iter().find(|e| e.function == f).unwrap();
        assert_ne!(get(1).ecx & LEAF1_ECX_VMX, 0);
        assert_ne!(get(LEAF_EXT_FEATURES).ecx & LEAF_EXT_ECX_SVM, 0);
        assert_eq!(get(LEAF_SVM_FEATURES).edx, 0xff);
        assert_eq!(get(LEAF_PMU).eax, 0, "the PMU stays hidden");
    }

    #[test]
    fn leaf4_core_count_saturates_instead_of_overflowing() {
        for (count, cores) in [(1u8, 1u32), (64, 64), (65, 64), (254, 64)] {
            let mut entries = [entry(LEAF_CACHE_PARAMS, 0)];
            entries[0].eax = 3 << 5; // an L3 cache
            configure_cpuid(&mut entries, 0, count);
            assert_eq!((entries[0].eax >> 26) + 1, cores, "{count} vCPUs");
            assert_eq!((entries[0].eax >> 5) & 7, 3, "the cache level stays");
        }
    }

    #[test]
    fn leaf1_reports_apic_id_count_and_hypervisor() {
        let mut entries = [kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0000_0800,
            edx: LEAF1_EDX_HTT,
            ..Default::default()
        }];
        configure_cpuid(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & LEAF1_EDX_HTT, 0);
        configure_cpuid(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn the_brand_string_replaces_or_adds_its_three_leaves() {
        let brand = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]];
        let mut cpuid = CpuId::from_entries(&[entry(LEAF_BRAND_STRING, 0), entry(0xb, 0)]).unwrap();
        set_brand_string(&mut cpuid, &brand).unwrap();
        let regs = |leaf: u32| {
            let e = cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == leaf)
                .unwrap_or_else(|| panic!("no leaf {leaf:#x}"));
            [e.eax, e.ebx, e.ecx, e.edx]
        };
        assert_eq!(regs(LEAF_BRAND_STRING), brand[0]);
        assert_eq!(regs(LEAF_BRAND_STRING + 1), brand[1]);
        assert_eq!(regs(LEAF_BRAND_STRING + 2), brand[2]);
        assert_eq!(cpuid.as_slice().len(), 4);
    }

    #[test]
    fn tsc_deadline_sets_only_its_bit_in_leaf_1() {
        let mut entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: LEAF1_ECX_HYPERVISOR,
                ..Default::default()
            },
            entry(0xb, 0),
        ];
        set_tsc_deadline(&mut entries);
        assert_eq!(
            entries[0].ecx,
            LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE
        );
        assert_eq!(entries[1].ecx, entry(0xb, 0).ecx);
    }

    #[test]
    fn extended_topology_describes_one_socket_of_n_cores() {
        let mut entries = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        configure_cpuid(&mut entries, 5, 6);
        assert_eq!(
            (entries[0].eax, entries[0].ebx, entries[0].ecx >> 8),
            (0, 1, 1)
        );
        assert_eq!(
            (entries[1].eax, entries[1].ebx, entries[1].ecx >> 8),
            (3, 6, 2)
        );
        assert_eq!(entries[2].ecx, 2, "level type 0 ends the enumeration");
        assert!(
            entries.iter().all(|e| e.edx == 5),
            "x2APIC ID in every subleaf"
        );
    }

    #[test]
    fn cache_leaf_counts_cores_and_l3_sharing() {
        let l1 = entry(4, 0);
        let l3 = kvm_cpuid_entry2 {
            eax: 3 << 5,
            ..entry(4, 3)
        };
        let mut entries = [l1, l3];
        configure_cpuid(&mut entries, 0, 2);
        assert_eq!(entries[0].eax >> 26, 1);
        assert_eq!((entries[0].eax >> 14) & 0xfff, 0);
        assert_eq!((entries[1].eax >> 14) & 0xfff, 1);
        assert_eq!((entries[1].eax >> 5) & 7, 3, "cache level kept");
    }

    #[test]
    fn amd_leaves_count_cores() {
        let mut entries = [entry(LEAF_AMD_SIZE_IDS, 0), entry(LEAF_AMD_EXT_APIC_ID, 0)];
        configure_cpuid(&mut entries, 2, 3);
        assert_eq!(entries[0].ecx & 0xff, 2);
        assert_eq!((entries[0].ecx >> 12) & 0xf, 2);
        assert_eq!(entries[1].eax, 2);
    }

    #[test]
    fn id_shift_rounds_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_shift), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn msrs_enable_write_back_mtrrs() {
        let msrs = boot_msrs();
        let mtrr = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        let misc = msrs
            .iter()
            .find(|m| m.index == MSR_IA32_MISC_ENABLE)
            .unwrap();
        assert_eq!(misc.data & 1, 1);
    }

    #[test]
    fn linux64_registers_follow_the_boot_protocol() {
        let e = EntryPoint::Linux64 {
            entry: 0x100_0000,
            zero_page: 0x7000,
        };
        let regs = boot_regs(e);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp, regs.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let sregs = boot_sregs(&kvm_sregs::default(), e, 0x9000);
        assert_eq!(sregs.cr3, 0x9000);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
    }

    #[test]
    fn pvh_registers_are_flat_protected_mode_without_paging() {
        let e = EntryPoint::Pvh {
            entry: 0x100_0abc,
            start_info: 0x6000,
        };
        let regs = boot_regs(e);
        assert_eq!((regs.rip, regs.rbx), (0x100_0abc, 0x6000));
        let sregs = boot_sregs(&kvm_sregs::default(), e, 0x9000);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
    }

    #[test]
    fn sregs_keep_the_apic_base_from_kvm() {
        let base = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let e = EntryPoint::Pvh {
            entry: 0,
            start_info: 0,
        };
        assert_eq!(boot_sregs(&base, e, 0).apic_base, 0xfee0_0900);
    }

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lapic_reg(&mut state, APIC_LVT1, 0x0001_0700);
        let out = configure_lint(&state);
        assert_eq!(lapic_reg(&out, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&out, APIC_LVT1), 0x0001_0400);
    }

    #[test]
    fn fpu_defaults_mask_all_exceptions() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }
}
