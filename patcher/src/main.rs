//! `patcher`: the command-line client of a running `vmm`'s control socket.
//! Human-readable output by default; `--json` prints the API's own JSON
//! reply, unchanged, for scripts, and errors as `{"error", "kind", "status"}`.
//!
//! Exit codes, so a script can tell what to do next:
//! 0 done; 1 refused (the module, its signature or the patch stack says no)
//! or any other error; 2 usage; 3 the VMM cannot be reached (or went away
//! mid-request); 4 blocked (no safe point in time: retry later or force);
//! 5 busy (another change or a pause: retry); 6 unavailable (the guest kernel is not ready, or the
//! request outlived its time: see `patcher list`); 7 the VMM or the guest
//! failed.

mod info;
mod progress;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use klpvisor_api::client::{Client, ClientError, Space, TransitionOptions, PROGRESS_INTERVAL};
use klpvisor_api::{
    CallbackRun, ErrorKind, HistoryEntry, KernelInfo, MemoryReply, PatchInfo, PatchesReply,
    RegsReply, RollbackReply, TasksReply, TransitionReply, VmInfo, MAX_MEMORY_READ,
};
use klpvisor_engine::module::ModuleError;
use klpvisor_engine::signature::{
    sign_level, write_key_pair, Policy, Provenance, SecretKey, SignatureError, TrustedKeys,
};

