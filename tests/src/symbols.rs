//! The moat binary's functions, and the list of those a boot runs
//! (`vmm/moat.order`), which `scripts/link.sh` lays out first.

use std::path::Path;
use std::process::Command;

use crate::repo_root;

/// A function in a binary's symbol table.
#[derive(Clone, Debug)]
pub struct Function {
    /// Offset from the start of the binary's first mapping.
    pub addr: u64,
    /// Bytes of code.
    pub size: u64,
    /// The mangled name.
    pub name: String,
    /// The name as `nm -C` demangles it.
    pub demangled: String,
}

/// `nm -S -p --defined-only [EXTRA] binary`'s lines: symbol-table order.
fn nm(binary: &Path, extra: &[&str]) -> Result<Vec<String>, String> {
    let out = Command::new("nm")
        .args(["-S", "-p", "--defined-only"])
        .args(extra)
        .arg(binary)
        .output()
        .map_err(|e| format!("run nm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nm {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The functions (code symbols with a size) in `binary`'s symbol table,
/// read with `nm`, by address.
pub fn functions(binary: &Path) -> Result<Vec<Function>, String> {
    let mangled = nm(binary, &[])?;
    let demangled = nm(binary, &["-C"])?;
    if mangled.len() != demangled.len() {
        return Err(format!(
            "nm and nm -C list different symbols in {}",
            binary.display()
        ));
    }
    let mut functions: Vec<Function> = mangled
        .iter()
        .zip(&demangled)
        .filter_map(|(line, readable)| {
            let mut words = line.split_whitespace();
            let (addr, size, kind, name) =
                (words.next()?, words.next()?, words.next()?, words.next()?);
            let (addr, size) = (
                u64::from_str_radix(addr, 16).ok()?,
                u64::from_str_radix(size, 16).ok()?,
            );
            // The name is what follows the third space.
            let demangled = readable.splitn(4, ' ').nth(3)?;
            (matches!(kind, "t" | "T" | "w" | "W") && size > 0).then(|| Function {
                addr,
                size,
                name: name.to_string(),
                demangled: demangled.to_string(),
            })
        })
        .collect();
    functions.sort_by_key(|f| f.addr);
    Ok(functions)
}

/// The name a function has in `vmm/moat.order`: its demangled name
/// without the hashes in it, which change with the compiler and the
/// dependencies' versions: the `::h` and 16 hex digits that end a legacy
/// Rust name, and the crate hashes (`std[7b120257af0c47a5]`) of a v0 name.
/// scripts/link.sh does the same, in awk.
pub fn order_key(demangled: &str) -> String {
    let mut key = demangled;
    if let Some((path, hash)) = key.rsplit_once("::h") {
        if hash.len() == 16 && hash.bytes().all(is_hex) {
            key = path;
        }
    }
    let mut out = String::with_capacity(key.len());
    let mut rest = key;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if close >= 8 && after[..close].bytes().all(is_hex) => {
                rest = &after[close + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Where the list is.
pub fn order_file() -> std::path::PathBuf {
    repo_root().join("vmm/moat.order")
}

/// The names in `text` (the list's format: one per line, `#` comments).
pub fn parse_order(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{order_key, parse_order};

    #[test]
    fn order_keys_drop_only_hashes() {
        assert_eq!(
            order_key("moat_vmm::vm::load_guest::hd21752ba46b09b11"),
            "moat_vmm::vm::load_guest"
        );
        assert_eq!(
            order_key("<std[7b120257af0c47a5]::sync::once::Once>::call_once::<std[7b120257af0c47a5]::rt::cleanup::{closure#0}>"),
            "<std::sync::once::Once>::call_once::<std::rt::cleanup::{closure#0}>"
        );
        // C names, slices and short or non-hex suffixes stay.
        assert_eq!(order_key("memcpy"), "memcpy");
        assert_eq!(
            order_key("<[f32] as core::fmt::Debug>::fmt"),
            "<[f32] as core::fmt::Debug>::fmt"
        );
        assert_eq!(
            order_key("foo::bar::h1752ba46b09b11"),
            "foo::bar::h1752ba46b09b11"
        );
        assert_eq!(
            order_key("foo::bar::hzz1752ba46b09b11"),
            "foo::bar::hzz1752ba46b09b11"
        );
        assert_eq!(order_key("a[0123456789abcdef"), "a[0123456789abcdef");
    }

    #[test]
    fn the_list_skips_comments_and_blank_lines() {
        assert_eq!(
            parse_order("# made by\n\nmain\n  memcpy \n#x\n"),
            ["main", "memcpy"]
        );
    }
}
