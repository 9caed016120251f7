//! virtio-net over a host tap device (`vmm --net tap=NAME[,mac=MAC]`).
//!
//! Two queues: receive (0) and transmit (1), both served by one device
//! thread ([`spawn_io`]). Each frame is the 12-byte virtio-net header and
//! the Ethernet frame, which a tap opened with `IFF_VNET_HDR` takes and
//! gives as they are.
//!
//! Why a thread, and not the vCPU: the guest's QueueNotify writes reach
//! the thread through KVM ioeventfds (one per queue, matched on the queue
//! index), so a notify costs the guest no exit to userspace and the vCPU
//! goes straight back to the guest while the thread writes the frames to
//! the tap. Nested, where every userspace exit is two levels deep, that
//! exit was most of a frame's cost. A notify that misses the ioeventfd (a
//! write of another width) still reaches the transport on the vCPU and is
//! served there, under the same lock.
//!
//! The thread waits on the tap, on the two notify eventfds and on a kick
//! eventfd, and runs the queues under the transport's lock:
//! - RX: when the guest has posted no buffer the frame stays pending and
//!   the thread stops watching the tap until the guest notifies the RX
//!   queue, which it does whenever it posts buffers; so a full queue
//!   never spins, and a pending frame waits for the buffers, not a timer.
//! - TX: a tap that refuses a frame with EAGAIN keeps it in the ring
//!   (the chain is not consumed) and the thread waits for the tap to be
//!   writable before it runs the queue again, so no frame is dropped for
//!   a momentarily full tap.
//!
//! No offloads are offered (no checksum or segmentation features), so the
//! tap's kernel side hands over whole, checksummed frames no larger than
//! its MTU, and the guest's receive buffers (1518 bytes and the header
//! without `VIRTIO_NET_F_MRG_RXBUF`) always fit one.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
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

/// What the device thread shares with the device.
#[derive(Debug)]
pub struct NetShared {
    /// Written when what the thread should watch changed outside it (the
    /// device was activated, a queue ran on a vCPU): it looks again.
    kick: EventFd,
    /// No receive buffer was free: stop watching the tap for input until
    /// the guest posts buffers.
    starved: AtomicBool,
    /// The tap refused a TX frame (EAGAIN): watch it for room.
    tx_blocked: AtomicBool,
}

/// What became of one TX frame.
#[derive(Debug, PartialEq, Eq)]
enum TxOutcome {
    /// Written to the tap, or dropped as a NIC drops a bad frame.
    Done,
    /// The tap is full: the frame stays in the ring for later.
    Blocked,
}

/// A virtio-net device on a tap. Generic over the tap so tests can use a
/// socket pair or a file.
pub struct Net<T> {
    tap: Arc<T>,
    mac: [u8; 6],
    shared: Arc<NetShared>,
    /// A frame read from the tap that no receive buffer has taken yet.
    pending: Option<usize>,
    rx_frame: Vec<u8>,
    tx_frame: Vec<u8>,
}

