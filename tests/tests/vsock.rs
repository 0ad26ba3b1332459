//! virtio-vsock and virtio-rng guest tests. The guest's side of vsock is
//! /bin/vsock (resources/guest/vsock.c, a netcat for AF_VSOCK); the host's
//! side is the same tool speaking moat's hybrid Unix-socket protocol
//! (`CONNECT <port>\n`), plus curl for a forwarded socket.

use moat_tests::net::value;
use moat_tests::{image, Guest, Scratch};

/// Host-script helpers: start moat, wait for a guest marker, and tell the
/// guest (listening on vsock port 5099) that the host is done.
const HOST_HELPERS: &str = r#"
log=/tmp/moat-vsock-$$.log
mkdir -p "$(dirname "$SOCK")"
start_moat() { "$@" >"$log" 2>&1 & moat=$!; }
ended() { wait $moat; rc=$?; cat "$log"; rm -f "$log"; exit $rc; }
wait_for() { until grep -q "$1" "$log"; do kill -0 $moat 2>/dev/null || ended; sleep 0.2; done; }
finish() {
    until echo done | $VSOCK -u $SOCK 5099 >/dev/null 2>&1; do kill -0 $moat 2>/dev/null || break; sleep 0.2; done
    ended
}
"#;

/// Guest-script helper: `listen_bg NAME ARGS...` starts `vsock ARGS` in
/// the background and returns once it listens.
const GUEST_HELPERS: &str = r#"
listen_bg() { n=$1; shift; vsock "$@" 2>/tmp/listen-$n </dev/null & until grep -q listening /tmp/listen-$n; do sleep 0.1; done; }
"#;

/// The guest's end of the "done" handshake.
const GUEST_WAIT_DONE: &str = "vsock -l 5099 </dev/null >/dev/null\n";

struct VsockGuest {
    _scratch: Scratch,
    socket: String,
}

impl VsockGuest {
    fn new(name: &str) -> VsockGuest {
        let scratch = Scratch::new(name);
        let socket = scratch.path("v.sock").to_string_lossy().into_owned();
        VsockGuest {
            _scratch: scratch,
            socket,
        }
    }

    /// A guest with a vsock device (CID 3) running `guest`, under the host
    /// script `host` (which gets $VSOCK, the tool, and $SOCK, moat's socket).
    fn run(&self, extra_args: &[&str], host: &str, guest: &str) -> moat_tests::Outcome {
        self.run_with(extra_args, &[], host, guest)
    }

    /// [`VsockGuest::run`], with more programs the host script uses.
    fn run_with(
        &self,
        extra_args: &[&str],
        host_programs: &[&str],
        host: &str,
        guest: &str,
    ) -> moat_tests::Outcome {
        let tool = image("VSOCK_TOOL");
        let host = format!(
            "VSOCK={}; SOCK={}\n{HOST_HELPERS}{host}",
            tool.display(),
            self.socket
        );
        host_programs
            .iter()
            .fold(Guest::vmlinux().host_file(tool), |g, p| g.host_file(p))
            .args([
                "--memory",
                "size=512M",
                "--vsock",
                &format!("cid=3,socket={}", self.socket),
            ])
            .args(extra_args.iter().copied())
            .host_script(&host)
            .script(&format!("{GUEST_HELPERS}{guest}{GUEST_WAIT_DONE}"))
            .run()
            .unwrap()
    }
}

#[test]
fn an_echo_service_in_the_guest_answers_a_host_client_through_connect() {
    let v = VsockGuest::new("vsock-echo");
    let out = v.run(
        &[],
        r#"start_moat "$@"; wait_for guest-ready
echo "HOST-ECHO=$(echo hello-over-vsock | $VSOCK -u $SOCK 5000)"
finish"#,
        "listen_bg echo -L 5000 cat\necho guest-ready\n",
    );
    out.assert_success();
    assert_eq!(
        value(&out.console, "HOST-ECHO"),
        "hello-over-vsock",
        "{}",
        out.tail(30)
    );
}

