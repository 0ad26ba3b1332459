//! The control plane: Firecracker's HTTP API on a Unix socket
//! (`moat --api-sock PATH`), its config file (`--config-file`), and the
//! process flags its tools pass.
//!
//! Two threads share the work. The API thread ([`http::serve`]) reads
//! requests, turns each into an [`ApiCall`] (or answers 4xx itself when
//! the request is malformed), and hands it to the VMM thread over a
//! channel, waking it with an eventfd. The VMM thread owns the
//! [`Controller`]: before `InstanceStart` it waits on the channel and
//! gathers the VM's resources; from `InstanceStart` on, the controller is
//! an event-loop subscriber next to the devices, so a request never
//! touches the VM from another thread.

pub mod http;
pub mod model;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use moat_devices::virtio::block::Block;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use self::http::{Request, Response};
use self::model::{
    ActionType, BootSource, Drive, EntropyDevice, Fault, InstanceActionInfo, Logger, MachineConfig,
    Metrics, NetworkInterface, PartialDrive, PartialMachineConfig, PartialNetworkInterface,
    SnapshotCreate, SnapshotLoad, VmResources, VmState, VmStateValue, Vsock,
};
use crate::config::DiskConfig;
use crate::error::Error;
use crate::exit::VmExit;
use crate::logger::{self, LogOptions};
use crate::metrics::{self, MetricsSink};
use crate::{Subscriber, Vm, VmHandle};

/// The application name `GET /` reports.
pub const APP_NAME: &str = "moat";
/// The instance id when `--id` is not given (Firecracker's).
pub const DEFAULT_ID: &str = "anonymous-instance";
/// Longest instance id (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// Requests the API thread has read, and those it answered with a fault.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// One API request, parsed and checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiCall {
    /// `GET /`.
    GetInstance,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(PartialMachineConfig),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNet(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNet(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateValue),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreate),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoad),
}

fn body<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, Response> {
    if request.body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::fault(400, "the request needs a JSON body"));
    }
    serde_json::from_slice(&request.body)
        .map_err(|e| Response::fault(400, &format!("bad request body: {e}")))
}

/// The id in `/drives/{id}` must be the body's too.
fn same_id(kind: &str, in_path: &str, in_body: &str) -> Result<(), Response> {
    if in_path == in_body {
        Ok(())
    } else {
        Err(Response::fault(
            400,
            &format!("the {kind} id in the path ({in_path}) and in the body ({in_body}) differ"),
        ))
    }
}

