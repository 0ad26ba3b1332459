//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! The kernel unpacks concatenated archives in order, so a test adds its
//! files by appending a small archive to the base image.

/// One file to put in an archive.
pub struct Entry<'a> {
    /// Path inside the archive, without a leading slash.
    pub name: &'a str,
    /// Permission bits (the file type is always "regular").
    pub mode: u32,
    /// Contents.
    pub data: &'a [u8],
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: usize, name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// An archive holding `entries`, with the trailer.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        header(
            &mut out,
            i as u32 + 1,
            0o100_000 | entry.mode,
            entry.data.len(),
            entry.name,
        );
        out.extend_from_slice(entry.data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, 0, "TRAILER!!!");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let a = archive(&[Entry {
            name: "test.sh",
            mode: 0o755,
            data: b"echo hi\n",
        }]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("test.sh\0"));
        assert!(text.contains("echo hi\n"));
        assert!(a.ends_with(b"TRAILER!!!\0\0\0\0"));
        // Mode field (second) says regular file, 0755.
        assert_eq!(&a[14..22], b"000081ed");
    }
}
