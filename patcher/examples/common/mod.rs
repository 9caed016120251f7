//! What the test tools in `patcher/examples/` share: how they report (one
//! `KLPV-RESULT name key=value ...` line per finding, read by the
//! end-to-end tests), statistics, hashes of guest memory read through the
//! API, and the vmm process's own mapping of guest RAM.
//!
//! Each tool is one file, run by a scenario in `tests/scenarios/` against a
//! `vmm --api-sock SOCK`. Every request goes through the typed methods of
//! [`klpvisor_api::client::Client`], where the routes are spelled once.
#![allow(dead_code)] // each tool uses a part

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use klpvisor_api::client::{Client, Space};
use klpvisor_api::MAX_MEMORY_READ;

/// The FNV-1a offset basis and prime: a fast equality hash for "this
/// memory did not change", not a cryptographic one.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds one byte (or word) into an FNV-1a hash.
pub fn fnv(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(FNV_PRIME)
}

/// Runs a tool's body and turns its error into the `api-check-error`
/// result line (spaces as `_`, so it stays one key=value) and exit 1.
pub fn run(body: impl FnOnce() -> Result<(), String>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("KLPV-RESULT api-check-error msg={}", e.replace(' ', "_"));
            ExitCode::FAILURE
        }
    }
}

/// The arguments after the program name, or a usage error (exit 2).
pub fn args(usage: &str, min: usize) -> Result<Vec<String>, ExitCode> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < min {
        eprintln!("usage: {usage}");
        return Err(ExitCode::from(2));
    }
    Ok(a)
}

/// Argument `i` as a number, or `default` when absent or not a number.
pub fn num_or<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A client of the socket at `sock`.
pub fn client(sock: &str) -> Result<Client, String> {
    Client::new(&PathBuf::from(sock)).map_err(|e| e.to_string())
}

/// The `p` quantile (0..=1) of `sorted`, nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The 5-byte sites of every live patched function.
pub fn live_sites(c: &Client) -> Result<Vec<u64>, String> {
    let v = c.patches().map_err(|e| e.to_string())?;
    Ok(v.patches
        .iter()
        .flat_map(|p| p.funcs.iter())
        .filter(|f| f.live)
        .map(|f| f.site.0)
        .collect())
}

/// FNV-1a over the kernel's text, `_text` to `_etext`, read through the API.
pub fn text_hash(c: &Client) -> Result<u64, String> {
    text_hash_masked(c, &[])
}

/// [`text_hash`] with the 5 bytes at each of `sites` hashed as zeros.
pub fn text_hash_masked(c: &Client, sites: &[u64]) -> Result<u64, String> {
    let addr = |name: &str| -> Result<u64, String> {
        let r = c.symbol(name).map_err(|e| e.to_string())?;
        r.symbols
            .first()
            .map(|s| s.addr.0)
            .ok_or(format!("no {name}"))
    };
    let (start, end) = (addr("_text")?, addr("_etext")?);
    let mut h = FNV_OFFSET;
    let mut va = start;
    while va < end {
        let len = (end - va).min(MAX_MEMORY_READ);
        let m = c
            .memory(Space::Virt, &format!("{va:#x}"), len)
            .map_err(|e| e.to_string())?;
        for (i, b) in m.bytes.bytes().enumerate() {
            let at = va + (i / 2) as u64;
            let b = if sites.iter().any(|&s| (s..s + 5).contains(&at)) {
                b'0'
            } else {
                b
            };
            h = fnv(h, u64::from(b));
        }
        va += len;
    }
    Ok(h)
}

/// Guest-physical `[gpa, end)` read through the API (`GET /memory?gpa=`),
/// at most [`MAX_MEMORY_READ`] bytes a request, stopping short of `skip`
/// (pages left out: read as zeros) and resuming after each; `f` gets each reply's hex text.
pub fn read_phys_hex(
    c: &Client,
    mut gpa: u64,
    end: u64,
    skip: &[u64],
    mut f: impl FnMut(&str),
) -> Result<(), String> {
    while gpa < end {
        if skip.contains(&gpa) {
            // Read as the zero page it was before klpvisor took it, so
            // that a hash does not depend on whether it is taken yet.
            f(&"0".repeat(8192));
            gpa += 4096;
            continue;
        }
        let len = (end - gpa).min(MAX_MEMORY_READ);
        let len = match skip.iter().filter(|&&s| s > gpa && s < gpa + len).min() {
            Some(s) => s - gpa,
            None => len,
        };
        let m = c
            .memory(Space::Phys, &format!("{gpa:#x}"), len)
            .map_err(|e| e.to_string())?;
        f(&m.bytes);
        gpa += len;
    }
    Ok(())
}