/// Turns a request into a call, or the response that refuses it.
pub fn route(request: &Request) -> Result<ApiCall, Response> {
    let path = request.path.trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let method = request.method.as_str();
    let wrong_method = || {
        Err(Response::fault(
            405,
            &format!("{method} is not allowed on {}", request.path),
        ))
    };
    match parts.as_slice() {
        [] => match method {
            "GET" => Ok(ApiCall::GetInstance),
            _ => wrong_method(),
        },
        ["version"] => match method {
            "GET" => Ok(ApiCall::GetVersion),
            _ => wrong_method(),
        },
        ["machine-config"] => match method {
            "GET" => Ok(ApiCall::GetMachineConfig),
            "PUT" => Ok(ApiCall::PutMachineConfig(body(request)?)),
            "PATCH" => Ok(ApiCall::PatchMachineConfig(body(request)?)),
            _ => wrong_method(),
        },
        ["vm", "config"] => match method {
            "GET" => Ok(ApiCall::GetVmConfig),
            _ => wrong_method(),
        },
        ["vm"] => match method {
            "PATCH" => Ok(ApiCall::PatchVm(body::<VmState>(request)?.state)),
            _ => wrong_method(),
        },
        ["boot-source"] => match method {
            "PUT" => Ok(ApiCall::PutBootSource(body(request)?)),
            _ => wrong_method(),
        },
        ["drives", id] => match method {
            "PUT" => {
                let drive: Drive = body(request)?;
                same_id("drive", id, &drive.drive_id)?;
                Ok(ApiCall::PutDrive(drive))
            }
            "PATCH" => {
                let drive: PartialDrive = body(request)?;
                same_id("drive", id, &drive.drive_id)?;
                Ok(ApiCall::PatchDrive(drive))
            }
            _ => wrong_method(),
        },
        ["network-interfaces", id] => match method {
            "PUT" => {
                let net: NetworkInterface = body(request)?;
                same_id("network interface", id, &net.iface_id)?;
                Ok(ApiCall::PutNet(net))
            }
            "PATCH" => {
                let net: PartialNetworkInterface = body(request)?;
                same_id("network interface", id, &net.iface_id)?;
                Ok(ApiCall::PatchNet(net))
            }
            _ => wrong_method(),
        },
        ["vsock"] => match method {
            "PUT" => Ok(ApiCall::PutVsock(body(request)?)),
            _ => wrong_method(),
        },
        ["entropy"] => match method {
            "PUT" => Ok(ApiCall::PutEntropy(body(request)?)),
            _ => wrong_method(),
        },
        ["logger"] => match method {
            "PUT" => Ok(ApiCall::PutLogger(body(request)?)),
            _ => wrong_method(),
        },
        ["metrics"] => match method {
            "PUT" => Ok(ApiCall::PutMetrics(body(request)?)),
            _ => wrong_method(),
        },
        ["actions"] => match method {
            "PUT" => Ok(ApiCall::Action(
                body::<InstanceActionInfo>(request)?.action_type,
            )),
            _ => wrong_method(),
        },
        ["snapshot", "create"] => match method {
            "PUT" => Ok(ApiCall::CreateSnapshot(body(request)?)),
            _ => wrong_method(),
        },
        ["snapshot", "load"] => match method {
            "PUT" => Ok(ApiCall::LoadSnapshot(body(request)?)),
            _ => wrong_method(),
        },
        [first, ..]
            if matches!(
                *first,
                "balloon" | "mmds" | "cpu-config" | "pmem" | "hotplug" | "serial"
            ) =>
        {
            Err(Response::fault(400, &model::unsupported(first)))
        }
        _ => Err(Response::fault(
            404,
            &format!("no such API resource: {}", request.path),
        )),
    }
}

/// The message Firecracker gives for a pre-boot resource after boot.
const AFTER_START: &str = "the requested operation is not supported after starting the microVM";

/// The VM's resources and, once it runs, the VM: what every API call acts
/// on. Lives on the VMM thread.
pub struct Controller {
    resources: VmResources,
    id: String,
    kvm_device: PathBuf,
    boot_timer: bool,
    seccomp: bool,
    transport: crate::config::Transport,
    running: Option<VmHandle>,
    metrics: Arc<Mutex<Option<MetricsSink>>>,
}

/// What a call asks of the VMM thread beyond an answer.
pub enum Next {
    /// Answer and go on.
    Reply(Response),
    /// Answer 204 and run this VM.
    Start(Box<Vm>),
}

impl Controller {
    /// A controller for instance `id`.
    pub fn new(id: &str, kvm_device: PathBuf, boot_timer: bool, seccomp: bool) -> Self {
        Self {
            resources: VmResources::default(),
            id: id.to_string(),
            kvm_device,
            boot_timer,
            seccomp,
            transport: crate::config::Transport::Mmio,
            running: None,
            metrics: Arc::new(Mutex::new(None)),
        }
    }

    /// Takes a config file's resources (logger and metrics included).
    pub fn load(&mut self, resources: VmResources) -> Result<(), Fault> {
        if let Some(logger) = &resources.logger {
            self.put_logger(logger)?;
        }
        if let Some(m) = &resources.metrics {
            self.put_metrics(m)?;
        }
        self.resources = resources;
        Ok(())
    }

    /// Sends metrics to `path` (`--metrics-path`).
    pub fn put_metrics(&mut self, m: &Metrics) -> Result<(), Fault> {
        let mut sink = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if sink.is_some() {
            return Err(Fault("metrics are already configured".into()));
        }
        let id = m.emit_id.unwrap_or(false).then(|| self.id.clone());
        let opened = MetricsSink::open(
            Path::new(&m.metrics_path),
            id,
            m.properties.clone().unwrap_or_default(),
        )
        .map_err(|e| Fault(format!("metrics: cannot open {}: {e}", m.metrics_path)))?;
        *sink = Some(opened);
        drop(sink);
        self.resources.metrics = Some(m.clone());
        Ok(())
    }

