//! The `moat` binary: parse the command line, run the VM, exit with a
//! status that says how it went.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use moat_vmm::cli::{Cli, Command};

fn fail(message: &str, code: u8) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "moat: {message}");
    ExitCode::from(code)
}

/// Lets moat hold as many descriptors as the hard limit allows: every
/// vsock connection is one, and the soft limit is often 1024.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    moat_vmm::boot_timer::process_start();
    raise_fd_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = write!(std::io::stderr(), "{}", e.render());
            return ExitCode::from(2);
        }
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first paragraph is the error; the rest is usage advice.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            return fail(first.join(" ").trim_start_matches("error: "), 2);
        }
    };
    let args = match cli.command {
        Some(Command::Run(args)) => args,
        None => {
            let options = match cli.api.into_options() {
                Ok(options) => options,
                Err(e) => return fail(&e, 2),
            };
            return match moat_vmm::api::run_process(&options) {
                Ok(exit) => finish(exit),
                Err(moat_vmm::api::ProcessError::Input(message)) => fail(&message, 2),
                Err(moat_vmm::api::ProcessError::Vm(e)) => {
                    fail(&e.to_string(), e.exit_code() as u8)
                }
            };
        }
    };
    let log = match args.log.options() {
        Ok(log) => log,
        Err(e) => return fail(&e, 2),
    };
    if let Err(e) = moat_vmm::logger::init("", &log) {
        return fail(&format!("--log-path: {e}"), 2);
    }
    let jail = match args.jail.config() {
        Ok(jail) => jail,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let restore = match args.restore_files() {
        Ok(restore) => restore,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string(), 2),
    };
    let outcome = match (&jail, restore) {
        (Some(jail), Some((state, memory))) => {
            moat_vmm::restore_jailed(&config, jail, &state, &memory)
        }
        (None, Some((state, memory))) => moat_vmm::restore(&config, &state, &memory),
        (Some(jail), None) => moat_vmm::run_jailed(&config, jail),
        (None, None) => moat_vmm::run(&config),
    };
    match outcome {
        Ok(exit) => finish(exit),
        Err(e) => fail(&e.to_string(), e.exit_code() as u8),
    }
}

/// The status for how the VM ended, with its message.
fn finish(exit: moat_vmm::exit::VmExit) -> ExitCode {
    if let Some(message) = exit.message() {
        let _ = writeln!(std::io::stderr(), "\r");
        return fail(&message, exit.exit_code().clamp(0, 255) as u8);
    }
    ExitCode::SUCCESS
}
