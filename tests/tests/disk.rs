//! virtio-blk guest tests: a real guest uses disks backed by host files, and
//! the host checks the files afterwards.

use moat_tests::{debugfs_cat, fsck, image, rootfs_with_script, Guest, Scratch};

/// The default command line, booting from the first disk.
fn root_cmdline() -> String {
    format!("{} root=/dev/vda rw", moat_tests::CMDLINE)
}

/// 64 KiB of a pattern the guest can regenerate: line N is "moat N".
const PATTERN_SCRIPT: &str = "i=0; while [ $i -lt 8000 ]; do echo \"moat $i\"; i=$((i+1)); done";

fn pattern() -> Vec<u8> {
    (0..8000)
        .flat_map(|i| format!("moat {i}\n").into_bytes())
        .collect()
}

#[test]
fn guest_boots_from_an_ext4_root_disk_and_its_writes_reach_the_image() {
    let scratch = Scratch::new("rootdisk");
    let script = format!("{PATTERN_SCRIPT} > /data.txt; sync; mount | grep ' / '");
    let root = rootfs_with_script(&scratch.path("root.ext4"), &script);
    let out = Guest::vmlinux()
        .no_initramfs()
        .args(["--cmdline", &root_cmdline()])
        .disk(&root, "")
        .run()
        .unwrap();
    out.assert_success();
    assert!(
        out.test_output.contains("/dev/root on / type ext4 (rw"),
        "{}",
        out.test_output
    );
    // The guest reboots without unmounting: replay the journal as the next
    // mount would, then look.
    fsck(&root);
    assert_eq!(debugfs_cat(&root, "/data.txt"), pattern());
}

#[test]
fn a_read_only_disk_refuses_writes_in_the_guest() {
    let scratch = Scratch::new("rodisk");
    let data = scratch.path("data.img");
    std::fs::write(&data, vec![0x5a; 1 << 20]).unwrap();
    let out = Guest::vmlinux()
        .disk(&data, "readonly=on")
        .script(
            "echo ro=$(cat /sys/block/vda/ro)\n\
             if echo x | dd of=/dev/vda bs=512 count=1 conv=notrunc 2>/dev/null; then echo WRITE-ALLOWED; fi\n\
             echo first=$(dd if=/dev/vda bs=1 count=4 2>/dev/null)",
        )
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.test_output.contains("ro=1"), "{}", out.test_output);
    assert!(
        !out.test_output.contains("WRITE-ALLOWED"),
        "{}",
        out.test_output
    );
    assert!(
        out.test_output.contains("first=ZZZZ"),
        "{}",
        out.test_output
    );
    assert_eq!(std::fs::read(&data).unwrap(), vec![0x5a; 1 << 20]);
}

#[test]
fn two_disks_are_visible_with_their_ids() {
    let scratch = Scratch::new("twodisks");
    let a = scratch.path("a.img");
    let b = scratch.path("b.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 2 << 20]).unwrap();
    let out = Guest::vmlinux()
        .disk(&a, "id=first-disk")
        .disk(&b, "id=second-disk,readonly=on")
        .script("for d in /sys/block/vd*; do echo \"$(basename $d) $(cat $d/serial) $(cat $d/size)\"; done")
        .run()
        .unwrap();
    out.assert_success();
    assert!(
        out.test_output.contains("vda first-disk 2048"),
        "{}",
        out.test_output
    );
    assert!(
        out.test_output.contains("vdb second-disk 4096"),
        "{}",
        out.test_output
    );
}

#[test]
fn data_synced_before_moat_is_killed_is_in_the_image() {
    let scratch = Scratch::new("kill9");
    let script = format!(
        "{PATTERN_SCRIPT} > /synced.txt; sync; echo DATA-SYNCED; \
         echo not-synced > /late.txt; sleep 1000"
    );
    let root = rootfs_with_script(&scratch.path("root.ext4"), &script);
    let out = Guest::vmlinux()
        .no_initramfs()
        .args(["--cmdline", &root_cmdline()])
        .disk(&root, "")
        .kill_after("DATA-SYNCED")
        .run()
        .unwrap();
    assert_ne!(out.status, 0, "moat was killed: {}", out.tail(10));
    assert!(out.console.contains("DATA-SYNCED"));
    fsck(&root);
    assert_eq!(debugfs_cat(&root, "/synced.txt"), pattern());
}

#[test]
fn async_disks_serve_requests_in_flight_together_and_what_the_guest_synced_survives_a_kill() {
    // io_engine=async on every disk: the root filesystem (its flush), and a
    // 4 MiB copy from vdb to vdc in four streams at once, with direct I/O
    // so each stream keeps its requests in flight at the device.
    let scratch = Scratch::new("async");
    let script = format!(
        "for p in 0 1 2 3; do \
           dd if=/dev/vdb of=/dev/vdc bs=4k skip=$((p*256)) seek=$((p*256)) count=256 \
              iflag=direct oflag=direct conv=notrunc 2>/dev/null || echo COPY-FAILED & \
         done; wait; echo COPIED; \
         {PATTERN_SCRIPT} > /synced.txt; sync; echo DATA-SYNCED; sleep 1000"
    );
    let root = rootfs_with_script(&scratch.path("root.ext4"), &script);
    let source = scratch.path("source.img");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&source, &data).unwrap();
    let copy = scratch.path("copy.img");
    std::fs::write(&copy, vec![0u8; 4 << 20]).unwrap();
    let out = Guest::vmlinux()
        .no_initramfs()
        .args(["--cmdline", &root_cmdline()])
        .disk(&root, "io_engine=async")
        .disk(&source, "readonly=on,io_engine=async")
        .disk(&copy, "io_engine=async")
        .kill_after("DATA-SYNCED")
        .run()
        .unwrap();
    assert!(out.console.contains("COPIED"), "{}", out.tail(20));
    assert!(!out.console.contains("COPY-FAILED"), "{}", out.tail(20));
    assert!(out.console.contains("DATA-SYNCED"), "{}", out.tail(20));
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "vdc differs from vdb"
    );
    fsck(&root);
    assert_eq!(debugfs_cat(&root, "/synced.txt"), pattern());
}

#[test]
fn a_locked_disk_is_refused_at_start_up() {
    let scratch = Scratch::new("locked");
    let data = scratch.path("data.img");
    std::fs::write(&data, vec![0u8; 4096]).unwrap();
    // Hold the lock the way another moat would.
    let held = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(rc, 0);
    let out = std::process::Command::new(moat_tests::moat_bin())
        .args(["run", "--kernel"])
        .arg(image("VMLINUX"))
        .arg("--disk")
        .arg(format!("path={}", data.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--disk: cannot open") && stderr.contains("locked by another process"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