    fn put_logger(&mut self, l: &Logger) -> Result<(), Fault> {
        let level = match &l.level {
            None => None,
            Some(text) => Some(logger::parse_level(text).ok_or_else(|| {
                Fault(format!(
                    "logger: level '{text}' is not Error, Warning, Info, Debug, Trace or Off"
                ))
            })?),
        };
        logger::configure(&LogOptions {
            path: l.log_path.as_ref().map(PathBuf::from),
            level,
            show_level: l.show_level.unwrap_or(false),
            show_origin: l.show_log_origin.unwrap_or(false),
            module: l.module.clone(),
        })
        .map_err(|e| {
            Fault(format!(
                "logger: cannot open {}: {e}",
                l.log_path.as_deref().unwrap_or("")
            ))
        })?;
        self.resources.logger = Some(l.clone());
        Ok(())
    }

    /// Writes a metrics line now.
    pub fn flush_metrics(&self) -> Result<(), Fault> {
        let mut sink = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sink) = sink.as_mut() else {
            return Err(Fault(
                "metrics are not configured (PUT /metrics first)".into(),
            ));
        };
        write_metrics(sink, self.running.as_ref())
            .map_err(|e| Fault(format!("cannot write metrics: {e}")))
    }

    fn state(&self) -> &'static str {
        match &self.running {
            None => "Not started",
            Some(vm) if vm.pause.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Puts the devices of the VMs it builds on `transport`.
    pub fn set_transport(&mut self, transport: crate::config::Transport) {
        self.transport = transport;
    }

    /// Builds the VM the resources describe.
    pub fn start(&mut self) -> Result<Box<Vm>, Fault> {
        let config = self.resources.vm_config(
            self.kvm_device.clone(),
            self.boot_timer,
            self.seccomp,
            self.transport,
        )?;
        log::info!("starting the microVM: {config:?}");
        let vm = Vm::build(&config).map_err(|e| Fault(e.to_string()))?;
        self.running = Some(vm.handle());
        Ok(Box::new(vm))
    }

    /// Builds the VM a snapshot describes, paused unless `resume_vm`.
    pub fn load_snapshot(&mut self, l: &SnapshotLoad) -> Result<Box<Vm>, Fault> {
        let memory = l.memory_file()?;
        let state = crate::snapshot::read_state(Path::new(&l.snapshot_path))
            .map_err(|e| Fault(format!("snapshot: {e}")))?;
        let overrides = crate::snapshot::Overrides {
            taps_by_id: l
                .network_overrides
                .iter()
                .flatten()
                .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                .collect(),
            vsock_socket: l
                .vsock_override
                .as_ref()
                .map(|v| PathBuf::from(&v.uds_path)),
            ..Default::default()
        };
        let base = crate::config::VmConfig::for_restore(
            self.kvm_device.clone(),
            self.boot_timer,
            self.seccomp,
        );
        let config = crate::snapshot::restored_config(&base, &state.machine, &overrides)
            .map_err(|e| Fault(format!("snapshot: {e}")))?;
        log::info!("loading the snapshot {}: {config:?}", l.snapshot_path);
        let vm =
            Vm::restore(&config, &state, Path::new(memory)).map_err(|e| Fault(e.to_string()))?;
        let handle = vm.handle();
        if !l.resume_vm.unwrap_or(false) {
            // The vCPUs park before their first KVM_RUN.
            handle.pause.pause(&[]);
        }
        self.running = Some(handle);
        Ok(Box::new(vm))
    }

    /// Carries out `call`.
    pub fn handle(&mut self, call: ApiCall) -> Next {
        let result = self.dispatch(call);
        match result {
            Ok(Some(next)) => next,
            Ok(None) => Next::Reply(Response::no_content()),
            Err(Fault(message)) => {
                log::warn!("API request refused: {message}");
                Next::Reply(Response::fault(400, &message))
            }
        }
    }

    fn json(value: &impl serde::Serialize) -> Option<Next> {
        Some(Next::Reply(Response::json(
            serde_json::to_string(value).unwrap_or_default(),
        )))
    }

    fn dispatch(&mut self, call: ApiCall) -> Result<Option<Next>, Fault> {
        let started = self.running.is_some();
        let pre_boot = |started: bool| {
            if started {
                Err(Fault(AFTER_START.into()))
            } else {
                Ok(())
            }
        };
        match call {
            ApiCall::GetInstance => Ok(Self::json(&serde_json::json!({
                "app_name": APP_NAME,
                "id": self.id,
                "state": self.state(),
                "vmm_version": env!("CARGO_PKG_VERSION"),
            }))),
            ApiCall::GetVersion => Ok(Self::json(&serde_json::json!({
                "firecracker_version": env!("CARGO_PKG_VERSION"),
            }))),
            ApiCall::GetMachineConfig => Ok(Self::json(&self.resources.machine_config)),
            ApiCall::GetVmConfig => Ok(Self::json(&self.resources)),
            ApiCall::PutMachineConfig(m) => {
                pre_boot(started)?;
                m.validate()?;
                self.resources.machine_config = m;
                Ok(None)
            }
            ApiCall::PatchMachineConfig(patch) => {
                pre_boot(started)?;
                let m = self.resources.machine_config.patched(patch);
                m.validate()?;
                self.resources.machine_config = m;
                Ok(None)
            }
            ApiCall::PutBootSource(b) => {
                pre_boot(started)?;
                b.validate()?;
                self.resources.boot_source = Some(b);
                Ok(None)
            }
            ApiCall::PutDrive(d) => {
                pre_boot(started)?;
                self.resources.insert_drive(d)?;
                Ok(None)
            }
            ApiCall::PatchDrive(d) => self.patch_drive(d).map(|()| None),
            ApiCall::PutNet(n) => {
                pre_boot(started)?;
                self.resources.insert_net(n)?;
                Ok(None)
            }
            ApiCall::PatchNet(n) => {
                if !started {
                    return Err(Fault(
                        "PATCH /network-interfaces is only supported after the microVM started"
                            .into(),
                    ));
                }
                if !self
                    .resources
                    .network_interfaces
                    .iter()
                    .any(|i| i.iface_id == n.iface_id)
                {
                    return Err(Fault(format!("no network interface {}", n.iface_id)));
                }
                let name = format!("network interface {}", n.iface_id);
                model::check_no_rate_limiter(&name, &n.rx_rate_limiter)?;
                model::check_no_rate_limiter(&name, &n.tx_rate_limiter)?;
                Ok(None)
            }
            ApiCall::PutVsock(v) => {
                pre_boot(started)?;
                v.validate()?;
                self.resources.vsock = Some(v);
                Ok(None)
            }
            ApiCall::PutEntropy(e) => {
                pre_boot(started)?;
                e.validate()?;
                self.resources.entropy = Some(e);
                Ok(None)
            }
            ApiCall::PutLogger(l) => {
                pre_boot(started)?;
                self.put_logger(&l).map(|()| None)
            }
            ApiCall::PutMetrics(m) => {
                pre_boot(started)?;
                self.put_metrics(&m).map(|()| None)
            }
            ApiCall::Action(ActionType::InstanceStart) => {
                pre_boot(started).map_err(|_| Fault("the microVM is already running".into()))?;
                Ok(Some(Next::Start(self.start()?)))
            }
            ApiCall::Action(ActionType::SendCtrlAltDel) => {
                let vm = self.running.as_ref().ok_or_else(not_running)?;
                vm.power_button
                    .trigger()
                    .map_err(|e| Fault(format!("cannot press the power button: {e}")))?;
                log::info!("SendCtrlAltDel: pressed the guest's ACPI power button");
                Ok(None)
            }
            ApiCall::Action(ActionType::FlushMetrics) => self.flush_metrics().map(|()| None),
            ApiCall::CreateSnapshot(c) => {
                c.validate()?;
                let vm = self.running.as_ref().ok_or_else(not_running)?;
                let started = std::time::Instant::now();
                let report = vm
                    .snapshot(Path::new(&c.snapshot_path), Path::new(&c.mem_file_path))
                    .map_err(|e| Fault(format!("cannot create the snapshot: {e}")))?;
                log::info!(
                    "snapshot created in {:?}: {} ({} bytes), {} ({} bytes of memory written)",
                    started.elapsed(),
                    c.snapshot_path,
                    report.state_bytes,
                    c.mem_file_path,
                    report.memory_bytes
                );
                Ok(None)
            }
            ApiCall::LoadSnapshot(l) => {
                pre_boot(started).map_err(|_| {
                    Fault("a snapshot loads only into a microVM that has not started".into())
                })?;
                Ok(Some(Next::Start(self.load_snapshot(&l)?)))
            }
            ApiCall::PatchVm(state) => {
                let vm = self.running.as_ref().ok_or_else(not_running)?;
                match state {
                    VmStateValue::Paused => {
                        let threads = vm.vcpus.lock().unwrap_or_else(|e| e.into_inner());
                        if !vm.pause.pause(&threads) {
                            return Err(Fault(
                                "not every vCPU stopped within 2 s; the VM stays paused as far as it could".into(),
                            ));
                        }
                        log::info!("paused the microVM");
                    }
                    VmStateValue::Resumed => {
                        vm.pause.resume();
                        log::info!("resumed the microVM");
                    }
                }
                Ok(None)
            }
        }
    }

    /// `PATCH /drives/{id}` after boot: a new backing file, and the guest
    /// told its new capacity.
    fn patch_drive(&mut self, patch: PartialDrive) -> Result<(), Fault> {
        let Some(vm) = &self.running else {
            return Err(Fault(
                "PATCH /drives is only supported after the microVM started; use PUT before".into(),
            ));
        };
        let index = self
            .resources
            .drives
            .iter()
            .position(|d| d.drive_id == patch.drive_id)
            .ok_or_else(|| Fault(format!("no drive {}", patch.drive_id)))?;
        let name = format!("drive {}", patch.drive_id);
        model::check_no_rate_limiter(&name, &patch.rate_limiter)?;
        let Some(path) = patch.path_on_host else {
            return Ok(());
        };
        let drive = &self.resources.drives[index];
        let disk = DiskConfig {
            path: PathBuf::from(&path),
            read_only: drive.is_read_only.unwrap_or(false),
            id: None,
            io_engine: crate::config::IoEngine::Sync,
        };
        let (file, size) = crate::virtio::open_disk(&disk).map_err(|e| {
            Fault(format!(
                "{name}: {}",
                e.to_string().trim_start_matches("--disk: ")
            ))
        })?;
        let transport = vm
            .devices
            .get(index)
            .ok_or_else(|| Fault(format!("{name} has no device")))?;
        let mut transport = transport.lock().unwrap_or_else(|e| e.into_inner());
        // Requests in flight finish with the file they started with.
        transport.quiesce();
        let block = transport
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()
            .ok_or_else(|| Fault(format!("{name} is not a block device")))?;
        block
            .replace_backing(file, size)
            .map_err(|e| Fault(format!("{name}: cannot put {path} in the io_uring: {e}")))?;
        transport.config_changed();
        log::info!("{name}: now backed by {path} ({size} bytes)");
        self.resources.drives[index].path_on_host = Some(path);
        Ok(())
    }
}

