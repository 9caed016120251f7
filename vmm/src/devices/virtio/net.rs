//! virtio-net over a host tap device (`vmm --net tap=NAME[,mac=MAC]`).
//!
//! Two queues: receive (0) and transmit (1). TX is served on the vCPU
//! that notifies the queue: each frame (the 12-byte virtio-net header and
//! the Ethernet frame, which a tap opened with `IFF_VNET_HDR` takes as
//! they are) is written to the tap. RX needs a thread: frames arrive from
//! the host at any time. The RX thread ([`spawn_rx`]) waits on the tap and
//! on a kick eventfd, and moves frames into the guest's receive buffers
//! under the transport's lock. When the guest has posted no buffer the
//! frame stays pending and the thread stops watching the tap until the
//! guest notifies the RX queue (the kick), so a full queue never spins.
//!
//! No offloads are offered (no checksum or segmentation features), so the
//! tap's kernel side hands over whole, checksummed frames no larger than
//! its MTU, and the guest's receive buffers (1518 bytes and the header
//! without `VIRTIO_NET_F_MRG_RXBUF`) always fit one.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::{QueueError, VirtioDevice};

/// The receive queue's index.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue's index.
pub const TX_QUEUE: u16 = 1;
/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: the header before every frame (virtio 1.x
/// always has `num_buffers`).
pub const HEADER_LEN: usize = 12;
/// The largest frame the device moves, header included: a 64 KiB packet
/// (what a tap can carry) and its Ethernet header.
const MAX_FRAME: usize = HEADER_LEN + 65_550;
/// Interface names are at most 15 bytes and a NUL (`IFNAMSIZ`).
const IFNAMSIZ: usize = 16;

#[allow(missing_docs)]
mod ioctls {
    use vmm_sys_util::ioctl_iow_nr;
    const TUNTAP: u32 = b'T' as u32;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);
}

/// Why a tap device cannot be used.
#[derive(Debug, Error)]
pub enum NetError {
    /// /dev/net/tun could not be opened.
    #[error("--net: cannot open /dev/net/tun: {0} (is the tun module loaded, and may this user use it?)")]
    OpenTun(std::io::Error),
    /// The tap could not be created or attached.
    #[error("--net tap={name}: cannot attach to the tap device: {source} (it must be a tap, not a tun, and free; creating one needs CAP_NET_ADMIN)")]
    SetIff {
        /// The interface name.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The tap refused our header size or offload setting.
    #[error("--net tap={name}: cannot configure the tap ({what}): {source}")]
    Configure {
        /// The interface name.
        name: String,
        /// Which setting.
        what: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The kick eventfd could not be created.
    #[error("cannot create an eventfd for the net device: {0}")]
    EventFd(std::io::Error),
}

/// One `--net tap=NAME[,mac=MAC]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface (created if it does not exist).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME` or `tap=NAME,mac=52:54:00:12:34:56`. Without `mac` the
    /// address is a locally administered one derived from the tap's name,
    /// so a guest keeps its address across runs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", name)) => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => {
                    return Err(format!(
                        "unknown net option {part:?}: use tap=NAME[,mac=MAC]"
                    ))
                }
            }
        }
        let tap = tap.ok_or("missing tap=NAME")?;
        if tap.is_empty() || tap.len() >= IFNAMSIZ || tap.contains(['/', ' ', '\0']) {
            return Err(format!(
                "tap name {tap:?} is not an interface name (1 to 15 characters, no '/' or blanks)"
            ));
        }
        let mac = mac.unwrap_or_else(|| default_mac(&tap));
        Ok(Self { tap, mac })
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("mac {s:?} is not six hex bytes separated by ':'");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac {s:?} is a multicast address"));
    }
    Ok(mac)
}

/// A locally administered unicast address (02:...) from a hash of `tap`.
fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x02, 0x4b, b[0], b[1], b[2], b[3]]
}

