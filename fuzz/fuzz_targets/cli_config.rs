//! The command line and the config file: any arguments (split at NUL
//! bytes) parsed as `moat` and, for `moat run`, turned into a VM config;
//! in API mode, the process options; and the same bytes as a config file
//! (Firecracker's JSON).
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use moat_vmm::api::model::VmResources;
use moat_vmm::cli::{Cli, Command};

fuzz_target!(|data: &[u8]| {
    let args = std::iter::once("moat".to_string()).chain(
        data.split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned()),
    );
    if let Ok(cli) = Cli::try_parse_from(args) {
        match cli.command {
            Some(Command::Run(run)) => {
                let _ = run.log.options();
                let _ = run.jail.config();
                let _ = run.into_config();
            }
            None => {
                let _ = cli.api.into_options();
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        // It checks what it parses.
        let _ = VmResources::from_json(text);
    }
});