#[test]
fn sixty_four_mib_cross_each_way_intact() {
    let v = VsockGuest::new("vsock-64m");
    let out = v.run(
        &[],
        r#"start_moat "$@"; wait_for guest-ready
dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null
echo "HOST-BLOB=$(sha256sum </tmp/blob | cut -d' ' -f1)"
echo "GUEST-GOT=$($VSOCK -u $SOCK 5001 </tmp/blob | cut -d' ' -f1)"
rm -f /tmp/blob
$VSOCK -U ${SOCK}_6000 >/tmp/from-guest 2>/tmp/sink-listening & sink=$!
until grep -q listening /tmp/sink-listening; do sleep 0.1; done
echo host-listening | $VSOCK -u $SOCK 5002 >/dev/null
wait $sink
echo "HOST-GOT=$(sha256sum </tmp/from-guest | cut -d' ' -f1)"
rm -f /tmp/from-guest
finish"#,
        r#"listen_bg sha -L 5001 sha256sum
listen_bg go -l 5002; go=$!
echo guest-ready
wait $go
dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null
echo "GUEST-BLOB=$(sha256sum </tmp/blob | cut -d' ' -f1)"
vsock 2 6000 </tmp/blob >/dev/null
rm -f /tmp/blob
"#,
    );
    out.assert_success();
    let c = &out.console;
    assert_eq!(value(c, "HOST-BLOB").len(), 64, "{}", out.tail(30));
    assert_eq!(
        value(c, "GUEST-GOT"),
        value(c, "HOST-BLOB"),
        "host to guest"
    );
    assert_eq!(
        value(c, "HOST-GOT"),
        value(c, "GUEST-BLOB"),
        "guest to host"
    );
}

#[test]
fn two_hundred_connections_at_once_each_echo_64_kib() {
    let v = VsockGuest::new("vsock-many");
    let out = v.run(
        &[],
        r#"start_moat "$@"; wait_for guest-ready
echo "HOST-MANY=$($VSOCK -n 200 -u $SOCK 5000 65536 2>&1 | tr ' ' _)"
finish"#,
        "listen_bg echo -L 5000 cat\necho guest-ready\n",
    );
    out.assert_success();
    assert_eq!(
        value(&out.console, "HOST-MANY"),
        "echo-ok_200",
        "{}",
        out.tail(30)
    );
}

#[test]
fn a_forwarded_socket_reaches_a_web_server_in_the_guest() {
    let v = VsockGuest::new("vsock-forward");
    let forward = format!("{}.fwd", v.socket);
    let out = v.run_with(
        &["--forward", &format!("unix:{forward}=vsock:8080")],
        &["/usr/bin/curl"],
        &format!(
            r#"start_moat "$@"; wait_for guest-ready
echo "HOST-HTTP=$(curl -s --max-time 30 --unix-socket {forward} http://guest/index.html)"
finish"#
        ),
        "mkdir -p /www && echo hello-from-guest-httpd >/www/index.html\n\
         listen_bg www -L 8080 httpd -i -h /www\necho guest-ready\n",
    );
    out.assert_success();
    assert_eq!(
        value(&out.console, "HOST-HTTP"),
        "hello-from-guest-httpd",
        "{}",
        out.tail(30)
    );
}

#[test]
fn dev_hwrng_gives_random_bytes_and_the_rate_limit_holds() {
    // 16 KiB at 4 KiB/s, with a second's worth available at once: at least
    // 3 s. The guest kernel's own entropy thread may take some too, which
    // only makes it slower.
    let script = r#"
read -r t0 _ </proc/uptime
dd if=/dev/hwrng of=/tmp/r bs=1024 count=16 iflag=fullblock 2>/dev/null
read -r t1 _ </proc/uptime
echo "RNG-BYTES=$(wc -c </tmp/r)"
echo "RNG-DISTINCT=$(od -An -v -tx1 /tmp/r | tr ' ' '\n' | grep . | sort -u | wc -l)"
echo "RNG-SECONDS=$(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }')"
cat /sys/class/misc/hw_random/rng_current
"#;
    let out = Guest::vmlinux()
        .args(["--rng", "rate=4096"])
        .script(script)
        .run()
        .unwrap();
    out.assert_success();
    let o = &out.test_output;
    assert_eq!(value(o, "RNG-BYTES"), "16384", "{o}");
    let distinct: u32 = value(o, "RNG-DISTINCT").parse().unwrap();
    assert!(distinct > 200, "{distinct} distinct byte values: {o}");
    let seconds: f64 = value(o, "RNG-SECONDS").parse().unwrap();
    assert!(seconds >= 2.8, "16 KiB at 4 KiB/s took {seconds} s: {o}");
    assert!(o.contains("virtio_rng"), "{o}");
}

#[test]
fn without_rng_the_guest_has_no_virtio_entropy_device() {
    let out = Guest::vmlinux()
        .args(["--rng", "off"])
        .script("echo devices=$(ls /sys/bus/virtio/devices | wc -l)")
        .run()
        .unwrap();
    out.assert_success();
    assert_eq!(
        value(&out.test_output, "devices"),
        "0",
        "{}",
        out.test_output
    );
}
