//! moat's errors, and which exit status each maps to.

use std::path::PathBuf;

use crate::config::ConfigError;

/// A KVM ioctl, named for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmOp {
    /// KVM_CREATE_VM.
    CreateVm,
    /// KVM_SET_TSS_ADDR / KVM_SET_IDENTITY_MAP_ADDR.
    SetTss,
    /// KVM_CREATE_IRQCHIP.
    CreateIrqchip,
    /// KVM_CREATE_PIT2.
    CreatePit,
    /// KVM_SET_GSI_ROUTING.
    GsiRouting,
    /// KVM_SET_USER_MEMORY_REGION.
    SetMemory,
    /// KVM_IRQFD.
    Irqfd,
    /// KVM_IOEVENTFD.
    Ioeventfd,
    /// KVM_CREATE_VCPU.
    CreateVcpu,
    /// KVM_GET_SUPPORTED_CPUID.
    GetSupportedCpuid,
    /// KVM_SET_CPUID2.
    SetCpuid,
    /// KVM_SET_MSRS.
    SetMsrs,
    /// KVM_SET_FPU.
    SetFpu,
    /// KVM_GET/SET_LAPIC.
    Lapic,
    /// KVM_GET/SET_SREGS.
    Sregs,
    /// KVM_SET_REGS.
    Regs,
    /// KVM_(UN)REGISTER_COALESCED_MMIO, for a port.
    CoalescedPio,
}

impl KvmOp {
    /// A closure turning a KVM error from this operation into an [`Error`].
    pub fn err(self) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op: self, source }
    }
}

impl std::fmt::Display for KvmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvmOp::CreateVm => "KVM_CREATE_VM",
            KvmOp::SetTss => "KVM_SET_TSS_ADDR",
            KvmOp::CreateIrqchip => "KVM_CREATE_IRQCHIP",
            KvmOp::CreatePit => "KVM_CREATE_PIT2",
            KvmOp::GsiRouting => "KVM_SET_GSI_ROUTING",
            KvmOp::SetMemory => "KVM_SET_USER_MEMORY_REGION",
            KvmOp::Irqfd => "KVM_IRQFD",
            KvmOp::Ioeventfd => "KVM_IOEVENTFD",
            KvmOp::CreateVcpu => "KVM_CREATE_VCPU",
            KvmOp::GetSupportedCpuid => "KVM_GET_SUPPORTED_CPUID",
            KvmOp::SetCpuid => "KVM_SET_CPUID2",
            KvmOp::SetMsrs => "KVM_SET_MSRS",
            KvmOp::SetFpu => "KVM_SET_FPU",
            KvmOp::Lapic => "KVM_GET/SET_LAPIC",
            KvmOp::Sregs => "KVM_GET/SET_SREGS",
            KvmOp::Regs => "KVM_SET_REGS",
            KvmOp::CoalescedPio => "KVM_(UN)REGISTER_COALESCED_MMIO",
        })
    }
}

/// Everything that can stop moat before or while it runs a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad option value.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The kernel or initramfs could not be loaded.
    #[error(transparent)]
    Boot(#[from] moat_boot::loader::Error),
    /// The KVM device could not be opened.
    #[error("cannot open {path}: {source}{hint}")]
    KvmUnavailable {
        /// The device path.
        path: PathBuf,
        /// The error from open(2).
        source: kvm_ioctls::Error,
        /// What the user can do about it.
        hint: &'static str,
    },
    /// The device opened but does not speak the KVM API moat needs.
    #[error("{path} is not a usable KVM device: {reason}")]
    NotKvm {
        /// The device path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map {size} of guest memory: {reason}")]
    GuestMemory {
        /// The size, formatted.
        size: String,
        /// Why.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// Which ioctl.
        op: KvmOp,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// An I/O operation on the host failed.
    #[error("cannot {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A snapshot could not be restored (a bad file, a host that cannot
    /// run it, devices that do not match).
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Entering the jail failed.
    #[error("jail: {0}")]
    Jail(String),
    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The process exit status: 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_)
            | Error::Boot(_)
            | Error::KvmUnavailable { .. }
            | Error::NotKvm { .. }
            | Error::GuestMemory { .. }
            | Error::Snapshot(_) => 2,
            Error::Kvm { .. } | Error::Io(..) | Error::Jail(_) | Error::Internal(_) => 1,
        }
    }
}