fn not_running() -> Fault {
    Fault("the microVM is not running (PUT /actions InstanceStart first)".into())
}

fn write_metrics(sink: &mut MetricsSink, vm: Option<&VmHandle>) -> std::io::Result<()> {
    let mut groups = vm.map(VmHandle::metric_groups).unwrap_or_default();
    groups.push((
        "api_server".into(),
        vec![
            ("requests", REQUESTS.load(Ordering::Relaxed)),
            ("faults", FAULTS.load(Ordering::Relaxed)),
        ],
    ));
    let notes = vm.map(VmHandle::metric_notes).unwrap_or_default();
    sink.write(&groups, &notes)
}

/// A call on its way to the VMM thread, with where to send the answer.
type Envelope = (ApiCall, Sender<Response>);

/// The API thread's end: sends calls and wakes the VMM thread.
struct Courier {
    calls: Sender<Envelope>,
    wake: EventFd,
}

impl Courier {
    fn answer(&self, request: Request) -> Response {
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        log::debug!("API request: {} {}", request.method, request.path);
        let response = match route(&request) {
            Err(response) => response,
            Ok(call) => {
                let (tx, rx) = mpsc::channel();
                let sent = self.calls.send((call, tx)).is_ok();
                let _ = self.wake.write(1);
                match sent.then(|| rx.recv().ok()).flatten() {
                    Some(response) => response,
                    None => Response::fault(400, "the microVM has ended"),
                }
            }
        };
        if response.status >= 400 {
            FAULTS.fetch_add(1, Ordering::Relaxed);
        }
        response
    }
}

