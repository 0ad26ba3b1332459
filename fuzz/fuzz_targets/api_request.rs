//! The API: any bytes on the socket, parsed into HTTP requests (pipelined,
//! partial, oversized), routed and their JSON bodies checked, then handed
//! to a controller before boot (every call but those that open files or
//! start the VM); then GET /vm/config's body read back as a config file.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use moat_vmm::api::http::{self, Parsed, Response};
use moat_vmm::api::model::VmResources;
use moat_vmm::api::{route, ApiCall, Controller, Next};

fuzz_target!(|data: &[u8]| {
    let mut controller = Controller::new("fuzz", PathBuf::from("/dev/null"), false, true);
    let mut rest = data;
    while !rest.is_empty() {
        let (request, used) = match http::parse(rest) {
            Parsed::Complete { request, used, .. } => (request, used),
            Parsed::Partial { .. } | Parsed::Refused(_) => break,
        };
        assert!(
            used > 0 && used <= rest.len(),
            "parse used {used} of {}",
            rest.len()
        );
        rest = &rest[used..];
        let Ok(call) = route(&request) else {
            continue;
        };
        match call {
            // These open files or start the VM.
            ApiCall::PutLogger(_) | ApiCall::PutMetrics(_) | ApiCall::Action(_) => {}
            call => {
                let _ = controller.handle(call);
            }
        }
    }
    match controller.handle(ApiCall::GetVmConfig) {
        Next::Reply(Response {
            status: 200,
            body: Some(text),
        }) => {
            let _ = VmResources::from_json(&text);
        }
        _ => panic!("GET /vm/config did not answer 200 with a body"),
    }
});
