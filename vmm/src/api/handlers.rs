//! Route handlers: parse and check the request, run the VM operation on a
//! blocking worker (pausing waits on vCPU threads), shape the reply.

use klpvisor_guest::GuestPhys;
use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use klpvisor_api::{
    parse_hex, AddrReply, Hex, KernelInfo, MemoryReply, PatchInfo, PatchesReply, PauseReply, Regs,
    RegsReply, ResumeReply, StateChange, SymbolEntry, SymbolsReply, TaskEntry, TasksReply,
    TransitionReply, VmInfo, VmState, MAX_MEMORY_READ,
};
use klpvisor_api::{HistoryEntry, RollbackReply, SignaturePolicyInfo, TrustedKeyInfo};
use klpvisor_guest::{kaslr, PagingError, VirtRead};
use klpvisor_guest::{Guest, VcpuRegs};

use super::error::{json_rejection, HttpError};
use super::routes::AppState;
use crate::control::{
    CachedKernel, Control, Transition, MAX_TRANSITION_TIMEOUT, TRANSITION_TIMEOUT,
};

type Reply<T> = Result<Json<T>, HttpError>;

/// Runs `f` on a blocking worker thread.
async fn blocking<T, F>(f: F) -> Result<T, HttpError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HttpError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| HttpError::internal("the request's worker thread failed (see the VMM log)"))?
}

fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn state_of(c: &Control) -> VmState {
    if c.vm().is_paused() {
        VmState::Paused
    } else {
        VmState::Running
    }
}

fn kernel_info(c: &Control, k: &CachedKernel) -> KernelInfo {
    let kern = &k.kernel;
    let uts = kern.kallsyms.addr("init_uts_ns").ok();
    let uts_field = |f: &str| {
        let base = uts?;
        let off = kern
            .btf
            .offset_of(&format!("uts_namespace.name.{f}"))
            .ok()?;
        c.read_cstr(kern, base.wrapping_add(off), 65)
    };
    let banner = kern
        .kallsyms
        .addr("linux_banner")
        .ok()
        .and_then(|a| c.read_cstr(kern, a, 512))
        .map(|s| s.trim_end().to_owned());
    KernelInfo {
        release: uts_field("release"),
        version: uts_field("version"),
        banner,
        text: Hex(kern.kaslr.text),
        text_phys: Hex(kern.kaslr.text_phys),
        slide: Hex(kern.kaslr.text.wrapping_sub(kaslr::DEFAULT_TEXT)),
        confirmed_by: format!("{:?}", kern.kaslr.evidence),
        page_table_levels: if kern.tables.five_level() { 5 } else { 4 },
        page_tables: Hex(kern.tables.root()),
        found_through: kern.origin.to_string(),
        symbols: kern.kallsyms.len(),
        decode_ms: k.decode.as_secs_f64() * 1e3,
        decode_pause_us: us(k.pause),
    }
}