/// The controller as an event-loop subscriber, once the VM runs; it also
/// writes a metrics line every [`metrics::PERIOD`].
pub struct ApiSubscriber {
    controller: Controller,
    calls: Option<Receiver<Envelope>>,
    wake: Option<EventFd>,
    timer: TimerFd,
}

impl ApiSubscriber {
    fn serve_calls(&mut self) {
        let Some(calls) = &self.calls else { return };
        while let Ok((call, reply)) = calls.try_recv() {
            let response = match self.controller.handle(call) {
                Next::Reply(r) => r,
                Next::Start(_) => Response::fault(400, "the microVM is already running"),
            };
            let _ = reply.send(response);
        }
    }
}

impl MutEventSubscriber for ApiSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(wake) = &self.wake {
            let _ = ops.add(Events::new(wake, EventSet::IN));
        }
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
        let _ = self.timer.reset(metrics::PERIOD, Some(metrics::PERIOD));
        // Calls that came while the VM was being built.
        self.serve_calls();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            let has_sink = self
                .controller
                .metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            if has_sink {
                if let Err(e) = self.controller.flush_metrics() {
                    log::error!("{e}");
                }
            }
            return;
        }
        if let Some(wake) = &self.wake {
            let _ = wake.read();
        }
        self.serve_calls();
    }
}

