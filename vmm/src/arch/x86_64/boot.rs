//! Loading a bzImage and its initrd and filling the zero page, following the
//! x86 boot protocol (Documentation/arch/x86/boot.rst). The kernel header is
//! checked before any KVM object exists, so a wrong file gets a plain error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{MemoryLayout, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};

const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Boot protocol 2.12 introduced `xloadflags` and the documented 64-bit entry.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const PAGE_SIZE: u64 = 4096;

/// Why the kernel, initrd or command line could not be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        /// The `--kernel` path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's setup header is missing or too old for a 64-bit boot.
    #[error("{path} is not a bzImage: {reason}")]
    NotBzImage {
        /// The `--kernel` path.
        path: PathBuf,
        /// What the header check found.
        reason: String,
    },
    /// The initrd file could not be opened or its size read.
    #[error("cannot open initrd {path}: {source}")]
    InitrdOpen {
        /// The `--initrd` path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd does not fit in low RAM beside the kernel.
    #[error("initrd {path} ({size_mib} MiB) does not fit in guest RAM below {limit_mib} MiB next to the kernel; raise --mem")]
    InitrdTooLarge {
        /// The `--initrd` path.
        path: PathBuf,
        /// Its size in MiB, rounded up.
        size_mib: u64,
        /// The guest-physical address, in MiB, it must end below.
        limit_mib: u64,
    },
    /// linux-loader refused the command line.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// linux-loader could not load the bzImage.
    #[error("loading the kernel into guest memory failed: {0}")]
    Load(linux_loader::loader::Error),
    /// Writing the zero page, command line or setup_data failed.
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The arena's PTE pages need more than a `setup_data` length (u32) holds.
    #[error("the arena's page-table blob ({size} bytes) does not fit a setup_data length")]
    TablesTooLarge {
        /// The blob's size in bytes.
        size: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("reading initrd {path} failed: {source}")]
    InitrdRead {
        /// The `--initrd` path.
        path: PathBuf,
        /// The guest-memory error.
        source: vm_memory::GuestMemoryError,
    },
}

/// What the kernel's setup header says about how to boot it.
#[derive(Debug, Clone, Copy)]
pub struct KernelInfo {
    /// The bzImage's `setup_header`, as read from offset 0x1f1.
    pub header: setup_header,
}

/// Reads and checks the setup header of a bzImage without loading it.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo, BootError> {
    let not_bz = |reason: &str| BootError::NotBzImage {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let mut f = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let mut header = setup_header::default();
    f.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .and_then(|_| f.read_exact(header.as_mut_slice()))
        .map_err(|_| not_bz("file is too short for a setup header"))?;
    if header.header != HDR_MAGIC {
        return Err(not_bz("no \"HdrS\" boot header magic at offset 0x202"));
    }
    if header.version < MIN_BOOT_PROTOCOL {
        return Err(not_bz(&format!(
            "boot protocol {}.{} is older than 2.12",
            header.version >> 8,
            header.version & 0xff
        )));
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_bz("kernel has no 64-bit entry point (XLF_KERNEL_64)"));
    }
    Ok(KernelInfo { header })
}

/// Where the boot CPU starts.
pub struct LoadedKernel {
    /// Guest-physical address of the kernel's 64-bit entry point.
    pub entry: u64,
}

/// Loads kernel, initrd and command line and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<LoadedKernel, BootError> {
    let info = inspect_kernel(kernel)?;
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_owned(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::Load)?;
    let mut hdr = loaded.setup_header.unwrap_or(info.header);

    let capacity = hdr.cmdline_size.max(1) as usize;
    let cl = Cmdline::try_from(cmdline, capacity).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::Load)?;

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32;

    if let Some(path) = initrd {
        // The decompressor needs [load address, + init_size) for itself.
        let kernel_end = loaded.kernel_load.raw_value() + u64::from(hdr.init_size);
        let (addr, size) = load_initrd(mem, layout, &hdr, kernel_end, path)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    write_tables_header(mem, layout)?;
    hdr.setup_data = layout.tables.0;

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp_addr,
        ..Default::default()
    };
    let e820 = layout.e820();
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;

    Ok(LoadedKernel {
        entry: loaded.kernel_load.raw_value() + ENTRY_64_OFFSET,
    })
}

/// `struct setup_data` type 0 (`SETUP_NONE`): data no kernel parses, only
/// reserves.
const SETUP_NONE: u32 = 0;

/// Writes the `setup_data` header that makes the kernel reserve the arena
/// tables (see the layout): `{ next: 0, type: SETUP_NONE, len }`, where
/// `len` covers the rest of the blob. The rest is zeroed: empty PTE pages.
fn write_tables_header(mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Result<(), BootError> {
    let (start, size) = layout.tables;
    let mut blob = vec![0u8; size as usize];
    let len = u32::try_from(size - 16).map_err(|_| BootError::TablesTooLarge { size })?;
    blob[8..12].copy_from_slice(&SETUP_NONE.to_le_bytes());
    blob[12..16].copy_from_slice(&len.to_le_bytes());
    mem.write_slice(&blob, GuestAddress(start))?;
    Ok(())
}

/// Places the initrd as high as the kernel allows, page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    hdr: &setup_header,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(|source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| BootError::InitrdOpen {
            path: path.to_owned(),
            source,
        })?
        .len();
    let limit = layout
        .low_free_end()
        .min(u64::from(hdr.initrd_addr_max) + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size_mib: size.div_ceil(1 << 20),
        limit_mib: limit >> 20,
    };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
        .map_err(|source| BootError::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((start, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("klpv-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn rejects_non_bzimage() {
        let p = temp_file("elf", b"\x7fELF not a kernel");
        let e = inspect_kernel(&p).unwrap_err();
        assert!(matches!(e, BootError::NotBzImage { .. }), "{e}");
        let p = temp_file("zeros", &[0u8; 4096]);
        let e = inspect_kernel(&p).unwrap_err().to_string();
        assert!(e.contains("HdrS"), "{e}");
    }

    #[test]
    fn rejects_old_protocol_and_32bit() {
        let mut img = vec![0u8; 4096];
        img[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        let e = inspect_kernel(&temp_file("old", &img))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2.6"), "{e}");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let e = inspect_kernel(&temp_file("32", &img))
            .unwrap_err()
            .to_string();
        assert!(e.contains("64-bit"), "{e}");
        img[0x236] = 1; // xloadflags
        inspect_kernel(&temp_file("ok", &img)).unwrap();
    }
}