/// GET /vm
pub async fn vm_info(State(c): State<AppState>) -> Reply<VmInfo> {
    blocking(move || {
        let (kernel, kernel_error) = match c.kernel() {
            Ok(k) => (Some(kernel_info(&c, &k)), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let vm = c.vm();
        Ok(Json(VmInfo {
            state: state_of(&c),
            vcpus: vm.vcpu_count(),
            uptime_ms: vm.uptime().as_secs_f64() * 1e3,
            boot_ms: vm.boot_time().map(|d| d.as_secs_f64() * 1e3),
            kernel,
            kernel_error,
            arena_gpa: Hex(vm.layout().arena.0),
            arena_size: vm.layout().arena.1,
            heap_bytes: crate::heap::live_bytes(),
            signatures: SignaturePolicyInfo {
                enforced: c.policy().enforced(),
                trusted_keys: c
                    .policy()
                    .trusted()
                    .iter()
                    .map(|k| TrustedKeyInfo {
                        key_id: k.id.to_string(),
                        file: k.file.clone(),
                    })
                    .collect(),
                highest_level: c.level_floor(),
            },
        }))
    })
    .await
}

fn do_pause(c: &Control) -> Result<PauseReply, HttpError> {
    let r = c.pause()?;
    tracing::info!(latency_us = us(r.latency), "API: VM paused");
    Ok(PauseReply {
        state: VmState::Paused,
        latency_us: us(r.latency),
    })
}

fn do_resume(c: &Control) -> Result<ResumeReply, HttpError> {
    let r = c.resume()?;
    tracing::info!(out_of_guest_us = us(r.paused_for), "API: VM resumed");
    Ok(ResumeReply {
        state: VmState::Running,
        out_of_guest_us: us(r.paused_for),
    })
}

/// PUT /vm/pause
pub async fn vm_pause(State(c): State<AppState>) -> Reply<PauseReply> {
    blocking(move || do_pause(&c).map(Json)).await
}

/// PUT /vm/resume
pub async fn vm_resume(State(c): State<AppState>) -> Reply<ResumeReply> {
    blocking(move || do_resume(&c).map(Json)).await
}

/// PATCH /vm {"state": "paused" | "running"}
pub async fn vm_set_state(
    State(c): State<AppState>,
    change: Result<Json<StateChange>, JsonRejection>,
) -> Result<Response, HttpError> {
    let Json(change) = change.map_err(json_rejection)?;
    blocking(move || {
        Ok(match change.state {
            VmState::Paused => Json(do_pause(&c)?).into_response(),
            VmState::Running => Json(do_resume(&c)?).into_response(),
        })
    })
    .await
}

/// GET /vcpus/{id}/regs
pub async fn vcpu_regs(State(c): State<AppState>, Path(id): Path<String>) -> Reply<RegsReply> {
    let count = c.vm().vcpu_count();
    let id: usize = id.parse().map_err(|_| {
        HttpError::bad_request(format!(
            "vCPU id `{id}` is not a number; use 0 to {}",
            count.saturating_sub(1)
        ))
    })?;
    blocking(move || {
        let r = c.regs(id)?;
        Ok(Json(RegsReply {
            vcpu: id,
            paused_for_read: r.pause.is_some(),
            out_of_guest_us: r.pause.map(us),
            regs: regs_reply(&r.value),
        }))
    })
    .await
}

/// GET /memory's query parameters.
pub const MEMORY_PARAMS: &[&str] = &["gpa", "va", "len"];
/// GET /symbols's query parameters.
pub const SYMBOLS_PARAMS: &[&str] = &["name", "addr"];
/// The transition routes' query parameters (see [`transition_params`]).
pub const TRANSITION_PARAMS: &[&str] = &["force", "timeout_ms"];
/// POST /rollback's: the transition's and `to`.
pub const ROLLBACK_PARAMS: &[&str] = &["to", "force", "timeout_ms"];

/// Rejects query parameters the route does not know, naming them.
fn check_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), HttpError> {
    let mut unknown: Vec<&str> = q
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(k) => Err(HttpError::bad_request(format!(
            "unknown query parameter `{k}`; this route takes {}",
            known.join(", ")
        ))),
    }
}

fn hex_param(name: &str, v: &str) -> Result<u64, HttpError> {
    parse_hex(v).map_err(|e| HttpError::bad_request(format!("{name}: {e}")))
}

fn hex_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn paging_error(va: u64, len: u64, e: PagingError) -> HttpError {
    match e {
        PagingError::NonCanonical { .. } | PagingError::Wraps { .. } => {
            HttpError::bad_request(format!("cannot read {len} bytes at {va:#x}: {e}"))
        }
        _ => HttpError::not_found(format!(
            "cannot read {len} bytes at kernel address {va:#x}: {e}"
        )),
    }
}