/// How moat was started in Firecracker's way.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// The API socket, unless `--no-api`.
    pub api_sock: Option<PathBuf>,
    /// A config file to boot from at once.
    pub config_file: Option<PathBuf>,
    /// The instance id.
    pub id: String,
    /// The log.
    pub log: LogOptions,
    /// Metrics path.
    pub metrics_path: Option<PathBuf>,
    /// `--boot-timer`.
    pub boot_timer: bool,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// Install the seccomp filters.
    pub seccomp: bool,
    /// The virtio transport (`--enable-pci`).
    pub transport: crate::config::Transport,
    /// A jail to run in (its root is the prepared directory: every path
    /// given afterwards names a file in it).
    pub jail: Option<crate::jail::JailConfig>,
}

/// Why moat ended before or while running a VM in API mode.
#[derive(Debug)]
pub enum ProcessError {
    /// Bad flags or config file (status 2).
    Input(String),
    /// The VM could not be built or failed (its own status).
    Vm(Error),
}

/// Checks an instance id: 1 to 64 letters, digits and dashes.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "--id: '{id}' must be 1 to {MAX_ID_LEN} letters, digits or dashes"
        ));
    }
    Ok(())
}

/// Binds the API socket; a stale socket file nobody serves is replaced.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let error = |e: std::io::Error| format!("--api-sock: cannot listen on {}: {e}", path.display());
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "--api-sock: {} is in use by another process",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(error)?;
    }
    UnixListener::bind(path).map_err(error)
}

