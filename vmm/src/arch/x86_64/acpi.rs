//! ACPI tables: the guest's only way to find secondary CPUs (the Debian cloud
//! kernel is built without MP-table parsing) and to power off. The platform is
//! "hardware-reduced": no PM1 blocks or PM timer; sleep and reset go through
//! one I/O port handled by `devices::power`. The DSDT names `_S5` (soft-off),
//! a pvpanic device so a panicking guest can tell us, and each virtio-mmio
//! device (`LNRO0005`: its register window and its interrupt), which is how
//! the guest's virtio_mmio driver finds them.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{align_up, ACPI_END, ACPI_START, APIC_START, IOAPIC_START};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT};
use crate::devices::virtio::MMIO_SIZE;
use crate::devices::{cmos, power::POWER_PORT, pvpanic::PVPANIC_PORT};

const OEM_ID: [u8; 6] = *b"KLPVSR";
const OEM_REVISION: u32 = 1;
/// Value the guest writes to the reset register (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 1;
/// ISA IRQ the SCI would use; unused on a hardware-reduced platform but must be valid.
const SCI_IRQ: u16 = 9;

/// Why the ACPI tables could not be placed.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables (needed bytes) outgrew the legacy BIOS area (available bytes).
    #[error("ACPI tables need {0} bytes but the BIOS area holds {1}")]
    TooLarge(u64, u64),
    /// Writing them into guest memory failed.
    #[error("cannot write ACPI tables into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// `dsdt(com2, virtio)`: the DSDT, with the COM2 device when the VM has one
/// and one device per virtio-mmio window (base, GSI) in `virtio`.
fn dsdt(com2: bool, virtio: &[(u64, u32)]) -> Vec<u8> {
    // \_S5_: SLP_TYPa = 5, the value the power device recognises.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    );

    // The UARTs must be ACPI devices: on a hardware-reduced platform Linux
    // has no legacy PIC and maps ISA IRQs only through _CRS, so without this
    // a UART's interrupt never arrives. (The 8250 driver still finds a
    // legacy port by probing, but its open then fails to get the IRQ and,
    // for root, succeeds anyway with every write failing: silence.)
    let uart = |port: u16, irq: u32| {
        (
            aml::IO::new(port, port, 1, 8),
            aml::Interrupt::new(true, true, false, false, irq),
        )
    };
    let (com1_io, com1_irq) = uart(COM1_PORT, COM1_IRQ);
    let com1_res = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &0u8);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    let (com2_io, com2_irq) = uart(COM2_PORT, COM2_IRQ);
    let com2_res = aml::ResourceTemplate::new(vec![&com2_io, &com2_irq]);
    let com2_uid = aml::Name::new("_UID".into(), &1u8);
    let com2_crs = aml::Name::new("_CRS".into(), &com2_res);
    let com2_dev = aml::Device::new("COM2".into(), vec![&com1_hid, &com2_uid, &com2_crs]);

    // The CMOS RTC, without an alarm interrupt.
    let rtc_io = aml::IO::new(cmos::INDEX_PORT, cmos::INDEX_PORT, 1, 2);
    let rtc_res = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_res);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_res = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_crs = aml::Name::new("_CRS".into(), &pvpanic_res);
    let pvpanic = aml::Device::new("PEVT".into(), vec![&pvpanic_hid, &pvpanic_crs]);

    // virtio-mmio: the ID the Linux driver's ACPI match table names, a
    // 32-bit fixed memory window and an edge-triggered, active-high line
    // (the irqfd is an edge: one eventfd write, one interrupt).
    let virtio_parts: Vec<_> = virtio
        .iter()
        .enumerate()
        .map(|(i, &(base, gsi))| {
            (
                format!("VR{i:02X}"),
                aml::Memory32Fixed::new(true, base as u32, MMIO_SIZE as u32),
                aml::Interrupt::new(true, true, false, false, gsi),
                aml::Name::new("_UID".into(), &(i as u32)),
            )
        })
        .collect();
    let virtio_hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let virtio_res: Vec<_> = virtio_parts
        .iter()
        .map(|(_, mem, irq, _)| aml::ResourceTemplate::new(vec![mem, irq]))
        .collect();
    let virtio_crs: Vec<_> = virtio_res
        .iter()
        .map(|r| aml::Name::new("_CRS".into(), r))
        .collect();
    let virtio_devs: Vec<_> = virtio_parts
        .iter()
        .zip(&virtio_crs)
        .map(|((name, _, _, uid), crs)| {
            aml::Device::new(name.as_str().into(), vec![&virtio_hid, uid, crs])
        })
        .collect();

    let mut devices: Vec<&dyn Aml> = vec![&com1, &rtc, &pvpanic];
    if com2 {
        devices.push(&com2_dev);
    }
    for d in &virtio_devs {
        devices.push(d);
    }
    let sb = aml::Scope::new("\\_SB_".into(), devices);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"KLPVDSDT", OEM_REVISION);
    s5.to_aml_bytes(&mut table);
    sb.to_aml_bytes(&mut table);
    table.update_checksum();
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |p: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(p),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, *b"KLPVFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    b.sci_int = SCI_IRQ.into();
    b.sleep_control_reg = port(POWER_PORT);
    b.sleep_status_reg = port(POWER_PORT + 1);
    b.reset_reg = port(POWER_PORT);
    b.reset_value = RESET_VALUE;
    bytes_of(&b.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"KLPVMADT",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes_of(&m)
}