/// GET /memory?gpa=HEX&len=N or ?va=HEX&len=N
pub async fn memory(
    State(c): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<MemoryReply> {
    check_params(&q, MEMORY_PARAMS)?;
    let len_text = q.get("len").ok_or_else(|| {
        HttpError::bad_request(format!(
            "missing len: give the byte count, 1 to {MAX_MEMORY_READ}"
        ))
    })?;
    let len: u64 = len_text
        .parse()
        .ok()
        .filter(|l| (1..=MAX_MEMORY_READ).contains(l))
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "len `{len_text}` is not a byte count from 1 to {MAX_MEMORY_READ}"
            ))
        })?;
    let target = match (q.get("gpa"), q.get("va")) {
        (Some(g), None) => Target::Phys(hex_param("gpa", g)?),
        (None, Some(v)) => Target::Virt(hex_param("va", v)?),
        _ => {
            return Err(HttpError::bad_request(
                "give exactly one of gpa (guest-physical) or va (kernel-virtual) address",
            ))
        }
    };
    blocking(move || {
        // len <= MAX_MEMORY_READ, so it fits in usize.
        let mut buf = vec![0u8; len as usize];
        match target {
            Target::Phys(gpa) => {
                c.vm().read_phys(GuestPhys(gpa), &mut buf).map_err(|_| {
                    HttpError::not_found(format!(
                        "guest-physical range {gpa:#x}+{len:#x} is not (entirely) in guest memory; \
                         RAM is {}",
                        ram_ranges(&c)
                    ))
                })?;
                Ok(Json(MemoryReply {
                    gpa: Hex(gpa),
                    va: None,
                    len,
                    bytes: hex_bytes(&buf),
                }))
            }
            Target::Virt(va) => {
                let k = c.kernel()?;
                let space = k.kernel.space(c.vm());
                let start = space.translate(va).map_err(|e| paging_error(va, len, e))?;
                space
                    .read_virt(va, &mut buf)
                    .map_err(|e| paging_error(va, len, e))?;
                Ok(Json(MemoryReply {
                    gpa: Hex(start.phys.0),
                    va: Some(Hex(va)),
                    len,
                    bytes: hex_bytes(&buf),
                }))
            }
        }
    })
    .await
}

enum Target {
    Phys(u64),
    Virt(u64),
}

fn ram_ranges(c: &Control) -> String {
    let l = c.vm().layout();
    let mut parts: Vec<String> = l
        .ram
        .iter()
        .map(|(s, n)| format!("{s:#x}-{:#x}", s + n))
        .collect();
    parts.push(format!(
        "arena {:#x}-{:#x}",
        l.arena.0,
        l.arena.0 + l.arena.1
    ));
    parts.join(", ")
}