/// Runs moat as Firecracker's tools start it: serve the API (and boot from
/// the config file, if given) until the VM ends.
pub fn run_process(options: &ProcessOptions) -> Result<VmExit, ProcessError> {
    let input = ProcessError::Input;
    check_id(&options.id).map_err(input)?;
    // In a jail every path from here on, flags' and the API's alike, names
    // a file in it, as with Firecracker's jailer; KVM is the jail's node.
    let (jailed, kvm_device) = match &options.jail {
        Some(jail) => {
            let layout = crate::jail::Layout::Prepared {
                kvm: options.kvm_device.clone(),
            };
            let jailed = crate::jail::enter(jail, &layout, &[]).map_err(ProcessError::Vm)?;
            (Some(jailed), PathBuf::from("/dev/kvm"))
        }
        None => (None, options.kvm_device.clone()),
    };
    logger::init(&options.id, &options.log)
        .map_err(|e| ProcessError::Input(format!("--log-path: {e}")))?;
    let mut controller =
        Controller::new(&options.id, kvm_device, options.boot_timer, options.seccomp);
    controller.set_transport(options.transport);
    if let Some(path) = &options.metrics_path {
        controller
            .put_metrics(&Metrics {
                metrics_path: path.display().to_string(),
                emit_id: None,
                properties: None,
            })
            .map_err(|e| ProcessError::Input(format!("--metrics-path: {e}")))?;
    }
    let listener = options
        .api_sock
        .as_deref()
        .map(bind)
        .transpose()
        .map_err(input)?;
    // Nothing from a client or a file is read as root: the jailed moat
    // drops to its uid before the config file and the first request.
    if let Some(jailed) = &jailed {
        jailed.drop_privileges().map_err(ProcessError::Vm)?;
    }
    let resources = match &options.config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ProcessError::Input(format!(
                    "--config-file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            let resources = VmResources::from_json(&text).map_err(|e| {
                ProcessError::Input(format!("--config-file: {}: {e}", path.display()))
            })?;
            Some(resources)
        }
        None => None,
    };
    if let Some(resources) = resources.clone() {
        controller
            .load(resources)
            .map_err(|e| ProcessError::Input(format!("--config-file: {e}")))?;
    }

    let api = match (&options.api_sock, listener) {
        (Some(path), Some(listener)) => {
            let (tx, rx) = mpsc::channel::<Envelope>();
            let wake = moat_devices::trigger::new_eventfd()
                .map_err(|e| ProcessError::Vm(Error::Io("create an eventfd", e)))?;
            let courier = Courier {
                calls: tx,
                wake: wake
                    .try_clone()
                    .map_err(|e| ProcessError::Vm(Error::Io("clone an eventfd", e)))?,
            };
            let filter = if options.seccomp {
                crate::seccomp::install_sigsys_handler()
                    .and_then(|()| crate::seccomp::program(crate::seccomp::ThreadKind::Api))
                    .map(Some)
                    .map_err(|e| ProcessError::Vm(Error::Internal(e.to_string())))?
            } else {
                None
            };
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || {
                    if let Some(filter) = filter {
                        if let Err(e) =
                            crate::seccomp::install(crate::seccomp::ThreadKind::Api, &filter)
                        {
                            log::error!("{e}; the API thread stops");
                            return;
                        }
                    }
                    http::serve(listener, |request| courier.answer(request))
                })
                .map_err(|e| ProcessError::Vm(Error::Io("start the API thread", e)))?;
            log::info!("API listening on {}", path.display());
            Some((rx, wake))
        }
        _ => None,
    };

    let result = (|| {
        let vm = if resources.is_some() {
            controller
                .start()
                .map_err(|e| ProcessError::Input(format!("--config-file: {e}")))?
        } else {
            let Some((calls, _)) = &api else {
                return Err(ProcessError::Input(
                    "--no-api needs --config-file (nothing could configure the VM)".into(),
                ));
            };
            wait_for_start(&mut controller, calls)
                .ok_or_else(|| ProcessError::Input("the API thread ended".into()))?
        };
        let (calls, wake) = match api {
            Some((calls, wake)) => (Some(calls), Some(wake)),
            None => (None, None),
        };
        let metrics = controller.metrics.clone();
        let running = controller.running.clone();
        let subscriber = ApiSubscriber {
            controller,
            calls,
            wake,
            timer: TimerFd::new()
                .map_err(|e| ProcessError::Vm(Error::Io("create a timer", e.into())))?,
        };
        let extra: Vec<Subscriber> = vec![Arc::new(Mutex::new(subscriber))];
        let exit = vm.run(extra).map_err(ProcessError::Vm);
        // A last line, as Firecracker writes when it ends.
        if let Some(sink) = metrics.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = write_metrics(sink, running.as_ref());
        }
        exit
    })();
    if let Some(path) = &options.api_sock {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Serves pre-boot calls until one starts the VM.
fn wait_for_start(controller: &mut Controller, calls: &Receiver<Envelope>) -> Option<Box<Vm>> {
    loop {
        let (call, reply) = calls.recv().ok()?;
        match controller.handle(call) {
            Next::Reply(response) => {
                let _ = reply.send(response);
            }
            Next::Start(vm) => {
                let _ = reply.send(Response::no_content());
                log::info!("the microVM is starting");
                return Some(vm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn fault_of(result: Result<ApiCall, Response>) -> (u16, String) {
        let response = result.unwrap_err();
        let body: serde_json::Value =
            serde_json::from_str(response.body.as_deref().unwrap()).unwrap();
        (
            response.status,
            body["fault_message"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn routes_parse_their_bodies() {
        assert_eq!(route(&req("GET", "/", "")).unwrap(), ApiCall::GetInstance);
        assert_eq!(
            route(&req(
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#
            ))
            .unwrap(),
            ApiCall::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            route(&req("PATCH", "/vm", r#"{"state": "Paused"}"#)).unwrap(),
            ApiCall::PatchVm(VmStateValue::Paused)
        );
        assert!(matches!(
            route(&req(
                "PUT",
                "/drives/rootfs",
                r#"{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true, "is_read_only": false}"#
            )),
            Ok(ApiCall::PutDrive(_))
        ));
    }

    #[test]
    fn bad_requests_get_4xx_with_a_reason() {
        let cases = [
            (req("PUT", "/actions", "{"), 400, "bad request body"),
            (
                req("PUT", "/actions", r#"{"action_type": "Explode"}"#),
                400,
                "unknown variant",
            ),
            (req("PUT", "/actions", ""), 400, "needs a JSON body"),
            (
                req(
                    "PUT",
                    "/machine-config",
                    r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#,
                ),
                400,
                "unknown field",
            ),
            (
                req(
                    "PUT",
                    "/machine-config",
                    r#"{"vcpu_count": -1, "mem_size_mib": 128}"#,
                ),
                400,
                "invalid value",
            ),
            (
                req(
                    "PUT",
                    "/drives/a",
                    r#"{"drive_id": "b", "is_root_device": false}"#,
                ),
                400,
                "differ",
            ),
            (req("DELETE", "/machine-config", ""), 405, "not allowed"),
            (req("GET", "/nothing", ""), 404, "no such API resource"),
            (req("PUT", "/balloon", "{}"), 400, "balloon"),
            (req("PUT", "/snapshot/create", "{}"), 400, "missing field"),
            (req("GET", "/snapshot/create", ""), 405, "not allowed"),
        ];
        for (request, status, text) in cases {
            let (got, message) = fault_of(route(&request));
            assert_eq!(got, status, "{request:?}: {message}");
            assert!(message.contains(text), "{request:?}: {message}");
        }
    }

    fn call(c: &mut Controller, call: ApiCall) -> Response {
        match c.handle(call) {
            Next::Reply(r) => r,
            Next::Start(_) => panic!("started"),
        }
    }

    #[test]
    fn the_controller_gathers_resources_and_refuses_what_is_wrong() {
        let mut c = Controller::new("t", "/dev/kvm".into(), false, true);
        let r = call(&mut c, ApiCall::GetInstance);
        assert!(r.body.unwrap().contains("\"Not started\""));
        let r = call(&mut c, ApiCall::GetMachineConfig);
        let v: serde_json::Value = serde_json::from_str(&r.body.unwrap()).unwrap();
        assert_eq!(
            (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
            (Some(1), Some(128))
        );
        let r = call(
            &mut c,
            ApiCall::PatchMachineConfig(PartialMachineConfig {
                vcpu_count: Some(2),
                ..Default::default()
            }),
        );
        assert_eq!(r.status, 204);
        assert_eq!(c.resources.machine_config.vcpu_count, 2);
        assert_eq!(c.resources.machine_config.mem_size_mib, 128);
        // Actions that need a running VM, and starting without a kernel.
        for action in [
            ActionType::SendCtrlAltDel,
            ActionType::InstanceStart,
            ActionType::FlushMetrics,
        ] {
            assert_eq!(
                call(&mut c, ApiCall::Action(action)).status,
                400,
                "{action:?}"
            );
        }
        assert_eq!(
            call(&mut c, ApiCall::PatchVm(VmStateValue::Paused)).status,
            400
        );
        let r = call(
            &mut c,
            ApiCall::PutBootSource(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                initrd_path: None,
                boot_args: None,
            }),
        );
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("kernel_image_path"));
        // A kernel that is not a kernel fails the start, and moat stays
        // ready for a better one.
        let r = call(
            &mut c,
            ApiCall::PutBootSource(BootSource {
                kernel_image_path: "/etc/hostname".into(),
                initrd_path: None,
                boot_args: None,
            }),
        );
        assert_eq!(r.status, 204);
        let r = call(&mut c, ApiCall::Action(ActionType::InstanceStart));
        assert_eq!(r.status, 400);
        assert!(c.running.is_none());
        let r = call(&mut c, ApiCall::GetVmConfig);
        let v: serde_json::Value = serde_json::from_str(&r.body.unwrap()).unwrap();
        assert_eq!(v["boot-source"]["kernel_image_path"], "/etc/hostname");
        assert_eq!(v["machine-config"]["vcpu_count"], 2);
    }

    #[test]
    fn ids_are_letters_digits_and_dashes() {
        assert!(check_id("vm-01").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&"a".repeat(65)).is_err());
    }
}
