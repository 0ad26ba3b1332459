//! Containers against microVMs on this machine, for
//! docs/containers-vs-microvms.md:
//!
//!   compare [--runs N]
//!
//! 1. Containers: the Docker guest (resources/docker) boots under moat and
//!    its dockerd runs the locally built busybox image: `docker run --rm
//!    IMAGE true` (create, start, end, delete) N times after a first run,
//!    `docker run -d` of N sleepers (create and start), the guest's
//!    MemAvailable before and after them (memory per running container,
//!    caches dropped), and `docker rm -f` of each (stop and delete). The
//!    host side samples that whole VM's resident memory.
//! 2. microVMs: the benchmark's guest (moat's kernel, a minimal /init; 1
//!    vCPU, 128 MiB) started N times, from moat's exec to the /init marker
//!    on the console and to moat's exit (the guest reboots at once, which
//!    ends moat), then N idle ones at a time: the host's MemAvailable
//!    before and after them and each moat's resident memory.
//!
//! Both parts run where the guest tests run: directly on a host with KVM,
//! else inside the test rig (so "host" above is the rig's VM, and every
//! figure is a nested, emulated machine's). Prints a table of medians and
//! writes target/compare/compare.json. `scripts/dev.sh compare` builds what
//! it needs and runs this.

use std::fmt::Write as _;
use std::time::Duration;

use moat_tests::{image, repo_root, write_into_ext4, Guest, Outcome, Scratch};

/// The guest's part of 1, written into the Docker guest's disk as its
/// test script (`@RUNS@` replaced). Times come from /proc/uptime (10 ms).
const CONTAINERS: &str = r#"N=@RUNS@
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
mem() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }
docker load -i /root/busybox-image.tar >/dev/null || exit 1
# The first run sets up what the later ones reuse (layers, the bridge).
docker run --rm moat/busybox true || exit 1
i=0; while [ $i -lt $N ]; do i=$((i+1))
    t0=$(ms); docker run --rm moat/busybox true || exit 1; t1=$(ms)
    echo "CT-LIFECYCLE-MS=$((t1-t0))"
done
sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; before=$(mem)
i=0; while [ $i -lt $N ]; do i=$((i+1))
    t0=$(ms); docker run -d --name cmp$i moat/busybox sleep 100000 >/dev/null || exit 1; t1=$(ms)
    echo "CT-START-MS=$((t1-t0))"
done
sleep 2; sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; after=$(mem)
echo "CT-MEM-PER-KIB=$(( (before - after) / N ))"
i=0; while [ $i -lt $N ]; do i=$((i+1))
    t0=$(ms); docker rm -f cmp$i >/dev/null || exit 1; t1=$(ms)
    echo "CT-DELETE-MS=$((t1-t0))"
done
"#;

/// The host's part of 1: the Docker VM's resident memory, sampled.
const DOCKER_HOST: &str = r#""$@" & moat=$!
max=0
while kill -0 $moat 2>/dev/null; do
    r=$(awk '/^VmRSS:/ { print $2 }' /proc/$moat/status 2>/dev/null)
    [ -n "$r" ] && [ "$r" -gt "$max" ] && max=$r
    sleep 1
done
wait $moat; rc=$?
echo "HOST-DOCKER-VM-RSS-KIB=$max"
exit $rc"#;

/// The host's part of 2a: N microVMs one after another, each timed from
/// exec to the guest's /init marker (awk reads the console as it comes: no
/// polling to slow the machine) and to moat's exit.
const VM_LIFECYCLE: &str = r#"N=@RUNS@
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
i=0; while [ $i -lt $N ]; do i=$((i+1))
    t0=$(ms)
    { "$@" </dev/null 2>&1; echo "VM-RC=$?"; } | awk -v t0=$t0 '
        /MOAT-BENCH-INIT/ && !seen { getline u < "/proc/uptime"; split(u, a, " ");
                                     printf "VM-START-MS=%d\n", a[1] * 1000 - t0; seen = 1 }
        /VM-RC=/ { print }'
    t2=$(ms)
    echo "VM-LIFECYCLE-MS=$((t2-t0))"
done"#;

