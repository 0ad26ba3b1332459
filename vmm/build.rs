//! moat.order is an input of the musl build's link (scripts/link.sh reads
//! it, as MOAT_CODE_ORDER): a new list must relink the binary.

fn main() {
    println!("cargo:rerun-if-changed=moat.order");
}
