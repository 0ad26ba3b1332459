//! moat's log: `log` records with a level, to stderr or to a file or FIFO
//! (`--log-path`, `PUT /logger`), one line each:
//! `2026-11-27T14:02:03.123Z [moat-id:vcpu0] WARN message`.
//!
//! Nothing a guest does can flood it: each module may write
//! [`BURST`] lines and then one a [`REFILL`]; what it could not write is
//! counted and the count is written with the next line it may write, so a
//! suppressed message is never silently gone.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines a module may write at once.
pub const BURST: u32 = 20;
/// After the burst, one line per this much time.
pub const REFILL: Duration = Duration::from_millis(100);

/// Where lines go.
enum Sink {
    Stderr,
    File(File),
}

/// A module's allowance.
struct Allowance {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

struct State {
    sink: Sink,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    allowances: HashMap<String, Allowance>,
}

/// The process's logger.
pub struct Logger {
    id: Mutex<String>,
    state: Mutex<State>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// How the log should look and where it goes.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// A file or FIFO; stderr when unset.
    pub path: Option<std::path::PathBuf>,
    /// The level (default Warn, or Info when a path is given).
    pub level: Option<LevelFilter>,
    /// Print the level.
    pub show_level: bool,
    /// Print the source file and line.
    pub show_origin: bool,
    /// Only this module path.
    pub module: Option<String>,
}

/// Parses Firecracker's level names (any case).
pub fn parse_level(text: &str) -> Option<LevelFilter> {
    Some(match text.to_ascii_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warning" | "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => return None,
    })
}

fn open_sink(path: &Path) -> std::io::Result<File> {
    // A FIFO opened for writing would block until a reader comes; open
    // it read-write, which never blocks, as Firecracker's users expect.
    File::options()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
}

/// Installs the logger (once) with `options` and instance `id`.
pub fn init(id: &str, options: &LogOptions) -> std::io::Result<()> {
    let logger = LOGGER.get_or_init(|| Logger {
        id: Mutex::new(String::new()),
        state: Mutex::new(State {
            sink: Sink::Stderr,
            show_level: true,
            show_origin: false,
            module: None,
            allowances: HashMap::new(),
        }),
    });
    *logger.id.lock().unwrap_or_else(|e| e.into_inner()) = id.to_string();
    configure(options)?;
    // A second call finds the logger installed; that is fine.
    let _ = log::set_logger(logger);
    Ok(())
}

/// Changes where the log goes and what it shows (`PUT /logger`).
pub fn configure(options: &LogOptions) -> std::io::Result<()> {
    let Some(logger) = LOGGER.get() else {
        return init("", options);
    };
    let sink = match &options.path {
        Some(path) => Sink::File(open_sink(path)?),
        None => Sink::Stderr,
    };
    let level = options.level.unwrap_or(if options.path.is_some() {
        LevelFilter::Info
    } else {
        LevelFilter::Warn
    });
    let mut state = logger.state.lock().unwrap_or_else(|e| e.into_inner());
    state.sink = sink;
    state.show_level = options.show_level || options.path.is_none();
    state.show_origin = options.show_origin;
    state.module = options.module.clone();
    log::set_max_level(level);
    Ok(())
}

/// The log file's descriptor, if the log goes to a file (the jail keeps it
/// open).
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    let state = LOGGER
        .get()?
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match &state.sink {
        Sink::File(file) => Some(std::os::fd::AsRawFd::as_raw_fd(file)),
        Sink::Stderr => None,
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc_timestamp(ms: u128) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let module = record.module_path().unwrap_or("moat");
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .module
            .as_deref()
            .is_some_and(|m| !module.starts_with(m))
        {
            return;
        }
        let now = Instant::now();
        let allowance = state
            .allowances
            .entry(module.to_string())
            .or_insert(Allowance {
                tokens: BURST,
                refilled: now,
                suppressed: 0,
            });
        let refills = now.duration_since(allowance.refilled).as_millis() / REFILL.as_millis();
        if refills > 0 {
            allowance.tokens = (allowance.tokens as u128 + refills).min(u128::from(BURST)) as u32;
            allowance.refilled = now;
        }
        if allowance.tokens == 0 {
            allowance.suppressed += 1;
            return;
        }
        allowance.tokens -= 1;
        let suppressed = std::mem::take(&mut allowance.suppressed);
        let thread = std::thread::current();
        let id = self.id.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut line = format!(
            "{} [{}:{}]",
            utc_timestamp(now_ms()),
            if id.is_empty() { "moat" } else { &id },
            thread.name().unwrap_or("main")
        );
        if state.show_level {
            line.push_str(&format!(" {}", level_name(record.level())));
        }
        if state.show_origin {
            line.push_str(&format!(
                " {}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!(" {}", record.args()));
        if suppressed > 0 {
            line.push_str(&format!(
                " ({suppressed} earlier messages from {module} were suppressed by the rate limit)"
            ));
        }
        line.push('\n');
        let _ = match &mut state.sink {
            Sink::Stderr => std::io::stderr().write_all(line.replace('\n', "\r\n").as_bytes()),
            Sink::File(file) => file.write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Sink::File(file) = &mut state.sink {
            let _ = file.flush();
        }
    }
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_iso_8601() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_timestamp(1_795_789_824_123), "2026-11-27T14:30:24.123Z");
        assert_eq!(utc_timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn levels_take_firecracker_names_in_any_case() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
