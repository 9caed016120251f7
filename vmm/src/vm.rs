//! A running VM: KVM objects, guest memory, devices and vCPU threads, and the
//! pause/resume/inspect operations the patch engine builds on.
//!
//! Set-up order follows what KVM requires: TSS and irqchip + PIT before any
//! vCPU; per vCPU, CPUID before MSRs, then registers and the LAPIC.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::{acpi, boot, cpuid, interrupts, layout, msr, regs};
use crate::devices::boot_timer::BootTimer;
use crate::devices::serial::{Console, COM1_IRQ, COM2_IRQ};
use crate::devices::virtio::block::{Block, BlockError, DiskConfig};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{self, Net, NetConfig, NetError};
use crate::devices::virtio::{self, Interrupt};
use crate::devices::{GuestEvent, PioDevices};
use crate::vcpu::{
    install_kick_handler, kick_signal, VcpuControl, VcpuError, VcpuReport, VcpuRequest, VcpuState,
    VcpuThread,
};

/// KVM's conventional TSS location, just below the BIOS, in the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long a pause may take before we give up and resume.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What to boot and how big.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The bzImage to boot.
    pub kernel: PathBuf,
    /// An initramfs to load beside it.
    pub initrd: Option<PathBuf>,
    /// The guest kernel's command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Size of the patch arena in MiB (a multiple of 2), outside guest RAM.
    pub arena_mib: u64,
    /// Raw disk images, each a virtio-blk device (the guest's vda, vdb...).
    pub disks: Vec<DiskConfig>,
    /// Host tap devices, each a virtio-net device (after the disks).
    pub nets: Vec<NetConfig>,
}

/// Why the VM could not be built, or a pause, resume or register read failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access?)")]
    KvmOpen(kvm_ioctls::Error),
    /// The host's KVM lacks a capability the VMM needs (named).
    #[error("host KVM lacks {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation (e.g. `memory slot`, `MSI`).
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be mapped.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// The size asked for, in MiB.
        mib: u64,
        /// vm-memory's error.
        reason: String,
    },
    /// The RAM or arena size is not usable.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The boot CPU's initial state could not be set.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A KVM variable-length structure (the boot MSR list) could not be built.
    #[error("cannot create vCPU configuration: {0}")]
    Fam(String),
    /// A vCPU thread could not be spawned.
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// An eventfd (serial IRQ line) could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// A `--disk` image could not be used.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A serial port's transmitter thread could not be spawned.
    #[error("cannot start a serial port's transmitter thread: {0}")]
    SerialThread(std::io::Error),
    /// A NIC's device thread could not be spawned.
    #[error("cannot start the virtio-net device thread: {0}")]
    NetThread(std::io::Error),
    /// A `--net` tap could not be used.
    #[error(transparent)]
    Net(#[from] NetError),
    /// More virtio devices than the VM has interrupt lines for them.
    #[error(
        "too many --disk and --net devices: at most {} in all",
        virtio::MAX_DEVICES
    )]
    TooManyDevices,
    /// A virtio device's queues could not be created (a klpvisor bug).
    #[error("cannot create a virtio queue: {0}")]
    VirtioQueue(virtio_queue::Error),
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A vCPU thread is gone, so the VM cannot be paused or read.
    #[error("the VM is not running (a vCPU has exited)")]
    NotRunning,
    /// A pause was asked for while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// A resume or register read was asked for while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// These vCPUs did not park within this time; the VM runs again.
    #[error("vCPUs {0:?} did not pause within {1:?}; the VM was resumed")]
    PauseTimeout(Vec<u8>, Duration),
    /// No vCPU has this index.
    #[error("no vCPU {0}")]
    NoSuchVcpu(u8),
    /// A parked vCPU's registers could not be read.
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off, reset or panicked.
    Guest(GuestEvent),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU's index.
        vcpu: u8,
    },
    /// A vCPU hit something it cannot continue from (a KVM error, an
    /// unhandled exit, a panicked vCPU thread).
    Fatal {
        /// The vCPU's index.
        vcpu: u8,
        /// What happened, for the log.
        reason: String,
    },
    /// The host asked us to stop (a signal number).
    Signal(i32),
}

