#!/usr/bin/env bash
# moat's one entry point for people and CI.
#
#   scripts/dev.sh boot [MOAT-RUN-OPTIONS...]   set up, build, boot the default guest
#   scripts/dev.sh test [CARGO-TEST-ARGS...]    set up, build, run every test
#   scripts/dev.sh build                        set up and build moat + guest images
#   scripts/dev.sh bench [VM-BENCH-ARGS...]     set up, build, run every benchmark
#   scripts/dev.sh rig-soak [N] [SOAK-ARGS...]  boot the rig's configurations N times each
#   scripts/dev.sh docker [MOAT-RUN-OPTIONS...] set up, build, boot the Docker guest
#   scripts/dev.sh compare [--runs N]           containers (in the Docker guest) vs microVMs
#   scripts/dev.sh code-order                   rewrite vmm/moat.order: the code a boot runs
#   scripts/dev.sh fuzz [--time S] [--runs N] [--sanitizer address|none] [TARGET...]
#                                               run the fuzz targets S seconds (default 60) or N inputs each
#
# "Set up" installs the Debian packages the guest images and the test rig
# need (resources/install-deps.sh). A Rust toolchain (rustup) must already
# be installed. On a host with hardware KVM moat runs directly; on a host
# without it (no /dev/kvm, or a nested software KVM such as PVM) it runs
# inside the QEMU test rig (resources/rig.sh). MOAT_BACKEND=direct|rig
# forces either.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

die() { echo "dev.sh: $*" >&2; exit 2; }

need_rust() {
    if ! command -v cargo >/dev/null; then
        [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null ||
        die "cargo not found: install Rust first (https://rustup.rs), then run this again"
}

setup() {
    need_rust
    "$root/resources/install-deps.sh"
}

# moat as people run it: the dist profile, a static musl binary (musl's
# libc linked in, a static PIE), so no shared library is mapped and only
# the code moat uses is paged in (docs/benchmarks.md, "The static musl
# binary (2026-11-29)"). --target keeps the static flag off build scripts
# and proc macros. musl_cargo runs cargo for that target. scripts/link.sh
# links it, laying out first the functions vmm/moat.order lists: the code
# a boot runs, so less of the binary is resident (see link.sh). The v0
# symbol mangling names each instance of a generic function with its type
# arguments, so the list can tell apart the instances that run.
musl_cargo() {
    local triple
    triple=$(uname -m)-unknown-linux-musl
    command -v rustup >/dev/null ||
        die "rustup not found: moat is built for rustup's $triple target (https://rustup.rs)"
    rustup target list --installed | grep -qx "$triple" ||
        rustup target add "$triple" >&2
    local var=CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$triple")
    env "${var}_RUSTFLAGS=-C target-feature=+crt-static -C linker-flavor=gcc -C symbol-mangling-version=v0" \
        "${var}_LINKER=$root/scripts/link.sh" MOAT_CODE_ORDER="$root/vmm/moat.order" \
        cargo "$1" --target "$triple" "${@:2}"
}

build_moat() {
    musl_cargo build --profile dist --locked -p moat-vmm --bin moat >&2
    export MOAT_BIN=$root/target/$(uname -m)-unknown-linux-musl/dist/moat
}

# Reads KEY=PATH lines from build-images.sh into IMG_KEY variables.
build_images() {
    local line
    while IFS= read -r line; do
        [[ $line == *=* ]] && printf -v "IMG_${line%%=*}" '%s' "${line#*=}"
    done < <("$root/resources/build-images.sh" "$@")
    [[ -n ${IMG_VMLINUX:-} && -n ${IMG_INITRAMFS:-} ]] || die "build-images.sh reported no images"
}

backend() {
    case ${MOAT_BACKEND:-} in
        direct|rig) echo "$MOAT_BACKEND"; return ;;
        "") ;;
        *) die "MOAT_BACKEND must be direct or rig" ;;
    esac
    if [[ -e /dev/kvm && ! -e /sys/module/kvm_pvm ]]; then echo direct; else echo rig; fi
}

# cargo-fuzz and the nightly toolchain it builds with (sanitizers).
need_fuzz() {
    need_rust
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        rustup toolchain install nightly --profile minimal >&2
    fi
    if [[ $(cargo fuzz --version 2>/dev/null) != "cargo-fuzz 0.13."* ]]; then
        cargo install --locked cargo-fuzz@0.13.2 >&2
    fi
}

