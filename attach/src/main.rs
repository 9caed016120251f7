//! `klpvisor-attach --qmp SOCKET --api-sock PATH`: attaches to a running
//! QEMU through its QMP socket and serves klpvisor's control API for its
//! guest, so `patcher --api-sock PATH status|regs|tasks|symbols|read`
//! and curl work as they do against `vmm`.
//!
//! It serves the VM's state and kernel view, registers, memory, symbols,
//! tasks, pause and resume, and, with `--arena` (a patch arena hot-plugged
//! into the VM, see `klpvisor_qemu::attach::ensure_arena`), the patch
//! routes: `POST /patches`, `POST /patches/{name}/disable` and `/enable`,
//! `DELETE /patches/{name}` and `POST /rollback`, through the engine's
//! transition lifecycle (see [`change`]). Patches that need code run in
//! the guest (klp callbacks, per-CPU data, module objects) are refused:
//! QEMU cannot raise the call gate's interrupt.
//!
//! A binary of its own rather than `vmm attach`: the VMM's control state
//! (`vmm::control::Control`) and its server are built around its own KVM
//! `Vm` and per-thread seccomp filters; this keeps the attach path out of
//! the VMM's code and sandbox.
#![forbid(unsafe_code)]

mod change;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use clap::Parser;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};

use klpvisor_api::{
    parse_hex, AddrReply, ErrorKind, ErrorReply, Hex, HistoryEntry, KernelInfo, MemoryReply,
    PatchInfo, PatchState, PatchesReply, PauseReply, PendingTransition, Regs, RegsReply,
    ResumeReply, RollbackReply, SignaturePolicyInfo, SymbolEntry, SymbolsReply, TaskEntry,
    TasksReply, TransitionReply, VmInfo, VmState, MAX_MEMORY_READ, MAX_PATCH_BYTES,
};
use klpvisor_engine::transition as lifecycle;
use klpvisor_guest::{kaslr, Guest, GuestPhys, Kernel, VcpuRegs, VirtRead};
use klpvisor_qemu::{AttachOptions, QemuGuest};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "klpvisor-attach",
    version,
    about = "Attach to a running QEMU over QMP and serve klpvisor's control API for its guest (patching with --arena)"
)]
struct Cli {
    /// QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`). QEMU
    /// serves one client per socket: not the one libvirt holds.
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// Where to serve the control API (created mode 0600).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// QEMU's pid, if it cannot be found from the socket (checked anyway).
    #[arg(long)]
    pid: Option<u32>,
    /// Deadline of each QMP command, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    qmp_timeout_ms: u64,
    /// Give the guest a patch arena: reuse the one an earlier attach (or
    /// QEMU's command line) added, else hot-plug a 16 MiB memfd-backed
    /// `ivshmem-plain` device through QMP.
    #[arg(long)]
    arena: bool,
}

/// The kernel view, built on first need and kept (as the VMM keeps it:
/// `_text`, kallsyms and BTF do not change after boot).
struct View {
    kernel: Kernel,
    decode: Duration,
    pause: Option<Duration>,
}

/// What every handler shares.
struct App {
    guest: QemuGuest,
    started: Instant,
    /// Serializes pauses: a user's pause and an internal one never mix.
    gate: Mutex<()>,
    /// Whether the VM is paused through this API (`PUT /vm/pause`).
    user_paused: Mutex<bool>,
    view: Mutex<Option<Arc<View>>>,
    /// The guest's patches; changed by one request at a time.
    engine: Mutex<klpvisor_engine::engine::Engine>,
    /// Held by the change under way (a second one is refused as busy).
    changing: Mutex<()>,
    /// What `GET /patches` shows, published after each change.
    published: Mutex<PatchesReply>,
    /// The transition under way, from the moment it is prepared until it
    /// ends: `GET /patches` shows it (and the tasks blocking its safe
    /// point) while its request still waits, as the VMM does.
    pending: Mutex<Option<PendingTransition>>,
}

type Shared = Arc<App>;

/// An error reply: status, message, kind, as the VMM sends them.
struct HttpError(StatusCode, ErrorKind, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(ErrorReply {
                error: self.2,
                kind: Some(self.1),
            }),
        )
            .into_response()
    }
}

fn bad_request(m: impl Into<String>) -> HttpError {
    HttpError(StatusCode::BAD_REQUEST, ErrorKind::Refused, m.into())
}

