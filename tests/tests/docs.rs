//! The docs' links into the code stay true: every relative link in
//! README.md and docs/*.md names a file that exists, and a link whose text
//! is a Rust item (`Vm::build`, `transfer`) into a `.rs` file names an item
//! that file defines. docs/tour.md is made of such links.

use std::path::{Path, PathBuf};

use moat_tests::repo_root;

/// `(text, target)` of each inline Markdown link in `markdown`.
fn links(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(close) = rest.find("](") {
        let before = &rest[..close];
        let after = &rest[close + 2..];
        let Some(end) = after.find(')') else { break };
        if let Some(open) = before.rfind('[') {
            out.push((before[open + 1..].to_string(), after[..end].to_string()));
        }
        rest = &after[end..];
    }
    out
}

/// The Rust item a link's text names: `Type::item`, `item` (in backticks).
fn item(text: &str) -> Option<(Option<&str>, &str)> {
    let inner = text.strip_prefix('`')?.strip_suffix('`')?;
    let ident = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    match inner.split_once("::") {
        Some((ty, name)) if ident(ty) && ident(name) => Some((Some(ty), name)),
        None if ident(inner) => Some((None, inner)),
        _ => None,
    }
}

/// Whether `source` defines `name` (a function, type, constant, module...).
fn defines(source: &str, name: &str) -> bool {
    let kinds = [
        "fn", "struct", "enum", "trait", "const", "static", "type", "mod",
    ];
    source.lines().any(|line| {
        let words: Vec<&str> = line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        words
            .windows(2)
            .any(|w| kinds.contains(&w[0]) && w[1] == name)
    })
}

/// Whether `source` has `impl ... Type` (its own or a trait's).
fn implements(source: &str, ty: &str) -> bool {
    source.lines().any(|line| {
        let line = line.trim_start();
        line.starts_with("impl")
            && line
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| w == ty)
    })
}

fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut docs = vec![root.join("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    docs
}

/// What is wrong with the links of the document at `path`.
fn problems(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let base = path.parent().unwrap();
    let mut problems = Vec::new();
    for (text, target) in links(&text) {
        if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
            continue;
        }
        let file = base.join(target.split('#').next().unwrap_or_default());
        if !file.exists() {
            problems.push(format!("[{text}]({target}): no such file"));
            continue;
        }
        let Some((ty, name)) = item(&text) else {
            continue;
        };
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let source = std::fs::read_to_string(&file).unwrap();
        if !defines(&source, name) {
            problems.push(format!("[{text}]({target}): no item {name} there"));
        }
        if let Some(ty) = ty {
            if !defines(&source, ty) && !implements(&source, ty) {
                problems.push(format!("[{text}]({target}): no type {ty} there"));
            }
        }
    }
    problems
}

#[test]
fn every_link_into_the_code_names_a_file_and_an_item_that_exist() {
    let mut all = Vec::new();
    for doc in documents() {
        for problem in problems(&doc) {
            all.push(format!("{}: {problem}", doc.display()));
        }
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
    // The tour is there and made of such links.
    let tour = std::fs::read_to_string(repo_root().join("docs/tour.md")).unwrap();
    let items = links(&tour)
        .iter()
        .filter(|(text, target)| item(text).is_some() && target.ends_with(".rs"))
        .count();
    assert!(items >= 40, "the tour links {items} items");
}

#[test]
fn the_checker_catches_a_renamed_item_and_a_moved_file() {
    let dir = std::env::temp_dir().join(format!("moat-docs-check-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("src/lib.rs"),
        "pub struct Vm;\nimpl Vm {\n    pub fn build() {}\n}\nfn transfer() {}\n",
    )
    .unwrap();
    let doc = dir.join("doc.md");
    std::fs::write(
        &doc,
        "[`Vm::build`](src/lib.rs) [`transfer`](src/lib.rs) [`Vm::run`](src/lib.rs) \
         [`Disk::build`](src/lib.rs) [`x`](src/gone.rs) [text](https://example.com)",
    )
    .unwrap();
    let found = problems(&doc);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].contains("no item run"), "{found:?}");
    assert!(found[1].contains("no type Disk"), "{found:?}");
    assert!(found[2].contains("no such file"), "{found:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
