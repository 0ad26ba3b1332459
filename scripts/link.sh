#!/usr/bin/env bash
# The linker of moat's musl builds (scripts/dev.sh sets it as cargo's linker
# for that target): cc with the toolchain's own lld (rust-lld), which, when
# MOAT_CODE_ORDER names a list of functions and the output is the moat
# binary, lays those functions out first, together, in the list's order.
#
# Why: the kernel maps a binary's code into a process 64 KiB around each
# page that runs (fault-around), so code that runs, scattered among code
# that does not, makes nearly all of a binary resident. vmm/moat.order
# lists the functions a boot with a disk and a network card runs (made by
# `scripts/dev.sh code-order`), and laid out together they take a third of
# the code (docs/benchmarks.md, "The code moat runs, laid out together").
#
# The list names functions by their demangled names without the hashes
# in them, which change with the compiler and the dependencies' versions.
# Since lld wants exact mangled names, this links twice: once to learn the
# names this build gave, once with those names in the list's order.
# Linking is a small part of a build with LTO.
set -euo pipefail

host=$(rustc -vV | sed -n 's/^host: //p')
lld_dir=$(rustc --print sysroot)/lib/rustlib/$host/bin/gcc-ld
if [[ ! -x $lld_dir/ld.lld ]]; then
    echo "scripts/link.sh: the Rust toolchain has no rust-lld ($lld_dir/ld.lld); update it with rustup" >&2
    exit 1
fi
link=(cc -fuse-ld=lld -B"$lld_dir")

out=
prev=
for arg in "$@"; do
    [[ $prev == -o ]] && out=$arg
    prev=$arg
done

"${link[@]}" "$@"

order=${MOAT_CODE_ORDER:-}
# cargo names the binary deps/moat-<hash> before it copies it out.
[[ -n $order && ${out##*/} == moat-* ]] || exit 0
[[ -f $order ]] || { echo "scripts/link.sh: no such file: $order (MOAT_CODE_ORDER)" >&2; exit 1; }
symbols=$out.order
# The names, in symbol-table order (-p), mangled and demangled: a name's
# key is its demangled form without hashes (as in
# tests/src/symbols.rs's order_key): the ::h and 16 hex digits that end a
# legacy Rust name, and the [16 hex digits] crate hashes of a v0 name.
nm -p --defined-only "$out" >"$symbols.mangled"
nm -p -C --defined-only "$out" | awk -v order="$order" -v mangled="$symbols.mangled" '
    BEGIN {
        hex8 = "[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]"
        legacy = "::h" hex8 hex8 "$"
        crate = "\\[" hex8 "[0-9a-f]*\\]"
    }
    {
        if ((getline line < mangled) <= 0) {
            print "scripts/link.sh: nm and nm -C list different symbols" > "/dev/stderr"
            exit 1
        }
        split(line, word, " ")
        key = $0
        sub(/^[^ ]* [^ ]* /, "", key)
        sub(legacy, "", key)
        gsub(crate, "", key)
        names[key] = names[key] " " word[3]
    }
    END {
        while ((getline line < order) > 0) {
            if (line ~ /^#/ || line == "" || !(line in names)) continue
            n = split(names[line], each, " ")
            for (i = 1; i <= n; i++) print each[i]
        }
    }' >"$symbols"
"${link[@]}" "$@" -Wl,--symbol-ordering-file="$symbols" -Wl,--no-warn-symbol-ordering