impl<T> Net<T>
where
    for<'a> &'a T: Read + Write,
{
    /// The device on `tap` with `mac`; the returned [`NetShared`] goes to
    /// the device thread.
    pub fn new(tap: Arc<T>, mac: [u8; 6]) -> Result<(Self, Arc<NetShared>), NetError> {
        let shared = Arc::new(NetShared {
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?,
            starved: AtomicBool::new(true),
            tx_blocked: AtomicBool::new(false),
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

    /// Wakes the device thread so it reads the shared flags again; only
    /// needed when they changed outside it, as a write costs it a wake-up.
    fn kick_thread(&self) {
        if let Err(e) = self.shared.kick.write(1) {
            tracing::warn!("virtio-net: cannot wake the device thread: {e}");
        }
    }

    /// The tap is drained: watch it again (waking the thread only if it
    /// was not watching, i.e. the buffers came through a vCPU's notify).
    fn rx_fed(&self) {
        if self.shared.starved.swap(false, Ordering::AcqRel) {
            self.kick_thread();
        }
    }

    /// Sends every frame the guest queued; a frame that cannot be read
    /// from guest memory or that the tap rejects is dropped (as a NIC
    /// drops it). A full tap (EAGAIN) stops the loop with the frame still
    /// in the ring: dropping it would cost the guest's TCP a
    /// retransmission timeout, 200 ms at least.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        self.shared.tx_blocked.store(false, Ordering::Release);
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let outcome = match chain.reader(mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    match self.tx_frame.get_mut(..len) {
                        Some(buf) if len >= HEADER_LEN => {
                            if reader.read_exact(buf).is_ok() {
                                send_frame(&*self.tap, buf)
                            } else {
                                TxOutcome::Done
                            }
                        }
                        _ => {
                            tracing::debug!(
                                len,
                                "virtio-net: TX frame of an impossible length dropped"
                            );
                            TxOutcome::Done
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-net: unreadable TX chain: {e}");
                    TxOutcome::Done
                }
            };
            if outcome == TxOutcome::Blocked {
                // Not consumed: the same chain comes first next time.
                queue.go_to_previous_position();
                if !self.shared.tx_blocked.swap(true, Ordering::AcqRel) {
                    self.kick_thread();
                }
                break;
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the tap into the guest's receive buffers until
    /// the tap is empty or the buffers run out (then the frame waits and
    /// the device thread stops watching the tap until the guest posts more).
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
                        self.rx_fed();
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
        self.shared.starved.store(false, Ordering::Release);
        self.kick_thread();
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
        self.shared.tx_blocked.store(false, Ordering::Release);
    }
}

/// Writes one TX frame to the tap.
fn send_frame<T>(tap: &T, frame: &[u8]) -> TxOutcome
where
    for<'a> &'a T: Write,
{
    match { tap }.write(frame) {
        Ok(_) => TxOutcome::Done,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => TxOutcome::Blocked,
        Err(e) => {
            // A frame the tap's kernel side refuses (a bad header, a
            // link that is down): dropped, as a wire drops it.
            tracing::debug!("virtio-net: TX frame dropped: {e}");
            TxOutcome::Done
        }
    }
}

/// The eventfds KVM signals when the guest writes a queue's index to the
/// device's QueueNotify register (registered by the VM as ioeventfds).
#[derive(Debug)]
pub struct Notifiers {
    /// The guest posted receive buffers.
    pub rx: EventFd,
    /// The guest queued frames to send.
    pub tx: EventFd,
}

/// Starts the device thread for a net device behind `transport`: it
/// serves both queues when `notifiers` fire, moves frames from `tap` while
/// the guest has buffers, and resumes a blocked TX when the tap has room.
/// Runs for the VMM's life, under [`crate::seccomp::Kind::Net`].
pub fn spawn_io<T>(
    tap: Arc<T>,
    shared: Arc<NetShared>,
    notifiers: Notifiers,
    transport: Arc<Mutex<MmioTransport>>,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    T: AsRawFd + Send + Sync + 'static,
{
    std::thread::Builder::new()
        .name("net-io".into())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::Kind::Net);
            io_loop(tap.as_raw_fd(), &shared, &notifiers, &transport, None);
        })
}

/// Which queues one wake-up of the device thread must run.
#[derive(Debug, Default, PartialEq, Eq)]
struct Work {
    rx: bool,
    tx: bool,
}

/// The pollfd set of one wait: the kick, the two notifiers, the tap (with
/// what the queues' state says to watch it for), and `stop` for tests.
fn poll_set(
    tap: RawFd,
    shared: &NetShared,
    notifiers: &Notifiers,
    stop: Option<RawFd>,
) -> [libc::pollfd; 5] {
    let mut tap_events = 0;
    if !shared.starved.load(Ordering::Acquire) {
        tap_events |= libc::POLLIN;
    }
    if shared.tx_blocked.load(Ordering::Acquire) {
        tap_events |= libc::POLLOUT;
    }
    let fd = |fd: RawFd, events| libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    [
        fd(shared.kick.as_raw_fd(), libc::POLLIN),
        fd(notifiers.rx.as_raw_fd(), libc::POLLIN),
        fd(notifiers.tx.as_raw_fd(), libc::POLLIN),
        // A negative fd is ignored by poll: a tap with nothing to watch
        // for would otherwise report POLLERR or POLLHUP forever.
        fd(if tap_events == 0 { -1 } else { tap }, tap_events),
        fd(stop.unwrap_or(-1), libc::POLLIN),
    ]
}

/// What the ready descriptors of a wait ask for. A notify's counter only
/// says "look at the queue": reading it resets it, its value is moot.
fn work_of(fds: &[libc::pollfd; 5], shared: &NetShared, notifiers: &Notifiers) -> Work {
    let ready = |i: usize| fds[i].revents != 0;
    if ready(0) {
        let _ = shared.kick.read();
    }
    if ready(1) {
        let _ = notifiers.rx.read();
    }
    if ready(2) {
        let _ = notifiers.tx.read();
    }
    let tap = fds[3].revents;
    Work {
        // The guest's RX notify means new buffers: a frame held back for
        // want of one goes now.
        rx: ready(1) || tap & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0,
        tx: ready(2) || tap & libc::POLLOUT != 0,
    }
}

fn io_loop(
    tap: RawFd,
    shared: &NetShared,
    notifiers: &Notifiers,
    transport: &Mutex<MmioTransport>,
    stop: Option<RawFd>,
) {
    loop {
        let mut fds = poll_set(tap, shared, notifiers, stop);
        // SAFETY: `fds` is a valid array of pollfds for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio-net device thread stops: poll failed: {e}");
            return;
        }
        if fds[4].revents != 0 {
            return;
        }
        let work = work_of(&fds, shared, notifiers);
        if work == Work::default() {
            continue;
        }
        let Ok(mut t) = transport.lock() else {
            tracing::error!("virtio-net device thread stops: the device's lock is poisoned");
            return;
        };
        // TX first: the guest's frames out before more come in, and a
        // request's reply frees the guest's TX ring soonest.
        if work.tx && !t.process_from_backend(TX_QUEUE) {
            shared.tx_blocked.store(false, Ordering::Release);
        }
        if work.rx && !t.process_from_backend(RX_QUEUE) {
            // Not live (no driver yet, or broken): wait for activation.
            shared.starved.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::memory;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
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
    fn tx_keeps_a_frame_the_full_tap_refuses_and_sends_it_later() {
        let mem = memory();
        let (mut net, host) = device();
        // Fill the socket until it refuses, as a full tap would.
        let filler = [0u8; 64];
        let mut queued = 0;
        while (&*net.tap).write(&filler).is_ok() {
            queued += 1;
        }
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend_from_slice(b"must not be lost");
        mem.write_slice(&frame, GuestAddress(0x4_0000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x4_0000,
            frame.len() as u32,
            0,
            0,
        ))];
        mock.build_desc_chain(&descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(!net.process_queue(TX_QUEUE, &mut q, &mem).unwrap());
        assert!(net.shared.tx_blocked.load(Ordering::Acquire));
        let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 0, "the chain stays the guest's until sent");
        assert_eq!(net.shared.kick.read().unwrap(), 1, "the thread is told");

        // Room again: the same chain goes out, once.
        let mut got = [0u8; 128];
        for _ in 0..queued {
            host.recv(&mut got).unwrap();
        }
        assert!(net.process_queue(TX_QUEUE, &mut q, &mem).unwrap());
        assert!(!net.shared.tx_blocked.load(Ordering::Acquire));
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);
        let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1);
    }

    impl AsRawFd for Dgram {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    /// A split queue laid out as `bring_up` programs it: descriptors at
    /// `base`, the available ring a page up, the used ring two.
    struct Ring {
        base: u64,
        next: u16,
    }

    impl Ring {
        /// Posts one descriptor over `len` bytes at `addr`.
        fn post(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u32, flags: u16) {
            let i = self.next % 16;
            let d = self.base + 16 * u64::from(i);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
            let avail = self.base + 0x1000;
            mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(i)))
                .unwrap();
            self.next = self.next.wrapping_add(1);
            mem.write_obj(self.next, GuestAddress(avail + 2)).unwrap();
        }

        fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
        }
    }

    /// Waits (bounded) for `cond`: the device thread runs on its own.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn the_device_thread_serves_notifies_and_delivers_a_held_frame_on_the_rx_notify() {
        use crate::devices::virtio::mmio::tests::bring_up;
        use crate::devices::virtio::Interrupt;
        let mem = memory();
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let tap = Arc::new(Dgram(ours));
        let (net, shared) = Net::new(tap.clone(), [2, 0, 0, 0, 0, 1]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq_seen = irq.try_clone().unwrap();
        let mut t =
            MmioTransport::new(Box::new(net), mem.clone(), Arc::new(Interrupt::new(irq))).unwrap();
        bring_up(
            &mut t,
            (1 << 32) | (1 << 5),
            &[(16, 0x1_0000), (16, 0x2_0000)],
        );
        let transport = Arc::new(Mutex::new(t));
        let notifiers = Arc::new(Notifiers {
            rx: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let thread = {
            let (shared, notifiers, transport) =
                (shared.clone(), notifiers.clone(), transport.clone());
            let (tap_fd, stop_fd) = (tap.as_raw_fd(), stop.as_raw_fd());
            std::thread::spawn(move || {
                io_loop(tap_fd, &shared, &notifiers, &transport, Some(stop_fd))
            })
        };
        let mut rx = Ring {
            base: 0x1_0000,
            next: 0,
        };
        let mut tx = Ring {
            base: 0x2_0000,
            next: 0,
        };

        // A frame with no receive buffer posted: held, and the tap unwatched.
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend_from_slice(b"held for a buffer");
        host.send(&frame).unwrap();
        eventually("the frame is held", || {
            shared.starved.load(Ordering::Acquire)
                && transport.lock().unwrap().status() & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        });
        assert_eq!(rx.used_idx(&mem), 0);

        // The guest posts a buffer and notifies (KVM signals the eventfd):
        // the held frame lands, and the line is raised.
        rx.post(&mem, 0x4_0000, 1526, F_WRITE);
        notifiers.rx.write(1).unwrap();
        eventually("the held frame is delivered", || rx.used_idx(&mem) == 1);
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(&got[HEADER_LEN..], b"held for a buffer");
        eventually("the interrupt is raised", || irq_seen.read().is_ok());

        // The tap is watched again: a new frame goes straight in.
        rx.post(&mem, 0x5_0000, 1526, F_WRITE);
        host.send(&frame).unwrap();
        eventually("a later frame is delivered", || rx.used_idx(&mem) == 2);

        // TX through the notifier.
        let mut out = vec![0u8; HEADER_LEN];
        out.extend_from_slice(b"to the host");
        mem.write_slice(&out, GuestAddress(0x6_0000)).unwrap();
        tx.post(&mem, 0x6_0000, out.len() as u32, 0);
        notifiers.tx.write(1).unwrap();
        let mut buf = [0u8; 64];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &out[..]);
        eventually("the TX chain is used", || tx.used_idx(&mem) == 1);

        stop.write(1).unwrap();
        thread.join().unwrap();
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