fn not_found(m: impl Into<String>) -> HttpError {
    HttpError(StatusCode::NOT_FOUND, ErrorKind::Refused, m.into())
}

fn failed(m: impl std::fmt::Display) -> HttpError {
    HttpError(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Failed,
        m.to_string(),
    )
}

fn unavailable(m: impl std::fmt::Display) -> HttpError {
    HttpError(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unavailable,
        m.to_string(),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl App {
    /// Runs `f` with the VM paused (see [`QemuGuest::paused`]), never
    /// across a user's pause or resume.
    fn paused<T>(
        &self,
        f: impl FnOnce(&QemuGuest) -> Result<T, HttpError>,
    ) -> Result<(T, Option<Duration>), HttpError> {
        let _g = lock(&self.gate);
        let (v, p) = self.guest.paused(f).map_err(failed)?;
        Ok((v?, p))
    }

    fn view(&self) -> Result<Arc<View>, HttpError> {
        if let Some(v) = lock(&self.view).as_ref() {
            return Ok(v.clone());
        }
        let t = Instant::now();
        let (kernel, pause) = self.paused(|g| {
            Kernel::open(g).map_err(|e| {
                unavailable(format!(
                    "the guest kernel cannot be inspected (is it still booting?): {e}"
                ))
            })
        })?;
        let v = Arc::new(View {
            kernel,
            decode: t.elapsed(),
            pause,
        });
        *lock(&self.view) = Some(v.clone());
        Ok(v)
    }

    fn state(&self) -> Result<VmState, HttpError> {
        let (running, _) = self.guest.status().map_err(failed)?;
        Ok(if running {
            VmState::Running
        } else {
            VmState::Paused
        })
    }

    fn read_cstr(&self, k: &Kernel, va: u64, max: usize) -> Option<String> {
        let mut b = vec![0u8; max];
        k.space(&self.guest).read_virt(va, &mut b).ok()?;
        let end = b.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&b[..end]).into_owned())
    }
}

/// Runs `f` on a blocking worker: QMP and page walks block.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| failed("the request's worker thread failed"))?
}

type Reply<T> = Result<Json<T>, HttpError>;

fn kernel_info(app: &App, v: &View) -> KernelInfo {
    let k = &v.kernel;
    let banner = k
        .kallsyms
        .addr("linux_banner")
        .ok()
        .and_then(|a| app.read_cstr(k, a, 512))
        .map(|s| s.trim_end().to_owned());
    KernelInfo {
        release: k.uts(&app.guest, "release"),
        version: k.uts(&app.guest, "version"),
        banner,
        text: Hex(k.kaslr.text),
        text_phys: Hex(k.kaslr.text_phys),
        slide: Hex(k.kaslr.text.wrapping_sub(kaslr::DEFAULT_TEXT)),
        confirmed_by: format!("{:?}", k.kaslr.evidence),
        page_table_levels: if k.tables.five_level() { 5 } else { 4 },
        page_tables: Hex(k.tables.root()),
        found_through: k.origin.to_string(),
        symbols: k.kallsyms.len(),
        decode_ms: v.decode.as_secs_f64() * 1e3,
        decode_pause_us: v.pause.map_or(0.0, us),
    }
}

/// GET /vm
async fn vm_info(State(app): State<Shared>) -> Reply<VmInfo> {
    blocking(move || {
        let (kernel, kernel_error) = match app.view() {
            Ok(v) => (Some(kernel_info(&app, &v)), None),
            Err(e) => (None, Some(e.2)),
        };
        let (arena, size) = app.guest.arena();
        Ok(Json(VmInfo {
            state: app.state()?,
            vcpus: app.guest.vcpu_count(),
            uptime_ms: app.started.elapsed().as_secs_f64() * 1e3,
            boot_ms: None,
            kernel,
            kernel_error,
            arena_gpa: Hex(arena.0),
            arena_size: size,
            heap_bytes: 0,
            signatures: SignaturePolicyInfo::default(),
        }))
    })
    .await
}

