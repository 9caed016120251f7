//! `.modinfo`: the NUL-separated `key=value` strings modpost and the
//! MODULE_* macros leave in every module (`name`, `vermagic`, `livepatch`,
//! `license`, ...).
//!
//! The release check follows the kernel's own: `vermagic` begins with the
//! kernel release the module was built against (`UTS_RELEASE`, then flags
//! such as `SMP preempt mod_unload modversions`). The kernel compares the
//! whole string; we compare only the release, because the flags are the
//! same for every module built against one headers package and the guest
//! does not show its own vermagic string (it is not in kallsyms).

use super::ModuleError;

/// The parsed `.modinfo` strings, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Modinfo {
    entries: Vec<(String, String)>,
}

impl Modinfo {
    /// Parses the section bytes; entries without '=' are skipped, as the
    /// kernel's get_next_modinfo skips them.
    pub fn parse(bytes: &[u8]) -> Self {
        let entries = bytes
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let s = String::from_utf8_lossy(s);
                let (k, v) = s.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        Self { entries }
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The kernel release in `vermagic` (its first word).
    pub fn release(&self) -> Option<&str> {
        self.get("vermagic")?.split_whitespace().next()
    }

    /// Refuses a module built for a release other than `guest_release`.
    pub fn check_release(&self, guest_release: &str) -> Result<(), ModuleError> {
        let module = self.release().ok_or(ModuleError::NoVermagic)?;
        if module != guest_release {
            return Err(ModuleError::ReleaseMismatch {
                module: module.to_owned(),
                guest: guest_release.to_owned(),
            });
        }
        Ok(())
    }

    /// MODULE_INFO(livepatch, "Y"), which klp requires of a livepatch module.
    pub fn livepatch(&self) -> bool {
        self.get("livepatch") == Some("Y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_release() {
        let m = Modinfo::parse(
            b"livepatch=Y\0license=GPL\0depends=\0junk\0\0name=lp\0vermagic=6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions \0",
        );
        assert_eq!(m.get("name"), Some("lp"));
        assert_eq!(m.get("depends"), Some(""));
        assert_eq!(m.get("junk"), None);
        assert!(m.livepatch());
        assert_eq!(m.release(), Some("6.1.0-56-cloud-amd64"));
        m.check_release("6.1.0-56-cloud-amd64").unwrap();
        match m.check_release("6.1.0-57-cloud-amd64") {
            Err(ModuleError::ReleaseMismatch { module, guest }) => {
                assert_eq!(module, "6.1.0-56-cloud-amd64");
                assert_eq!(guest, "6.1.0-57-cloud-amd64");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Modinfo::parse(b"name=x\0").check_release("r"),
            Err(ModuleError::NoVermagic)
        ));
        assert!(!Modinfo::parse(b"livepatch=N\0").livepatch());
    }
}