/// Figures from one pause.
#[derive(Debug, Clone, Copy)]
pub struct PauseReport {
    /// From the pause request until the last vCPU acknowledged.
    pub latency: Duration,
}

/// Figures from one resume.
#[derive(Debug, Clone, Copy)]
pub struct ResumeReport {
    /// From the pause request until every vCPU was released again: an upper
    /// bound on the time any vCPU spent out of guest mode for this pause.
    pub paused_for: Duration,
}

struct VcpuHandle {
    control: Arc<VcpuControl>,
    requests: Sender<VcpuRequest>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct PauseState {
    generation: u64,
    paused_since: Option<Instant>,
    /// Each vCPU's registers as it parked for the current pause.
    states: Vec<Result<VcpuState, VcpuError>>,
}

/// A VM with its vCPU threads.
pub struct Vm {
    _kvm: Kvm,
    /// The VM file descriptor (MSIs for the call gate).
    vm_fd: VmFd,
    memory: GuestMemoryMmap,
    layout: layout::MemoryLayout,
    devices: Arc<PioDevices>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    acks: Mutex<Receiver<VcpuReport>>,
    exits_tx: Sender<VmExit>,
    exits: Mutex<Receiver<VmExit>>,
    pause: Mutex<PauseState>,
    started: Instant,
}

impl Vm {
    /// Creates and configures the VM and starts its vCPUs. The console's
    /// output goes to `console_out`; with `com2_out` the guest also has a
    /// second serial port, whose output goes there. `boot_timer` holds the
    /// process start time.
    pub fn start(
        config: &VmConfig,
        console_out: Box<dyn std::io::Write + Send>,
        com2_out: Option<Box<dyn std::io::Write + Send>>,
        boot_timer: BootTimer,
    ) -> Result<Self, VmError> {
        let layout = layout::MemoryLayout::new(config.mem_mib << 20, config.arena_mib << 20)?;
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
            (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
            (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("TSS address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("irqchip creation"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;

        let memory = create_memory(&vm_fd, &layout, config.mem_mib)?;
        regs::write_boot_tables(&memory)?;
        // Disks first, then NICs, each on the next window and GSI.
        let mut transports = Vec::new();
        let mut net_threads = Vec::new();
        let devices_wanted = config.disks.len() + config.nets.len();
        if devices_wanted > virtio::MAX_DEVICES {
            return Err(VmError::TooManyDevices);
        }
        let mut new_transport = |device: Box<dyn virtio::VirtioDevice>| {
            let index = transports.len();
            let (base, gsi) = virtio::slot(index).ok_or(VmError::TooManyDevices)?;
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd
                .register_irqfd(&irq, gsi)
                .map_err(kvm_err("virtio irqfd"))?;
            let transport =
                MmioTransport::new(device, memory.clone(), Arc::new(Interrupt::new(irq)))
                    .map_err(VmError::VirtioQueue)?;
            let transport = Arc::new(Mutex::new(transport));
            transports.push((base, gsi, transport.clone()));
            Ok::<_, VmError>((base, transport))
        };
        for disk in &config.disks {
            new_transport(Box::new(Block::open(&disk.path, disk.read_only)?))?;
        }
        for nic in &config.nets {
            let tap = Arc::new(net::open_tap(&nic.tap)?);
            let (device, shared) = Net::new(tap.clone(), nic.mac)?;
            let (base, transport) = new_transport(Box::new(device))?;
            let notifiers = net::Notifiers {
                rx: queue_notifier(&vm_fd, base, net::RX_QUEUE)?,
                tx: queue_notifier(&vm_fd, base, net::TX_QUEUE)?,
            };
            net_threads.push((tap, shared, notifiers, transport));
        }
        let virtio_slots: Vec<(u64, u32)> = transports.iter().map(|(b, g, _)| (*b, *g)).collect();
        let rsdp = acpi::write_tables(&memory, config.cpus, com2_out.is_some(), &virtio_slots)?;
        let kernel = boot::load(
            &memory,
            &layout,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            rsdp,
        )?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("serial irqfd"))?;
        let com2 = match com2_out {
            Some(out) => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
                vm_fd
                    .register_irqfd(&irq, COM2_IRQ)
                    .map_err(kvm_err("COM2 irqfd"))?;
                Some(Console::new("com2", irq, out).map_err(VmError::SerialThread)?)
            }
            None => None,
        };
        let mut devices = PioDevices::new(
            Console::new("com1", serial_irq, console_out).map_err(VmError::SerialThread)?,
            com2,
            boot_timer,
        );
        for (base, _, transport) in transports {
            devices.add_virtio(base, transport);
        }
        for (tap, shared, notifiers, transport) in net_threads {
            net::spawn_io(tap, shared, notifiers, transport).map_err(VmError::NetThread)?;
        }
        let devices = Arc::new(devices);

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("supported CPUID query"))?;
        let mut fds = Vec::with_capacity(config.cpus.into());
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("vCPU creation"))?;
            configure_vcpu(&fd, id, config.cpus, &supported, kernel.entry)?;
            fds.push(fd);
        }

