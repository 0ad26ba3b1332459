//! The jail (`moat run --jail DIR --uid N --gid N`, and the same options
//! in API mode), seen from outside: what the jailed moat is (uid,
//! capabilities, namespaces, root, limits, descriptors) while its guest
//! runs, and that it ends as an unjailed moat would. The jail is set up
//! before the guest runs, so these use an idle ELF guest and run moat
//! directly on any /dev/kvm (the nested PVM one of our build machines will
//! do), as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_tests::{api_request as request, idle_kernel, moat_bin, Scratch};

const NOBODY: &str = "65534";

fn need_root_and_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests start moat directly: they need a /dev/kvm (any kind)"
    );
    // SAFETY: geteuid only returns a number.
    assert_eq!(unsafe { libc::geteuid() }, 0, "--jail needs root");
}

/// `/proc/PID/status` as (key, value) lines.
fn status(pid: u32) -> Vec<(String, String)> {
    status_of(&format!("/proc/{pid}/status"))
}

/// The `moat run` arguments of a jailed idle guest, then `extra`.
fn jailed_args(kernel: &Path, jail: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "size=64M",
        "--shutdown-timeout",
        "0",
        "--jail",
        jail.to_str().unwrap(),
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn field(status: &[(String, String)], key: &str) -> String {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The one child of `pid` (the jailed moat), once it runs as `uid` with
/// every thread filtered, i.e. once its guest runs.
fn jailed_child(pid: u32, uid: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(child) = child_of(pid) {
            let s = status(child);
            let threads = threads(child);
            if field(&s, "Uid").split_whitespace().next() == Some(uid)
                && threads.len() >= 3
                && threads.iter().all(|(_, s)| field(s, "Seccomp") == "2")
            {
                return child;
            }
        }
        assert!(Instant::now() < deadline, "no jailed moat under {pid}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child of `pid` (by its PPid: /proc/PID/task/TID/children is not in
/// every kernel).
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| field(&status(*p), "PPid") == pid.to_string())
}

/// Each thread's name and status.
fn threads(pid: u32) -> Vec<(String, Vec<(String, String)>)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok())
        .map(|tid| {
            let s = status_of(&format!("/proc/{pid}/task/{tid}/status"));
            (field(&s, "Name"), s)
        })
        .collect()
}