/// The host's part of 2b: N idle microVMs at once, and what they take.
const VM_FOOTPRINT: &str = r#"N=@RUNS@
mem() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }
sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; before=$(mem)
pids=
i=0; while [ $i -lt $N ]; do i=$((i+1))
    "$@" >/tmp/cmp-idle-$$-$i.log 2>&1 </dev/null & pids="$pids $!"
done
i=0; while [ $i -lt $N ]; do i=$((i+1))
    t=0; until grep -q MOAT-BENCH-INIT /tmp/cmp-idle-$$-$i.log; do
        t=$((t+1)); [ $t -gt 1200 ] && { cat /tmp/cmp-idle-$$-$i.log; exit 1; }; sleep 0.2
    done
done
sleep 2; sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; after=$(mem)
rss=0; for p in $pids; do rss=$((rss + $(awk '/^VmRSS:/ { print $2 }' /proc/$p/status))); done
echo "VM-MEM-PER-KIB=$(( (before - after) / N ))"
echo "VM-RSS-PER-KIB=$((rss / N))"
for p in $pids; do kill -9 $p; done; wait
rm -f /tmp/cmp-idle-$$-*.log
exit 0"#;

/// Every number printed as `KEY=N` in `console`.
fn values(console: &str, key: &str) -> Vec<f64> {
    let prefix = format!("{key}=");
    console
        .lines()
        .filter_map(|l| {
            let at = l.find(&prefix)?;
            l[at + prefix.len()..]
                .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn checked(what: &str, out: Outcome) -> Result<Outcome, String> {
    if out.status != 0 {
        return Err(format!(
            "{what}: ended with status {}\n{}",
            out.status,
            out.tail(40)
        ));
    }
    Ok(out)
}

fn containers(runs: usize) -> Result<Outcome, String> {
    let scratch = Scratch::new("compare-docker");
    let disk = scratch.path("docker.ext4");
    let copied = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(image("DOCKER_ROOTFS"))
        .arg(&disk)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if !copied.success() {
        return Err("cannot copy the Docker guest's disk".into());
    }
    let script = CONTAINERS.replace("@RUNS@", &runs.to_string());
    write_into_ext4(&disk, "/etc/moat-test.sh", script.as_bytes());
    let cmdline = std::fs::read_to_string(image("DOCKER_CMDLINE")).map_err(|e| e.to_string())?;
    let socket = scratch.path("vsock.sock");
    let out = Guest::new(image("DOCKER_KERNEL"))
        .initramfs(image("DOCKER_INITRD"))
        .args(["--cmdline", cmdline.trim(), "--cpus", "boot=1"])
        .args(["--memory", "size=1536M"])
        .args(["--vsock", &format!("cid=3,socket={}", socket.display())])
        .disk(&disk, "")
        .host_script(DOCKER_HOST)
        .rig_memory_mib(3072)
        .rig_cpus(1)
        .timeout(Duration::from_secs(1200))
        .run()?;
    checked("the Docker guest", out)
}

/// The microVMs: the benchmark's guest (resources/bench: moat's kernel, an
/// /init that prints its marker first thing, sleeps `hold_ms`, reboots).
fn microvms(runs: usize, host: &str, hold_ms: u64) -> Result<Outcome, String> {
    let cmdline =
        format!("console=ttyS0 panic=1 i8042.noaux i8042.nokbd quiet reboot=k -- {hold_ms}");
    let out = Guest::vmlinux()
        .initramfs(image("BENCH_INITRAMFS"))
        .args([
            "--cpus",
            "boot=1",
            "--memory",
            "size=128M",
            "--cmdline",
            &cmdline,
        ])
        .host_script(&host.replace("@RUNS@", &runs.to_string()))
        .rig_cpus(1)
        .timeout(Duration::from_secs(900))
        .run()?;
    checked("the microVMs", out)
}

fn main() {
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--runs", Some(n)) if n > 0 => runs = n,
            _ => {
                eprintln!("compare: usage: compare [--runs N]");
                std::process::exit(2);
            }
        }
    }
    let result = (|| -> Result<(), String> {
        eprintln!("compare: containers in the Docker guest ({runs} of each)");
        let docker = containers(runs)?;
        eprintln!("compare: microVMs one after another ({runs})");
        let lifecycle = microvms(runs, VM_LIFECYCLE, 0)?;
        eprintln!("compare: {runs} idle microVMs at once");
        let footprint = microvms(runs, VM_FOOTPRINT, 3_600_000)?;
        report(runs, &docker, &lifecycle, &footprint)
    })();
    if let Err(e) = result {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

fn report(
    runs: usize,
    docker: &Outcome,
    lifecycle: &Outcome,
    footprint: &Outcome,
) -> Result<(), String> {
    let d = &docker.console;
    let (l, f) = (&lifecycle.console, &footprint.console);
    let one = |c: &str, key: &str| {
        median(values(c, key)).ok_or_else(|| format!("no {key} in the output"))
    };
    let all_of = |c: &str, key: &str| -> Result<f64, String> {
        let v = values(c, key);
        if v.len() != runs {
            return Err(format!("{} {key} values, not {runs}", v.len()));
        }
        median(v).ok_or_else(|| format!("no {key}"))
    };
    // (key, what, container, microVM, unit)
    let rows: Vec<(&str, &str, f64, f64, &str)> = vec![
        (
            "create_start_end_delete_ms",
            "create, start, end, delete (run --rm true / boot, power off)",
            all_of(d, "CT-LIFECYCLE-MS")?,
            all_of(l, "VM-LIFECYCLE-MS")?,
            "ms",
        ),
        (
            "create_start_ms",
            "create and start (run -d / exec to the guest's /init)",
            all_of(d, "CT-START-MS")?,
            all_of(l, "VM-START-MS")?,
            "ms",
        ),
        (
            "memory_per_instance_kib",
            "memory per running instance (host MemAvailable drop)",
            one(d, "CT-MEM-PER-KIB")?,
            one(f, "VM-MEM-PER-KIB")?,
            "KiB",
        ),
    ];
    let codes = values(l, "VM-RC");
    if codes.len() != runs || codes.iter().any(|c| *c != 0.0) {
        return Err(format!(
            "the microVMs ended with {codes:?}\n{}",
            lifecycle.tail(30)
        ));
    }
    let delete = all_of(d, "CT-DELETE-MS")?;
    let vm_rss = one(f, "VM-RSS-PER-KIB")?;
    let docker_vm_rss = one(d, "HOST-DOCKER-VM-RSS-KIB")?;
    let place = if lifecycle.l1_console.is_some() {
        "inside the test rig (QEMU TCG L1, nested KVM)"
    } else {
        "directly on this host's KVM"
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "containers vs microVMs ({place}; medians of {runs}; {})",
        chrono_free_date()
    );
    let _ = writeln!(
        table,
        "{:<62} {:>5} {:>12} {:>12} {:>9}",
        "", "unit", "container", "microVM", "VM/ct"
    );
    let mut json = format!("{{\"place\": \"{place}\", \"runs\": {runs}, \"rows\": [");
    for (i, (key, what, ct, vm, unit)) in rows.iter().enumerate() {
        let _ = writeln!(
            table,
            "{what:<62} {unit:>5} {ct:>12.0} {vm:>12.0} {:>9.2}",
            vm / ct
        );
        let _ = write!(
            json,
            "{}{{\"key\": \"{key}\", \"unit\": \"{unit}\", \"container\": {ct}, \"microvm\": {vm}}}",
            if i > 0 { ", " } else { "" }
        );
    }
    let _ = writeln!(
        table,
        "{:<62} {:>5} {delete:>12.0}",
        "stop and delete (rm -f)", "ms"
    );
    let _ = writeln!(
        table,
        "{:<62} {:>5} {:>12} {vm_rss:>12.0}",
        "moat's resident memory per idle microVM (RSS)", "KiB", ""
    );
    let _ = writeln!(
        table,
        "{:<62} {:>5} {docker_vm_rss:>12.0}",
        "the Docker guest's whole VM, resident (moat RSS, peak)", "KiB"
    );
    let _ = writeln!(
        json,
        "], \"container_delete_ms\": {delete}, \"microvm_rss_kib\": {vm_rss}, \"docker_vm_rss_kib\": {docker_vm_rss}}}"
    );
    print!("{table}");
    let dir = repo_root().join("target/compare");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("compare.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("compare.txt"), table).map_err(|e| e.to_string())?;
    eprintln!("compare: JSON in {}", dir.join("compare.json").display());
    Ok(())
}

/// Today's date, from `date` (no date crate for one line).
fn chrono_free_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