        install_kick_handler().map_err(VmError::Signal)?;
        let (acks_tx, acks) = mpsc::channel();
        let (exits_tx, exits) = mpsc::channel();
        let mut vcpus = Vec::with_capacity(fds.len());
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            let control = Arc::new(VcpuControl::default());
            let (req_tx, req_rx) = mpsc::channel();
            let thread = VcpuThread {
                id,
                fd,
                control: control.clone(),
                devices: devices.clone(),
                requests: req_rx,
                reports: acks_tx.clone(),
                exits: exits_tx.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || thread.run())
                .map_err(VmError::Thread)?;
            vcpus.push(VcpuHandle {
                control,
                requests: req_tx,
                thread: Some(handle),
            });
        }

        Ok(Self {
            _kvm: kvm,
            vm_fd,
            memory,
            layout,
            devices,
            vcpus: Mutex::new(vcpus),
            acks: Mutex::new(acks),
            exits_tx,
            exits: Mutex::new(exits),
            pause: Mutex::new(PauseState::default()),
            started: Instant::now(),
        })
    }
}

impl Vm {
    /// The call gate's doorbell.
    pub fn doorbell(&self) -> &crate::devices::doorbell::Doorbell {
        &self.devices.doorbell
    }

    /// Where vCPUs stopped in a module hook send their events.
    pub fn module_hooks(&self) -> &crate::devices::module_hooks::ModuleHooks {
        &self.devices.module_hooks
    }

    /// Raises `vector` on the local APIC of vCPU `vcpu` (APIC id = vCPU
    /// index here) with an MSI, fixed delivery, edge: the interrupt an IPI
    /// to that CPU would be. Returns false if the APIC did not accept it.
    pub fn raise_vector(&self, vcpu: usize, vector: u8) -> Result<bool, VmError> {
        let apic = u32::try_from(vcpu)
            .ok()
            .filter(|_| vcpu < self.vcpu_count())
            .ok_or(VmError::NoSuchVcpu(u8::try_from(vcpu).unwrap_or(u8::MAX)))?;
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | (apic << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        let delivered = self.vm_fd.signal_msi(msi).map_err(kvm_err("MSI"))?;
        Ok(delivered > 0)
    }

    /// Guest memory (RAM and the arena), for introspection.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Where RAM, the patch arena and its page tables sit in guest-physical space.
    pub fn layout(&self) -> &layout::MemoryLayout {
        &self.layout
    }

    /// Number of vCPUs the VM was built with.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Time since the VM was built and its vCPU threads started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time from VMM start to the guest's boot marker, once written.
    pub fn boot_time(&self) -> Option<Duration> {
        self.devices.boot_timer.boot_time()
    }

    /// Queues host input on the serial console; returns bytes accepted.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.devices.console.enqueue(bytes)
    }