fn status_of(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn start(args: &[String]) -> Child {
    Command::new(moat_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stop(mut moat: Child) -> (i32, String) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(moat.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while moat.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = moat.kill();
            panic!("moat did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = moat.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_jailed_moat_has_its_uid_no_capabilities_its_own_namespaces_and_only_the_vms_files() {
    need_root_and_kvm();
    let scratch = Scratch::new("jail");
    let kernel = idle_kernel(&scratch.path("idle.elf"));
    let disk = scratch.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let jail = scratch.path("jail");
    let moat = start(&jailed_args(
        &kernel,
        &jail,
        &["--disk", &format!("path={}", disk.display())],
    ));
    let child = jailed_child(moat.id(), NOBODY);
    let s = status(child);

    // Its ids, and not one capability, nor a way to gain one.
    for key in ["Uid", "Gid"] {
        assert_eq!(
            field(&s, key),
            format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}"),
            "{key}"
        );
    }
    assert_eq!(field(&s, "Groups"), "");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&s, key), "0000000000000000", "{key}");
    }
    assert_eq!(field(&s, "NoNewPrivs"), "1");
    for (name, s) in threads(child) {
        assert_eq!(field(&s, "Seccomp"), "2", "thread {name}");
        assert_eq!(field(&s, "CapEff"), "0000000000000000", "thread {name}");
    }

    // PID 1 of its own PID namespace, and its own mount, IPC and UTS ones.
    assert_eq!(field(&s, "NSpid"), format!("{child}\t1"));
    let me = std::process::id().to_string();
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            ns(&child.to_string(), kind),
            ns(&me, kind),
            "{kind} namespace"
        );
    }
    assert_eq!(
        ns(&child.to_string(), "net"),
        ns(&me, "net"),
        "no --netns: the host's"
    );

    // Its root holds the VM's files at their paths and nothing else: no
    // /etc, /bin, /proc; the host's directory stays empty.
    let root = PathBuf::from(format!("/proc/{child}/root"));
    for path in [&kernel, &disk, &PathBuf::from("/dev/kvm")] {
        let inside = root.join(path.strip_prefix("/").unwrap());
        assert!(inside.exists(), "{} not in the jail", path.display());
    }
    for absent in ["etc", "bin", "usr", "proc", "sys", "root", "dev/null"] {
        assert!(!root.join(absent).exists(), "/{absent} is in the jail");
    }
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let expected_top: std::collections::BTreeSet<String> = [&kernel, &disk]
        .iter()
        .map(|p| p.iter().nth(1).unwrap().to_string_lossy().into_owned())
        .chain(["dev".to_string()])
        .collect();
    for name in &top {
        assert!(
            expected_top.contains(name),
            "/{name} is in the jail ({top:?})"
        );
    }
    assert_eq!(
        std::fs::read_dir(&jail).unwrap().count(),
        0,
        "the host's {}",
        jail.display()
    );
    // The root is read-only; the disk is not.
    let mounts = std::fs::read_to_string(format!("/proc/{child}/mounts")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .unwrap();
    assert!(root_mount.contains(" ro,"), "{root_mount}");

    // No core dumps (guest memory), and no descriptor it did not open but
    // stdin, stdout and stderr.
    let limits = std::fs::read_to_string(format!("/proc/{child}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        &core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    for fd in std::fs::read_dir(format!("/proc/{child}/fd"))
        .unwrap()
        .flatten()
    {
        let n: u32 = fd.file_name().to_str().unwrap().parse().unwrap();
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        let vm_own = t.starts_with("anon_inode:") || t == "/dev/kvm" || target == disk;
        assert!(n <= 2 || vm_own, "fd {n} -> {t}");
    }

    // It ends as moat does, and the waiting process passes its status on.
    let (code, stderr) = stop(moat);
    assert_eq!(code, 143, "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
}

/// The child of `pid` once it runs as `uid`.
fn child_as(pid: u32, uid: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(child) = child_of(pid) {
            if field(&status(child), "Uid").split_whitespace().next() == Some(uid) {
                return child;
            }
        }
        assert!(Instant::now() < deadline, "no child of {pid} as uid {uid}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chown(path: &Path, id: u32) {
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
}

#[test]
fn in_api_mode_the_jail_is_the_prepared_directory_and_no_request_is_served_as_root() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    need_root_and_kvm();
    let scratch = Scratch::new("jail-api");
    // What the operator prepares, as for Firecracker's jailer: the VM's
    // files in the directory, owned by the uid where it must write.
    let jail = scratch.path("jail");
    std::fs::create_dir_all(&jail).unwrap();
    let nobody: u32 = NOBODY.parse().unwrap();
    chown(&jail, nobody);
    idle_kernel(&jail.join("idle.elf"));
    let disk = jail.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    chown(&disk, nobody);
    let outside = idle_kernel(&scratch.path("outside.elf"));

    let moat = Command::new(moat_bin())
        .args(["--api-sock", "api.sock", "--id", "jailed", "--jail"])
        .arg(&jail)
        .args(["--uid", NOBODY, "--gid", NOBODY])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The socket's path, like every later one, is in the jail.
    let sock = jail.join("api.sock");
    let child = child_as(moat.id(), NOBODY);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no {}", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    // Before any request: no capability left.
    let s = status(child);
    for key in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(field(&s, key), "0000000000000000", "{key}");
    }
    assert_eq!(field(&s, "NoNewPrivs"), "1");

    // A host path outside the jail is not there for it.
    let boot = |path: &str| format!(r#"{{"kernel_image_path": "{path}"}}"#);
    let start = r#"{"action_type": "InstanceStart"}"#;
    let (code, body) = request(
        &sock,
        "PUT",
        "/boot-source",
        &boot(outside.to_str().unwrap()),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("No such file"), "{body}");

    // The jail's own paths work, as the uid.
    assert_eq!(
        request(&sock, "PUT", "/boot-source", &boot("/idle.elf")).0,
        204
    );
    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
    assert_eq!(request(&sock, "PUT", "/machine-config", machine).0, 204);
    let drive = r#"{"drive_id": "d", "path_on_host": "/disk.img", "is_root_device": false, "is_read_only": false}"#;
    assert_eq!(request(&sock, "PUT", "/drives/d", drive).0, 204);
    let (code, body) = request(&sock, "PUT", "/actions", start);
    assert_eq!(code, 204, "{body}");
    let (_, body) = request(&sock, "GET", "/", "");
    assert!(body.contains(r#""state":"Running""#), "{body}");
    // Each thread installs its filter as it starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !threads(child)
        .iter()
        .all(|(_, s)| field(s, "Seccomp") == "2")
    {
        assert!(Instant::now() < deadline, "{:?}", threads(child));
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, s) in threads(child) {
        assert_eq!(field(&s, "CapEff"), "0000000000000000", "thread {name}");
    }

    // Its root is the directory; its /dev holds a KVM node of the uid's
    // and the TUN device only, and is not the host's directory's.
    let root = PathBuf::from(format!("/proc/{child}/root"));
    assert!(root.join("idle.elf").exists() && root.join("disk.img").exists());
    assert!(!root.join("etc").exists() && !root.join("proc").exists());
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!((kvm.uid(), kvm.mode() & 0o777), (nobody, 0o600));
    assert_eq!(kvm.rdev(), std::fs::metadata("/dev/kvm").unwrap().rdev());
    let mut dev: Vec<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dev.sort();
    let expected: Vec<&str> = if Path::new("/dev/net/tun").exists() {
        vec!["kvm", "net"]
    } else {
        vec!["kvm"]
    };
    assert_eq!(dev, expected);
    assert_eq!(std::fs::read_dir(jail.join("dev")).unwrap().count(), 0);
    assert_eq!(field(&status(child), "NSpid"), format!("{child}\t1"));

    let (code, stderr) = stop(moat);
    assert_eq!(code, 143, "{stderr}");
    assert!(!sock.exists(), "the socket outlived moat");
}

#[test]
fn cgroup_limits_apply_to_the_jailed_moat_where_cgroup_v2_is_mounted() {
    need_root_and_kvm();
    let scratch = Scratch::new("jail-cgroup");
    let kernel = idle_kernel(&scratch.path("idle.elf"));
    let jail = scratch.path("jail");
    let args = jailed_args(
        &kernel,
        &jail,
        &["--cgroup", "pids.max=64,memory.max=536870912"],
    );
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if !(v2.contains("pids") && v2.contains("memory")) {
        // This host (cgroup v1, as these build machines) cannot: moat says
        // so in one line and starts nothing.
        let out = Command::new(moat_bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("moat: jail: --cgroup needs cgroup v2 mounted at /sys/fs/cgroup")
                || stderr.contains("controller is not available"),
            "{stderr}"
        );
        return;
    }
    let moat = start(&args);
    let child = jailed_child(moat.id(), NOBODY);
    let group = PathBuf::from(format!("/sys/fs/cgroup/moat/{}", moat.id()));
    let cgroup = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
    assert_eq!(cgroup.trim(), format!("0::/moat/{}", moat.id()));
    assert_eq!(
        std::fs::read_to_string(group.join("pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    assert_eq!(
        std::fs::read_to_string(group.join("memory.max"))
            .unwrap()
            .trim(),
        "536870912"
    );
    let (code, stderr) = stop(moat);
    assert_eq!(code, 143, "{stderr}");
    assert!(!group.exists(), "{} left behind", group.display());
}

#[test]
fn jail_options_that_cannot_work_get_one_line_naming_the_option() {
    for (args, says) in [
        (
            vec!["--jail", "/tmp/j", "--uid", "0", "--gid", "1"],
            "--uid: 0 would keep root's power",
        ),
        (
            vec!["--jail", "/tmp/j", "--uid", "1", "--gid", "0"],
            "--gid: 0 is root's group",
        ),
        (
            vec!["--jail", "/", "--uid", "1", "--gid", "1"],
            "--jail: needs a directory other than /",
        ),
        (vec!["--jail", "/tmp/j", "--uid", "1"], "--gid"),
        (vec!["--uid", "1"], "--jail"),
        (
            vec![
                "--jail",
                "/tmp/j",
                "--uid",
                "1",
                "--gid",
                "1",
                "--cgroup",
                "cgroup.procs=1",
            ],
            "--cgroup: 'cgroup.procs' is not a controller's file",
        ),
    ] {
        // Both modes take the same options.
        for mode in [
            &["run", "--kernel", "/nonexistent"][..],
            &["--api-sock", "/nonexistent/api.sock"][..],
        ] {
            let mut argv = mode.to_vec();
            argv.extend(args.iter());
            let out = Command::new(moat_bin()).args(&argv).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{argv:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{argv:?}: {stderr}");
            assert!(stderr.contains(says), "{argv:?}: {stderr}");
        }
    }
}

/// Starts the jailed moat ("$@"), reports what it is once its guest runs
/// (uid, capabilities, cgroup and its limits), and waits for it. In the
/// rig this runs in L1, which mounts cgroup v2 (where nothing is mounted
/// yet) as a host's init would.
const JAILED_HOST: &str = r#"[ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] && mount -t cgroup2 none /sys/fs/cgroup
"$@" & moat=$!
child=
i=0; while [ $i -lt 600 ]; do
    child=
    for p in /proc/[0-9]*; do
        grep -q "^PPid:.$moat\$" $p/status 2>/dev/null && child=${p#/proc/}
    done
    [ -n "$child" ] && grep -q "^Uid:.65534" /proc/$child/status 2>/dev/null && break
    i=$((i+1)); sleep 0.1
done
echo "HOST-UID=$(grep ^Uid: /proc/$child/status | tr -s '\t ' ',' | cut -d, -f2-)"
echo "HOST-CAPEFF=$(grep ^CapEff: /proc/$child/status | tr -d '\t' | cut -d: -f2)"
echo "HOST-CGROUP=$(cat /proc/$child/cgroup)"
echo "HOST-PIDS-MAX=$(cat /sys/fs/cgroup/moat/$moat/pids.max)"
echo "HOST-MEMORY-MAX=$(cat /sys/fs/cgroup/moat/$moat/memory.max)"
wait $moat; rc=$?
echo "HOST-CGROUP-LEFT=$([ -d /sys/fs/cgroup/moat/$moat ] && echo yes || echo no)"
exit $rc"#;

#[test]
fn a_guest_boots_and_writes_its_disk_from_a_jailed_moat_under_cgroup_limits() {
    use moat_tests::net::value;
    use moat_tests::{debugfs_cat, fsck, make_ext4, Guest};
    let scratch = Scratch::new("jail-guest");
    let data = scratch.path("data.ext4");
    make_ext4(&data, 16);
    let out = Guest::vmlinux()
        .args([
            "--jail",
            "/tmp/moat-jail",
            "--uid",
            NOBODY,
            "--gid",
            NOBODY,
            "--cgroup",
            "pids.max=64,memory.max=1G",
        ])
        // io_uring in the jail: its kernel workers count in the cgroup's
        // pids.max, and the ring was made before the jail dropped root.
        .disk(&data, "io_engine=async")
        .host_script(JAILED_HOST)
        .script("mount /dev/vda /mnt && echo written-in-jail > /mnt/file.txt && umount /mnt")
        .run()
        .unwrap();
    out.assert_success();
    let c = &out.console;
    assert_eq!(
        value(c, "HOST-UID"),
        "65534,65534,65534,65534",
        "{}",
        out.tail(30)
    );
    assert_eq!(value(c, "HOST-CAPEFF"), "0000000000000000");
    assert!(value(c, "HOST-CGROUP").starts_with("0::/moat/"), "{c}");
    assert_eq!(value(c, "HOST-PIDS-MAX"), "64");
    assert_eq!(value(c, "HOST-MEMORY-MAX"), "1073741824");
    assert_eq!(value(c, "HOST-CGROUP-LEFT"), "no");
    fsck(&data);
    assert_eq!(debugfs_cat(&data, "/file.txt"), b"written-in-jail\n");
}
