#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz targets that parse text or files
into fuzz/corpus/<target>/ (the virtio and port targets' seeds are inputs
the fuzzer found, minimized, in the same place). Run from anywhere; the
hostile guest's ELF is taken as a kernel seed when given as argument."""
import hashlib
import os
import struct
import sys

here = os.path.dirname(os.path.abspath(__file__))
corpus = os.path.join(here, "..", "corpus")


def seed(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def args(*a):
    return "\0".join(a)


# The command line: each option's forms, and API mode.
seed("cli_config", args("run", "--kernel", "/k", "--initramfs", "/i", "--cmdline", "console=ttyS0",
                        "--cpus", "boot=2", "--memory", "size=512M"))
seed("cli_config", args("run", "--kernel", "/k", "--disk", "path=/d,readonly=on,id=root",
                        "--disk", "path=/e", "--net", "tap=tap0,mac=02:00:00:00:00:01",
                        "--vsock", "cid=3,socket=/tmp/v.sock", "--forward",
                        "unix:/tmp/f.sock=vsock:2375", "--rng", "rate=4096"))
seed("cli_config", args("run", "--kernel", "/k", "--boot-protocol", "pvh", "--seccomp", "off",
                        "--shutdown-timeout", "2.5", "--trace-exits=/tmp/t.json,live",
                        "--level", "Debug", "--log-path", "/tmp/l"))
seed("cli_config", args("run", "--kernel", "/k", "--jail", "/srv/j", "--uid", "1000", "--gid", "1000",
                        "--netns", "/var/run/netns/n", "--cgroup", "memory.max=256M,pids.max=64"))
seed("cli_config", args("--api-sock", "/tmp/a.sock", "--id", "vm-1", "--level", "Info",
                        "--metrics-path", "/tmp/m", "--no-seccomp"))
seed("cli_config", args("--config-file", "/tmp/c.json", "--no-api", "--boot-timer"))
config = ('{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0",'
          ' "initrd_path": "/i"},'
          ' "drives": [{"drive_id": "rootfs", "path_on_host": "/d", "is_root_device": true,'
          ' "is_read_only": false}],'
          ' "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},'
          ' "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",'
          ' "guest_mac": "02:00:00:00:00:01"}],'
          ' "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},'
          ' "entropy": {"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}},'
          ' "logger": {"log_path": "/tmp/l", "level": "Info"}, "metrics": {"metrics_path": "/tmp/m"}}')
seed("cli_config", config)


def http(method, path, body=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head + "\r\n" + body


# The API: Firecracker's calls, one per seed and all of them pipelined.
calls = [
    http("GET", "/"), http("GET", "/version"), http("GET", "/machine-config"), http("GET", "/vm/config"),
    http("PUT", "/machine-config", '{"vcpu_count": 2, "mem_size_mib": 256}'),
    http("PATCH", "/machine-config", '{"mem_size_mib": 512}'),
    http("PUT", "/boot-source", '{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}'),
    http("PUT", "/drives/rootfs",
         '{"drive_id": "rootfs", "path_on_host": "/d", "is_root_device": true, "is_read_only": false}'),
    http("PATCH", "/drives/rootfs", '{"drive_id": "rootfs", "path_on_host": "/e"}'),
    http("PUT", "/network-interfaces/eth0",
         '{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01"}'),
    http("PATCH", "/network-interfaces/eth0", '{"iface_id": "eth0"}'),
    http("PUT", "/vsock", '{"guest_cid": 3, "uds_path": "/tmp/v.sock"}'),
    http("PUT", "/entropy", '{"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}}'),
    http("PUT", "/actions", '{"action_type": "FlushMetrics"}'),
    http("PATCH", "/vm", '{"state": "Paused"}'),
    "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n",
    "GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
]
for c in calls:
    seed("api_request", c)
seed("api_request", "".join(calls))

# Kernels: a minimal ELF (as tests' idle kernel), a bzImage setup header,
# and the hostile guest if given.
code = bytes([0xfb, 0xf4, 0xeb, 0xfd])
load, code_at = 0x100000, 64 + 56
elf = bytes([0x7f, ord("E"), ord("L"), ord("F"), 2, 1, 1, 0]) + bytes(8)
elf += struct.pack("<HHIQQQIHHHHHH", 2, 0x3e, 1, load + code_at, 64, 0, 0, 64, 56, 1, 0, 0, 0)
elf += struct.pack("<IIQQQQQQ", 1, 5, 0, load, load, code_at + 4, code_at + 4, 0x1000)
seed("kernel_loader", elf + code)
bz = bytearray(4096)
bz[0x1f1] = 3                                    # setup_sects
bz[0x1fe:0x200] = b"\x55\xaa"                    # boot flag
bz[0x202:0x206] = b"HdrS"
struct.pack_into("<H", bz, 0x206, 0x020f)        # protocol 2.15
bz[0x211] = 1                                    # loadflags: LOADED_HIGH
struct.pack_into("<I", bz, 0x22c, 0x7fffffff)    # initrd_addr_max
struct.pack_into("<I", bz, 0x230, 0x200000)      # kernel_alignment
struct.pack_into("<H", bz, 0x236, 0x3)           # xloadflags: KERNEL_64
seed("kernel_loader", bytes(bz))
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        seed("kernel_loader", f.read())