/// Live-patch a Linux guest from the hypervisor: the client of `vmm --api-sock`.
#[derive(Debug, Parser)]
#[command(name = "patcher", version)]
struct Args {
    /// The VMM's control socket (`vmm --api-sock PATH`); every command
    /// but keygen, sign, verify, info, completions and man needs it.
    /// Before or after the command.
    #[arg(long, env = "KLPV_API_SOCK", value_name = "PATH", global = true)]
    api_sock: Option<PathBuf>,
    /// Print the API's JSON reply instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Say nothing on stderr while a transition (apply, enable, disable,
    /// rollback) waits for a safe point. Without it, each new attempt is
    /// reported there with the tasks that block it; stdout and the exit
    /// code are the same either way.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// VM state and the guest kernel found in its memory.
    Status,
    /// Stop every vCPU out of guest mode.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// One vCPU's registers (pauses for the read if the VM runs).
    Regs {
        #[arg(default_value_t = 0)]
        vcpu: usize,
    },
    /// Dump guest memory (hex + ASCII) by kernel-virtual or guest-physical address.
    Mem {
        /// Kernel-virtual address (hex), or a symbol name optionally with
        /// +offset (hex); with --phys, a guest-physical address (hex).
        addr: String,
        /// ADDR is guest-physical.
        #[arg(long)]
        phys: bool,
        /// Bytes to read (at most 65536).
        #[arg(long, default_value_t = 64)]
        len: u64,
    },
    /// Addresses of a kernel symbol (every occurrence, with klp's sympos).
    Sym { name: String },
    /// The symbol containing a kernel address, as name+offset.
    Addr { addr: String },
    /// Every kernel symbol, in /proc/kallsyms format.
    Symbols,
    /// Every task (thread) and each CPU's idle task.
    Tasks,
    /// Load a livepatch module (.ko) into the guest and enable it.
    Apply {
        file: PathBuf,
        /// Skip the safe-point check (the patch is marked forced).
        #[arg(long)]
        force: bool,
        /// How long to wait for a safe point, in milliseconds (VMM default 10000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
    /// The loaded patches and where each patched function jumps.
    List,
    /// Disable an enabled patch.
    Disable {
        name: String,
        #[arg(long)]
        force: bool,
        /// How long to wait for a safe point, in milliseconds (VMM default 10000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
    /// Enable a disabled or replaced patch again.
    Enable {
        name: String,
        #[arg(long)]
        force: bool,
        /// How long to wait for a safe point, in milliseconds (VMM default 10000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
    /// Forget a disabled or replaced patch and free its arena space.
    Remove { name: String },
    /// The committed transitions, each with the stack it started from.
    History,
    /// Make an Ed25519 key pair for signing patches: NAME.key (secret,
    /// mode 0600) and NAME.pub (for `vmm --trusted-keys DIR`).
    Keygen {
        /// Path and base name of the two files.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
    },
    /// Sign a livepatch module: append a klpvisor signature by KEY.
    Sign {
        /// The secret key (NAME.key from `patcher keygen`).
        #[arg(long, value_name = "NAME.key")]
        key: PathBuf,
        /// The livepatch module (.ko).
        file: PathBuf,
        /// Where to write the signed module (default: FILE, in place).
        #[arg(short, long, value_name = "OUT.ko")]
        out: Option<PathBuf>,
        /// The patch level the signature covers (0 to 65535). A VMM with
        /// --trusted-keys refuses a lower level than the highest it has
        /// applied: raise it with every release of a fix.
        #[arg(long, value_name = "N", default_value_t = 0)]
        level: u16,
    },
    /// Check a module's signature offline, as `vmm --trusted-keys DIR` would.
    Verify {
        /// A directory of trusted NAME.pub files.
        #[arg(long, value_name = "DIR")]
        trusted_keys: PathBuf,
        file: PathBuf,
    },
    /// Describe a livepatch module offline (no VMM), as `kpatch info` does.
    ///
    /// Its patch, objects, functions, callbacks, states, sections (and
    /// whether klpvisor can honour each) and signature. Exits 1 when
    /// klpvisor would refuse the module for what can be told without the
    /// guest (a section it cannot honour, a static key of its own, a
    /// reference to init data, a signature that does not verify against
    /// --trusted-keys); the guest's release and symbols are checked only
    /// at apply time.
    Info {
        /// The livepatch module (.ko), signed or not.
        file: PathBuf,
        /// Also check its signature as `vmm --trusted-keys DIR` would.
        #[arg(long, value_name = "DIR")]
        trusted_keys: Option<PathBuf>,
        /// Read the klp structure layouts from this BTF file (e.g. the
        /// guest kernel's /sys/kernel/btf/vmlinux) instead of the built-in
        /// ones (x86-64 Linux 6.1 to 6.12).
        #[arg(long, value_name = "FILE")]
        btf: Option<PathBuf>,
    },
    /// Print a shell completion script (e.g. `patcher completions bash >
    /// /etc/bash_completion.d/patcher`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff); with --dir, write patcher.1 and one page
    /// per subcommand (patcher-apply.1, ...) there.
    Man {
        /// Write the pages into this directory instead of stdout.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Return every patch, in one safe-point transition, to its state just
    /// before transition N (default: undo the last transition), including
    /// patches a replace had disabled. Patches loaded since stay, disabled.
    Rollback {
        /// The transition to go back before (`patcher history` numbers them).
        #[arg(long, value_name = "N")]
        to: Option<u64>,
        #[arg(long)]
        force: bool,
        /// How long to wait for a safe point, in milliseconds (VMM default 10000).
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, turning a closed pipe into a println! panic.
    // SAFETY: restoring a signal's default disposition before any thread
    // exists has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = Args::parse();
    if let Some(done) = offline(&args.command, args.json) {
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            // The report, already printed, says why it would be refused.
            Err(OfflineError::Refused { .. }) if args.json => ExitCode::FAILURE,
            Err(e) if args.json && matches!(args.command, Command::Info { .. }) => {
                // Info's reply is JSON with --json; so is its error.
                println!(
                    "{}",
                    serde_json::json!({ "error": e.to_string(), "kind": "refused", "status": null })
                );
                ExitCode::FAILURE
            }
            Err(e) => fail(&e),
        };
    }
    let Some(sock) = &args.api_sock else {
        eprintln!(
            "patcher: error: give the VMM's control socket: --api-sock PATH or KLPV_API_SOCK"
        );
        return ExitCode::from(2);
    };
    let client = match Client::new(sock) {
        Ok(c) => c,
        Err(e) => return fail_request(&e, args.json),
    };
    match run(&client, &args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_request(&e, args.json),
    }
}

/// Exit codes beyond 0 (done), 1 (refused or other) and 2 (usage).
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_BLOCKED: u8 = 4;
const EXIT_BUSY: u8 = 5;
const EXIT_UNAVAILABLE: u8 = 6;
const EXIT_FAILED: u8 = 7;

/// The exit code for a failed request (see the crate doc).
fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect { .. } | ClientError::Gone { .. } => EXIT_UNREACHABLE,
        ClientError::Timeout { .. } => EXIT_UNAVAILABLE,
        ClientError::Api { kind, .. } => match kind {
            ErrorKind::Refused => 1,
            ErrorKind::Blocked => EXIT_BLOCKED,
            ErrorKind::Busy => EXIT_BUSY,
            ErrorKind::Unavailable => EXIT_UNAVAILABLE,
            ErrorKind::Failed => EXIT_FAILED,
        },
        ClientError::Http { .. }
        | ClientError::Decode { .. }
        | ClientError::File { .. }
        | ClientError::Runtime(_) => 1,
    }
}

/// The `--json` form of a failed request: the VMM's kind and status when
/// it answered, `unreachable` when it could not be reached.
fn error_json(e: &ClientError) -> serde_json::Value {
    let (kind, status) = match e {
        ClientError::Api { kind, status, .. } => (
            serde_json::to_value(kind).unwrap_or(serde_json::Value::Null),
            serde_json::Value::from(*status),
        ),
        ClientError::Connect { .. } | ClientError::Gone { .. } => {
            ("unreachable".into(), serde_json::Value::Null)
        }
        ClientError::Timeout { .. } => ("unavailable".into(), serde_json::Value::Null),
        _ => ("client".into(), serde_json::Value::Null),
    };
    serde_json::json!({ "error": e.to_string(), "kind": kind, "status": status })
}

/// Reports a failed request on stderr (as JSON on stdout with `--json`)
/// and picks the exit code.
fn fail_request(e: &ClientError, json: bool) -> ExitCode {
    if json {
        println!("{}", error_json(e));
    } else {
        eprintln!("patcher: error: {e}");
    }
    ExitCode::from(exit_code(e))
}

/// Why a command that needs no VMM failed.
#[derive(Debug)]
enum OfflineError {
    /// Keys, signatures, or a file read for them.
    Signature(SignatureError),
    /// `patcher info`: the module cannot be read as a livepatch module.
    Module { path: PathBuf, source: ModuleError },
    /// `patcher info`: it was read, and klpvisor would refuse it.
    Refused { path: PathBuf, why: String },
    /// Writing output (man pages).
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Display for OfflineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signature(e) => write!(f, "{e}"),
            Self::Module { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Refused { path, why } => {
                write!(f, "{}: klpvisor would refuse it: {why}", path.display())
            }
            Self::Write { path, source } => write!(f, "cannot write {}: {source}", path.display()),
        }
    }
}

impl From<SignatureError> for OfflineError {
    fn from(e: SignatureError) -> Self {
        Self::Signature(e)
    }
}

/// The commands that need no VMM (keys, signatures, module info,
/// completions, man pages); None for the rest.
fn offline(command: &Command, json: bool) -> Option<Result<(), OfflineError>> {
    Some(match command {
        Command::Info {
            file,
            trusted_keys,
            btf,
        } => info::command(file, trusted_keys.as_deref(), btf.as_deref(), json),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Args::command(),
                "patcher",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
        _ => return offline_keys(command).map(|r| r.map_err(OfflineError::from)),
    })
}

/// `patcher man`: the page on stdout, or every page into `dir`.
fn man(dir: Option<&Path>) -> Result<(), OfflineError> {
    let cmd = Args::command();
    match dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .map_err(|source| OfflineError::Write {
                path: "stdout".into(),
                source,
            }),
        Some(dir) => {
            let write_err = |source| OfflineError::Write {
                path: dir.to_owned(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(write_err)?;
            clap_mangen::generate_to(cmd, dir).map_err(write_err)?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
    }
}

/// The key and signature commands; None for the rest.
fn offline_keys(command: &Command) -> Option<Result<(), SignatureError>> {
    Some(match command {
        Command::Keygen { out } => write_key_pair(out).map(|(secret, public, id)| {
            println!("key {id}");
            println!("secret: {} (keep it private)", secret.display());
            println!(
                "public: {} (copy it into the directory of vmm --trusted-keys)",
                public.display()
            );
        }),
        Command::Sign {
            key,
            file,
            out,
            level,
        } => sign_file(key, file, out.as_deref().unwrap_or(file), *level),
        Command::Verify { trusted_keys, file } => {
            verify_file(trusted_keys, file).map(|p| println!("{}: {p}", file.display()))
        }
        _ => return None,
    })
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, SignatureError> {
    std::fs::read(path).map_err(|source| SignatureError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Signs `file` into `out`, through a temporary file renamed over it, so
/// an interrupted in-place sign never leaves half a module.
fn sign_file(key: &Path, file: &Path, out: &Path, level: u16) -> Result<(), SignatureError> {
    let key = SecretKey::load(key)?;
    let signed = sign_level(&read(file)?, &key, level)?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".signing");
    let tmp = PathBuf::from(tmp);
    let write_err = |source| SignatureError::Write {
        path: out.to_owned(),
        source,
    };
    std::fs::write(&tmp, &signed).map_err(write_err)?;
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    println!(
        "signed {} with key {} at level {level} -> {}",
        file.display(),
        key.id(),
        out.display()
    );
    Ok(())
}

fn verify_file(dir: &Path, file: &Path) -> Result<Provenance, SignatureError> {
    let policy = Policy::RequireSigned(TrustedKeys::load_dir(dir)?);
    Ok(policy.check(&read(file)?)?.provenance)
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("patcher: error: {e}");
    ExitCode::FAILURE
}

/// Prints a reply as JSON or through `human`.
fn show<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
    if json {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("patcher: cannot print JSON: {e}"),
        }
    } else {
        human(v);
    }
}

fn run(c: &Client, args: &Args) -> Result<(), ClientError> {
    let json = args.json;
    match &args.command {
        Command::Status => {
            let v = c.vm()?;
            show(json, &v, print_status);
        }
        Command::Pause => {
            let v = c.pause()?;
            show(json, &v, |v| {
                println!(
                    "paused: every vCPU parked {:.0} us after the request",
                    v.latency_us
                )
            });
        }
        Command::Resume => {
            let v = c.resume()?;
            show(json, &v, |v| {
                println!(
                    "running: vCPUs were out of guest mode for {}",
                    duration_us(v.out_of_guest_us)
                )
            });
        }
        Command::Regs { vcpu } => {
            let v = c.regs(*vcpu)?;
            show(json, &v, print_regs);
        }
        Command::Mem { addr, phys, len } => {
            let len = (*len).min(MAX_MEMORY_READ);
            let v = if *phys {
                c.memory(Space::Phys, addr, len)?
            } else {
                c.memory(Space::Virt, &resolve_address(c, addr)?, len)?
            };
            show(json, &v, print_memory);
        }
        Command::Sym { name } => {
            let v = c.symbol(name)?;
            show(json, &v, |v| {
                for s in &v.symbols {
                    let pc = if s.per_cpu { " (per-cpu offset)" } else { "" };
                    println!("{} {} {} sympos={}{pc}", s.addr, s.kind, v.name, s.sympos);
                }
            });
        }
        Command::Addr { addr } => {
            let v = c.symbol_at(addr)?;
            show(json, &v, |v| {
                println!(
                    "{} = {}+{} ({} at {}, sympos={})",
                    v.addr, v.name, v.offset, v.kind, v.symbol_addr, v.sympos
                )
            });
        }
        Command::Symbols => {
            // Already a text format every tool reads; --json does not apply.
            print!("{}", c.all_symbols()?);
        }
        Command::Tasks => {
            let v = c.tasks()?;
            show(json, &v, print_tasks);
        }
        Command::Apply {
            file,
            force,
            timeout,
        } => {
            let bytes = std::fs::read(file).map_err(|source| ClientError::File {
                path: file.clone(),
                source,
            })?;
            // Said here rather than by a VMM that stops reading at the
            // limit, which leaves the upload to die of a broken pipe.
            if bytes.len() > klpvisor_api::MAX_PATCH_BYTES {
                return Err(ClientError::Api {
                    status: 413,
                    kind: ErrorKind::Refused,
                    message: format!(
                        "{} is {} bytes; the VMM accepts modules up to {} MiB: strip its debug \
                         info (strip -g) and retry",
                        file.display(),
                        bytes.len(),
                        klpvisor_api::MAX_PATCH_BYTES >> 20
                    ),
                });
            }
            let v = watched(c, args.quiet, "apply", None, |c| {
                c.apply(bytes, options(*force, *timeout))
            })?;
            show(json, &v, |v| print_transition("applied", v));
        }
        Command::List => {
            let v = c.patches()?;
            show(json, &v, print_patches);
        }
        Command::Disable {
            name,
            force,
            timeout,
        } => {
            let v = watched(c, args.quiet, "disable", Some(name), |c| {
                c.disable(name, options(*force, *timeout))
            })?;
            show(json, &v, |v| print_transition("disabled", v));
        }
        Command::Enable {
            name,
            force,
            timeout,
        } => {
            let v = watched(c, args.quiet, "enable", Some(name), |c| {
                c.enable(name, options(*force, *timeout))
            })?;
            show(json, &v, |v| print_transition("enabled", v));
        }
        Command::History => {
            let v = c.history()?;
            show(json, &v, |v| print_history(v));
        }
        Command::Rollback { to, force, timeout } => {
            let v = watched(c, args.quiet, "rollback", None, |c| {
                c.rollback(*to, options(*force, *timeout))
            })?;
            show(json, &v, print_rollback);
        }
        Command::Keygen { .. }
        | Command::Sign { .. }
        | Command::Verify { .. }
        | Command::Info { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {}
        Command::Remove { name } => {
            let v = c.remove(name)?;
            show(json, &v, |v| {
                println!("removed {} ({} arena bytes freed)", v.name, v.arena_bytes)
            });
        }
    }
    Ok(())
}

/// Runs a transition request; unless `quiet`, reports on stderr each new
/// attempt of the transition while it waits for a safe point (see
/// [`progress`]). A failed poll or write is never an error: the request's
/// own result is what the command returns.
fn watched<T>(
    c: &Client,
    quiet: bool,
    action: &'static str,
    patch: Option<&str>,
    request: impl FnOnce(&Client) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    if quiet {
        return request(c);
    }
    let mut progress = progress::Progress::new(action, patch);
    c.watch(PROGRESS_INTERVAL, request, move |t| {
        if let Some(line) = progress.line(t) {
            // One write, so the line cannot be split by another writer of
            // the same terminal (stderr is unbuffered: writeln! writes
            // each piece); and not eprintln!, which panics when stderr is
            // gone.
            let _ = std::io::stderr().write_all(format!("patcher: {line}\n").as_bytes());
        }
    })
}

/// `0xffff...`, `sym` or `sym+0x10` to a hex address.
fn resolve_address(c: &Client, spec: &str) -> Result<String, ClientError> {
    if klpvisor_api::parse_hex(spec).is_ok() {
        return Ok(spec.to_owned());
    }
    let (name, off) = match spec.split_once('+') {
        Some((n, o)) => (
            n,
            klpvisor_api::parse_hex(o).map_err(|m| ClientError::Api {
                status: 400,
                kind: ErrorKind::Refused,
                message: format!("offset in `{spec}`: {m}"),
            })?,
        ),
        None => (spec, 0),
    };
    let v = c.symbol(name)?;
    match v.symbols.as_slice() {
        [one] => Ok(format!("{:#x}", one.addr.0.wrapping_add(off))),
        many => Err(ClientError::Api {
            status: 400,
            kind: ErrorKind::Refused,
            message: format!(
                "`{name}` names {} symbols ({}); give an address",
                many.len(),
                many.iter()
                    .map(|s| s.addr.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

fn duration_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn print_status(v: &VmInfo) {
    println!("state:    {}", v.state);
    println!("vcpus:    {}", v.vcpus);
    println!("uptime:   {:.1} s", v.uptime_ms / 1000.0);
    println!("vmm heap: {} KiB", v.heap_bytes / 1024);
    if let Some(b) = v.boot_ms {
        println!(
            "booted:   {:.1} s after start (guest boot marker)",
            b / 1000.0
        );
    }
    if v.signatures.enforced {
        let keys: Vec<String> = v
            .signatures
            .trusted_keys
            .iter()
            .map(|k| format!("{} ({})", k.key_id, k.file))
            .collect();
        println!("patches:  signed only; trusted keys: {}", keys.join(", "));
    } else {
        println!("patches:  unsigned accepted (no --trusted-keys)");
    }
    match (&v.kernel, &v.kernel_error) {
        (Some(k), _) => print_kernel(k),
        (None, Some(e)) => println!("kernel:   not found yet: {e}"),
        (None, None) => println!("kernel:   unknown"),
    }
}

fn print_kernel(k: &KernelInfo) {
    let unknown = || "?".to_owned();
    println!("kernel:   {}", k.release.clone().unwrap_or_else(unknown));
    println!("build:    {}", k.version.clone().unwrap_or_else(unknown));
    if let Some(b) = &k.banner {
        println!("banner:   {b}");
    }
    println!(
        "_text:    {} (phys {}, KASLR slide {}, confirmed by {})",
        k.text, k.text_phys, k.slide, k.confirmed_by
    );
    println!(
        "symbols:  {} decoded in {:.1} ms ({}-level page tables)",
        k.symbols, k.decode_ms, k.page_table_levels
    );
    println!(
        "paging:   read through init_top_pgt at {} (found through {})",
        k.page_tables, k.found_through
    );
}

fn print_regs(v: &RegsReply) {
    let r = &v.regs;
    println!(
        "vcpu {}{}",
        v.vcpu,
        match v.out_of_guest_us {
            Some(us) => format!(" (paused {} for the read)", duration_us(us)),
            None => String::new(),
        }
    );
    println!(
        "rip {}  rsp {}  rflags {}  cpl {}",
        r.rip, r.rsp, r.rflags, r.cpl
    );
    println!("rax {}  rbx {}  rcx {}  rdx {}", r.rax, r.rbx, r.rcx, r.rdx);
    println!("rsi {}  rdi {}  rbp {}", r.rsi, r.rdi, r.rbp);
    println!("r8  {}  r9  {}  r10 {}  r11 {}", r.r8, r.r9, r.r10, r.r11);
    println!("r12 {}  r13 {}  r14 {}  r15 {}", r.r12, r.r13, r.r14, r.r15);
    println!("cr0 {}  cr3 {}  cr4 {}", r.cr0, r.cr3, r.cr4);
    let opt = |h: Option<klpvisor_api::Hex>| h.map_or("?".to_owned(), |h| h.to_string());
    println!(
        "efer {}  lstar {}  gs_base {}  kernel_gs_base {}",
        opt(r.efer),
        opt(r.lstar),
        r.gs_base,
        opt(r.kernel_gs_base)
    );
}

fn print_memory(v: &MemoryReply) {
    let bytes: Vec<u8> = (0..v.bytes.len() / 2)
        .filter_map(|i| u8::from_str_radix(&v.bytes[2 * i..2 * i + 2], 16).ok())
        .collect();
    let base = v.va.unwrap_or(v.gpa).0;
    for (i, row) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:016x}  {:<47}  {ascii}",
            base.wrapping_add(16 * i as u64),
            hex.join(" ")
        );
    }
}

fn print_tasks(v: &TasksReply) {
    println!(
        "{:>7} {:>7} {:<16} {:>2} {:>5}  {:<18} {:<18}",
        "PID", "TGID", "COMM", "S", "VCPU", "TASK", "SAVED SP"
    );
    for t in &v.tasks {
        let comm = match t.idle_cpu {
            Some(cpu) => format!("<idle cpu{cpu}>"),
            None => t.comm.clone(),
        };
        println!(
            "{:>7} {:>7} {:<16} {:>2} {:>5}  {:<18} {:<18}",
            t.pid,
            t.tgid,
            comm,
            t.state,
            t.vcpu.map_or("-".to_owned(), |c| c.to_string()),
            t.task.to_string(),
            t.saved_sp.to_string()
        );
    }
    println!(
        "{} tasks{}",
        v.count,
        v.out_of_guest_us
            .map(|us| format!(", walked in a pause of {}", duration_us(us)))
            .unwrap_or_default()
    );
}

fn print_transition(what: &str, v: &TransitionReply) {
    println!(
        "{what} {}: prepared in {:.1} ms while the guest ran, {} bytes written in one pause of {}",
        v.patch.name,
        v.prepare_ms,
        v.bytes_written,
        duration_us(v.pause_us)
    );
    print_pause_tasks(v.pause_tasks);
    print_waited(v.attempts, v.waited_ms, v.nudged);
    print_callbacks(&v.callbacks, &v.warnings);
    print_patch(&v.patch);
}

fn print_callbacks(runs: &[CallbackRun], warnings: &[String]) {
    for r in runs {
        println!(
            "callback {} {}({}) ran in the guest in {:.1} ms{}",
            r.patch,
            r.callback,
            r.object,
            r.ms,
            r.ret.map(|v| format!(", returned {v}")).unwrap_or_default()
        );
    }
    for w in warnings {
        println!("warning: {w}");
    }
}

fn print_history(v: &[HistoryEntry]) {
    if v.is_empty() {
        println!("no transitions yet");
    }
    for h in v {
        let before: Vec<String> = h.before.iter().map(|(n, s)| format!("{n} {s}")).collect();
        println!(
            "#{} at {} (unix): {} {}{}; before it: {}",
            h.seq,
            h.at,
            h.action,
            h.patch,
            if h.forced { " (forced)" } else { "" },
            if before.is_empty() {
                "no patches".to_owned()
            } else {
                before.join(", ")
            }
        );
    }
}

fn print_rollback(v: &RollbackReply) {
    println!(
        "rolled back to before #{} (this is #{}): {} bytes written in one pause of {}",
        v.to,
        v.seq,
        v.bytes_written,
        duration_us(v.pause_us)
    );
    print_pause_tasks(v.pause_tasks);
    print_waited(v.attempts, v.waited_ms, v.nudged);
    print_callbacks(&v.callbacks, &v.warnings);
    for p in &v.patches {
        print_patch(p);
    }
}

fn print_pause_tasks(n: u32) {
    if n > 0 {
        println!("that pause read the stacks of {n} task(s)");
    }
}

fn print_waited(attempts: u32, waited_ms: f64, nudged: u32) {
    if attempts > 1 {
        println!("waited {waited_ms:.0} ms for a safe point ({attempts} pauses)");
    }
    if nudged > 0 {
        println!(
            "sent klp's fake signal to {nudged} task(s) asleep in changed functions; their \
             syscalls restart outside them"
        );
    }
}

fn print_patch(p: &PatchInfo) {
    println!(
        "{} [{}{}{}] applied at {} (unix), pause {}, {} arena bytes",
        p.name,
        p.state,
        if p.replace { ", replace" } else { "" },
        if p.forced { ", forced" } else { "" },
        p.applied_at,
        duration_us(p.pause_us),
        p.arena_bytes
    );
    println!("  signature: {}", p.signature);
    if let Some(m) = &p.module {
        println!(
            "  guest module at {}: {} exception fixups, {} BUG/WARN sites, {} ORC entries, \
             {} symbols, {} static-key sites on {} keys",
            m.address,
            m.extable,
            m.bug_sites,
            m.orc_entries,
            m.symbols,
            m.static_key_sites,
            m.static_keys
        );
        if let Some(at) = m.percpu {
            println!(
                "  per-CPU variables: {} bytes at per-CPU address {at} (on every possible CPU)",
                m.percpu_size
            );
        }
    }
    if let Some(pin) = &p.pinned {
        println!(
            "  pinned: {pin}; kept loaded for good, as klp keeps a patch a forced transition \
             took out of use (cannot be removed, enabled, applied again or rolled back to)"
        );
    }
    // vmlinux alone needs no object lines (every patch has it).
    if p.objects.iter().any(|o| o.name != "vmlinux") {
        for o in &p.objects {
            println!("  object {}: {} ({} functions)", o.name, o.state, o.funcs);
            if let Some(why) = &o.refused {
                println!("    refused its module's last load: {why}");
            }
        }
    }
    for f in &p.funcs {
        let pos = if f.sympos == 0 {
            String::new()
        } else {
            format!(",{}", f.sympos)
        };
        let object = if f.object == "vmlinux" {
            String::new()
        } else {
            format!("{}:", f.object)
        };
        let via = match f.ftrace_ops {
            Some(ops) => format!(" (through ftrace, ops {ops})"),
            None if f.live => " (jmp at its entry)".to_owned(),
            None => String::new(),
        };
        println!(
            "  {object}{}{pos} {} -> {} {}{via}",
            f.name,
            f.old_addr,
            f.new_addr,
            if f.live { "live" } else { "not live" }
        );
    }
}

fn print_patches(v: &PatchesReply) {
    if v.patches.is_empty() {
        println!("no patches loaded");
    }
    for p in &v.patches {
        print_patch(p);
    }
    let inert: Vec<&str> = v
        .ftrace
        .iter()
        .filter(|f| !f.live)
        .map(|f| f.name.as_str())
        .collect();
    if !inert.is_empty() {
        println!(
            "ftrace: {} ops registered, {} inert until changes pause: {}",
            v.ftrace.len(),
            inert.len(),
            inert.join(", ")
        );
    }
    if let Some(t) = &v.transition {
        println!(
            "in transition: {} {}{} — {} attempt(s), waiting {:.0} ms for a safe point",
            t.action,
            t.patch,
            if t.forced { " (forced)" } else { "" },
            t.attempts,
            t.waited_ms
        );
        for b in &t.blockers {
            println!("  blocked by {b}");
        }
    }
    if !v.live.is_empty() {
        println!("live redirections:");
        for f in &v.live {
            println!(
                "  {:<32} {} -> {}  ({})",
                sym_name(&f.name, f.sympos),
                f.old_addr,
                f.target,
                f.patch
            );
        }
    }
    if let Some(g) = &v.gate {
        println!(
            "call gate (klp callbacks): code at {}, data at {}; {} callback(s) sent",
            g.text, g.data, g.calls
        );
    }
    if let Some(l) = &v.switch_log {
        println!(
            "switch log (safe-point pauses): probe at {} on sched_switch, ring at {}, {}; {} \
             switch(es) logged",
            l.probe,
            l.ring,
            l.state,
            l.head / 2
        );
    }
    for r in &v.retired {
        println!(
            "retired {}: {} arena bytes still mapped until no task's stack references its code",
            r.name, r.arena_bytes
        );
    }
    // The last one only: what a client whose request timed out wants to know.
    if let Some(e) = v.ended.last() {
        let what = format!(
            "{} {}{}",
            e.action,
            e.patch,
            if e.forced { " (forced)" } else { "" }
        );
        match (e.seq, &e.error) {
            (Some(seq), None) => println!(
                "last transition: {what} committed as #{seq} ({} attempt(s), {:.0} ms)",
                e.attempts, e.waited_ms
            ),
            (Some(seq), Some(err)) => {
                println!("last transition: {what} committed as #{seq}, then: {err}")
            }
            (None, err) => println!(
                "last transition: {what} did not commit after {} attempt(s): {}",
                e.attempts,
                err.as_deref().unwrap_or("no reason recorded")
            ),
        }
    }
}

/// `name` or `name,sympos` as klp's sysfs spells it.
fn sym_name(name: &str, sympos: u32) -> String {
    if sympos == 0 {
        name.to_owned()
    } else {
        format!("{name},{sympos}")
    }
}

/// The transition routes' query string.
fn options(force: bool, timeout_ms: Option<u64>) -> TransitionOptions {
    TransitionOptions { force, timeout_ms }
}
