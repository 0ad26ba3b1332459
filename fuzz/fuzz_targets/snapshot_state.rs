//! The snapshot state file: any bytes as a file, and (first byte odd) the
//! rest as a payload under a valid header and checksum, so the fuzzer
//! reaches the JSON and the checks behind it. What parses must give a
//! machine that a restore can turn into a VM config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_vmm::config::VmConfig;
use moat_vmm::snapshot::{frame, parse_state, restored_config, Overrides};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 1 {
        frame(rest)
    } else {
        rest.to_vec()
    };
    if let Ok(state) = parse_state(&bytes) {
        assert_eq!(state.vcpus.len(), usize::from(state.machine.cpus));
        let base = VmConfig::for_restore("/dev/kvm".into(), false, true);
        let _ = restored_config(&base, &state.machine, &Overrides::default());
    }
});
