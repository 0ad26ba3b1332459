//! Network test scripts shared by the guest tests and the rig soak: a
//! host-side script gives moat's TAP an address and plays the far end, the
//! guest configures its card and talks to it. Addresses come from a
//! documentation range (RFC 5737), so nothing here can reach a real network.

/// Waits for moat to create TAP `$1`, gives it address `$2`, and starts a
/// web server on it serving `/tmp/www`; also ping, fetch and report helpers.
/// Each helper gives up as soon as moat (`$moat`) is gone, a fetch under
/// way too: a guest that died (a triple fault ends moat) ends the host
/// script with moat's status and message, instead of the script waiting on
/// a connection to a card that no longer exists.
pub const HOST_TAP_SETUP: &str = r#"
tap_up() {
    until [ -e /sys/class/net/$1 ]; do kill -0 "$moat" 2>/dev/null || exit 1; sleep 0.1; done
    ip addr add $2/26 dev $1 && ip link set $1 up
}
# Whether another try may follow: moat runs, and fewer than $1 tries so far.
again() { i=$((i+1)); [ $i -lt $1 ] && kill -0 "$moat" 2>/dev/null; }
ping_until() {
    i=0; until ping -c 1 -W 1 $1 >/dev/null 2>&1; do again 120 || return 1; sleep 0.5; done
}
fetch_once() {
    wget -q -O $2 $1 2>/dev/null & w=$!
    while kill -0 $w 2>/dev/null; do
        kill -0 "$moat" 2>/dev/null || { kill $w; wait $w 2>/dev/null; return 1; }
        sleep 0.5
    done
    wait $w
}
fetch_until() {
    i=0; until fetch_once $1 $2; do again 120 || return 1; sleep 1; done
}
# Tells the guest (listening on port 5003) that the host is done.
tell_done() {
    i=0; until echo done | nc $1 5003 2>/dev/null; do again 120 || return 1; sleep 0.5; done
}
sha() { sha256sum < $1 | cut -d' ' -f1; }
# What the host reports is printed after moat exits: written while the
# guest prints on the same console, it could split one of the guest's lines.
host_log=/tmp/moat-host-$$.log
: >"$host_log"
say() { echo "$*" >>"$host_log"; }
report() { cat "$host_log"; rm -f "$host_log"; }
"#;

/// Host side of [`GUEST_TRANSFER`]: serves a 64 MiB blob, fetches the
/// guest's, and reports both checksums.
pub const HOST_TRANSFER: &str = r#"
"$@" & moat=$!
tap_up @TAP0@ @H0@
mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/blob bs=1M count=64 2>/dev/null
say HOST-BLOB-SHA=$(sha /tmp/www/blob)
httpd -f -p @H0@:8080 -h /tmp/www & web=$!
ping_until @G0@ && say HOST-PING-OK
fetch_until http://@G0@:8080/blob /tmp/from-guest && say HOST-GOT-SHA=$(sha /tmp/from-guest)
rm -f /tmp/from-guest
tell_done @G0@
wait $moat; rc=$?
kill $web 2>/dev/null
report
exit $rc
"#;

/// Guest side of a 64 MiB transfer each way over HTTP, with pings.
pub const GUEST_TRANSFER: &str = r#"
ip addr add @G0@/26 dev eth0 && ip link set eth0 up || exit 1
echo GUEST-FEATURES=$(cat /sys/bus/virtio/devices/virtio0/features)
ping -c 3 -W 5 @H0@ >/dev/null && echo GUEST-PING-OK
mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/blob bs=1M count=64 2>/dev/null
echo GUEST-BLOB-SHA=$(sha256sum < /tmp/www/blob | cut -d' ' -f1)
httpd -p 8080 -h /tmp/www
i=0; until wget -q -O /tmp/from-host http://@H0@:8080/blob 2>/dev/null; do i=$((i+1)); [ $i -ge 120 ] && exit 2; sleep 1; done
echo GUEST-GOT-SHA=$(sha256sum < /tmp/from-host | cut -d' ' -f1)
rm -f /tmp/from-host
# Stay up until the host has fetched our blob and says so.
nc -l -p 5003 </dev/null >/dev/null
"#;

/// A test's TAP names and addresses: card `i` gets TAP `@TAPi@` and the
/// /26 subnet `first_subnet + i` of 192.0.2.0/24, host `@Hi@`, guest `@Gi@`.
pub fn fill(script: &str, first_subnet: u8, cards: u8) -> String {
    let mut out = script.to_string();
    for i in 0..cards {
        let base = 64 * (first_subnet + i);
        let tap = format!("mt{}n{}", std::process::id() % 100_000, first_subnet + i);
        out = out
            .replace(&format!("@TAP{i}@"), &tap)
            .replace(&format!("@H{i}@"), &format!("192.0.2.{}", base + 1))
            .replace(&format!("@G{i}@"), &format!("192.0.2.{}", base + 2));
    }
    out
}

/// The value after `KEY=` on the console: one word. The guest kernel may
/// print a message (`[  71.03] ...`) into the middle of a line userspace
/// is writing, so the value ends at whitespace or a `[`.
pub fn value<'a>(console: &'a str, key: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.split_once(&format!("{key}=")).map(|(_, v)| v))
        .map(|v| {
            v.split(|c: char| c.is_whitespace() || c == '[')
                .next()
                .unwrap_or("")
        })
        .unwrap_or_else(|| panic!("no {key} in console:\n{console}"))
}

#[cfg(test)]
mod tests {
    use super::{value, HOST_TAP_SETUP};

    /// A guest that dies mid-transfer (a triple fault ends moat) must end
    /// the host script, not leave its fetch waiting on a dead connection.
    #[test]
    fn a_fetch_under_way_ends_when_moat_does() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and never answers, like a guest that stopped mid-reply.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream);
            }
        });
        // busybox's wget, as in the rig's VM.
        let bin = crate::Scratch::new("fetch-ends");
        std::os::unix::fs::symlink("/bin/busybox", bin.path("wget")).unwrap();
        let path = format!(
            "{}:{}",
            bin.path("").display(),
            std::env::var("PATH").unwrap()
        );
        let script = format!(
            "{HOST_TAP_SETUP}\nsleep 1 & moat=$!\n\
             fetch_until http://127.0.0.1:{port}/blob /dev/null; echo fetch-rc=$?"
        );
        let started = std::time::Instant::now();
        let out = std::process::Command::new("timeout")
            .args(["-k", "5", "60", "sh", "-c", &script])
            .env("PATH", path)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("fetch-rc=1"), "{stdout}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn a_value_ends_where_a_kernel_message_cuts_into_its_line() {
        let console = "GUEST-GOT-SHA=7bb3f9a5f[   71.030243] clocksource: Long readout\nX=0-1 \n";
        assert_eq!(value(console, "GUEST-GOT-SHA"), "7bb3f9a5f");
        assert_eq!(value(console, "X"), "0-1");
    }
}
