//! Writes `vmm/moat.order`: the functions of the moat binary that a boot
//! with a disk and a network card runs, driven from the command line and
//! from the API. `scripts/link.sh` lays them out first, together, so that
//! the kernel's fault-around maps little code that never runs
//! (docs/benchmarks.md, "The code moat runs, laid out together").
//!
//!   code-order [--out FILE]
//!
//! gdb runs moat (`MOAT_BIN`, else the newest build) with a one-shot
//! breakpoint on every function in its symbol table, three times: `moat
//! run`; `moat --api-sock` configured and started with curl as
//! Firecracker's getting-started guide does; and `moat --api-sock
//! --config-file`; the API runs are then asked for the VM's configuration.
//! Each time the guest writes and reads its disk with direct I/O (1 MiB and
//! 4 KiB blocks), fetches 8 MiB from the host over TCP, serves the host
//! 8 MiB, and reboots. The list puts the functions only the API runs ran
//! first, then those both kinds ran, then those only `moat run` ran, each
//! part in the order they first ran: either way of running moat then runs
//! one stretch of code. Functions are named by their demangled names without
//! hashes (see [`moat_tests::symbols::order_key`]). On a host without
//! hardware KVM this runs in the test rig, gdb and curl copied in.
//! `scripts/dev.sh code-order` builds what it needs and runs this; it needs
//! root (a TAP) and gdb.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use moat_tests::net::{fill, HOST_TAP_SETUP};
use moat_tests::symbols::{self, order_key, Function};
use moat_tests::{bench_disk, moat_bin, Guest, Scratch, API_PRELUDE, CMDLINE};

/// The guest's part: the disk both ways, then TCP both ways.
const GUEST: &str = r#"
for bs in 1M 4k; do
    count=8; [ $bs = 4k ] && count=1024
    dd if=/dev/zero of=/dev/vda bs=$bs count=$count oflag=direct 2>/dev/null || exit 1
    dd if=/dev/vda of=/dev/null bs=$bs count=$count iflag=direct 2>/dev/null || exit 1
done
sync
ip addr add @G0@/26 dev eth0 && ip link set eth0 up || exit 1
mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/blob bs=1M count=8 2>/dev/null
httpd -p 8080 -h /tmp/www
i=0; until wget -q -O /dev/null http://@H0@:8080/blob 2>/dev/null; do i=$((i+1)); [ $i -ge 120 ] && exit 2; sleep 1; done
echo GUEST-FETCHED
nc -l -p 5003 </dev/null >/dev/null
"#;

/// Shell functions for the host's part: `start_gdb ARGS...` starts moat
/// under gdb (one-shot breakpoints at the function offsets in @ADDRS@,
/// plus the binary's load address, which gdb's disabled address
/// randomization keeps from one run to the next) in the background, as
/// `$pid`; `end_gdb` prints the guest's console, then each hit as
/// "CODE-ORDER-HIT <offset>", and returns whether the guest's script
/// passed.
const HOST_GDB: &str = r#"
work=$(mktemp -d)
moat_path=$(readlink -f "$1")
start_gdb() {
    gdb -nx -batch -ex starti -ex "info proc mappings" --args "$moat_path" --version >$work/maps 2>&1
    base=$(awk -v m="$moat_path" '$NF == m { print $1; exit }' $work/maps)
    [ -n "$base" ] || { echo "CODE-ORDER: no load address from gdb:"; cat $work/maps; exit 1; }
    {
        echo "set pagination off"
        echo "set width 0"
        echo "set confirm off"
        echo "set breakpoint always-inserted on"
        echo "handle all nostop noprint pass"
        echo "starti"
        while read -r offset; do printf 'tbreak *0x%x\n' $((base + 0x$offset)); done <@ADDRS@
        echo "while 1"
        echo "continue"
        echo "end"
    } >$work/commands
    gdb -nx -batch -x $work/commands --args "$moat_path" "$@" >$work/out 2>&1 </dev/null & pid=$!
}
end_gdb() {
    # The guest's console, without gdb's lines.
    grep -av "breakpoint [0-9-]*[ ,]" $work/out
    grep -ao "breakpoint [0-9]*, 0x[0-9a-f]*" $work/out | while read -r _ _ at; do
        printf 'CODE-ORDER-HIT %x\n' $((at - base))
    done
    # How moat ended, last, where a failure's tail shows it.
    grep -ao "\[Inferior.*" $work/out
    # gdb may lose moat as it exits ("Couldn't get registers"): the run
    # counts if the guest got to the end of its script.
    grep -aq "MOAT-TEST-END rc=0" $work/out; ok=$?
    rm -rf $work
    return $ok
}
# The far end of the guest's transfers, once its TAP is up (then
# `tell_done @G0@` lets the guest reboot).
transfers() {
    tap_up @TAP0@ @H0@
    mkdir -p $work/www && dd if=/dev/zero of=$work/www/blob bs=1M count=8 2>/dev/null
    httpd -f -p @H0@:8080 -h $work/www & web=$!
    fetch_until http://@G0@:8080/blob /dev/null && say HOST-FETCHED
}
"#;

