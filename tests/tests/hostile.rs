//! A hostile guest (resources/hostile/hostile.c): a bare-metal program
//! booted in place of a kernel that drives moat's virtio devices as no
//! driver should, then checks they still work once reset. moat must stay
//! up, go idle afterwards, keep both disks intact outside the ranges the
//! guest may write (the second half of the read-write disk; nothing of the
//! read-only one), and end with status 0 when the guest resets the machine.

use moat_tests::net::value;
use moat_tests::{image, Guest, Scratch};

/// The host's part: the console into a log, moat's stdin from a FIFO the
/// script holds; once the guest says HOSTILE-IDLE, moat's CPU time outside
/// its vCPU threads is measured over 3 s (HOST-IDLE-TICKS, in 1/100 s),
/// then a byte lets the guest reset the machine.
const MEASURE_IDLE: &str = r#"log=/tmp/moat-hostile-$$.log; out=/tmp/moat-hostile-$$.out; in=/tmp/moat-hostile-$$.in
mkfifo "$out" "$in"
tee "$log" <"$out" & tee=$!
exec 3<>"$in"
"$@" <"$in" >"$out" 2>&1 & moat=$!
i=0; until grep -q HOSTILE-IDLE "$log"; do
    kill -0 $moat 2>/dev/null || break
    i=$((i+1)); [ $i -ge 4500 ] && break
    sleep 0.2
done
ticks() {
    total=0
    for t in /proc/$moat/task/*; do
        case $(cat $t/comm 2>/dev/null) in
            vcpu*|"") ;;
            *) set -- $(cut -d' ' -f14,15 $t/stat 2>/dev/null); total=$((total + ${1:-0} + ${2:-0})) ;;
        esac
    done
    echo $total
}
if kill -0 $moat 2>/dev/null; then
    sleep 1
    a=$(ticks); sleep 3; b=$(ticks)
    echo "HOST-IDLE-TICKS=$((b - a))"
    for t in /proc/$moat/task/*; do echo "HOST-THREAD $(cat $t/comm) $(cut -d' ' -f14,15 $t/stat)"; done
fi
printf x >&3
stop_if_stuck $moat 60
wait $moat; rc=$?
exec 3>&-
wait $tee; rm -f "$log" "$out" "$in"
exit $rc"#;

const SECTOR: usize = 512;

/// A disk whose every sector holds its own number's pattern.
fn patterned(sectors: usize) -> Vec<u8> {
    (0..sectors * SECTOR)
        .map(|i| ((i / SECTOR) as u8).wrapping_mul(7).wrapping_add(1) ^ (i % 251) as u8)
        .collect()
}

#[test]
fn a_hostile_guest_leaves_moat_up_idle_and_the_disks_intact() {
    let scratch = Scratch::new("hostile");
    let (rw, ro) = (scratch.path("rw.img"), scratch.path("ro.img"));
    let original = patterned(4096);
    std::fs::write(&rw, &original).unwrap();
    std::fs::write(&ro, &original).unwrap();
    let seed: u64 = std::env::var("MOAT_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        });
    println!("hostile guest seed {seed} (MOAT_HOSTILE_SEED={seed} replays it)");
    let vsock = format!("/tmp/moat-hostile-{}.sock", std::process::id());
    let out = Guest::new(image("HOSTILE_KERNEL"))
        .no_initramfs()
        // One disk with each engine: the hostile chains reach both.
        .disk(&rw, "io_engine=async")
        .disk(&ro, "readonly=on")
        .args([
            "--cmdline".to_string(),
            format!("hostile.seed={seed} hostile.rounds=3000"),
            "--net".to_string(),
            "tap=mhostile0".to_string(),
            "--vsock".to_string(),
            format!("cid=3,socket={vsock}"),
        ])
        .host_script(MEASURE_IDLE)
        .timeout(std::time::Duration::from_secs(900))
        .run()
        .unwrap();
    let _ = std::fs::remove_file(&vsock);
    let console = &out.console;
    assert!(
        console.contains("HOSTILE-DONE fails=0"),
        "seed {seed}: a check failed or the guest did not finish:\n{}",
        out.tail(40)
    );
    assert_eq!(
        out.status,
        0,
        "seed {seed}: moat did not end with 0 after the guest's reset:\n{}",
        out.tail(40)
    );
    assert!(console.contains("HOSTILE-RESET"), "{}", out.tail(20));
    let devices = console.matches("HOSTILE-DEVICE ").count();
    assert_eq!(devices, 5, "2 disks, net, vsock, rng:\n{}", out.tail(40));
    for check in [
        "HOSTILE-CHECK block",
        "HOSTILE-CHECK rng",
        "HOSTILE-CHECK net",
        "HOSTILE-CHECK vsock",
    ] {
        assert!(console.contains(check), "no {check}:\n{}", out.tail(40));
    }
    assert_eq!(console.matches("HOSTILE-CHECK block").count(), 2);
    // Idle: a spinning event loop or device thread shows ~300 ticks in 3 s.
    let ticks: u64 = value(console, "HOST-IDLE-TICKS").parse().unwrap();
    assert!(
        ticks <= 15,
        "seed {seed}: moat used {ticks}/300 of a CPU while the guest idled:\n{}",
        out.tail(20)
    );
    let after = std::fs::read(&rw).unwrap();
    let half = original.len() / 2;
    assert_eq!(after.len(), original.len());
    if let Some(i) = (0..half).find(|&i| after[i] != original[i]) {
        panic!(
            "seed {seed}: the read-write disk changed at byte {i} (sector {}), outside the half the guest writes",
            i / SECTOR
        );
    }
    assert!(
        std::fs::read(&ro).unwrap() == original,
        "seed {seed}: the read-only disk changed"
    );
    println!(
        "hostile guest: moat idle at {ticks}/300 ticks; {} device(s) attacked",
        devices
    );
}