/// PUT /vm/pause
async fn vm_pause(State(app): State<Shared>) -> Reply<PauseReply> {
    blocking(move || {
        let _g = lock(&app.gate);
        let mut user = lock(&app.user_paused);
        if *user {
            return Err(HttpError(
                StatusCode::CONFLICT,
                ErrorKind::Busy,
                "the VM is already paused; resume it first (PUT /vm/resume)".into(),
            ));
        }
        let p = app.guest.pause().map_err(failed)?;
        *user = true;
        Ok(Json(PauseReply {
            state: VmState::Paused,
            latency_us: us(p.latency),
        }))
    })
    .await
}

/// PUT /vm/resume
async fn vm_resume(State(app): State<Shared>) -> Reply<ResumeReply> {
    blocking(move || {
        let _g = lock(&app.gate);
        let mut user = lock(&app.user_paused);
        if !*user {
            return Err(HttpError(
                StatusCode::CONFLICT,
                ErrorKind::Busy,
                "the VM is not paused through this API; pause it first (PUT /vm/pause)".into(),
            ));
        }
        let d = app.guest.resume().map_err(failed)?;
        *user = false;
        Ok(Json(ResumeReply {
            state: VmState::Running,
            out_of_guest_us: us(d),
        }))
    })
    .await
}

fn regs_reply(r: &VcpuRegs) -> Regs {
    Regs {
        rax: Hex(r.rax),
        rbx: Hex(r.rbx),
        rcx: Hex(r.rcx),
        rdx: Hex(r.rdx),
        rsi: Hex(r.rsi),
        rdi: Hex(r.rdi),
        rbp: Hex(r.rbp),
        rsp: Hex(r.rsp),
        r8: Hex(r.r8),
        r9: Hex(r.r9),
        r10: Hex(r.r10),
        r11: Hex(r.r11),
        r12: Hex(r.r12),
        r13: Hex(r.r13),
        r14: Hex(r.r14),
        r15: Hex(r.r15),
        rip: Hex(r.rip),
        rflags: Hex(r.rflags),
        cr0: Hex(r.cr0),
        cr3: Hex(r.cr3),
        cr4: Hex(r.cr4),
        efer: r.efer.map(Hex),
        lstar: r.lstar.map(Hex),
        gs_base: Hex(r.gs_base),
        kernel_gs_base: r.kernel_gs_base.map(Hex),
        cs_selector: Hex(u64::from(r.cs_selector)),
        cs_long: r.cs_long,
        cpl: r.cpl(),
        idtr_base: Hex(r.idtr_base),
        idtr_limit: Hex(u64::from(r.idtr_limit)),
    }
}

/// GET /vcpus/{id}/regs
async fn vcpu_regs(State(app): State<Shared>, UrlPath(id): UrlPath<String>) -> Reply<RegsReply> {
    let count = app.guest.vcpu_count();
    let id: usize = id.parse().ok().filter(|&i| i < count).ok_or_else(|| {
        not_found(format!(
            "no vCPU `{id}`: this VM has vCPUs 0 to {}",
            count.saturating_sub(1)
        ))
    })?;
    blocking(move || {
        let (r, pause) = app.paused(|g| g.vcpu_regs(id).map_err(failed))?;
        Ok(Json(RegsReply {
            vcpu: id,
            paused_for_read: pause.is_some(),
            out_of_guest_us: pause.map(us),
            regs: regs_reply(&r),
        }))
    })
    .await
}

fn check_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), HttpError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(bad_request(format!(
            "unknown query parameter `{k}`; this route takes {}",
            known.join(", ")
        ))),
    }
}

fn hex_param(name: &str, v: &str) -> Result<u64, HttpError> {
    parse_hex(v).map_err(|e| bad_request(format!("{name}: {e}")))
}

fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// GET /memory?gpa=HEX&len=N or ?va=HEX&len=N
async fn memory(
    State(app): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<MemoryReply> {
    check_params(&q, &["gpa", "va", "len"])?;
    let len: u64 = q
        .get("len")
        .and_then(|l| l.parse().ok())
        .filter(|l| (1..=MAX_MEMORY_READ).contains(l))
        .ok_or_else(|| {
            bad_request(format!(
                "give len, a byte count from 1 to {MAX_MEMORY_READ}"
            ))
        })?;
    let (gpa, va) = match (q.get("gpa"), q.get("va")) {
        (Some(g), None) => (Some(hex_param("gpa", g)?), None),
        (None, Some(v)) => (None, Some(hex_param("va", v)?)),
        _ => {
            return Err(bad_request(
                "give exactly one of gpa (guest-physical) or va (kernel-virtual) address",
            ))
        }
    };
    blocking(move || {
        // len <= MAX_MEMORY_READ, so it fits in usize.
        let mut buf = vec![0u8; len as usize];
        let start = match (gpa, va) {
            (Some(gpa), _) => {
                app.guest
                    .read_phys(GuestPhys(gpa), &mut buf)
                    .map_err(|e| not_found(e.to_string()))?;
                gpa
            }
            (_, Some(va)) => {
                let v = app.view()?;
                let space = v.kernel.space(&app.guest);
                let t = space
                    .translate(va)
                    .map_err(|e| not_found(format!("cannot read {len} bytes at {va:#x}: {e}")))?;
                space
                    .read_virt(va, &mut buf)
                    .map_err(|e| not_found(format!("cannot read {len} bytes at {va:#x}: {e}")))?;
                t.phys.0
            }
            _ => return Err(bad_request("no address")),
        };
        Ok(Json(MemoryReply {
            gpa: Hex(start),
            va: va.map(Hex),
            len,
            bytes: hex_bytes(&buf),
        }))
    })
    .await
}

/// GET /symbols?name=NAME or ?addr=HEX
async fn symbols(
    State(app): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    check_params(&q, &["name", "addr"])?;
    let name = q.get("name").filter(|n| !n.is_empty()).cloned();
    let addr = match q.get("addr") {
        Some(a) => Some(hex_param("addr", a)?),
        None => None,
    };
    blocking(move || {
        let v = app.view()?;
        let ks = &v.kernel.kallsyms;
        match (name, addr) {
            (Some(name), None) => {
                let found = ks.lookup(&name);
                if found.is_empty() {
                    return Err(not_found(format!(
                        "no symbol `{name}` in the guest kernel (module symbols are not searched)"
                    )));
                }
                Ok(Json(SymbolsReply {
                    symbols: found
                        .iter()
                        .map(|f| SymbolEntry {
                            addr: Hex(f.symbol.addr),
                            sympos: f.sympos,
                            kind: f.symbol.kind.to_string(),
                            per_cpu: f.symbol.absolute,
                        })
                        .collect(),
                    name,
                })
                .into_response())
            }
            (None, Some(addr)) => {
                let l = ks.locate(addr).ok_or_else(|| {
                    not_found(format!(
                        "{addr:#x} is not inside any symbol of the guest kernel"
                    ))
                })?;
                let sympos = ks
                    .lookup(&l.symbol.name)
                    .iter()
                    .find(|f| std::ptr::eq(f.symbol, l.symbol))
                    .map_or(1, |f| f.sympos);
                Ok(Json(AddrReply {
                    addr: Hex(addr),
                    name: l.symbol.name.clone(),
                    offset: Hex(l.offset),
                    symbol_addr: Hex(l.symbol.addr),
                    kind: l.symbol.kind.to_string(),
                    sympos,
                })
                .into_response())
            }
            _ => Err(bad_request(
                "give exactly one of name (a symbol name) or addr (a hex kernel address)",
            )),
        }
    })
    .await
}

/// GET /symbols/all: the decoded table in /proc/kallsyms format.
async fn symbols_all(State(app): State<Shared>) -> Result<Response, HttpError> {
    blocking(move || {
        let v = app.view()?;
        let mut out = String::new();
        for s in v.kernel.kallsyms.symbols() {
            let _ = writeln!(out, "{:016x} {} {}", s.addr, s.kind, s.name);
        }
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            out,
        )
            .into_response())
    })
    .await
}

/// GET /tasks
async fn tasks(State(app): State<Shared>) -> Reply<TasksReply> {
    blocking(move || {
        let v = app.view()?;
        let (list, pause) = app.paused(|g| {
            v.kernel
                .tasks(g)
                .map_err(|e| failed(format!("reading the guest's task list failed: {e}")))
        })?;
        let tasks: Vec<TaskEntry> = list
            .iter()
            .map(|t| TaskEntry {
                pid: t.pid,
                tgid: t.tgid,
                comm: t.comm.clone(),
                state: t.state_char().to_string(),
                on_cpu: t.on_cpu,
                vcpu: t.running.map(|r| r.vcpu),
                cpu: t.running.map(|r| r.cpu),
                idle_cpu: t.idle_cpu,
                kthread: t.is_kthread(),
                wq_worker: t.is_wq_worker(),
                task: Hex(t.addr),
                stack_start: Hex(t.stack.start),
                stack_end: Hex(t.stack.end),
                saved_sp: Hex(t.saved_sp),
            })
            .collect();
        Ok(Json(TasksReply {
            count: tasks.len(),
            out_of_guest_us: pause.map(us),
            tasks,
        }))
    })
    .await
}

