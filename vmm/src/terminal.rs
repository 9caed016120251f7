//! The host side of the serial console: stdin, put in non-canonical no-echo
//! mode when it is a terminal (ISIG stays on, so Ctrl-C still stops the
//! VMM), fed to the guest's UART; the original mode is restored on drop.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use vmm::Vm;

/// Restores the terminal's saved mode when dropped.
pub struct RawStdin {
    saved: Option<libc::termios>,
}

impl RawStdin {
    pub fn enable() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                return Self { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return Self { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO);
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
            Self { saved: Some(saved) }
        }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restoring the termios read in `enable`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        }
    }
}

/// Copies stdin to the guest console until EOF. When the UART FIFO is full
/// the guest has not read yet; wait a little rather than drop keystrokes.
pub fn spawn_stdin_pump(vm: Arc<Vm>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            vmm::seccomp::enter_or_exit(vmm::seccomp::Kind::Vmm);
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = vm.console_input(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}