    /// Whether every vCPU is parked by a pause that has not been resumed.
    pub fn is_paused(&self) -> bool {
        self.pause
            .lock()
            .map(|p| p.paused_since.is_some())
            .unwrap_or(false)
    }

    /// Takes every vCPU out of guest mode and parks it. On return no guest
    /// instruction runs until [`Vm::resume`].
    pub fn pause(&self) -> Result<PauseReport, VmError> {
        let mut state = self.pause.lock().map_err(|_| VmError::NotRunning)?;
        if state.paused_since.is_some() {
            return Err(VmError::AlreadyPaused);
        }
        let vcpus = self.vcpus.lock().map_err(|_| VmError::NotRunning)?;
        let acks = self.acks.lock().map_err(|_| VmError::NotRunning)?;
        // Drop acks left over from an earlier, failed pause.
        while acks.try_recv().is_ok() {}
        if vcpus
            .iter()
            .any(|v| v.control.exited.load(Ordering::Acquire))
        {
            return Err(VmError::NotRunning);
        }
        state.generation += 1;
        let generation = state.generation;
        let start = Instant::now();
        for v in vcpus.iter() {
            v.control.generation.store(generation, Ordering::Release);
            v.control.pause.store(true, Ordering::Release);
            kick(v);
        }
        let mut parked: Vec<Option<Result<VcpuState, VcpuError>>> = vec![None; vcpus.len()];
        let mut failure = None;
        while parked.iter().any(Option::is_none) {
            let left = PAUSE_TIMEOUT.saturating_sub(start.elapsed());
            match acks.recv_timeout(left) {
                Ok(VcpuReport::Paused {
                    id,
                    generation: g,
                    state,
                }) if g == generation => {
                    if let Some(p) = parked.get_mut(usize::from(id)) {
                        *p = Some(*state);
                    }
                }
                Ok(VcpuReport::Paused { .. }) => {}
                Ok(VcpuReport::Exited { .. }) | Err(RecvTimeoutError::Disconnected) => {
                    failure = Some(VmError::NotRunning);
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let missing = (0..parked.len() as u8)
                        .filter(|i| parked[usize::from(*i)].is_none())
                        .collect();
                    failure = Some(VmError::PauseTimeout(missing, PAUSE_TIMEOUT));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            release(&vcpus);
            return Err(err);
        }
        state.states = parked.into_iter().flatten().collect();
        state.paused_since = Some(start);
        Ok(PauseReport {
            latency: start.elapsed(),
        })
    }

    /// Lets every parked vCPU re-enter the guest.
    pub fn resume(&self) -> Result<ResumeReport, VmError> {
        let mut state = self.pause.lock().map_err(|_| VmError::NotRunning)?;
        let since = state.paused_since.take().ok_or(VmError::NotPaused)?;
        state.states.clear();
        let vcpus = self.vcpus.lock().map_err(|_| VmError::NotRunning)?;
        release(&vcpus);
        Ok(ResumeReport {
            paused_for: since.elapsed(),
        })
    }

    /// Registers of vCPU `id`; the VM must be paused.
    pub fn vcpu_state(&self, id: u8) -> Result<VcpuState, VmError> {
        let state = self.pause.lock().map_err(|_| VmError::NotRunning)?;
        if state.paused_since.is_none() {
            return Err(VmError::NotPaused);
        }
        // Read by the vCPU's own thread as it parked; a parked vCPU runs
        // nothing, so they are still its registers.
        Ok(state
            .states
            .get(usize::from(id))
            .ok_or(VmError::NoSuchVcpu(id))?
            .clone()?)
    }

    /// A handle that makes [`Vm::wait`] return, e.g. from a signal thread.
    pub fn exit_requester(&self) -> Sender<VmExit> {
        self.exits_tx.clone()
    }

    /// Blocks until the guest or the host ends the VM, then stops every vCPU.
    pub fn wait(&self) -> VmExit {
        let exit = match self.exits.lock() {
            Ok(rx) => rx.recv().unwrap_or(VmExit::Fatal {
                vcpu: 0,
                reason: "all vCPU threads vanished".into(),
            }),
            Err(_) => VmExit::Fatal {
                vcpu: 0,
                reason: "exit channel poisoned".into(),
            },
        };
        self.stop();
        exit
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        // Same lock order as pause/resume (pause state, then vCPUs): a pause
        // in flight finishes or fails first, and none can start meanwhile.
        let Ok(mut pause) = self.pause.lock() else {
            return;
        };
        let Ok(mut vcpus) = self.vcpus.lock() else {
            return;
        };
        for v in vcpus.iter() {
            v.control.stop.store(true, Ordering::Release);
            kick(v);
            let _ = v.requests.send(VcpuRequest::Resume);
        }
        for v in vcpus.iter_mut() {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
        pause.paused_since = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kick(v: &VcpuHandle) {
    if v.control.exited.load(Ordering::Acquire) {
        return;
    }
    if let Some(t) = &v.thread {
        // ESRCH only means the thread already left; it will not run the guest.
        let _ = t.kill(kick_signal());
    }
}

fn release(vcpus: &[VcpuHandle]) {
    for v in vcpus {
        v.control.pause.store(false, Ordering::Release);
    }
    for v in vcpus {
        let _ = v.requests.send(VcpuRequest::Resume);
    }
}

/// An eventfd KVM signals, without leaving the guest, when it writes
/// `queue` (4 bytes) to QueueNotify in the virtio-mmio window at `base`.
/// Other writes there still exit to the VMM, which serves them the slow way.
fn queue_notifier(vm_fd: &VmFd, base: u64, queue: u16) -> Result<EventFd, VmError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    let addr = IoEventAddress::Mmio(base + u64::from(virtio::QUEUE_NOTIFY_OFFSET));
    vm_fd
        .register_ioevent(&fd, &addr, u32::from(queue))
        .map_err(kvm_err("virtio ioeventfd"))?;
    Ok(fd)
}

fn create_memory(
    vm_fd: &VmFd,
    layout: &layout::MemoryLayout,
    mem_mib: u64,
) -> Result<GuestMemoryMmap, VmError> {
    let mut ranges: Vec<(GuestAddress, usize)> = layout
        .ram
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size as usize))
        .collect();
    ranges.push((GuestAddress(layout.arena.0), layout.arena.1 as usize));
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
        mib: mem_mib,
        reason: e.to_string(),
    })?;
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory {
                mib: mem_mib,
                reason: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping belongs to `memory`, which the returned value owns
        // and which the Vm keeps alive as long as the VM fd.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(kvm_err("memory slot"))?;
    }
    Ok(memory)
}

fn configure_vcpu(
    fd: &VcpuFd,
    id: u8,
    count: u8,
    supported: &kvm_bindings::CpuId,
    entry: u64,
) -> Result<(), VmError> {
    let mut c = supported.clone();
    cpuid::configure(&mut c, id, count);
    fd.set_cpuid2(&c).map_err(kvm_err("CPUID"))?;
    if let Some(xcr0) = cpuid::xcr0(&c) {
        let mut xcrs = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        fd.set_xcrs(&xcrs).map_err(kvm_err("XCR0 setup"))?;
    }
    let msrs = msr::boot_msrs().map_err(|e| VmError::Fam(e.to_string()))?;
    let written = fd.set_msrs(&msrs).map_err(kvm_err("MSR setup"))?;
    if written != msrs.as_slice().len() {
        return Err(VmError::Kvm {
            what: "MSR setup",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    if id == 0 {
        regs::setup_boot_cpu(fd, entry)?;
    }
    regs::setup_fpu(fd)?;
    let mut lapic = fd.get_lapic().map_err(kvm_err("LAPIC read"))?;
    interrupts::set_lint(&mut lapic);
    fd.set_lapic(&lapic).map_err(kvm_err("LAPIC setup"))?;
    Ok(())
}