/// GET /patches: the engine's state as of the last change, with the
/// transition under way (its patch shown "in transition").
async fn patches(State(app): State<Shared>) -> Json<PatchesReply> {
    let mut reply = lock(&app.published).clone();
    reply.transition = lock(&app.pending).clone();
    if let Some(t) = &reply.transition {
        for p in reply.patches.iter_mut().filter(|p| p.name == t.patch) {
            p.state = PatchState::InTransition;
        }
    }
    Json(reply)
}

/// GET /history
async fn history(State(app): State<Shared>) -> Reply<Vec<HistoryEntry>> {
    blocking(move || Ok(Json(change::history(&app)))).await
}

/// `force` and `timeout_ms`, as the VMM takes them.
fn transition_params(
    q: &HashMap<String, String>,
    known: &[&str],
) -> Result<lifecycle::Transition, HttpError> {
    check_params(q, known)?;
    let force = match q.get("force").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(v) => return Err(bad_request(format!("force `{v}` is not true or false"))),
    };
    let timeout = match q.get("timeout_ms") {
        None => lifecycle::TRANSITION_TIMEOUT,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .map(Duration::from_millis)
            .filter(|d| *d <= lifecycle::MAX_TRANSITION_TIMEOUT)
            .ok_or_else(|| {
                bad_request(format!(
                    "timeout_ms `{v}` is not a number of milliseconds from 0 to {}",
                    lifecycle::MAX_TRANSITION_TIMEOUT.as_millis()
                ))
            })?,
    };
    Ok(lifecycle::Transition { force, timeout })
}

const TRANSITION_PARAMS: &[&str] = &["force", "timeout_ms"];
const ROLLBACK_PARAMS: &[&str] = &["force", "timeout_ms", "to"];

/// POST /patches?force=BOOL&timeout_ms=MS, the module's bytes as the body.
async fn patch_apply(
    State(app): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    let ko = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::Refused,
                format!(
                    "the module is larger than {MAX_PATCH_BYTES} bytes; strip its debug info \
                     (strip -g) and retry"
                ),
            )
        } else {
            HttpError(r.status(), ErrorKind::Refused, r.body_text())
        }
    })?;
    if ko.is_empty() {
        return Err(bad_request(
            "empty body: send the livepatch module's bytes (curl --data-binary @FILE.ko)",
        ));
    }
    blocking(move || {
        let v = app.view()?;
        Ok(Json(change::apply(&app, &v.kernel, &ko, t)?))
    })
    .await
}

/// POST /patches/{name}/disable?force=BOOL&timeout_ms=MS
async fn patch_disable(
    State(app): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    blocking(move || {
        let v = app.view()?;
        Ok(Json(change::disable(&app, &v.kernel, &name, t)?))
    })
    .await
}

/// POST /patches/{name}/enable?force=BOOL&timeout_ms=MS
async fn patch_enable(
    State(app): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    blocking(move || {
        let v = app.view()?;
        Ok(Json(change::enable(&app, &v.kernel, &name, t)?))
    })
    .await
}

/// DELETE /patches/{name}
async fn patch_remove(
    State(app): State<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Reply<PatchInfo> {
    blocking(move || {
        let v = app.view()?;
        Ok(Json(change::remove(&app, &v.kernel, &name)?))
    })
    .await
}

/// POST /rollback?to=SEQ&force=BOOL&timeout_ms=MS
async fn rollback(
    State(app): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<RollbackReply> {
    let t = transition_params(&q, ROLLBACK_PARAMS)?;
    let to = match q.get("to") {
        None => None,
        Some(v) => Some(v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            bad_request(format!(
                "to `{v}` is not a transition number; `patcher history` lists them"
            ))
        })?),
    };
    blocking(move || {
        let v = app.view()?;
        Ok(Json(change::rollback(&app, &v.kernel, to, t)?))
    })
    .await
}

