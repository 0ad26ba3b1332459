//! TAP devices: the host end of a guest's network card.
//!
//! A TAP is opened through /dev/net/tun with IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, so each read or write is one Ethernet frame preceded by a
//! 12-byte virtio-net header, exactly what the guest's queues carry.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vm_memory::VolatileSlice;

use super::{NetBackend, NET_HDR_LEN};

// The TUN constants come from libc (linux/if_tun.h).
const IFF_TAP: u16 = libc::IFF_TAP as u16;
const IFF_NO_PI: u16 = libc::IFF_NO_PI as u16;
const IFF_VNET_HDR: u16 = libc::IFF_VNET_HDR as u16;
/// The TAP may pass frames with a partial checksum.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// The TAP may pass TCPv4 segmentation offload frames.
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// The TAP may pass TCPv6 segmentation offload frames.
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// IFNAMSIZ, including the NUL.
const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Why a TAP could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open TAP {name}: /dev/net/tun: {source}")]
    OpenTun {
        /// The interface name.
        name: String,
        /// The error from open(2).
        source: io::Error,
    },
    /// The kernel refused to attach to or create the TAP.
    #[error("cannot open TAP {name}: {source}")]
    Attach {
        /// The interface name.
        name: String,
        /// The error from TUNSETIFF.
        source: io::Error,
    },
    /// A file descriptor handed over is not a usable TAP.
    #[error("fd {fd} is not a usable TAP: {reason}")]
    Fd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        reason: String,
    },
    /// Setting up the opened TAP failed.
    #[error("cannot set up TAP {name}: {source}")]
    Setup {
        /// The interface name.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// An open TAP.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// An `ifreq` holding a name and flags, the argument of the TUN ioctls.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

impl IfReq {
    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// TUNSETIFF or TUNGETIFF on `file`: the kernel reads and writes `req`.
fn ifreq_ioctl(file: &File, set: bool, req: &mut IfReq) -> io::Result<()> {
    let request = if set {
        libc::TUNSETIFF
    } else {
        libc::TUNGETIFF
    };
    // SAFETY: both requests take a `struct ifreq`, which IfReq lays out
    // (40 bytes, checked by a test); the kernel touches nothing else.
    check(unsafe { libc::ioctl(file.as_raw_fd(), request, req as *mut IfReq) })
}

/// TUNSETVNETHDRSZ on `file`: the kernel reads `len`.
fn set_vnet_header_size(file: &File, len: libc::c_int) -> io::Result<()> {
    // SAFETY: the request reads one c_int from the pointer, ours.
    check(unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &len as *const libc::c_int,
        )
    })
}

/// Whether the TAP `name` was opened with IFF_NO_PI, from its sysfs
/// flags; None when sysfs cannot say.
fn no_pi_from_sysfs(name: &str) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).ok()?;
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & u32::from(IFF_NO_PI) != 0)
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens the TAP called `name`, creating it if it does not exist and
    /// moat is allowed to (CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ifreq_ioctl(&file, true, &mut req).map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        Self::finish(file, req.name())
    }

    /// Takes over `fd`, a TAP a parent process opened with IFF_VNET_HDR.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::Fd { fd, reason };
        // SAFETY: F_GETFD only checks that the descriptor is open.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad("it is not an open file descriptor".into()));
        }
        // SAFETY: the descriptor is open and the user handed it to moat to
        // own; nothing else in moat uses it.
        let file = unsafe { File::from_raw_fd(fd) };
        // An inherited descriptor comes without close-on-exec; moat's own
        // have it.
        // SAFETY: F_SETFD on a descriptor we own; no memory is involved.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })
            .map_err(|e| bad(format!("cannot set close-on-exec: {e}")))?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        ifreq_ioctl(&file, false, &mut req).map_err(|e| bad(format!("TUNGETIFF failed: {e}")))?;
        // Without IFF_NO_PI every frame would carry 4 more bytes the guest
        // would read as the start of its virtio-net header. TUNGETIFF
        // cannot tell: it reports IFF_NOFILTER in the same bit. sysfs can.
        let no_pi = match no_pi_from_sysfs(&req.name()) {
            Some(no_pi) => no_pi,
            None => {
                log::warn!(
                    "TAP {} (fd {fd}): /sys/class/net is not readable, so moat cannot check that it was opened with IFF_NO_PI",
                    req.name()
                );
                true
            }
        };
        if req.flags & IFF_TAP == 0 || !no_pi || req.flags & IFF_VNET_HDR == 0 {
            return Err(bad(
                "it must be a TAP opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR".into(),
            ));
        }
        Self::finish(file, req.name())
    }

    fn finish(file: File, name: String) -> Result<Tap, TapError> {
        let setup = |source| TapError::Setup {
            name: name.clone(),
            source,
        };
        set_vnet_header_size(&file, NET_HDR_LEN as libc::c_int).map_err(setup)?;
        set_nonblocking(&file).map_err(setup)?;
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the TAP takes checksum and TSO offload settings (tried,
    /// then reset to none until a guest accepts them).
    pub fn supports_offload(&mut self) -> bool {
        self.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok()
            && self.set_offload(0).is_ok()
    }
}

impl Tap {
    /// Writes one frame (vnet header first) from a plain buffer.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv_into(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        crate::virtio::readv(self.file.as_raw_fd(), bufs)
    }

    fn send_from(&mut self, bufs: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        crate::virtio::writev(self.file.as_raw_fd(), bufs)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes the flags by value, not by pointer.
        // SAFETY: an ioctl on our descriptor with an integer argument.
        check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_an_interface_name() {
        assert!(matches!(Tap::open(""), Err(TapError::Name(_))));
        assert!(matches!(
            Tap::open("a-name-longer-than-15"),
            Err(TapError::Name(_))
        ));
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let err = Tap::from_fd(-1).unwrap_err().to_string();
        assert!(err.contains("not an open file descriptor"), "{err}");
        let file = File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        let err = Tap::from_fd(fd).unwrap_err().to_string();
        assert!(err.contains("TUNGETIFF failed"), "{err}");
    }

    /// A TAP descriptor opened with `flags`, or None without /dev/net/tun
    /// or the right to create a TAP.
    fn tap_fd(name: &str, flags: u16) -> Option<RawFd> {
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .ok()?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        ifreq_ioctl(&file, true, &mut req).ok()?;
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // As a parent process would hand it over: no close-on-exec.
        // SAFETY: F_SETFD on the descriptor we just made.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        Some(fd)
    }

    #[test]
    fn an_inherited_tap_without_no_pi_is_refused() {
        let name = format!("mt{}", std::process::id() % 100_000);
        let Some(fd) = tap_fd(&name, IFF_TAP | IFF_VNET_HDR) else {
            // Creating a TAP needs CAP_NET_ADMIN; the guest tests run as root.
            // SAFETY: geteuid has no arguments and cannot fail.
            let euid = unsafe { libc::geteuid() };
            assert_ne!(euid, 0, "root could not create a TAP");
            return;
        };
        let err = Tap::from_fd(fd).unwrap_err().to_string();
        assert!(err.contains("IFF_NO_PI"), "{err}");
        let Some(fd) = tap_fd(&format!("{name}b"), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) else {
            panic!("could create one TAP but not a second");
        };
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let inherited = unsafe { libc::fcntl(fd, libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_eq!(inherited, 0, "the test's descriptor starts without it");
        let tap = Tap::from_fd(fd).unwrap();
        // SAFETY: as above.
        let now = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_ne!(now, 0, "moat marks an inherited TAP close-on-exec");
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
