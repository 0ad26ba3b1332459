"""Drives moat with the PyPI package firecracker-python (a client written
for Firecracker): create, pause, resume and delete a microVM.

    python firecracker_python.py MOAT KERNEL ROOTFS WORKDIR

The package starts the binary at its configured path with
`--api-sock S --id I --log-path L`, then configures and starts the VM over
the socket. It only accepts a process whose name is `firecracker` (it
checks with psutil), so moat is started through a symlink of that name.

Three things the package does are replaced, none of them part of the VMM's
interface: it looks up the host's public address on the internet (no
internet here), connects to a Docker daemon in its constructor (only used
for building root filesystems from images), and rewrites the host's
nftables and creates a TAP with pyroute2 (moat creates the TAP itself when
the interface names one that does not exist). Everything else, from the
process start to the API requests and the SIGTERM on delete, is the
package's own code.

Prints one line per step (`STEP-OK name` or `STEP-FAILED name: why`) and
exits 0 when every step passed.
"""

import os
import sys
import threading
import time


def instance_state(sock):
    """The `state` of moat's GET /, asked directly (the package's own
    status() reads its config.json, not the VMM)."""
    import urllib.parse

    import requests_unixsocket

    url = "http+unix://" + urllib.parse.quote(sock, safe="") + "/"
    try:
        return requests_unixsocket.Session().get(url, timeout=10).json().get("state")
    except Exception as e:  # noqa: BLE001 - reported as the step's failure
        return f"no answer: {e}"


def main():
    moat, kernel, rootfs, work = sys.argv[1:5]
    data = os.path.join(work, "data")
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir, exist_ok=True)
    binary = os.path.join(bindir, "firecracker")
    if not os.path.islink(binary):
        os.symlink(moat, binary)

    import firecracker.config as config
    import firecracker.microvm as microvm
    import firecracker.network as network
    import firecracker.process as process
    import firecracker.vmm as vmm

    original = config.MicroVMConfig

    def ours():
        return original(
            data_path=data, binary_path=binary, snapshot_path=os.path.join(data, "snapshots")
        )

    for module in (microvm, process, vmm, network):
        module.MicroVMConfig = ours
    microvm.get_public_ip = lambda *a, **k: "192.0.2.1"
    microvm.docker.from_env = lambda *a, **k: None
    network.NetworkManager.setup = lambda self, **k: None
    network.NetworkManager.cleanup = lambda self, *a, **k: None

    from firecracker import MicroVM

    failures = 0

    def step(name, ok, detail=""):
        nonlocal failures
        if ok:
            print(f"STEP-OK {name}", flush=True)
        else:
            failures += 1
            print(f"STEP-FAILED {name}: {detail}", flush=True)

    vm = MicroVM(kernel_file=kernel, base_rootfs=rootfs, vcpu=1, memory=128)
    vm_id = vm._microvm_id
    result = vm.create()
    step("create", result == f"VMM {vm_id} created", result)
    pid_file = os.path.join(data, vm_id, "firecracker.pid")
    pid = int(open(pid_file).read()) if os.path.exists(pid_file) else None
    step("process", pid is not None and os.path.exists(f"/proc/{pid}"), f"pid {pid}")
    if pid is not None:
        # The package does not reap the child it started; reap it here, or
        # its delete() waits for a zombie.
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
    listed = [v.get("id") for v in vm.list()]
    step("list", vm_id in listed, repr(listed))
    sock = os.path.join(data, vm_id, "firecracker.socket")
    step("state-running", instance_state(sock) == "Running", instance_state(sock))
    result = vm.pause()
    step("pause", str(result).endswith("paused successfully"), repr(result))
    step("state-paused", instance_state(sock) == "Paused", instance_state(sock))
    result = vm.resume()
    step("resume", str(result).endswith("resumed successfully"), repr(result))
    step("state-resumed", instance_state(sock) == "Running", instance_state(sock))
    config_json = vm.config()
    step(
        "vm-config",
        isinstance(config_json, dict)
        and config_json.get("machine-config", {}).get("vcpu_count") == 1
        and config_json.get("drives", [{}])[0].get("drive_id") == "rootfs",
        repr(config_json),
    )
    started = time.monotonic()
    result = vm.delete()
    step("delete", result == f"VMM {vm_id} is deleted", repr(result))
    gone = not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    step("process-gone", gone, f"pid {pid}")
    step("files-gone", not os.path.exists(os.path.join(data, vm_id)), "the VM's directory is left")
    print(f"DELETE-SECONDS={time.monotonic() - started:.1f}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
