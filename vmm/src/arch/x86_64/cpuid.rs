//! Per-vCPU CPUID: KVM's supported set, with the topology leaves rewritten so
//! each vCPU reports its own APIC id. Only leaves that exist are touched and no
//! feature bit is cleared: the guest sees what the host KVM offers.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Rewrites `cpuid` for vCPU `id` of `count`.
pub fn configure(cpuid: &mut CpuId, id: u8, count: u8) {
    // Bits needed to number `count` logical CPUs in one package.
    let shift = u32::BITS - (u32::from(count).max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY => {
                entry.edx = u32::from(id);
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        entry.eax = shift;
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Every XCR0 state component the CPUID offers (leaf 0xD.0 EDX:EAX), or
/// `None` without XSAVE.
///
/// The VMM starts vCPUs with XCR0 set to this rather than the reset value 1.
/// Linux enables exactly these components, so nothing changes for the guest,
/// but KVM then sizes CPUID 0xD.0 EBX for them from the start. That matters
/// where XSETBV from the guest does not reach KVM (nested under QEMU TCG,
/// whose SVM emulation does not intercept it): otherwise the guest reads a
/// stale XSAVE size and warns "XSAVE consistency problem" at boot.
pub fn xcr0(cpuid: &CpuId) -> Option<u64> {
    let e = cpuid.as_slice();
    let leaf1 = e.iter().find(|x| x.function == LEAF_FEATURES)?;
    if leaf1.ecx & ECX_XSAVE == 0 {
        return None;
    }
    let d = e
        .iter()
        .find(|x| x.function == LEAF_XSAVE && x.index == 0)?;
    Some(u64::from(d.eax) | (u64::from(d.edx) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ecx: 0x1234,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let mut c =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(7, 0)]).unwrap();
        configure(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "low EBX bits preserved");
        assert_eq!(e[0].ecx, 0x1234 | ECX_HYPERVISOR, "existing features kept");
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
        assert_eq!(e[3].ecx, 0x1234, "other leaves untouched");
    }

    #[test]
    fn xcr0_from_leaf_0xd() {
        let mut l1 = entry(1, 0);
        let mut d = entry(0xd, 0);
        d.eax = 0x207;
        assert_eq!(
            xcr0(&CpuId::from_entries(&[l1, d]).unwrap()),
            None,
            "no XSAVE"
        );
        l1.ecx |= ECX_XSAVE;
        assert_eq!(xcr0(&CpuId::from_entries(&[l1, d]).unwrap()), Some(0x207));
    }
}
