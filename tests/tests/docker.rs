//! Docker in a moat guest (resources/docker, docs/docker.md): Debian's
//! cloud kernel, systemd, dockerd and containerd from Debian 12's packages,
//! root on a virtio disk, eth0 on a TAP, dockerd's API on vsock. The
//! guest's image has no registry to pull from here, so the tests `docker
//! load` a busybox image built locally (resources/docker/busybox-image.sh).
//!
//! The image runs /etc/moat-test.sh (written into a copy of its disk) once
//! dockerd is up, between MOAT-TEST-BEGIN and MOAT-TEST-END on the console,
//! and powers off. Through the rig, the "host" below is the rig's VM: the
//! TAP, the forwarded socket and the host's docker CLI are there. The host
//! helper that also adds NAT to the internet (scripts/moat-tap) is tested on
//! its own, at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use moat_tests::net::value;
use moat_tests::{image, report_retry, write_into_ext4, Guest, Outcome, Scratch};

/// A value from resources/docker/net.env, which the image and the TAP
/// helper share.
fn net(key: &str) -> String {
    include_str!("../../resources/docker/net.env")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in net.env"))
        .trim_matches('"')
        .to_string()
}

/// The host's part: start moat, give its TAP the guest's gateway address,
/// serve $TOKEN over HTTP there, and time (from moat's exec) dockerd's
/// readiness (the test service starting) and the first container's output.
/// Once dockerd is up the host's own docker CLI, through the forwarded
/// socket, asks for the server's version and, if $CREATE is set, creates a
/// container the guest waits for.
const HOST: &str = r#"
log=/tmp/moat-docker-$$.log host_log=/tmp/moat-docker-host-$$.log www=/tmp/moat-www-$$
mkdir -p "$(dirname "$SOCK")" $www
echo "$TOKEN" >$www/token
: >$host_log
say() { echo "$*" >>$host_log; }
t0=$(cut -d' ' -f1 /proc/uptime)
since() { awk -v a=$t0 -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }'; }
docker() { DOCKER_HOST=unix://$SOCK timeout 60 $CLI "$@"; }
# The console goes to the test as it comes, and to $log for the checks.
mkfifo $log.fifo
tee $log <$log.fifo & tee=$!
"$@" >$log.fifo 2>&1 & moat=$!
until [ -e /sys/class/net/$TAP ]; do kill -0 $moat 2>/dev/null || break; sleep 0.1; done
ip addr add $HOST_CIDR dev $TAP && ip link set $TAP up
httpd -f -p ${HOST_CIDR%/*}:8080 -h $www & web=$!
ready= first= version= created= down=0 quiet=0 size=0
while kill -0 $moat 2>/dev/null; do
    # A guest whose console stays silent for 5 minutes is stuck (the
    # slowest step, a first docker run, prints within 2): say where moat's
    # threads are, on the console at once, and stop it.
    now=$(wc -c <$log)
    if [ "$now" = "$size" ]; then quiet=$((quiet+1)); else quiet=0; size=$now; fi
    if [ $quiet -ge 600 ]; then
        for t in /proc/$moat/task/*; do echo "HOST-MOAT-QUIET $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f3 $t/stat)"; done
        kill -9 $moat
    fi
    # moat must end once the guest is powered off: if it does not, say
    # where its threads wait, and stop it.
    if grep -q 'reboot: Power down' $log; then
        down=$((down+1))
        if [ $down -ge 120 ]; then
            for t in /proc/$moat/task/*; do say "HOST-MOAT-STUCK $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f3 $t/stat)"; done
            kill -9 $moat
        fi
    fi
    if [ -z "$ready" ] && grep -q MOAT-TEST-BEGIN $log; then ready=$(since); say HOST-DOCKERD-READY-S=$ready; fi
    if [ -z "$first" ] && grep -q 'hello from a container' $log; then first=$(since); say HOST-FIRST-OUTPUT-S=$first; fi
    if [ -n "$ready" ] && [ -z "$version" ]; then
        version=$(docker version --format '{{.Server.Version}}' 2>>$host_log) && say HOST-SERVER-VERSION=$version
    fi
    if [ -n "$CREATE" ] && [ -n "$version" ] && [ -z "$created" ]; then
        docker create --name host-was-here moat/busybox true >/dev/null 2>>$host_log && created=1 && say HOST-CREATED=1
    fi
    sleep 0.5
done
wait $moat; rc=$?
wait $tee
kill $web 2>/dev/null
cat $host_log; rm -rf $log $log.fifo $host_log $www
exit $rc
"#;

/// The first boot: load the image, run it, reach the host through docker0
/// and the guest's NAT (keeping what came back in a volume), a detached
/// container with exec and ps, and wait for the host CLI's container.
/// Removes what a previous attempt left, so a retried run starts clean.
const FIRST_BOOT: &str = r#"
docker rm -f sleeper host-was-here >/dev/null 2>&1; docker volume rm moatvol >/dev/null 2>&1
echo GUEST-SERVER-VERSION=$(docker version --format '{{.Server.Version}}')
docker load -i /root/busybox-image.tar || exit 1
docker run --rm moat/busybox || exit 1
echo "NAT=$(docker run --rm -v moatvol:/data moat/busybox sh -c 'wget -q -O - http://@HOST@:8080/token | tee /data/token')"
docker run -d --name sleeper moat/busybox sleep 100000 >/dev/null || exit 1
echo "EXEC=$(docker exec sleeper sh -c 'echo exec-ok >/marker; cat /marker')"
echo "PS=$(docker ps --filter name=sleeper --format '{{.Names}}/{{.Image}}/{{.State}}')"
docker kill sleeper >/dev/null
i=0; until docker inspect host-was-here >/dev/null 2>&1; do
    i=$((i+1)); [ $i -ge 180 ] && { echo no container from the host CLI; exit 1; }; sleep 1
done
echo GUEST-SAW-HOST-CONTAINER=yes
"#;

/// The second boot of the same disk: the volume, the stopped container's
/// own files and the host CLI's container are still there.
const SECOND_BOOT: &str = r#"
echo "VOLUME=$(docker run --rm -v moatvol:/data moat/busybox cat /data/token)"
docker start sleeper >/dev/null && echo "MARKER=$(docker exec sleeper cat /marker)"
echo "CONTAINERS=$(docker ps -a --format '{{.Names}}' | sort | tr '\n' ,)"
docker kill sleeper >/dev/null
"#;

struct DockerGuest {
    scratch: Scratch,
    disk: PathBuf,
}

impl DockerGuest {
    /// A fresh copy of the built image's disk.
    fn new(name: &str) -> DockerGuest {
        let scratch = Scratch::new(name);
        let disk = scratch.path("docker.ext4");
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(image("DOCKER_ROOTFS"))
            .arg(&disk)
            .status()
            .expect("cp");
        assert!(status.success(), "copy the Docker guest's disk");
        DockerGuest { scratch, disk }
    }

    /// Boots the disk with `script` as its test script; `create` has the
    /// host CLI create the container FIRST_BOOT waits for.
    fn boot(&self, script: &str, create: bool, token: &str) -> Outcome {
        let host_cidr = format!("{}/{}", net("DOCKER_HOST_ADDR"), net("DOCKER_PREFIX"));
        let script = script.replace("@HOST@", &net("DOCKER_HOST_ADDR"));
        write_into_ext4(&self.disk, "/etc/moat-test.sh", script.as_bytes());
        let socket = self.scratch.path("run/vsock.sock");
        let docker_socket = self.scratch.path("run/docker.sock");
        let tap = format!("mtdock{}", std::process::id() % 100_000);
        let cli = image("DOCKER_CLI");
        let host = format!(
            "TAP={tap}; HOST_CIDR={host_cidr}; TOKEN={token}; CLI={}; SOCK={}; CREATE={}\n{HOST}",
            cli.display(),
            docker_socket.display(),
            if create { "1" } else { "" },
        );
        let cmdline = std::fs::read_to_string(image("DOCKER_CMDLINE")).unwrap();
        // One vCPU, in a one-vCPU rig: the two-vCPU rig crashes under this
        // load now and then (docs/testing.md).
        Guest::new(image("DOCKER_KERNEL"))
            .initramfs(image("DOCKER_INITRD"))
            .args(["--cmdline", cmdline.trim(), "--cpus", "boot=1"])
            .args(["--memory", "size=1536M", "--net", &format!("tap={tap}")])
            .args(["--vsock", &format!("cid=3,socket={}", socket.display())])
            .args([
                "--forward",
                &format!(
                    "unix:{}=vsock:{}",
                    docker_socket.display(),
                    net("DOCKER_VSOCK_PORT")
                ),
            ])
            .disk(&self.disk, "")
            .host_file(cli)
            .host_script(&host)
            .rig_memory_mib(3072)
            .timeout(Duration::from_secs(900))
            .run()
            .unwrap()
    }
}

fn seconds(out: &Outcome, key: &str) -> f64 {
    value(&out.console, key).parse().unwrap_or(f64::NAN)
}

#[test]
fn docker_runs_containers_with_network_and_volumes_that_survive_a_second_boot() {
    let guest = DockerGuest::new("docker");
    let token = format!("token-{}", std::process::id());

    let first = guest.boot(FIRST_BOOT, true, &token);
    // The test service powers the guest off: status 0.
    first.assert_success();
    let c = &first.console;
    assert!(
        first
            .test_output
            .contains("hello from a container in a moat guest"),
        "{}",
        first.tail(40)
    );
    assert_eq!(value(c, "NAT"), token, "container -> docker0 -> NAT -> TAP");
    assert_eq!(value(c, "EXEC"), "exec-ok");
    assert_eq!(value(c, "PS"), "sleeper/moat/busybox/running");
    let server = value(c, "GUEST-SERVER-VERSION");
    assert!(!server.is_empty(), "{}", first.tail(40));
    assert_eq!(
        value(c, "HOST-SERVER-VERSION"),
        server,
        "the host's docker CLI reaches the guest's dockerd"
    );
    assert_eq!(value(c, "GUEST-SAW-HOST-CONTAINER"), "yes");
    report_retry(&format!(
        "docker guest, first boot: dockerd ready {:.1} s, first container output {:.1} s after moat's exec ({} backend)",
        seconds(&first, "HOST-DOCKERD-READY-S"),
        seconds(&first, "HOST-FIRST-OUTPUT-S"),
        if first.l1_console.is_some() { "rig" } else { "direct" },
    ));

    let second = guest.boot(SECOND_BOOT, false, &token);
    second.assert_success();
    let c = &second.console;
    assert_eq!(value(c, "VOLUME"), token, "{}", second.tail(40));
    assert_eq!(value(c, "MARKER"), "exec-ok", "the container's own files");
    assert_eq!(
        value(c, "CONTAINERS"),
        "host-was-here,sleeper,",
        "{}",
        second.tail(40)
    );
    report_retry(&format!(
        "docker guest, second boot: dockerd ready {:.1} s after moat's exec",
        seconds(&second, "HOST-DOCKERD-READY-S"),
    ));
}

/// scripts/moat-tap on this host: the TAP with its address, the NAT
/// table, forwarding on, and all of it gone again after `down`.
#[test]
fn the_tap_helper_sets_up_address_nat_and_forwarding_and_removes_them() {
    let helper = moat_tests::repo_root().join("scripts/moat-tap");
    let tap = format!("mttap{}", std::process::id() % 100_000);
    // A documentation range (RFC 5737): nothing real is routed there.
    let cidr = "198.51.100.1/30";
    let run = |args: &[&str]| {
        let out = Command::new(&helper).args(args).output().expect("moat-tap");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let (code, text) = run(&["up", &tap, cidr]);
    assert_eq!(code, Some(0), "{text}");
    let (code, status) = run(&["status", &tap]);
    let cleanup = run(&["down", &tap]);
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains(cidr), "{status}");
    assert!(
        status.contains(&format!("nat: table ip moat-{tap}")),
        "{status}"
    );
    assert!(status.contains("ip_forward: 1"), "{status}");
    assert_eq!(cleanup.0, Some(0), "{}", cleanup.1);
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists());
    let nft = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&nft.stdout).contains(&format!("moat-{tap}")),
        "the NAT table is gone"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        forward_before,
        "forwarding is back as it was"
    );
    // Bad input: one line naming the problem, status 2.
    let (code, text) = run(&["up", &tap, "10.0.0.300/24"]);
    assert_eq!(code, Some(2), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("bad address"), "{text}");
}