/// The host's part of the `moat run` profile.
const HOST_RUN: &str = r#"
shift
start_gdb "$@"
moat=$pid
transfers
tell_done @G0@
wait $pid
kill $web 2>/dev/null
end_gdb; rc=$?
report
exit $rc
"#;

/// The host's part of the API profiles: moat with its API socket, started
/// as @START@ says, then asked what an orchestrator asks a running VM.
const HOST_API: &str = r#"
@START@
moat=$pid
transfers
api GET /
api GET /vm/config
api GET /machine-config
tell_done @G0@
wait $pid
kill $web 2>/dev/null
end_gdb; rc=$?
cat "$report"
report
exit $rc
"#;

/// Firecracker's getting-started sequence, with curl.
const START_API_REQUESTS: &str = r#"
start_gdb --api-sock "$sock" --id code-order
wait_sock 120
api PUT /boot-source "{\"kernel_image_path\": \"$kernel\", \"initrd_path\": \"$initrd\", \"boot_args\": \"@CMDLINE@\"}"
api PUT /drives/vda '{"drive_id": "vda", "path_on_host": "@DISK@", "is_root_device": false, "is_read_only": false}'
api PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "@TAP0@"}'
api PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 256}'
api PUT /actions '{"action_type": "InstanceStart"}'
"#;

/// The same machine from `--config-file`.
const START_API_CONFIG: &str = r#"
cat >$work/config.json <<EOF
{"boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd", "boot_args": "@CMDLINE@"},
 "drives": [{"drive_id": "vda", "path_on_host": "@DISK@", "is_root_device": false, "is_read_only": false}],
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "@TAP0@"}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}
EOF
start_gdb --api-sock "$sock" --id code-order --config-file $work/config.json
wait_sock 120
"#;

fn main() {
    let mut out = symbols::order_file();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--out", Some(path)) => out = PathBuf::from(path),
            _ => die("usage: code-order [--out FILE]"),
        }
    }
    let moat = moat_bin();
    let functions = symbols::functions(&moat).unwrap_or_else(|e| die(&e));
    let scratch = Scratch::new("code-order");
    let addrs = scratch.path("addrs");
    let offsets: Vec<String> = functions.iter().map(|f| format!("{:x}", f.addr)).collect();
    std::fs::write(&addrs, offsets.join("\n") + "\n").unwrap_or_else(|e| die(&e.to_string()));
    let disk = scratch.path("disk.img");
    bench_disk(&disk, 64);

    let gdb = gdb_files();

    eprintln!("code-order: running {} under gdb: moat run", moat.display());
    let run = profile(&format!("{HOST_TAP_SETUP}{HOST_RUN}"), &gdb, &addrs, &disk);
    let mut api = Vec::new();
    for (what, start) in [
        ("the API's requests", START_API_REQUESTS),
        ("the API with --config-file", START_API_CONFIG),
    ] {
        eprintln!("code-order: running {} under gdb: {what}", moat.display());
        let host = format!("{API_PRELUDE}{HOST_TAP_SETUP}{HOST_API}").replace("@START@", start);
        api.extend(profile(&host, &gdb, &addrs, &disk));
    }

    let run_keys = order(&functions, &run);
    let api_keys = order(&functions, &api);
    let in_run: HashSet<&String> = run_keys.iter().collect();
    let in_api: HashSet<&String> = api_keys.iter().collect();
    let list: Vec<&String> = api_keys
        .iter()
        .filter(|k| !in_run.contains(k))
        .chain(run_keys.iter().filter(|k| in_api.contains(k)))
        .chain(run_keys.iter().filter(|k| !in_api.contains(k)))
        .collect();
    let kib = |hits: &[u64]| ran_bytes(&functions, hits) / 1024;
    let all: u64 = functions.iter().map(|f| f.size).sum::<u64>() / 1024;
    let both: Vec<u64> = run.iter().chain(&api).copied().collect();
    let (run_kib, api_kib, both_kib) = (kib(&run), kib(&api), kib(&both));
    let header = format!(
        "# The functions of the moat binary a boot runs (a disk written and\n\
         # read with direct I/O, 8 MiB each way over TCP), driven by `moat run`\n\
         # and by the API, by demangled name without hashes: first those only\n\
         # the API runs ran, then those both kinds ran, then those only `moat\n\
         # run` ran. scripts/link.sh lays them out first, in this order. Made by\n\
         # `scripts/dev.sh code-order` from moat at {}: `moat run` ran\n\
         # {} KiB, the API runs {} KiB, all {} KiB of {} KiB of code.\n",
        git_head(),
        run_kib,
        api_kib,
        both_kib,
        all,
    );
    let names: Vec<&str> = list.iter().map(|k| k.as_str()).collect();
    std::fs::write(&out, header + &names.join("\n") + "\n")
        .unwrap_or_else(|e| die(&format!("write {}: {e}", out.display())));
    eprintln!(
        "code-order: `moat run` ran {run_kib} KiB, the API runs {api_kib} KiB, all {both_kib} KiB \
         of {all} KiB of code; {} names written to {}",
        list.len(),
        out.display()
    );
}