/// GET /symbols?name=NAME or ?addr=HEX
pub async fn symbols(
    State(c): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    check_params(&q, SYMBOLS_PARAMS)?;
    let query = match (q.get("name"), q.get("addr")) {
        (Some(n), None) if !n.is_empty() => SymQuery::Name(n.clone()),
        (None, Some(a)) => SymQuery::Addr(hex_param("addr", a)?),
        _ => {
            return Err(HttpError::bad_request(
                "give exactly one of name (a symbol name) or addr (a hex kernel address)",
            ))
        }
    };
    blocking(move || {
        let k = c.kernel()?;
        let ks = &k.kernel.kallsyms;
        Ok(match query {
            SymQuery::Name(name) => {
                let found = ks.lookup(&name);
                if found.is_empty() {
                    return Err(HttpError::not_found(format!(
                        "no symbol `{name}` in the guest kernel (module symbols are not searched)"
                    )));
                }
                Json(SymbolsReply {
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
                .into_response()
            }
            SymQuery::Addr(addr) => {
                let l = ks.locate(addr).ok_or_else(|| {
                    HttpError::not_found(format!(
                        "{addr:#x} is not inside any symbol of the guest kernel"
                    ))
                })?;
                let sympos = ks
                    .lookup(&l.symbol.name)
                    .iter()
                    .find(|f| std::ptr::eq(f.symbol, l.symbol))
                    .map_or(1, |f| f.sympos);
                Json(AddrReply {
                    addr: Hex(addr),
                    name: l.symbol.name.clone(),
                    offset: Hex(l.offset),
                    symbol_addr: Hex(l.symbol.addr),
                    kind: l.symbol.kind.to_string(),
                    sympos,
                })
                .into_response()
            }
        })
    })
    .await
}

enum SymQuery {
    Name(String),
    Addr(u64),
}

/// GET /symbols/all: the decoded table in /proc/kallsyms format.
pub async fn symbols_all(State(c): State<AppState>) -> Result<Response, HttpError> {
    blocking(move || {
        let k = c.kernel()?;
        let syms = k.kernel.kallsyms.symbols();
        let mut out = String::with_capacity(syms.len() * 48);
        for s in syms {
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
pub async fn tasks(State(c): State<AppState>) -> Reply<TasksReply> {
    blocking(move || {
        let p = c.tasks()?;
        let tasks: Vec<TaskEntry> = p
            .value
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
            out_of_guest_us: p.pause.map(us),
            tasks,
        }))
    })
    .await
}

/// The transition routes' parameters: `?force=true|false` (default false)
/// and `?timeout_ms=N` (how long to wait for a safe point; default
/// [`TRANSITION_TIMEOUT`], at most [`MAX_TRANSITION_TIMEOUT`]).
fn transition_params(q: &HashMap<String, String>, known: &[&str]) -> Result<Transition, HttpError> {
    check_params(q, known)?;
    let force = match q.get("force").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(v) => {
            return Err(HttpError::bad_request(format!(
                "force `{v}` is not true or false"
            )))
        }
    };
    let timeout = match q.get("timeout_ms") {
        None => TRANSITION_TIMEOUT,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .map(std::time::Duration::from_millis)
            .filter(|d| *d <= MAX_TRANSITION_TIMEOUT)
            .ok_or_else(|| {
                HttpError::bad_request(format!(
                    "timeout_ms `{v}` is not a number of milliseconds from 0 to {}",
                    MAX_TRANSITION_TIMEOUT.as_millis()
                ))
            })?,
    };
    Ok(Transition { force, timeout })
}

/// GET /patches
pub async fn patches(State(c): State<AppState>) -> Reply<PatchesReply> {
    blocking(move || Ok(Json(c.patches()))).await
}

/// POST /patches?force=BOOL, body: the livepatch module (.ko) as is.
pub async fn patch_apply(
    State(c): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    let ko = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the module is larger than {} bytes; strip its debug info (strip -g) and retry",
                    klpvisor_api::MAX_PATCH_BYTES
                ),
            )
        } else {
            HttpError::new(r.status(), r.body_text())
        }
    })?;
    if ko.is_empty() {
        return Err(HttpError::bad_request(
            "empty body: send the livepatch module's bytes (curl --data-binary @FILE.ko)",
        ));
    }
    blocking(move || Ok(Json(c.apply(&ko, t)?))).await
}

/// POST /patches/{name}/disable?force=BOOL
pub async fn patch_disable(
    State(c): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    blocking(move || Ok(Json(c.disable(&name, t)?))).await
}

/// POST /patches/{name}/enable?force=BOOL
pub async fn patch_enable(
    State(c): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<TransitionReply> {
    let t = transition_params(&q, TRANSITION_PARAMS)?;
    blocking(move || Ok(Json(c.enable(&name, t)?))).await
}

/// DELETE /patches/{name}
pub async fn patch_remove(State(c): State<AppState>, Path(name): Path<String>) -> Reply<PatchInfo> {
    blocking(move || Ok(Json(c.remove(&name)?))).await
}

/// GET /history
pub async fn history(State(c): State<AppState>) -> Reply<Vec<HistoryEntry>> {
    blocking(move || Ok(Json(c.history()))).await
}

/// POST /rollback?to=SEQ&force=BOOL&timeout_ms=MS
pub async fn rollback(
    State(c): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Reply<RollbackReply> {
    let t = transition_params(&q, ROLLBACK_PARAMS)?;
    let to = match q.get("to") {
        None => None,
        Some(v) => Some(v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            HttpError::bad_request(format!(
                "to `{v}` is not a transition number; `patcher history` lists them"
            ))
        })?),
    };
    blocking(move || Ok(Json(c.rollback(to, t)?))).await
}

/// A vCPU's registers as the API shows them (hex strings, the CPL spelled
/// out): the wire type lives in `klpvisor-api`, which knows no guest types.
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
