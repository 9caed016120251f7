//! virtio-blk over a raw image file (`vmm --disk PATH[,ro]`).
//!
//! One request queue, served synchronously on the vCPU thread that
//! notified it: a small VMM's disk is for test data and scratch space, and
//! this keeps the device free of threads and locks beyond the transport's.
//! Requests: IN (read), OUT (write), FLUSH (`fdatasync`) and GET_ID; any
//! other type is answered `VIRTIO_BLK_S_UNSUPP`.
//!
//! A request is guest input: its header, sector and lengths are checked
//! against the disk before any byte moves (`VIRTIO_BLK_S_IOERR` when they do
//! not fit), and every descriptor is checked against guest memory by
//! `virtio-queue`'s reader and writer. A chain with no room for the status
//! byte cannot be answered at all: the device then needs a reset.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{QueueError, VirtioDevice};

/// The unit of the disk's capacity and of request sectors.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors in the request queue.
const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (`seg_max`): the queue
/// less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The bounce buffer between the image file and guest memory.
const CHUNK: usize = 128 << 10;
/// Length of the request header (type, reserved, sector).
const HEADER_LEN: usize = 16;

/// Why a disk image cannot be used.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("--disk {path}: cannot open it: {source}")]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("--disk {path}: the image is in use by another process (it holds a lock on it); stop it or use a copy")]
    Locked {
        /// The image's path.
        path: PathBuf,
    },
    /// The image is not a regular file or block device.
    #[error("--disk {path}: not a regular file or a block device; give a raw disk image")]
    NotAFile {
        /// The image's path.
        path: PathBuf,
    },
    /// Its size could not be found.
    #[error("--disk {path}: cannot read its size: {source}")]
    Size {
        /// The image's path.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// One `--disk PATH[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest sees a read-only disk and the image is opened read-only.
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH` or `PATH,ro`. A path with a comma in it is written with
    /// `,ro` or `,rw` at the end, so the last comma is the separator.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, other)) => {
                return Err(format!(
                    "unknown disk option {other:?}: use PATH, PATH,ro or PATH,rw"
                ))
            }
            None => (s, false),
        };
        if path.is_empty() {
            return Err("the disk image path is empty".into());
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// What one request did to its chain: bytes written to the guest (data and
/// status), for the used ring.
struct Done {
    written: u32,
}

/// A virtio-blk device on a raw image.
pub struct Block {
    file: File,
    read_only: bool,
    /// Capacity in 512-byte sectors; a partial last sector is not exposed.
    sectors: u64,
    /// GET_ID's answer: the image's device and inode numbers, so the guest's
    /// /dev/disk/by-id name is stable for one image.
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    buffer: Vec<u8>,
}

impl Block {
    /// Opens `path` (read-only with `read_only`) and takes a lock on it
    /// (shared when read-only, exclusive otherwise), so two VMMs never
    /// write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.into(),
                source,
            })?;
        let lock = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked { path: path.into() });
        }
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: path.into(),
            source,
        })?;
        // A block device (a host disk or partition, or a nested test VM's
        // own disk) is a raw image too; its size is where it ends, which
        // its metadata does not say.
        let bytes = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(|source| BlockError::Size {
                    path: path.into(),
                    source,
                })?
        } else {
            return Err(BlockError::NotAFile { path: path.into() });
        };
        if bytes % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                "disk image size is not a multiple of {SECTOR_SIZE} bytes; its last partial sector is not visible to the guest"
            );
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let text = format!("{:x}{:x}", meta.dev(), meta.ino());
        for (d, s) in id.iter_mut().zip(text.bytes()) {
            *d = s;
        }
        Ok(Self::from_file(file, read_only, bytes / SECTOR_SIZE, id))
    }

    fn from_file(
        file: File,
        read_only: bool,
        sectors: u64,
        id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    ) -> Self {
        Self {
            file,
            read_only,
            sectors,
            id,
            buffer: vec![0; CHUNK],
        }
    }

    /// The configuration space: capacity, size_max (unused), seg_max.
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Executes one request; `None` when its chain has no room for the
    /// status byte (the device then needs a reset).
    fn execute(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Option<Done> {
        let mut writer = chain.clone().writer(mem).ok()?;
        let status_at = writer.available_bytes().checked_sub(1)?;
        let mut status_writer = writer.split_at(status_at).ok()?;
        let status = match chain.reader(mem) {
            Ok(mut reader) => self.request(&mut reader, &mut writer),
            Err(e) => {
                tracing::debug!("virtio-blk: unreadable request: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        status_writer.write_all(&[status as u8]).ok()?;
        let written = writer.bytes_written().checked_add(1)?;
        Some(Done {
            written: u32::try_from(written).ok()?,
        })
    }

    /// Reads the header from `reader` and serves the request; returns its
    /// status. `reader` holds the header and any data to write, `writer`
    /// the room for data to read (the status byte split off).
    fn request(
        &mut self,
        reader: &mut virtio_queue::Reader<'_>,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> u32 {
        let mut header = [0u8; HEADER_LEN];
        if reader.read_exact(&mut header).is_err() {
            tracing::debug!("virtio-blk: request header shorter than {HEADER_LEN} bytes");
            return VIRTIO_BLK_S_IOERR;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        let result = match kind {
            VIRTIO_BLK_T_IN => self
                .range(sector, writer.available_bytes())
                .and_then(|(off, len)| self.read_into(off, len, writer)),
            VIRTIO_BLK_T_OUT if self.read_only => Err("write to a read-only disk"),
            VIRTIO_BLK_T_OUT => self
                .range(sector, reader.available_bytes())
                .and_then(|(off, len)| self.write_from(off, len, reader)),
            VIRTIO_BLK_T_FLUSH => self.file.sync_data().map_err(|_| "fdatasync failed"),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                writer
                    .write_all(&self.id[..n])
                    .map_err(|_| "GET_ID buffer not writable")
            }
            other => {
                tracing::debug!(kind = other, "virtio-blk: unsupported request type");
                return VIRTIO_BLK_S_UNSUPP;
            }
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(why) => {
                tracing::debug!(kind, sector, "virtio-blk: request failed: {why}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// The byte offset and length of `len` bytes at `sector`, if they are
    /// whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Result<(u64, u64), &'static str> {
        let len = u64::try_from(len).map_err(|_| "request too long")?;
        if len % SECTOR_SIZE != 0 {
            return Err("data length is not a multiple of 512 bytes");
        }
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or("sector number overflows")?;
        if end > self.sectors {
            return Err("request beyond the end of the disk");
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or("sector number overflows")?;
        Ok((offset, len))
    }

    fn read_into(
        &mut self,
        mut offset: u64,
        mut len: u64,
        writer: &mut virtio_queue::Writer<'_>,
    ) -> Result<(), &'static str> {
        while len > 0 {
            let n = usize::try_from(len).unwrap_or(CHUNK).min(CHUNK);
            let buf = self.buffer.get_mut(..n).ok_or("bounce buffer")?;
            self.file
                .read_exact_at(buf, offset)
                .map_err(|_| "read from the image failed")?;
            writer
                .write_all(buf)
                .map_err(|_| "guest buffer not writable")?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    fn write_from(
        &mut self,
        mut offset: u64,
        mut len: u64,
        reader: &mut virtio_queue::Reader<'_>,
    ) -> Result<(), &'static str> {
        while len > 0 {
            let n = usize::try_from(len).unwrap_or(CHUNK).min(CHUNK);
            let buf = self.buffer.get_mut(..n).ok_or("bounce buffer")?;
            reader
                .read_exact(buf)
                .map_err(|_| "guest buffer not readable")?;
            self.file
                .write_all_at(buf, offset)
                .map_err(|_| "write to the image failed")?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn process_queue(
        &mut self,
        _index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let Some(done) = self.execute(chain, mem) else {
                return Err(QueueError::Chain {
                    head,
                    reason: "no writable status byte",
                });
            };
            queue.add_used(mem, head, done.written)?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::memory;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const SECTORS: u64 = 16;
    const HDR: u64 = 0x4_0000;
    const DATA: u64 = 0x5_0000;
    const STATUS: u64 = 0x6_0000;

    fn disk(read_only: bool) -> (Block, tempfile_free::Scratch) {
        let scratch = tempfile_free::Scratch::new(SECTORS * SECTOR_SIZE);
        let file = scratch.open();
        (
            Block::from_file(file, read_only, SECTORS, [b'x'; 20]),
            scratch,
        )
    }

    /// Minimal scratch files without a dev-dependency.
    mod tempfile_free {
        pub struct Scratch(pub std::path::PathBuf);
        impl Scratch {
            pub fn new(len: u64) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p =
                    std::env::temp_dir().join(format!("klpv-blk-{}-{n}.img", std::process::id()));
                let f = std::fs::File::create(&p).unwrap();
                f.set_len(len).unwrap();
                Self(p)
            }
            pub fn open(&self) -> std::fs::File {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.0)
                    .unwrap()
            }
        }
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// Puts one request chain (header, data, status) on a fresh queue and
    /// runs the device; returns the status byte, the used length and the
    /// device's result.
    fn run(
        blk: &mut Block,
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (Result<bool, QueueError>, u8, u32) {
        mem.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
        let mock = MockSplitQueue::new(mem, 16);
        mock.build_desc_chain(descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let r = blk.process_queue(0, &mut q, mem);
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        let used_len: u32 = mem.read_obj(mock.used_addr().unchecked_add(4 + 4)).unwrap();
        (r, status, used_len)
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn rw(kind: u32, len: u32) -> Vec<RawDescriptor> {
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            F_NEXT | F_WRITE
        } else {
            F_NEXT
        };
        vec![
            d(HDR, 16, F_NEXT),
            d(DATA, len, data_flags),
            d(STATUS, 1, F_WRITE),
        ]
    }

    #[test]
    fn disk_options_parse() {
        let p = |s: &str| s.parse::<DiskConfig>();
        assert_eq!(
            p("a.img"),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: false
            })
        );
        assert!(p("a.img,ro").unwrap().read_only);
        assert!(!p("x,y.img,rw").unwrap().read_only);
        assert_eq!(p("x,y.img,rw").unwrap().path, PathBuf::from("x,y.img"));
        assert!(p("a.img,readonly").is_err());
        assert!(p(",ro").is_err());
    }

    #[test]
    fn open_checks_the_image_and_locks_it() {
        let scratch = tempfile_free::Scratch::new(3 * SECTOR_SIZE + 100);
        let blk = Block::open(&scratch.0, false).unwrap();
        assert_eq!(blk.sectors, 3, "the partial sector is not exposed");
        let again = Block::open(&scratch.0, false).err().unwrap().to_string();
        assert!(again.contains("in use by another process"), "{again}");
        drop(blk);
        let a = Block::open(&scratch.0, true).unwrap();
        let b = Block::open(&scratch.0, true).unwrap();
        drop((a, b));
        let e = Block::open(std::path::Path::new("/nonexistent/x.img"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("--disk /nonexistent/x.img: cannot open it"),
            "{e}"
        );
        let dir = Block::open(&std::env::temp_dir(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(dir.contains("not a regular file"), "{dir}");
    }

    #[test]
    fn write_then_read_back() {
        let mem = memory();
        let (mut blk, scratch) = disk(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&header(VIRTIO_BLK_T_OUT, 3), GuestAddress(HDR))
            .unwrap();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        let (r, status, used) = run(&mut blk, &mem, &rw(VIRTIO_BLK_T_OUT, 1024));
        assert!(matches!(r, Ok(true)));
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
        assert_eq!(used, 1, "only the status byte is written");
        let on_disk = std::fs::read(&scratch.0).unwrap();
        assert_eq!(&on_disk[3 * 512..3 * 512 + 1024], &pattern[..]);

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 3), GuestAddress(HDR))
            .unwrap();
        let (r, status, used) = run(&mut blk, &mem, &rw(VIRTIO_BLK_T_IN, 1024));
        assert!(matches!(r, Ok(true)));
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
        assert_eq!(used, 1025);
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn a_request_beyond_the_end_is_an_io_error() {
        let mem = memory();
        let (mut blk, scratch) = disk(false);
        // The last sector is fine; one more is not, nor is a wrapping sector.
        for (sector, len, want) in [
            (SECTORS - 1, 512, VIRTIO_BLK_S_OK),
            (SECTORS - 1, 1024, VIRTIO_BLK_S_IOERR),
            (SECTORS, 512, VIRTIO_BLK_S_IOERR),
            (u64::MAX, 512, VIRTIO_BLK_S_IOERR),
            (u64::MAX / 512 + 1, 0, VIRTIO_BLK_S_IOERR),
            (0, 100, VIRTIO_BLK_S_IOERR),
        ] {
            mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
            mem.write_slice(&header(VIRTIO_BLK_T_OUT, sector), GuestAddress(HDR))
                .unwrap();
            let (r, status, _) = run(&mut blk, &mem, &rw(VIRTIO_BLK_T_OUT, len));
            assert!(matches!(r, Ok(true)));
            assert_eq!(u32::from(status), want, "sector {sector} len {len}");
        }
        let on_disk = std::fs::read(&scratch.0).unwrap();
        assert_eq!(on_disk.len() as u64, SECTORS * SECTOR_SIZE, "never grown");
        assert!(on_disk[..(SECTORS as usize - 1) * 512]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn malformed_chains_get_an_error_or_a_reset_never_a_panic() {
        let mem = memory();
        let (mut blk, _scratch) = disk(false);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .unwrap();
        // Data descriptor outside guest memory: the chain is unreadable,
        // but the status byte can still say so.
        let descs = vec![
            d(HDR, 16, F_NEXT),
            d(0xffff_0000, 512, F_NEXT | F_WRITE),
            d(STATUS, 1, F_WRITE),
        ];
        let (r, status, _) = run(&mut blk, &mem, &descs);
        assert!(r.is_err(), "writer cannot be built: {r:?}");
        assert_eq!(status, 0xee, "nothing written");

        // Header too short.
        let descs = vec![d(HDR, 8, F_NEXT), d(STATUS, 1, F_WRITE)];
        let (r, status, used) = run(&mut blk, &mem, &descs);
        assert!(matches!(r, Ok(true)));
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR);
        assert_eq!(used, 1);

        // No writable descriptor at all: no status byte, the device needs a reset.
        let descs = vec![d(HDR, 16, 0)];
        let (r, _, _) = run(&mut blk, &mem, &descs);
        assert!(matches!(r, Err(QueueError::Chain { .. })), "{r:?}");

        // Unknown request type.
        mem.write_slice(&header(99, 0), GuestAddress(HDR)).unwrap();
        let descs = vec![d(HDR, 16, F_NEXT), d(STATUS, 1, F_WRITE)];
        let (r, status, _) = run(&mut blk, &mem, &descs);
        assert!(matches!(r, Ok(true)));
        assert_eq!(u32::from(status), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn a_looping_chain_ends_and_a_runaway_avail_index_needs_reset() {
        let mem = memory();
        let (mut blk, _scratch) = disk(false);
        mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .unwrap();
        // Descriptor 1 points back at 0: the chain would never end.
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, F_NEXT | F_WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        // Bounded by the queue size, whatever it answers.
        let _ = blk.process_queue(0, &mut q, &mem);

        // The driver claims 100 new requests in a queue of 16.
        let mock = MockSplitQueue::new(&mem, 16);
        mock.avail().idx().store(100);
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(matches!(
            blk.process_queue(0, &mut q, &mem),
            Err(QueueError::Queue(_))
        ));
    }

    #[test]
    fn read_only_refuses_writes_and_says_so() {
        let mem = memory();
        let (mut blk, scratch) = disk(true);
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        mem.write_slice(&header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HDR))
            .unwrap();
        let (_, status, _) = run(&mut blk, &mem, &rw(VIRTIO_BLK_T_OUT, 512));
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR);
        assert!(std::fs::read(&scratch.0).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn get_id_flush_and_config() {
        let mem = memory();
        let (mut blk, _scratch) = disk(false);
        mem.write_slice(&header(VIRTIO_BLK_T_GET_ID, 0), GuestAddress(HDR))
            .unwrap();
        let descs = vec![
            d(HDR, 16, F_NEXT),
            d(DATA, 20, F_NEXT | F_WRITE),
            d(STATUS, 1, F_WRITE),
        ];
        let (_, status, used) = run(&mut blk, &mem, &descs);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
        assert_eq!(used, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(id, [b'x'; 20]);

        mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(HDR))
            .unwrap();
        let descs = vec![d(HDR, 16, F_NEXT), d(STATUS, 1, F_WRITE)];
        let (_, status, _) = run(&mut blk, &mem, &descs);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);

        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), SECTORS);
        let mut past = [0xffu8; 4];
        blk.read_config(100, &mut past);
        assert_eq!(past, [0xff; 4], "untouched here; the transport zeroes it");
    }
}
