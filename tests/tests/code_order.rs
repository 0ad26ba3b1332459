//! The moat binary `scripts/dev.sh` builds (static, musl, linked by
//! scripts/link.sh) lays out the functions `vmm/moat.order` lists together,
//! so that the code a boot runs is resident without the code it does not
//! (docs/benchmarks.md, "The code moat runs, laid out together"). Checked
//! on `MOAT_BIN`, which dev.sh sets to that build; other builds (`cargo
//! build`) are linked without the list.

use std::collections::{HashMap, HashSet};

use moat_tests::symbols::{functions, order_file, order_key, parse_order};

#[test]
fn the_functions_a_boot_runs_lie_together() {
    let Some(bin) = std::env::var_os("MOAT_BIN") else {
        eprintln!("skipped: MOAT_BIN is not set (scripts/dev.sh test sets it to its musl build)");
        return;
    };
    let text = std::fs::read_to_string(order_file()).unwrap();
    let list = parse_order(&text);
    let all = functions(bin.as_ref()).unwrap();
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, f) in all.iter().enumerate() {
        by_key.entry(order_key(&f.demangled)).or_default().push(i);
    }

    // A list that no longer names what the code calls its functions lays
    // out little: rewrite it with `scripts/dev.sh code-order`.
    let found = list
        .iter()
        .filter(|name| by_key.contains_key(**name))
        .count();
    assert!(
        found * 10 >= list.len() * 8,
        "only {found} of the {} functions in vmm/moat.order are in {}: \
         run scripts/dev.sh code-order",
        list.len(),
        bin.to_string_lossy()
    );

    let listed: HashSet<usize> = list
        .iter()
        .filter_map(|name| by_key.get(*name))
        .flatten()
        .copied()
        .collect();
    let addrs: HashSet<u64> = listed.iter().map(|&i| all[i].addr).collect();
    let lo = listed.iter().map(|&i| all[i].addr).min().unwrap();
    let hi = listed
        .iter()
        .map(|&i| all[i].addr + all[i].size)
        .max()
        .unwrap();
    let between: Vec<&str> = all
        .iter()
        .enumerate()
        .filter(|(i, f)| {
            !listed.contains(i) && !addrs.contains(&f.addr) && f.addr >= lo && f.addr < hi
        })
        .map(|(_, f)| f.name.as_str())
        .collect();
    assert!(
        between.is_empty(),
        "{} functions not in vmm/moat.order lie among those in it \
         ({lo:#x}..{hi:#x}), e.g. {:?}: the binary was not linked with the list \
         (scripts/link.sh)",
        between.len(),
        &between[..between.len().min(5)]
    );
}