/// Writes RSDP, XSDT, FADT, DSDT and MADT into the BIOS area and returns
/// the RSDP address (for `boot_params.acpi_rsdp_addr`). `com2`: the VM has
/// a second UART; `virtio`: the virtio-mmio windows (base, GSI).
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    com2: bool,
    virtio: &[(u64, u32)],
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align_up(rsdp_addr + Rsdp::len() as u64, 16);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge(end - ACPI_START, ACPI_END - ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        next = align_up(end, 16);
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(com2, virtio))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cpus))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"KLPVXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    mem.write_slice(
        &bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rsdp = write_tables(&mem, 4, false, &[]).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(xsdt)).unwrap();
        assert_eq!(&hdr[..4], b"XSDT");
        let n = (u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize - 36) / 8;
        let mut sigs = Vec::new();
        for i in 0..n {
            let p: u64 = mem
                .read_obj(GuestAddress(xsdt + 36 + 8 * i as u64))
                .unwrap();
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(p)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(p)).unwrap();
            assert!(checksum_ok(&t), "{:?} checksum", &h[..4]);
            sigs.push(h[..4].to_vec());
            if &h[..4] == b"APIC" {
                // header(36) + lapic addr + flags + 4 LAPICs (8) + IOAPIC (12)
                assert_eq!(len, 44 + 4 * 8 + 12);
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn dsdt_names_s5_and_pvpanic() {
        let d = dsdt(false, &[]);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
        assert!(d.windows(8).any(|w| w == b"QEMU0001"));
        assert!(d.windows(4).any(|w| w == b"COM1"));
        assert!(!d.windows(4).any(|w| w == b"COM2"));
        assert!(!d.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt(true, &[]).windows(4).any(|w| w == b"COM2"));
    }

    #[test]
    fn dsdt_describes_each_virtio_window_and_line() {
        let d = dsdt(false, &[(0xd000_0000, 5), (0xd000_1000, 6)]);
        assert!(d.windows(4).any(|w| w == b"VR00"));
        assert!(d.windows(4).any(|w| w == b"VR01"));
        assert_eq!(d.windows(8).filter(|w| *w == b"LNRO0005").count(), 2);
        // Memory32Fixed descriptor (0x86, length 9, read-write) with the
        // base and size little-endian.
        let mut mem32 = vec![0x86, 9, 0, 1];
        mem32.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        mem32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(d.windows(mem32.len()).any(|w| w == mem32.as_slice()));
        // Extended interrupt descriptor: consumer, edge, active high, one GSI.
        let irq = [0x89, 6, 0, 0b0_0011, 1, 6, 0, 0, 0];
        assert!(
            d.windows(irq.len()).any(|w| w == irq),
            "GSI 6, edge-triggered"
        );
    }
}
