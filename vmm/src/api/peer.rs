//! Who may use the socket: the kernel tells us the peer's credentials
//! (SO_PEERCRED, taken when it connected). The socket file's 0600 mode
//! already keeps others out; this check also holds when the mode is
//! loosened or the file is reached through a passed descriptor.

use tokio::net::UnixStream;

/// What to do with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Refused(String),
}

/// Only the VMM's own effective uid, and root, may drive the VM.
pub fn uid_allowed(peer_uid: u32, vmm_euid: u32) -> bool {
    peer_uid == vmm_euid || peer_uid == 0
}

/// Checks the peer of `stream`; refusals are logged.
pub fn check(stream: &UnixStream, vmm_euid: u32) -> Verdict {
    match stream.peer_cred() {
        Ok(cred) if uid_allowed(cred.uid(), vmm_euid) => Verdict::Allowed,
        Ok(cred) => {
            let pid = cred
                .pid()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into());
            tracing::warn!(
                peer_uid = cred.uid(),
                peer_pid = %pid,
                "API: refused a connection from uid {} (pid {pid})",
                cred.uid()
            );
            Verdict::Refused(format!(
                "uid {} may not use this socket: only uid {vmm_euid} (the VMM's user) and root may",
                cred.uid()
            ))
        }
        Err(e) => {
            tracing::warn!("API: refused a connection whose credentials are unknown: {e}");
            Verdict::Refused(format!("cannot identify the connecting process: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_uid_and_root_only() {
        assert!(uid_allowed(1000, 1000));
        assert!(uid_allowed(0, 1000));
        assert!(!uid_allowed(65534, 1000));
        assert!(uid_allowed(0, 0));
        assert!(!uid_allowed(65534, 0));
    }
}
