//! `vmm`: boot a Linux guest on KVM with its serial console on this terminal.
//!
//! Exit codes: 0 guest powered off or rebooted; 1 bad arguments or set-up
//! failure; 2 usage error (clap); 3 guest panic (pvpanic); 4 triple fault;
//! 5 fatal KVM/vCPU error; 6 a forbidden system call (seccomp); 128+N
//! stopped by signal N.

mod config;
mod terminal;

/// Counts the heap for `GET /vm`'s `heap_bytes`.
#[global_allocator]
static HEAP: vmm::heap::Counting = vmm::heap::Counting;

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

use vmm::api::ApiServer;
use vmm::control::Control;
use vmm::devices::boot_timer::BootTimer;
use vmm::devices::console_out;
use vmm::devices::GuestEvent;
use vmm::{Vm, VmExit};

const EXIT_SETUP: u8 = 1;
const EXIT_GUEST_PANIC: u8 = 3;
const EXIT_TRIPLE_FAULT: u8 = 4;
const EXIT_FATAL: u8 = 5;
/// How long the exiting VMM waits for stdout to take the console's last output.
const CONSOLE_FLUSH: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let started = Instant::now();
    let args = config::Args::parse();
    // Generated from the argument definitions, so they never drift from them.
    if let Some(shell) = args.completions {
        let mut cmd = config::Args::command();
        clap_complete::generate(shell, &mut cmd, "vmm", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    if args.man {
        return match clap_mangen::Man::new(config::Args::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("cannot write the man page: {e}")),
        };
    }
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The VMM's own log: stderr, or a file of its own (--log-file), never
    // the guest's console (stdout).
    match args.log_file.as_deref().map(open_log) {
        None => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Some(Ok(file)) => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::sync::Mutex::new(file))
            .with_target(false)
            .with_ansi(false)
            .init(),
        Some(Err(e)) => return fail(&e),
    }
    if args.kvm_probe {
        return probe();
    }
    // Before any thread starts: each confines itself as it starts
    // (vmm::seccomp), so the filters and the SIGSYS report must be ready.
    if let Err(e) = vmm::seccomp::prepare(!args.no_seccomp) {
        return fail(&e);
    }
    // Before the kernel is even looked at: a missing module is the
    // likelier typo, and it is cheap to name.
    let boot_patches = match args.boot_patches() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let policy = match args.signature_policy() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    for k in policy.trusted() {
        tracing::info!(key_id = %k.id, file = k.file, "trusted patch signing key");
    }

    // The socket is bound before any KVM object exists: a path in use is a
    // set-up error like any bad argument.
    let mut api = match args.api_sock.as_deref().map(ApiServer::bind).transpose() {
        Ok(api) => api,
        Err(e) => return fail(&e),
    };

    // The console goes to fd 1 through a bounded buffer and a thread of
    // its own (devices::console_out): a slow stdout never stalls a vCPU,
    // and a prompt without a newline still shows up at once.
    let console_bytes = args.console_buffer as usize * 1024;
    let stdout = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => return fail(&e),
    };
    let (console, console_drain) = match console_out::start("COM1", Box::new(stdout), console_bytes)
    {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot start the console thread: {e}")),
    };
    // COM2, when asked for, drains to its file the same way. Opening a FIFO
    // waits here for its reader, before the guest runs.
    let com2 = match args
        .serial2_out
        .as_deref()
        .map(|p| open_serial2(p, console_bytes))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let (com2_out, com2_drain) = match com2 {
        Some((out, drain)) => (
            Some(Box::new(out) as Box<dyn std::io::Write + Send>),
            Some(drain),
        ),
        None => (None, None),
    };
    let vm = match Vm::start(
        &config,
        Box::new(console),
        com2_out,
        BootTimer::new(started),
    ) {
        Ok(vm) => Arc::new(vm),
        Err(e) => return fail(&e),
    };
    tracing::info!(
        cpus = config.cpus,
        mem_mib = config.mem_mib,
        arena = format!("{:#x}+{:#x}", vm.layout().arena.0, vm.layout().arena.1),
        "guest started"
    );

    // The patch engine, for the control socket and the --patch modules
    // alike: they share one patch stack.
    if api.is_some() || !boot_patches.is_empty() {
        let control = Arc::new(Control::new(vm.clone(), policy, args.allow_downgrade));
        if args.no_switch_log {
            control.no_switch_log();
        }
        if let Err(e) = control.serve_module_hooks() {
            tracing::warn!("cannot serve module hooks (modules loading later stay unpatched): {e}");
        }
        if let Some(api) = api.as_mut() {
            if let Err(e) = api.start(control.clone()) {
                return fail(&e);
            }
        }
        if let Err(e) = vmm::boot_patch::spawn(control, boot_patches) {
            return fail(&format!("cannot start the --patch thread: {e}"));
        }
    }

    let requester = vm.exit_requester();
    match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            let _ = std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    vmm::seccomp::enter_or_exit(vmm::seccomp::Kind::Vmm);
                    if let Some(sig) = signals.forever().next() {
                        let _ = requester.send(VmExit::Signal(sig));
                    }
                });
        }
        Err(e) => tracing::warn!("cannot watch signals: {e}"),
    }
    let tty = terminal::RawStdin::enable();
    terminal::spawn_stdin_pump(vm.clone());

    // Set up is over: from here the main thread only waits, reports and
    // restores the terminal.
    if let Err(e) = vmm::seccomp::enter(vmm::seccomp::Kind::Vmm) {
        return fail(&e);
    }
    let exit = vm.wait();
    // The guest's last lines (a panic message, "Power down") before the
    // VMM's own report.
    if let Some(drain) = com2_drain {
        let dropped = drain.dropped();
        if !drain.finish(CONSOLE_FLUSH) {
            tracing::warn!(
                "--serial2-out did not take COM2's last output within {CONSOLE_FLUSH:?}"
            );
        }
        if dropped > 0 {
            tracing::warn!(
                dropped_bytes = dropped,
                "COM2 output was dropped while its file was slow"
            );
        }
    }
    let dropped = console_drain.dropped();
    if !console_drain.finish(CONSOLE_FLUSH) {
        tracing::warn!("stdout did not take the console's last output within {CONSOLE_FLUSH:?}");
    }
    if dropped > 0 {
        tracing::warn!(
            dropped_bytes = dropped,
            "console output was dropped while stdout was slow"
        );
    }
    drop(tty);
    // Remove the socket file before reporting: the VM is gone.
    drop(api);
    match exit {
        VmExit::Guest(GuestEvent::PowerOff) => {
            tracing::info!("guest powered off");
            ExitCode::SUCCESS
        }
        VmExit::Guest(GuestEvent::Reset) => {
            tracing::info!("guest rebooted");
            ExitCode::SUCCESS
        }
        VmExit::Guest(GuestEvent::Panic) => {
            eprintln!("vmm: guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        VmExit::TripleFault { vcpu } => {
            eprintln!("vmm: guest triple fault on vCPU {vcpu}");
            ExitCode::from(EXIT_TRIPLE_FAULT)
        }
        VmExit::Fatal { vcpu, reason } => {
            eprintln!("vmm: vCPU {vcpu} stopped: {reason}");
            ExitCode::from(EXIT_FATAL)
        }
        VmExit::Signal(sig) => {
            tracing::info!("stopped by signal {sig}");
            ExitCode::from(128u8.saturating_add(sig as u8))
        }
    }
}

/// Opens `--serial2-out` and starts its drain thread.
fn open_serial2(
    path: &std::path::Path,
    capacity: usize,
) -> Result<(console_out::ConsoleOut, console_out::ConsoleDrain), String> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("--serial2-out {}: {e}", path.display()))?;
    console_out::start("COM2", Box::new(file), capacity)
        .map_err(|e| format!("cannot start the COM2 thread: {e}"))
}

/// Opens `--log-file`: appended to, created mode 0600 (the log names
/// patches, keys and guest addresses).
fn open_log(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("--log-file {}: {e}", path.display()))
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {e}");
    ExitCode::from(EXIT_SETUP)
}

fn probe() -> ExitCode {
    match vmm::kvm_probe::run() {
        Ok(p) => {
            println!(
                "kvm-probe native={} loop_ms={:.1} iterations={}",
                p.is_native(),
                p.elapsed.as_secs_f64() * 1e3,
                vmm::kvm_probe::ITERATIONS
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}