/// Every route that would change the guest, and unknown ones.
async fn refused(uri: axum::http::Uri, method: axum::http::Method) -> HttpError {
    HttpError(
        StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Refused,
        format!(
            "{method} {}: klpvisor-attach serves GET /vm, /vcpus/{{id}}/regs, /memory, \
             /symbols, /symbols/all, /tasks, /patches, /history; PUT /vm/pause, /vm/resume; \
             POST /patches, /patches/{{name}}/disable, /patches/{{name}}/enable, /rollback; \
             DELETE /patches/{{name}}",
            uri.path()
        ),
    )
}

fn router(app: Shared) -> Router {
    Router::new()
        .route(
            "/patches",
            get(patches)
                .post(patch_apply)
                .layer(DefaultBodyLimit::max(MAX_PATCH_BYTES)),
        )
        .route("/patches/{name}", delete(patch_remove))
        .route("/patches/{name}/disable", post(patch_disable))
        .route("/patches/{name}/enable", post(patch_enable))
        .route("/rollback", post(rollback))
        .route("/vm", get(vm_info))
        .route("/vm/pause", put(vm_pause))
        .route("/vm/resume", put(vm_resume))
        .route("/vcpus/{id}/regs", get(vcpu_regs))
        .route("/memory", get(memory))
        .route("/symbols", get(symbols))
        .route("/symbols/all", get(symbols_all))
        .route("/tasks", get(tasks))
        .route("/history", get(history))
        .fallback(refused)
        // The VMM's limits (vmm/src/api/mod.rs): an answer or 503 within
        // 30 s (a QMP command has 10 s), a body within 10 s, no body over
        // the largest module, and a handler's panic answered 500.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(30),
        ))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(10)))
        .layer(RequestBodyLimitLayer::new(MAX_PATCH_BYTES))
        .layer(CatchPanicLayer::custom(|_| {
            failed("klpvisor-attach hit a bug serving this request").into_response()
        }))
        .with_state(app)
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
enum SockError {
    #[error("--api-sock {0}: another process is listening on it; pick another path")]
    InUse(PathBuf),
    #[error("--api-sock {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("--api-sock {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Binds `path` with mode 0600, replacing only a stale socket file.
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, SockError> {
    let io = |e| SockError::Io(path.to_path_buf(), e);
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SockError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SockError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(io)?;
    // Before anyone could use it: the API reads the guest's memory.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    l.set_nonblocking(true).map_err(io)?;
    Ok(l)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let opts = AttachOptions {
        timeout: Duration::from_millis(cli.qmp_timeout_ms),
        pid: cli.pid,
        arena: cli.arena,
        ..AttachOptions::default()
    };
    let guest = match QemuGuest::attach(&cli.qmp, &opts) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("klpvisor-attach: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!(
        "klpvisor-attach: attached to QEMU {} (pid {}), {} vCPUs, {} memory ranges",
        guest.version(),
        guest.pid(),
        guest.vcpu_count(),
        guest.memory_map().len()
    );
    let (GuestPhys(arena), arena_len) = guest.arena();
    if arena_len > 0 {
        eprintln!(
            "klpvisor-attach: patch arena at guest-physical {arena:#x}+{arena_len:#x} ({})",
            if guest.arena_added() {
                "hot-plugged now"
            } else {
                "found"
            }
        );
    }
    let listener = match bind(&cli.api_sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("klpvisor-attach: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let app = Arc::new(App {
        guest,
        started: Instant::now(),
        gate: Mutex::new(()),
        user_paused: Mutex::new(false),
        view: Mutex::new(None),
        engine: Mutex::new(klpvisor_engine::engine::Engine::default()),
        changing: Mutex::new(()),
        published: Mutex::new(PatchesReply::default()),
        pending: Mutex::new(None),
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("klpvisor-attach: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let path = cli.api_sock.clone();
    let served: Result<(), std::io::Error> = rt.block_on(async move {
        let l = tokio::net::UnixListener::from_std(listener)?;
        eprintln!("klpvisor-attach: serving the API on {}", path.display());
        axum::serve(l, router(app))
            .with_graceful_shutdown(async {
                // Ctrl-C or SIGTERM: stop serving and remove the socket;
                // the guest runs on (a pause of ours is never left behind:
                // every internal pause ends within its request).
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            })
            .await
    });
    let _ = std::fs::remove_file(&cli.api_sock);
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("klpvisor-attach: serving the API failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