/// Runs moat under gdb with `host` as the host's part (`gdb`: the files
/// gdb needs in the rig), and returns the offsets of the functions that
/// ran, in the order they first ran.
fn profile(host: &str, gdb: &[PathBuf], addrs: &Path, disk: &Path) -> Vec<u64> {
    let host = fill(&format!("{HOST_GDB}{host}"), 0, 1)
        .replace("@ADDRS@", &addrs.display().to_string())
        .replace("@DISK@", &disk.display().to_string())
        .replace("@CMDLINE@", CMDLINE);
    let mut guest = Guest::vmlinux()
        .args(["--memory", "size=256M", "--net", &fill("tap=@TAP0@", 0, 1)])
        .disk(disk, "")
        .host_script(&host)
        .host_file(addrs)
        .host_file("/usr/bin/curl")
        .script(&fill(GUEST, 0, 1))
        .timeout(Duration::from_secs(1800));
    for file in gdb {
        guest = guest.host_file(file);
    }
    let outcome = guest.run().unwrap_or_else(|e| die(&e));
    if outcome.status != 0 || !outcome.console.contains("HOST-FETCHED") {
        let console: Vec<&str> = outcome
            .console
            .lines()
            .filter(|l| !l.starts_with("CODE-ORDER-HIT") && !l.starts_with("0x"))
            .collect();
        die(&format!(
            "the run failed (status {}):\n{}",
            outcome.status,
            console[console.len().saturating_sub(60)..].join("\n")
        ));
    }
    let hits: Vec<u64> = outcome
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("CODE-ORDER-HIT "))
        .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
        .collect();
    if hits.is_empty() {
        die(&format!(
            "gdb reported no function run:\n{}",
            outcome.tail(40)
        ));
    }
    hits
}

/// The hit functions' names, hash-less, each once, in the order of the
/// hits.
fn order(functions: &[Function], hits: &[u64]) -> Vec<String> {
    let by_addr: HashMap<u64, &Function> = functions.iter().rev().map(|f| (f.addr, f)).collect();
    let mut seen = HashSet::new();
    hits.iter()
        .filter_map(|addr| by_addr.get(addr))
        .map(|f| order_key(&f.demangled))
        .filter(|key| seen.insert(key.clone()))
        .collect()
}

/// Bytes of code in the hit functions.
fn ran_bytes(functions: &[Function], hits: &[u64]) -> u64 {
    let sizes: HashMap<u64, u64> = functions.iter().map(|f| (f.addr, f.size)).collect();
    let hits: HashSet<&u64> = hits.iter().collect();
    hits.into_iter().filter_map(|a| sizes.get(a)).sum()
}

/// gdb, its data directory (the Python code it runs at every stop) and
/// the standard library of the Python it embeds, all copied into the rig's
/// VM (rig.sh adds gdb's shared libraries).
fn gdb_files() -> Vec<PathBuf> {
    let gdb = which("gdb").unwrap_or_else(|| die("gdb not found: apt-get install gdb"));
    let output = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_else(|e| die(&format!("run {cmd:?}: {e}")))
    };
    let data = output(Command::new(&gdb).args(["-nx", "-batch", "-ex", "show data-directory"]));
    let ldd = output(Command::new("ldd").arg(&gdb));
    let mut files = vec![gdb];
    // "GDB's data directory is "/usr/share/gdb"."
    if let Some(dir) = data.split('"').nth(1) {
        files.push(PathBuf::from(dir));
    }
    // "libpython3.11.so.1.0 => ...": /usr/lib/python3.11.
    if let Some(at) = ldd.find("libpython3.") {
        let version: String = ldd[at + "libpython".len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        files.push(Path::new("/usr/lib").join(format!("python{}", version.trim_end_matches('.'))));
    }
    files.retain(|f| f.exists());
    files
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn git_head() -> String {
    Command::new("git")
        .args([
            "-C",
            &moat_tests::repo_root().display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "an unknown revision".into())
}

fn die(message: &str) -> ! {
    eprintln!("code-order: {message}");
    std::process::exit(1);
}