/// Guest memory as the vmm holds it: RAM in the vmm's own address space
/// (found by content: the ACPI RSDP page the VMM wrote at 0xe0000 is read
/// through the API and looked for page by page in the vmm's anonymous
/// mappings), the arena by physical reads of the API. These work before
/// the VMM has looked at the guest kernel (physical reads need no kernel
/// view).
pub struct GuestMemory {
    mem: std::fs::File,
    /// (host address, bytes) of guest RAM from guest-physical 0.
    pub regions: Vec<(u64, u64)>,
    pub client: Client,
    /// The arena: (guest-physical start, bytes).
    pub arena: (u64, u64),
}

/// Where the VMM writes the ACPI RSDP.
const RSDP_GPA: u64 = 0xe0000;

impl GuestMemory {
    /// Finds the RAM of the vmm process `pid` (`ram` bytes, `--mem`) and
    /// the arena after it (`arena` bytes, `--arena`).
    pub fn open(sock: &Path, pid: u64, ram: u64, arena: u64) -> Result<Self, String> {
        use std::os::unix::fs::FileExt;
        if ram > 3 << 30 {
            return Err("RAM above 3 GiB is split around the MMIO hole; use less".into());
        }
        let client = Client::new(sock).map_err(|e| e.to_string())?;
        let m = client
            .memory(Space::Phys, &format!("{RSDP_GPA:#x}"), 4096)
            .map_err(|e| e.to_string())?;
        let page = (0..m.bytes.len() / 2)
            .map(|i| u8::from_str_radix(&m.bytes[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| format!("memory reply: {e}"))?;
        if !page.starts_with(b"RSD PTR ") {
            return Err(format!("no RSDP at guest-physical {RSDP_GPA:#x}"));
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| format!("/proc/{pid}/maps: {e}"))?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 4096];
        for line in maps.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Anonymous (no path), read-write, large enough to hold RAM.
            if f.len() != 5 || !f[1].starts_with("rw") {
                continue;
            }
            let Some((a, b)) = f[0].split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            let mut base = a;
            while base + ram <= b {
                if mem.read_exact_at(&mut buf, base + RSDP_GPA).is_ok() && buf == page {
                    found.push(base);
                }
                base += 4096;
            }
        }
        match found.as_slice() {
            [base] => Ok(GuestMemory {
                mem,
                regions: vec![(*base, ram)],
                client,
                arena: (ram.next_multiple_of(2 << 20), arena),
            }),
            other => Err(format!(
                "{} places in vmm {pid} hold guest RAM's RSDP page; cannot tell which is RAM",
                other.len()
            )),
        }
    }

    /// From the arguments `SOCK PID MEM_MIB ARENA_MIB`.
    pub fn from_args(tool: &str, args: &[String]) -> Result<Self, String> {
        let num = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok());
        match (args.first(), num(1), num(2), num(3)) {
            (Some(sock), Some(pid), Some(mem), Some(arena)) => {
                Self::open(Path::new(sock), pid, mem << 20, arena << 20)
            }
            _ => Err(format!("usage: {tool} SOCK PID MEM_MIB ARENA_MIB")),
        }
    }

    /// Reads host address `at` of the vmm process.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.mem
            .read_exact_at(buf, at)
            .map_err(|e| format!("reading guest memory at {at:#x}: {e}"))
    }

    /// Writes host address `at` of the vmm process.
    pub fn write(&self, at: u64, buf: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        self.mem
            .write_all_at(buf, at)
            .map_err(|e| format!("writing guest memory at {at:#x}: {e}"))
    }

    /// Every region, 1 MiB at a time.
    pub fn chunks(&self, mut f: impl FnMut(u64, &[u8])) -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 20];
        for &(start, len) in &self.regions {
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                self.read(start + off, &mut buf[..n])?;
                f(start + off, &buf[..n]);
                off += n as u64;
            }
        }
        Ok(())
    }
}

/// Waits until no function that no patch redirects still has an ftrace
/// redirect registered, and the switch log is not registered (the VMM lets
/// both go once changes pause), so a reading of the guest happens after
/// that, never during it. Returns how long it waited; fails after `limit`.
pub fn ops_settled(c: &Client, limit: std::time::Duration) -> Result<std::time::Duration, String> {
    let start = std::time::Instant::now();
    loop {
        let v = c.patches().map_err(|e| e.to_string())?;
        let left: Vec<String> = v
            .ftrace
            .iter()
            // A lost slot is never let go: nothing to wait for.
            .filter(|f| !f.live && f.state != "lost")
            .map(|f| format!("{} ({})", f.name, f.state))
            .chain(
                v.switch_log
                    .iter()
                    .filter(|l| l.state == "registered")
                    .map(|_| "the switch log (registered)".to_string()),
            )
            .collect();
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "ftrace redirects still registered after {} s: {}",
                limit.as_secs(),
                left.join(", ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