/// Opens (creating if needed) the tap `name` with virtio-net headers, no
/// packet information, no offloads, non-blocking.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    // SAFETY: a NUL-terminated literal path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(NetError::OpenTun(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let tap = unsafe { File::from_raw_fd(fd) };
    // struct ifreq: the name, then a union whose first member here is the
    // short flags word; 40 bytes in all on x86_64.
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    ifreq[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is
    // (40 bytes, name then flags); the fd is ours.
    if unsafe { libc::ioctl(tap.as_raw_fd(), ioctls::TUNSETIFF(), ifreq.as_mut_ptr()) } < 0 {
        return Err(NetError::SetIff {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let hdr_len = HEADER_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    if unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            ioctls::TUNSETVNETHDRSZ(),
            &hdr_len as *const libc::c_int,
        )
    } < 0
    {
        return Err(NetError::Configure {
            name: name.into(),
            what: "virtio-net header size",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 is no offloads.
    if unsafe { libc::ioctl(tap.as_raw_fd(), ioctls::TUNSETOFFLOAD(), 0 as libc::c_ulong) } < 0 {
        return Err(NetError::Configure {
            name: name.into(),
            what: "offloads",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(tap)
}

/// What the RX thread shares with the device.
#[derive(Debug)]
pub struct RxShared {
    /// Written when the guest posts receive buffers (or the device is
    /// activated): the thread should watch the tap again.
    kick: EventFd,
    /// No receive buffer was free: stop watching the tap until a kick.
    starved: AtomicBool,
}

/// A virtio-net device on a tap. Generic over the tap so tests can use a
/// socket pair or a file.
pub struct Net<T> {
    tap: Arc<T>,
    mac: [u8; 6],
    shared: Arc<RxShared>,
    /// A frame read from the tap that no receive buffer has taken yet.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
}

impl<T> Net<T>
where
    for<'a> &'a T: Read + Write,
{
    /// The device on `tap` with `mac`; the returned [`RxShared`] goes to
    /// the RX thread.
    pub fn new(tap: Arc<T>, mac: [u8; 6]) -> Result<(Self, Arc<RxShared>), NetError> {
        let shared = Arc::new(RxShared {
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?,
            starved: AtomicBool::new(true),
        });
        Ok((
            Self {
                tap,
                mac,
                shared: shared.clone(),
                pending: None,
                rx_frame: vec![0; MAX_FRAME],
                tx_frame: vec![0; MAX_FRAME],
            },
            shared,
        ))
    }

    fn kick_rx(&self) {
        self.shared.starved.store(false, Ordering::Release);
        if let Err(e) = self.shared.kick.write(1) {
            tracing::warn!("virtio-net: cannot wake the RX thread: {e}");
        }
    }

    /// Sends every frame the guest queued; a frame that cannot be read
    /// from guest memory or sent is dropped (as a NIC drops it).
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    if !(HEADER_LEN..=MAX_FRAME).contains(&len) {
                        tracing::debug!(
                            len,
                            "virtio-net: TX frame of an impossible length dropped"
                        );
                    } else if let Some(buf) = self.tx_frame.get_mut(..len) {
                        if reader.read_exact(buf).is_ok() {
                            // A full tap queue drops the frame: the
                            // guest's TCP retransmits, as on a busy wire.
                            if let Err(e) = (&*self.tap).write(buf) {
                                tracing::debug!("virtio-net: TX frame dropped: {e}");
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!("virtio-net: unreadable TX chain: {e}"),
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the tap into the guest's receive buffers until
    /// the tap is empty or the buffers run out (then the frame waits and
    /// the RX thread stops watching the tap until the guest posts more).
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => match (&*self.tap).read(&mut self.rx_frame) {
                    Ok(len) if len > HEADER_LEN => len,
                    // A runt: nothing to deliver.
                    Ok(_) => continue,
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            tracing::warn!("virtio-net: reading the tap failed: {e}");
                        }
                        // Drained (or broken): the thread watches the tap
                        // again, as buffers may be left.
                        self.kick_rx();
                        break;
                    }
                },
            };
            self.pending = Some(len);
            let Some(chain) = queue.iter(mem)?.next() else {
                self.shared.starved.store(true, Ordering::Release);
                break;
            };
            let head = chain.head_index();
            let Ok(mut writer) = chain.writer(mem) else {
                return Err(QueueError::Chain {
                    head,
                    reason: "receive buffer outside guest memory",
                });
            };
            let frame = self.rx_frame.get_mut(..len).ok_or(QueueError::Chain {
                head,
                reason: "frame longer than the device's buffer",
            })?;
            if writer.available_bytes() < len {
                // Only a guest that posts buffers smaller than its own
                // MTU gets here: drop the frame, keep the buffer.
                tracing::debug!(
                    len,
                    "virtio-net: RX frame larger than the guest's buffer dropped"
                );
                queue.go_to_previous_position();
                self.pending = None;
                continue;
            }
            // num_buffers: always one buffer without VIRTIO_NET_F_MRG_RXBUF.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            if writer.write_all(frame).is_err() {
                return Err(QueueError::Chain {
                    head,
                    reason: "receive buffer not writable",
                });
            }
            self.pending = None;
            let len = u32::try_from(len).map_err(|_| QueueError::Chain {
                head,
                reason: "frame length",
            })?;
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }
}

impl<T: Send + Sync> VirtioDevice for Net<T>
where
    for<'a> &'a T: Read + Write,
{
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], then fields for features not offered.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.mac.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn activate(&mut self, _acked_features: u64) {
        self.kick_rx();
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
        self.shared.starved.store(true, Ordering::Release);
    }
}

/// Starts the RX thread for a net device behind `transport`: it waits for
/// frames on `tap` (while the guest has buffers) and for kicks, and runs
/// the RX queue under the transport's lock. Runs for the VMM's life.
pub fn spawn_rx(
    tap: Arc<File>,
    shared: Arc<RxShared>,
    transport: Arc<Mutex<MmioTransport>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("net-rx".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::Kind::Vmm);
            rx_loop(&tap, &shared, &transport);
        })
        .map(|_| ())
}

fn rx_loop(tap: &File, shared: &RxShared, transport: &Mutex<MmioTransport>) {
    loop {
        let watch_tap = !shared.starved.load(Ordering::Acquire);
        let mut fds = [
            libc::pollfd {
                fd: shared.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // A negative fd is ignored by poll.
                fd: if watch_tap { tap.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio-net RX thread stops: poll failed: {e}");
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // The counter only says "look again"; its value does not matter.
            let _ = shared.kick.read();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let Ok(mut t) = transport.lock() else {
                tracing::error!("virtio-net RX thread stops: the device's lock is poisoned");
                return;
            };
            if !t.process_from_backend(RX_QUEUE) {
                // Not live (no driver yet, or broken): wait for activation.
                shared.starved.store(true, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::memory;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let d: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(d.mac[0], 0x02, "locally administered, unicast");
        assert_eq!(d.mac, "tap=tap0".parse::<NetConfig>().unwrap().mac);
        assert_ne!(d.mac, "tap=tap1".parse::<NetConfig>().unwrap().mac);
        for bad in [
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=averyveryverylongname",
            "tap=t0,mac=52:54:00:12:34",
            "tap=t0,mac=01:00:00:00:00:00",
            "tap=t0,mtu=9000",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    /// A datagram socket stands in for the tap: one frame per read or write.
    struct Dgram(UnixDatagram);

    impl Read for &Dgram {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(buf)
        }
    }

    impl Write for &Dgram {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.send(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (Net<Dgram>, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (net, _) = Net::new(Arc::new(Dgram(ours)), [2, 0, 0, 0, 0, 1]).unwrap();
        (net, theirs)
    }

    #[test]
    fn tx_sends_header_and_frame() {
        let mem = memory();
        let (mut net, host) = device();
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend_from_slice(b"an ethernet frame");
        mem.write_slice(&frame, GuestAddress(0x4_0000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x4_0000, 5, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x4_0005, frame.len() as u32 - 5, 0, 0)),
        ];
        mock.build_desc_chain(&descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(net.process_queue(TX_QUEUE, &mut q, &mem).unwrap());
        let mut got = [0u8; 64];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);
    }

    #[test]
    fn rx_fills_a_buffer_and_waits_without_one() {
        let mem = memory();
        let (mut net, host) = device();
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend_from_slice(b"from the host");
        host.send(&frame).unwrap();

        // No buffer posted: the frame waits and the device is starved.
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(!net.process_queue(RX_QUEUE, &mut q, &mem).unwrap());
        assert!(net.shared.starved.load(Ordering::Acquire));

        // A buffer arrives (the guest's notify): the frame lands in it.
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x4_0000, 1526, F_WRITE, 0,
        ))];
        mock.build_desc_chain(&descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(net.process_queue(RX_QUEUE, &mut q, &mem).unwrap());
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&got[HEADER_LEN..], b"from the host");
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        let used_len: u32 = mem.read_obj(mock.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len as usize, frame.len());
    }

    #[test]
    fn rx_into_a_buffer_outside_memory_needs_reset() {
        let mem = memory();
        let (mut net, host) = device();
        host.send(&[0u8; 40]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0xffff_0000,
            1526,
            F_WRITE,
            0,
        ))];
        mock.build_desc_chain(&descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(matches!(
            net.process_queue(RX_QUEUE, &mut q, &mem),
            Err(QueueError::Chain { .. })
        ));
    }
}
