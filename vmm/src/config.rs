//! Command-line configuration and the checks that run before any KVM object
//! exists, so every bad input gets a one-line error naming the problem.

use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

use klpvisor_engine::signature::{Policy, SignatureError, TrustedKeys};
use vmm::arch::x86_64::boot::{inspect_kernel, BootError};
use vmm::arch::x86_64::layout::MIN_MEM_MIB;
use vmm::boot_patch::{BootPatch, BootPatchError};
use vmm::devices::virtio::block::DiskConfig;
use vmm::devices::virtio::net::NetConfig;
use vmm::devices::virtio::MAX_DEVICES;
use vmm::VmConfig;

/// APIC ids are one byte in the MADT, and 0xff is the broadcast id.
pub const MAX_CPUS: u32 = 254;
pub const MAX_ARENA_MIB: u64 = 512;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Boot an unmodified Linux guest on KVM, ready to be live-patched from outside.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
pub struct Args {
    /// The guest kernel (a bzImage).
    #[arg(long, required_unless_present_any = ["kvm_probe", "completions", "man"])]
    pub kernel: Option<PathBuf>,
    /// An initramfs for the guest.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The guest kernel command line, passed verbatim.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// Size of the reserved patch arena in MiB (a multiple of 2).
    #[arg(long, default_value_t = 16)]
    pub arena: u64,
    /// Serve the HTTP/JSON control API on this Unix socket (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Accept only patches signed (`patcher sign`) by one of the keys in
    /// DIR (every `*.pub` file there, made by `patcher keygen`). Without
    /// it, unsigned patches are accepted and `patcher list` says so.
    #[arg(long, value_name = "DIR")]
    pub trusted_keys: Option<PathBuf>,
    /// With --trusted-keys: also accept a patch signed at a lower level
    /// (`patcher sign --level N`) than the highest already applied. Without
    /// it, such a downgrade is refused, so an old signed fix cannot be
    /// replayed over a newer one.
    #[arg(long, requires = "trusted_keys")]
    pub allow_downgrade: bool,
    /// Never register the switch log (klpvisor's probe on the guest's
    /// `sched_switch` tracepoint, README "What the pause costs"), which
    /// otherwise runs while changes happen so that a safe-point pause
    /// reads only the tasks that may have run since they were judged.
    /// Without it every pause reads every task: for a guest whose kernel
    /// text must not change even for a moment outside the patches.
    #[arg(long)]
    pub no_switch_log: bool,
    /// Give the guest a virtio-blk disk backed by this raw image file
    /// (its /dev/vda; a second --disk is vdb, and so on, up to 5). Append
    /// `,ro` for a read-only disk: the image is opened read-only and the
    /// guest sees it so. The image is locked while the VMM runs (shared
    /// when read-only, exclusive otherwise): a second VMM on the same
    /// writable image is refused. The guest needs the virtio_mmio and
    /// virtio_blk drivers.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<DiskConfig>,
    /// Give the guest a virtio-net NIC on the host tap device NAME
    /// (created if it does not exist, which needs CAP_NET_ADMIN; an
    /// existing one must be a tap this user may attach to). `mac=` sets
    /// the guest's address (default: a locally administered one derived
    /// from NAME). Repeatable; disks and NICs together: at most 5. The
    /// guest needs the virtio_mmio and virtio_net drivers.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]")]
    pub nets: Vec<NetConfig>,
    /// Give the guest a second serial port (COM2, its ttyS1), output only,
    /// written to PATH (a file, created or appended to, or a FIFO). The
    /// kernel prints to the console (COM1) unless told otherwise, so
    /// program output sent to ttyS1 never has kernel messages spliced in.
    #[arg(long, value_name = "PATH")]
    pub serial2_out: Option<PathBuf>,
    /// How much console output (per serial port) the VMM holds for a slow
    /// reader of stdout (or of --serial2-out), in KiB, 1 to 65536. Past
    /// it, output is dropped and counted (logged at exit): a vCPU never
    /// waits for the reader.
    #[arg(long, value_name = "KIB", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub console_buffer: u32,
    /// Write the VMM's own log to PATH (appended to, created mode 0600)
    /// instead of stderr. The guest's console stays on stdout either way;
    /// start-up errors still go to stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Apply this livepatch module (.ko) once the guest kernel has booted,
    /// as `kpatch install` has modules loaded at every boot. Repeatable:
    /// applied in the order given, each as `patcher apply` would (same
    /// signature policy, listed and managed by `patcher` afterwards); one
    /// that fails is logged with its error and the VM runs on. The files
    /// are read at start-up: one that cannot be read stops the VMM (exit 1).
    #[arg(long = "patch", value_name = "FILE.ko")]
    pub patches: Vec<PathBuf>,
    /// Run without the seccomp filters (README "Threat model"): every VMM
    /// thread then may make any system call. For debugging a VMM stopped
    /// with exit code 6 (a forbidden system call) only.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Time a loop on /dev/kvm, print whether it runs at hardware speed, and exit.
    #[arg(long)]
    pub kvm_probe: bool,
    /// Print a completion script for SHELL and exit (e.g. `vmm
    /// --completions bash > /etc/bash_completion.d/vmm`).
    #[arg(long, value_name = "SHELL", value_enum, exclusive = true)]
    pub completions: Option<clap_complete::Shell>,
    /// Print this manual page (roff) and exit (`vmm --man > vmm.1`).
    #[arg(long, exclusive = true)]
    pub man: bool,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--cpus {0} is out of range: use 1 to {MAX_CPUS}")]
    Cpus(u32),
    #[error("--mem {0} MiB is too small: the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    #[error("--mem {asked} MiB exceeds this host's {host} MiB of RAM")]
    MemTooLarge { asked: u64, host: u64 },
    #[error("--arena {0} MiB must be an even number between 2 and {MAX_ARENA_MIB}")]
    Arena(u64),
    #[error("--kernel is required")]
    NoKernel,
    #[error(transparent)]
    Kernel(#[from] BootError),
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is {size} MiB, larger than guest RAM ({mem} MiB); raise --mem")]
    InitrdTooLarge { path: PathBuf, size: u64, mem: u64 },
    #[error("--cmdline is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("--cmdline contains a character the kernel cannot take (only printable ASCII)")]
    CmdlineChars,
    #[error("{0} --disk and --net devices: at most {MAX_DEVICES} in all")]
    TooManyDisks(usize),
    #[error("--disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--trusted-keys: {0}")]
    TrustedKeys(#[from] SignatureError),
}

/// Total host RAM in MiB from /proc/meminfo, if readable.
fn host_mem_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl Args {
    /// The `--patch` modules, read now (see [`BootPatch::read`]).
    pub fn boot_patches(&self) -> Result<Vec<BootPatch>, BootPatchError> {
        self.patches.iter().map(|p| BootPatch::read(p)).collect()
    }

    /// Which patches the control socket accepts: read once at start-up,
    /// so a bad key file stops the VMM before the guest boots.
    pub fn signature_policy(&self) -> Result<Policy, ConfigError> {
        Ok(match &self.trusted_keys {
            None => Policy::AcceptUnsigned,
            Some(dir) => Policy::RequireSigned(TrustedKeys::load_dir(dir)?),
        })
    }

    /// Checks every argument and the files they name.
    pub fn validate(&self) -> Result<VmConfig, ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.mem < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem));
        }
        if let Some(host) = host_mem_mib() {
            if self.mem > host {
                return Err(ConfigError::MemTooLarge {
                    asked: self.mem,
                    host,
                });
            }
        }
        if self.arena < 2 || self.arena > MAX_ARENA_MIB || self.arena % 2 != 0 {
            return Err(ConfigError::Arena(self.arena));
        }
        let kernel = self.kernel.clone().ok_or(ConfigError::NoKernel)?;
        let info = inspect_kernel(&kernel)?;
        if let Some(path) = &self.initrd {
            let size = std::fs::metadata(path)
                .map_err(|source| ConfigError::Initrd {
                    path: path.clone(),
                    source,
                })?
                .len();
            if size >= self.mem << 20 {
                return Err(ConfigError::InitrdTooLarge {
                    path: path.clone(),
                    size: size.div_ceil(1 << 20),
                    mem: self.mem,
                });
            }
        }
        let devices = self.disks.len() + self.nets.len();
        if devices > MAX_DEVICES {
            return Err(ConfigError::TooManyDisks(devices));
        }
        for disk in &self.disks {
            // Opened (and locked) when the VM is built; this catches a
            // missing file before any KVM object exists.
            std::fs::metadata(&disk.path).map_err(|source| ConfigError::Disk {
                path: disk.path.clone(),
                source,
            })?;
        }
        let max = info.header.cmdline_size;
        if self.cmdline.len() >= max as usize {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max: max.saturating_sub(1),
            });
        }
        if !self
            .cmdline
            .chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control())
        {
            return Err(ConfigError::CmdlineChars);
        }
        Ok(VmConfig {
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            cpus: self.cpus as u8,
            mem_mib: self.mem,
            arena_mib: self.arena,
            disks: self.disks.clone(),
            nets: self.nets.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn the_switch_log_is_on_unless_turned_off() {
        assert!(
            !parse(&["--kernel", "bzImage"])
                .expect("parses")
                .no_switch_log
        );
        assert!(
            parse(&["--kernel", "bzImage", "--no-switch-log"])
                .expect("parses")
                .no_switch_log
        );
    }

    #[test]
    fn patch_is_repeatable_and_keeps_its_order() {
        let a = parse(&[
            "--kernel", "bzImage", "--patch", "b.ko", "--patch", "a.ko", "--patch", "b.ko",
        ])
        .expect("parses");
        assert_eq!(
            a.patches,
            [
                PathBuf::from("b.ko"),
                PathBuf::from("a.ko"),
                PathBuf::from("b.ko")
            ]
        );
        assert!(parse(&["--kernel", "bzImage"])
            .expect("parses")
            .patches
            .is_empty());
    }

    #[test]
    fn disk_is_repeatable_and_takes_ro() {
        let a = parse(&[
            "--kernel", "bzImage", "--disk", "a.img", "--disk", "b.img,ro",
        ])
        .expect("parses");
        assert_eq!(a.disks.len(), 2);
        assert!(!a.disks[0].read_only);
        assert!(a.disks[1].read_only);
        let e = parse(&["--kernel", "bzImage", "--disk", "a.img,bad"]).expect_err("bad option");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn net_takes_a_tap_and_a_mac() {
        let a = parse(&[
            "--kernel",
            "bzImage",
            "--net",
            "tap=kt0,mac=52:54:00:00:00:01",
        ])
        .expect("parses");
        assert_eq!(a.nets[0].tap, "kt0");
        assert_eq!(a.nets[0].mac, [0x52, 0x54, 0, 0, 0, 1]);
        let e = parse(&["--kernel", "bzImage", "--net", "kt0"]).expect_err("no tap=");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn patch_wants_a_file_and_is_no_generator_option() {
        let e = parse(&["--kernel", "bzImage", "--patch"]).expect_err("no value");
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
        let e = parse(&["--man", "--patch", "a.ko"]).expect_err("--man stands alone");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn an_unreadable_patch_is_named_at_start_up() {
        let a = parse(&["--kernel", "bzImage", "--patch", "/nonexistent/fix.ko"]).expect("parses");
        let e = a.boot_patches().expect_err("missing file").to_string();
        assert!(
            e.contains("--patch /nonexistent/fix.ko: cannot read it"),
            "{e}"
        );
    }
}