# Runs each fuzz target (all by default) for a bounded time or number of
# inputs, from the seeds in fuzz/corpus/ plus what earlier runs found
# (target/fuzz/); prints a table of executions and coverage, writes
# target/fuzz/results.json, and fails if a target crashed (the input is
# kept in target/fuzz/artifacts/). Built with debug assertions (overflow
# checks) and, unless --sanitizer none, AddressSanitizer.
fuzz() {
    local seconds=60 runs=-1 sanitizer=address targets=() t
    while [[ $# -gt 0 ]]; do
        case $1 in
            --time) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--time needs a number of seconds"
                    seconds=$2; shift 2 ;;
            --runs) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--runs needs a number of inputs"
                    runs=$2; seconds=0; shift 2 ;;
            --sanitizer) [[ ${2:-} == address || ${2:-} == none ]] \
                    || die "--sanitizer must be address or none"
                    sanitizer=$2; shift 2 ;;
            -*) die "fuzz: unknown option $1" ;;
            *) targets+=("$1"); shift ;;
        esac
    done
    need_fuzz
    local all
    all=$(cd "$root/fuzz" && cargo fuzz list)
    [[ ${#targets[@]} -gt 0 ]] || mapfile -t targets <<<"$all"
    for t in "${targets[@]}"; do
        grep -qx "$t" <<<"$all" || die "fuzz: no target $t (targets: $(echo $all))"
    done
    local build=(--release --debug-assertions --sanitizer "$sanitizer")
    (cd "$root/fuzz" && cargo +nightly fuzz build "${build[@]}" >&2)
    local out=$root/target/fuzz failed=() rows=() json=()
    mkdir -p "$out"
    for t in "${targets[@]}"; do
        mkdir -p "$out/corpus/$t" "$out/artifacts/$t" "$root/fuzz/corpus/$t"
        local log=$out/$t.log status=0 start=$SECONDS took
        if [[ $runs -ge 0 ]]; then
            echo "dev.sh: fuzzing $t for $runs inputs" >&2
        else
            echo "dev.sh: fuzzing $t for $seconds s" >&2
        fi
        (cd "$root/fuzz" && cargo +nightly fuzz run "${build[@]}" "$t" \
            "$out/corpus/$t" "$root/fuzz/corpus/$t" -- \
            -max_total_time="$seconds" -runs="$runs" -print_final_stats=1 -rss_limit_mb=2048 \
            -timeout=10 -artifact_prefix="$out/artifacts/$t/") >"$log" 2>&1 || status=$?
        took=$(( SECONDS - start ))
        local done_ cov corp
        done_=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
        corp=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
        if [[ $status -ne 0 ]]; then
            failed+=("$t")
            echo "dev.sh: $t FAILED (status $status); its log: $log" >&2
            grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -20 >&2 || true
        fi
        rows+=("$(printf '%-16s %8s %12s %10s %8s %6s' "$t" "$took" "${done_:-?}" \
            "$(( ${done_:-0} / (took > 0 ? took : 1) ))" "${cov:-?}" "${corp:-?}")")
        json+=("$(printf '{"target": "%s", "sanitizer": "%s", "seconds": %s, "executions": %s, "coverage": %s, "corpus": %s, "crashed": %s}' \
            "$t" "$sanitizer" "$took" "${done_:-0}" "${cov:-0}" "${corp:-0}" \
            "$([[ $status -ne 0 ]] && echo true || echo false)")")
    done
    printf '%-16s %8s %12s %10s %8s %6s\n' target seconds executions "exec/s" coverage corpus
    printf '%s\n' "${rows[@]}"
    (IFS=,; printf '{"date": "%s", "results": [%s]}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${json[*]}") \
        >"$out/results.json"
    [[ ${#failed[@]} -eq 0 ]] || die "fuzz: ${failed[*]} crashed or failed; inputs in $out/artifacts/"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
    build)
        setup
        build_moat
        build_images
        ;;
    boot)
        setup
        build_moat
        build_images
        args=(run --kernel "$IMG_VMLINUX" --initramfs "$IMG_INITRAMFS" "$@")
        if [[ $(backend) == direct ]]; then
            exec "$MOAT_BIN" "${args[@]}"
        fi
        echo "dev.sh: no hardware KVM here; running moat inside the QEMU test rig" >&2
        exec "$root/resources/rig.sh" --timeout 0 \
            --file "$IMG_VMLINUX" --file "$IMG_INITRAMFS" -- "$MOAT_BIN" "${args[@]}"
        ;;
    test)
        setup
        cargo fmt --all -- --check
        # The feature brings in the benches, so they keep compiling.
        cargo clippy --locked --workspace --all-targets --features moat-devices/test-driver -- -D warnings
        build_moat
        # The tests boot the Docker guest too (tests/tests/docker.rs).
        export MOAT_DOCKER_IMAGE=1
        build_images
        [[ -n ${MOAT_BACKEND:-} ]] && export MOAT_TEST_BACKEND=$MOAT_BACKEND
        echo "dev.sh: guest tests run on the $(backend) backend" >&2
        # Host-only tiers first, with a bound: they take about a minute, so
        # one that hangs fails the run here instead of at CI's time limit.
        timeout --kill-after 10 900 cargo test --locked --workspace --exclude moat-tests "$@"
        cargo test --locked -p moat-tests "$@"
        # Every fuzz target, briefly: the seeds and earlier finds replay
        # (regression inputs), then 20 s of new inputs each.
        [[ $# -eq 0 ]] && fuzz --time 20
        ;;
    bench)
        # Device cost (host only, no guest), then the VM benchmark (boots
        # guests: directly, or inside the rig). Each prints its table and
        # writes its JSON; results.json holds both. VM-BENCH-ARGS: --runs N
        # (boots per figure, default 10), --launches N (default 10),
        # --io-runs N (I/O guest boots per VMM, default 3; 0 for none),
        # --peer firecracker=PATH, --peer cloud-hypervisor=PATH (peers beside
        # moat and QEMU), --peer baseline=PATH (another moat build: the
        # moat/baseline column is a change's effect), --no-qemu, --transport pci
        # (moat on virtio-pci; the baseline keeps virtio-mmio).
        setup
        build_moat
        build_images
        [[ -n ${MOAT_BACKEND:-} ]] && export MOAT_TEST_BACKEND=$MOAT_BACKEND
        started=$SECONDS
        # The device paths with the libc moat ships with.
        musl_cargo bench --locked -p moat-devices --features test-driver --bench device_cost
        cargo bench --locked -p moat-tests --bench vm -- "$@"
        out=$root/target/bench
        printf '{"date": "%s", "host": "%s", "cpus": %s, "device_cost": %s, "vm": %s}\n' \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(uname -nr)" "$(nproc)" \
            "$(cat "$out/device_cost.json")" "$(cat "$out/vm.json")" >"$out/results.json"
        echo "dev.sh: benchmarks done in $((SECONDS - started)) s; JSON in $out/results.json" >&2
        ;;
    rig-soak)
        # Boots each configuration the guest tests use N times (default 10)
        # and prints the failure rate per configuration and kind; see
        # tests/src/bin/rig-soak.rs for SOAK-ARGS (--parallel, --only).
        setup
        build_moat
        build_images
        runs=10
        if [[ ${1:-} =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
        [[ -n ${MOAT_BACKEND:-} ]] && export MOAT_TEST_BACKEND=$MOAT_BACKEND
        cargo run --release --locked -q -p moat-tests --bin rig-soak -- --runs "$runs" "$@"
        ;;
    fuzz)
        fuzz "$@"
        ;;
    code-order)
        # Runs moat under gdb through a boot with a disk and a network card
        # and writes the functions it ran to vmm/moat.order, which
        # scripts/link.sh lays out first (tests/src/bin/code-order.rs). Run
        # it when what a boot runs has changed much; the next build uses it.
        setup
        if ! command -v gdb >/dev/null; then
            sudo=()
            [[ $(id -u) -eq 0 ]] || sudo=(sudo)
            "${sudo[@]}" apt-get update -qq >&2
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends gdb >&2
        fi
        build_moat
        build_images
        [[ -n ${MOAT_BACKEND:-} ]] && export MOAT_TEST_BACKEND=$MOAT_BACKEND
        cargo run --release --locked -q -p moat-tests --bin code-order -- "$@"
        ;;
    compare)
        # Containers started by dockerd in the Docker guest against moat
        # microVMs: create/start/delete times and memory per instance,
        # measured here (docs/containers-vs-microvms.md; tests/src/bin/compare.rs).
        setup
        build_moat
        build_images --docker
        [[ -n ${MOAT_BACKEND:-} ]] && export MOAT_TEST_BACKEND=$MOAT_BACKEND
        cargo run --release --locked -q -p moat-tests --bin compare -- "$@"
        ;;
    docker)
        # The Docker guest (resources/docker, docs/docker.md) with its
        # persistent disk ($MOAT_DOCKER_DISK, made from the built image on
        # first use), a network through scripts/moat-tap, and dockerd's API
        # forwarded to a host Unix socket for the host's docker CLI.
        setup
        build_moat
        build_images --docker
        # shellcheck source=../resources/docker/net.env
        . "$root/resources/docker/net.env"
        disk=${MOAT_DOCKER_DISK:-${XDG_DATA_HOME:-$HOME/.local/share}/moat/docker.ext4}
        if [[ ! -e $disk ]]; then
            mkdir -p "$(dirname "$disk")"
            cp --sparse=always "$IMG_DOCKER_ROOTFS" "$disk.tmp"
            mv "$disk.tmp" "$disk"
            echo "dev.sh: made the Docker guest's disk $disk (delete it to start afresh)" >&2
        fi
        runtime=${XDG_RUNTIME_DIR:-/tmp}/moat-docker-$(id -u)
        mkdir -p "$runtime"
        chmod 700 "$runtime"
        rm -f "$runtime/vsock.sock" "$runtime/docker.sock"
        # Defaults for the size, unless the user's options set it.
        cpus=2 memory=2G
        [[ $(backend) == rig ]] && cpus=1 memory=1536M
        size=()
        [[ " $* " == *" --cpus"* ]] || size+=(--cpus "boot=$cpus")
        [[ " $* " == *" --memory"* ]] || size+=(--memory "size=$memory")
        args=(run --kernel "$IMG_DOCKER_KERNEL" --initramfs "$IMG_DOCKER_INITRD"
              --cmdline "$(cat "$IMG_DOCKER_CMDLINE")" --disk "path=$disk"
              --net "tap=$DOCKER_TAP" --vsock "cid=3,socket=$runtime/vsock.sock"
              --forward "unix:$runtime/docker.sock=vsock:$DOCKER_VSOCK_PORT")
        if [[ $(backend) == direct ]]; then
            sudo=()
            [[ $(id -u) -eq 0 ]] || sudo=(sudo)
            "${sudo[@]}" "$root/scripts/moat-tap" up
            trap '"${sudo[@]}" "$root/scripts/moat-tap" down' EXIT
            echo "dev.sh: the host's docker CLI, from another terminal:" >&2
            echo "    DOCKER_HOST=unix://$runtime/docker.sock $IMG_DOCKER_CLI ps" >&2
            echo "dev.sh: log in as root on the console below; 'poweroff' ends moat" >&2
            "$MOAT_BIN" "${args[@]}" "${size[@]}" "$@"
            exit
        fi
        # In the rig the TAP is in the rig's VM, which has no way out: the
        # guest reaches the TAP's address, not the internet; the forwarded
        # socket is in that VM too (the tests use it from there).
        echo "dev.sh: no hardware KVM here; running moat inside the QEMU test rig" >&2
        echo "dev.sh: the guest has no internet in the rig; log in as root below, 'poweroff' ends it" >&2
        # One vCPU: a two-vCPU rig crashes under Docker's load (docs/docker.md).
        # shellcheck disable=SC2016  # expanded by the rig's shell
        exec "$root/resources/rig.sh" --timeout 0 --cpus 1 --mem 3072 --disk "$disk" \
            --file "$MOAT_BIN" --file "$IMG_DOCKER_KERNEL" --file "$IMG_DOCKER_INITRD" -- /bin/sh -c '
                mkdir -p '"'$runtime'"'
                # A background job of a script reads /dev/null unless told.
                exec 3<&0
                "$@" <&3 3<&- & moat=$!
                until [ -e /sys/class/net/'"$DOCKER_TAP"' ]; do
                    kill -0 $moat 2>/dev/null || break; sleep 0.1
                done
                ip addr add '"$DOCKER_HOST_ADDR/$DOCKER_PREFIX"' dev '"$DOCKER_TAP"' 2>/dev/null
                ip link set '"$DOCKER_TAP"' up 2>/dev/null
                wait $moat' moat-docker "$MOAT_BIN" "${args[@]}" "${size[@]}" "$@"
        ;;
    *)
        sed -n '2,18p' "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
esac
