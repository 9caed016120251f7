//! Signed livepatch modules: who may change the guest's kernel text.
//!
//! A patch is an ELF module with an Ed25519 signature appended, in the style
//! of the kernel's own appended module signature (module bytes, a fixed
//! struct, a magic string at the very end) so a signed `.ko` is still the
//! same `.ko` to every ELF tool, but with a magic of our own, so neither
//! format is mistaken for the other:
//!
//! ```text
//! [ module bytes ... ][ version=2 | algorithm=1 (Ed25519) | level ]   4 bytes
//!                     [ key id: SHA-256(public key)[..8]          ]   8 bytes
//!                     [ Ed25519 signature                         ]  64 bytes
//!                     [ "~klpvisor signature~\n"                  ]  21 bytes
//! ```
//!
//! The signature covers [`DOMAIN`], the 12 header bytes (version,
//! algorithm, patch level, key id) and the module bytes, so a signature
//! made for anything else (or with its key id or level changed) never
//! verifies here.
//!
//! The *patch level* (a little-endian u16; `patcher sign --level N`) is
//! the signer's statement of how new the fix is. Under `--trusted-keys` the
//! VMM refuses to bring back a lower level than the highest it has applied
//! (anti-rollback: an old signed patch replayed would revert a security
//! fix), unless it was started with `--allow-downgrade`. Version 1
//! trailers, written before levels existed, have zeros there: level 0.
//!
//! The kernel's own signature ("~Module signature appended~", PKCS#7 over
//! X.509 keys) cannot be verified here with a maintained pure-Rust crate,
//! so it is stripped before the ELF parser runs and never counts as a
//! signature: with trusted keys such a module is refused unless it also
//! carries ours (`patcher sign` on a kernel-signed module appends ours
//! after the kernel's, covering it).
//!
//! Key files are one line of text, so a wrong file is named, not guessed
//! at: `klpvisor-ed25519-secret <64 hex digits>` (`NAME.key`, mode 0600)
//! and `klpvisor-ed25519-public <64 hex digits>` (`NAME.pub`).

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The last bytes of a module signed by `patcher sign`.
pub const MAGIC: &[u8] = b"~klpvisor signature~\n";
/// The last bytes of a module signed by the kernel's `scripts/sign-file`.
pub const KERNEL_MAGIC: &[u8] = b"~Module signature appended~\n";
/// The trailer format this code writes; it reads it and version 1 (the
/// same layout, without a level).
pub const VERSION: u8 = 2;
/// Ed25519 (RFC 8032), the only algorithm of version 1.
pub const ALGORITHM_ED25519: u8 = 1;
const HEADER_LEN: usize = 4 + KeyId::LEN;
/// Every trailer of version 1 or 2 is this long.
pub const TRAILER_LEN: usize = HEADER_LEN + Signature::BYTE_SIZE + MAGIC.len();
/// Prefixed to what is signed, so a klpvisor signature is good for
/// nothing else and nothing else's signature is good here.
pub const DOMAIN: &[u8] = b"klpvisor livepatch module signature v1\0";
/// The kernel's `struct module_signature`: algo, hash, id_type,
/// signer_len, key_id_len, 3 pad bytes, then sig_len (big-endian u32).
const KERNEL_SIG_STRUCT_LEN: usize = 12;

const SECRET_TAG: &str = "klpvisor-ed25519-secret";
const PUBLIC_TAG: &str = "klpvisor-ed25519-public";

/// Why a patch's signature was refused, or a key or file could not be used.
#[derive(Debug, Error)]
pub enum SignatureError {
    /// No klpvisor signature, and this VMM requires one.
    #[error(
        "patch is not signed; this VMM only accepts patches signed by a trusted key \
         (--trusted-keys); sign it with `patcher sign --key KEY.key FILE.ko`"
    )]
    Unsigned,
    /// Only the kernel's PKCS#7 signature, and this VMM requires klpvisor's.
    #[error(
        "patch carries only the kernel's module signature (PKCS#7), which klpvisor cannot \
         verify; this VMM only accepts patches signed by a trusted key (--trusted-keys); \
         sign it with `patcher sign --key KEY.key FILE.ko`"
    )]
    KernelSignatureOnly,
    /// Signed by a key that is not trusted.
    #[error(
        "patch is signed by key {key_id}, which is not among the trusted keys ({trusted}); \
         sign it with one of those keys or add {key_id}'s .pub file to --trusted-keys"
    )]
    UnknownKey {
        /// The signer's key id, from the trailer.
        key_id: KeyId,
        /// The trusted keys, listed for the message.
        trusted: String,
    },
    /// The signature does not verify with the trusted key of that id.
    #[error(
        "patch signature does not verify with trusted key {key_id} ({key_file}): the module or \
         its signature changed after signing; sign the original module again"
    )]
    BadSignature {
        /// The signer's key id.
        key_id: KeyId,
        /// The trusted `.pub` file of that id.
        key_file: String,
    },
    /// A klpvisor trailer or the kernel's appended signature is truncated
    /// or of an unknown version or algorithm.
    #[error("patch signature trailer is malformed: {0}")]
    Malformed(String),
    /// `patcher sign` was given an already signed module.
    #[error("the module is already signed by key {0}; sign the unsigned module instead")]
    AlreadySigned(KeyId),
    /// `patcher sign` was given something other than an ELF file.
    #[error("the input is not an ELF object; sign the livepatch module (.ko) itself")]
    NotElf,
    /// A key file, the trusted-keys directory or `/proc/self` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A new key file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `patcher keygen` would overwrite a key file.
    #[error("{path} already exists; choose another --out NAME or remove it first")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A key file is not a klpvisor key of the expected kind.
    #[error(
        "{path} is not a klpvisor {expected} key: {why}; make a key pair with \
         `patcher keygen --out NAME`"
    )]
    KeyFormat {
        /// The key file.
        path: PathBuf,
        /// `secret` or `public`.
        expected: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The trusted-keys directory has no `*.pub` file.
    #[error(
        "{dir} holds no *.pub file; copy there the NAME.pub of each key \
         (`patcher keygen --out NAME`) whose patches this VMM may apply"
    )]
    NoTrustedKeys {
        /// The `--trusted-keys` directory.
        dir: PathBuf,
    },
    /// `/dev/urandom` could not be read for a new key.
    #[error("cannot read the system's random source: {0}")]
    Random(std::io::Error),
    /// A trusted key or its directory is writable by others, or owned by
    /// neither root nor this process's user.
    #[error(
        "{path} {why}: whoever can change a trusted key can sign patches for this VMM; make \
         it owned by root or by the VMM's user and writable by the owner only (chmod go-w)"
    )]
    KeyPermissions {
        /// The file or directory.
        path: PathBuf,
        /// Which rule it breaks.
        why: String,
    },
}

/// Refuses a trusted-key file or directory that someone other than root
/// or this process's user could change.
fn check_owner_and_mode(path: &Path) -> Result<(), SignatureError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| SignatureError::Read {
        path: path.to_owned(),
        source,
    })?;
    // This process's effective uid: the owner of its /proc/self.
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|source| SignatureError::Read {
            path: "/proc/self".into(),
            source,
        })?;
    let why = if m.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by its group or others (mode {:o})",
            m.mode() & 0o7777
        ))
    } else if m.uid() != 0 && m.uid() != me {
        Some(format!(
            "belongs to uid {}, neither root nor uid {me}",
            m.uid()
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(SignatureError::KeyPermissions {
            path: path.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// The first 8 bytes of the SHA-256 of a public key: short enough for an
/// error message, long enough that two keys never share one by chance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KeyId::LEN]);

impl KeyId {
    /// Bytes of a key id.
    pub const LEN: usize = 8;

    fn of(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; Self::LEN];
        id.copy_from_slice(&digest[..Self::LEN]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

/// A signing key, as `patcher keygen` writes it to `NAME.key`.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id())
    }
}

impl SecretKey {
    /// A fresh key from the kernel's random source.
    pub fn generate() -> Result<Self, SignatureError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(SignatureError::Random)?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(Self(key))
    }

    /// The key whose Ed25519 seed is `seed` (what a `NAME.key` file holds).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Its verifying key, for `NAME.pub`.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Its public key's id.
    pub fn id(&self) -> KeyId {
        self.public().id()
    }

    /// Reads a `NAME.key` file.
    pub fn load(path: &Path) -> Result<Self, SignatureError> {
        let seed = read_key_file(path, SECRET_TAG, "secret")?;
        Ok(Self::from_seed(seed))
    }

    /// The one line of a `NAME.key` file.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", to_hex(self.0.as_bytes()))
    }
}

/// A verifying key, as `patcher keygen` writes it to `NAME.pub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// The first 8 bytes of its SHA-256.
    pub fn id(&self) -> KeyId {
        KeyId::of(&self.0)
    }

    /// Reads a `NAME.pub` file.
    pub fn load(path: &Path) -> Result<Self, SignatureError> {
        let bytes = read_key_file(path, PUBLIC_TAG, "public")?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| SignatureError::KeyFormat {
                path: path.to_owned(),
                expected: "public",
                why: "its 32 bytes are not a point on Ed25519's curve".into(),
            })
    }

    /// The one line of a `NAME.pub` file.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", to_hex(self.0.as_bytes()))
    }
}

/// Reads the 32 key bytes of a one-line key file tagged `tag`, naming the
/// other kind of key if it is one (the commonest mix-up).
fn read_key_file(
    path: &Path,
    tag: &str,
    expected: &'static str,
) -> Result<[u8; 32], SignatureError> {
    let bad = |why: String| SignatureError::KeyFormat {
        path: path.to_owned(),
        expected,
        why,
    };
    let raw = std::fs::read(path).map_err(|source| SignatureError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = std::str::from_utf8(&raw).map_err(|_| bad("it is not text".into()))?;
    let line = text.trim();
    let (found, hex) = line.split_once(' ').unwrap_or((line, ""));
    if found != tag {
        let other = if tag == SECRET_TAG {
            PUBLIC_TAG
        } else {
            SECRET_TAG
        };
        return Err(bad(if found == other {
            format!(
                "it holds a {} key",
                if expected == "secret" {
                    "public"
                } else {
                    "secret"
                }
            )
        } else {
            format!("it does not start with `{tag} `")
        }));
    }
    from_hex(hex.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| bad(format!("`{tag}` must be followed by 64 hex digits")))
}

/// Writes a new key pair to `NAME.key` (mode 0600) and `NAME.pub`,
/// refusing to overwrite either. Returns both paths and the key id.
pub fn write_key_pair(name: &Path) -> Result<(PathBuf, PathBuf, KeyId), SignatureError> {
    use std::os::unix::fs::OpenOptionsExt;
    let with_ext = |ext: &str| {
        let mut s = name.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (secret_path, public_path) = (with_ext(".key"), with_ext(".pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(SignatureError::Exists { path: p.clone() });
        }
    }
    let key = SecretKey::generate()?;
    let write = |path: &Path, mode: u32, text: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| SignatureError::Write {
                path: path.to_owned(),
                source,
            })
    };
    write(&secret_path, 0o600, &key.to_file_text())?;
    write(&public_path, 0o644, &key.public().to_file_text())?;
    Ok((secret_path, public_path, key.id()))
}

/// The message an Ed25519 signature covers.
fn signed_message(header: &[u8; HEADER_LEN], module: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + HEADER_LEN + module.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(header);
    m.extend_from_slice(module);
    m
}

fn header(key_id: KeyId, level: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = ALGORITHM_ED25519;
    h[2..4].copy_from_slice(&level.to_le_bytes());
    h[4..].copy_from_slice(&key_id.0);
    h
}

/// `module` with a klpvisor signature by `key` appended, at patch level 0.
/// The module may carry the kernel's signature (ours then covers it too),
/// not ours.
pub fn sign(module: &[u8], key: &SecretKey) -> Result<Vec<u8>, SignatureError> {
    sign_level(module, key, 0)
}

/// [`sign`] at patch `level` (see the module docs: anti-rollback).
pub fn sign_level(module: &[u8], key: &SecretKey, level: u16) -> Result<Vec<u8>, SignatureError> {
    if !module.starts_with(b"\x7fELF") {
        return Err(SignatureError::NotElf);
    }
    if let Some(t) = Trailer::find(module)? {
        return Err(SignatureError::AlreadySigned(t.key_id));
    }
    let header = header(key.id(), level);
    let signature = key.0.sign(&signed_message(&header, module));
    let mut out = Vec::with_capacity(module.len() + TRAILER_LEN);
    out.extend_from_slice(module);
    out.extend_from_slice(&header);
    out.extend_from_slice(&signature.to_bytes());
    out.extend_from_slice(MAGIC);
    Ok(out)
}

/// A klpvisor signature found at the end of a module.
struct Trailer<'a> {
    key_id: KeyId,
    level: u16,
    header: [u8; HEADER_LEN],
    signature: Signature,
    /// What it signs: everything before it.
    signed: &'a [u8],
}

impl<'a> Trailer<'a> {
    /// The trailer of `ko`, if it ends with [`MAGIC`].
    fn find(ko: &'a [u8]) -> Result<Option<Self>, SignatureError> {
        if !ko.ends_with(MAGIC) {
            return Ok(None);
        }
        let Some(start) = ko.len().checked_sub(TRAILER_LEN) else {
            return Err(SignatureError::Malformed(format!(
                "the file is {} bytes, shorter than the {TRAILER_LEN}-byte trailer its magic \
                 announces (truncated?)",
                ko.len()
            )));
        };
        let (signed, trailer) = ko.split_at(start);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&trailer[..HEADER_LEN]);
        let v1 = header[0] == 1 && header[2..4] == [0, 0];
        if !(v1 || header[0] == VERSION) || header[1] != ALGORITHM_ED25519 {
            return Err(SignatureError::Malformed(format!(
                "version {} algorithm {} (this VMM reads versions 1 and {VERSION}, algorithm \
                 {ALGORITHM_ED25519} = Ed25519; truncated or from a newer patcher?)",
                header[0], header[1]
            )));
        }
        let level = u16::from_le_bytes([header[2], header[3]]);
        let mut id = [0u8; KeyId::LEN];
        id.copy_from_slice(&header[4..]);
        let mut sig = [0u8; Signature::BYTE_SIZE];
        sig.copy_from_slice(&trailer[HEADER_LEN..HEADER_LEN + Signature::BYTE_SIZE]);
        Ok(Some(Self {
            key_id: KeyId(id),
            level,
            header,
            signature: Signature::from_bytes(&sig),
            signed,
        }))
    }
}

/// `ko` without the kernel's appended signature, and whether it had one.
fn strip_kernel_signature(ko: &[u8]) -> Result<(&[u8], bool), SignatureError> {
    let Some(rest) = ko.strip_suffix(KERNEL_MAGIC) else {
        return Ok((ko, false));
    };
    let bad = || {
        SignatureError::Malformed(
            "the kernel's module signature (\"~Module signature appended~\") is truncated".into(),
        )
    };
    let info_at = rest
        .len()
        .checked_sub(KERNEL_SIG_STRUCT_LEN)
        .ok_or_else(bad)?;
    let info = &rest[info_at..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let end = info_at.checked_sub(sig_len).ok_or_else(bad)?;
    Ok((&rest[..end], true))
}

/// The trusted public keys (`vmm --trusted-keys DIR`).
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

/// One trusted public key and where it came from.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Its key id.
    pub id: KeyId,
    /// The file it came from, for status and error messages.
    pub file: String,
    key: PublicKey,
}

impl TrustedKeys {
    /// Every `*.pub` file in `dir`, in name order. Any unreadable or
    /// malformed one is an error naming it: a key silently skipped would
    /// refuse patches for a reason nobody could see.
    pub fn load_dir(dir: &Path) -> Result<Self, SignatureError> {
        let read_err = |source| SignatureError::Read {
            path: dir.to_owned(),
            source,
        };
        check_owner_and_mode(dir)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        files.retain(|p| p.extension().is_some_and(|e| e == "pub"));
        files.sort();
        let keys = files
            .iter()
            .map(|p| {
                check_owner_and_mode(p)?;
                let key = PublicKey::load(p)?;
                Ok(TrustedKey {
                    id: key.id(),
                    file: p.file_name().map_or_else(
                        || p.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    ),
                    key,
                })
            })
            .collect::<Result<Vec<_>, SignatureError>>()?;
        if keys.is_empty() {
            return Err(SignatureError::NoTrustedKeys {
                dir: dir.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// Trusts exactly `keys` (tests, embedding); each named `file`.
    pub fn from_keys(keys: impl IntoIterator<Item = (PublicKey, String)>) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|(key, file)| TrustedKey {
                    id: key.id(),
                    file,
                    key,
                })
                .collect(),
        }
    }

    /// The keys, in file-name order.
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    fn list(&self) -> String {
        self.keys
            .iter()
            .map(|k| format!("{} ({})", k.id, k.file))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which patches a VMM accepts.
#[derive(Debug, Clone)]
pub enum Policy {
    /// No `--trusted-keys`: any patch; a signature is stripped, not checked.
    AcceptUnsigned,
    /// Only patches carrying a valid signature by one of these keys.
    RequireSigned(TrustedKeys),
}

/// How an accepted patch was signed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// No klpvisor signature (accepted only without trusted keys).
    Unsigned {
        /// It carried the kernel's module signature, stripped unverified.
        kernel_signed: bool,
    },
    /// Signed by a trusted key, and the signature verified.
    Verified {
        /// The signer's key id.
        key_id: KeyId,
        /// The trusted `.pub` file that verified it.
        key_file: String,
        /// The patch level the signature covers.
        level: u16,
        /// It also carried the kernel's module signature, stripped unverified.
        kernel_signed: bool,
    },
    /// Signed, but this VMM has no trusted keys to check it with.
    NotVerified {
        /// The key id the trailer names.
        key_id: KeyId,
        /// The patch level the trailer claims.
        level: u16,
        /// It also carried the kernel's module signature, stripped unverified.
        kernel_signed: bool,
    },
}

impl Provenance {
    /// The verified patch level: what anti-rollback compares (an
    /// unverified level is only what the file claims).
    pub fn verified_level(&self) -> Option<u16> {
        match self {
            Self::Verified { level, .. } => Some(*level),
            _ => None,
        }
    }
}

impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kernel = |k: bool| {
            if k {
                "; kernel module signature stripped, not verified"
            } else {
                ""
            }
        };
        match self {
            Self::Unsigned { kernel_signed } => write!(f, "unsigned{}", kernel(*kernel_signed)),
            Self::Verified {
                key_id,
                key_file,
                level,
                kernel_signed,
            } => write!(
                f,
                "verified: {key_id} ({key_file}), level {level}{}",
                kernel(*kernel_signed)
            ),
            Self::NotVerified {
                key_id,
                level,
                kernel_signed,
            } => write!(
                f,
                "not verified: signed by {key_id} at level {level}, no --trusted-keys{}",
                kernel(*kernel_signed)
            ),
        }
    }
}

/// An accepted patch: the module bytes to parse and how it was signed.
#[derive(Debug)]
pub struct Checked<'a> {
    /// Exactly the module as built, every signature stripped.
    pub module: &'a [u8],
    /// How it was signed and checked.
    pub provenance: Provenance,
}

impl Policy {
    /// Decides whether `ko` may be applied, reading nothing but its bytes;
    /// on success returns the module without its signatures.
    pub fn check<'a>(&self, ko: &'a [u8]) -> Result<Checked<'a>, SignatureError> {
        let trailer = Trailer::find(ko)?;
        let signed_part = trailer.as_ref().map_or(ko, |t| t.signed);
        let (module, kernel_signed) = strip_kernel_signature(signed_part)?;
        let provenance = match (self, trailer) {
            (Self::AcceptUnsigned, None) => Provenance::Unsigned { kernel_signed },
            (Self::AcceptUnsigned, Some(t)) => Provenance::NotVerified {
                key_id: t.key_id,
                level: t.level,
                kernel_signed,
            },
            (Self::RequireSigned(_), None) if kernel_signed => {
                return Err(SignatureError::KernelSignatureOnly)
            }
            (Self::RequireSigned(_), None) => return Err(SignatureError::Unsigned),
            (Self::RequireSigned(trusted), Some(t)) => {
                let candidates: Vec<&TrustedKey> =
                    trusted.keys.iter().filter(|k| k.id == t.key_id).collect();
                let Some(first) = candidates.first() else {
                    return Err(SignatureError::UnknownKey {
                        key_id: t.key_id,
                        trusted: trusted.list(),
                    });
                };
                let message = signed_message(&t.header, t.signed);
                let good = candidates
                    .iter()
                    .find(|k| k.key.0.verify_strict(&message, &t.signature).is_ok())
                    .ok_or_else(|| SignatureError::BadSignature {
                        key_id: t.key_id,
                        key_file: first.file.clone(),
                    })?;
                Provenance::Verified {
                    key_id: good.id,
                    key_file: good.file.clone(),
                    level: t.level,
                    kernel_signed,
                }
            }
        };
        Ok(Checked { module, provenance })
    }

    /// Whether signatures are required (`--trusted-keys` was given).
    pub fn enforced(&self) -> bool {
        matches!(self, Self::RequireSigned(_))
    }

    /// The trusted keys (none without `--trusted-keys`).
    pub fn trusted(&self) -> &[TrustedKey] {
        match self {
            Self::AcceptUnsigned => &[],
            Self::RequireSigned(t) => t.keys(),
        }
    }
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in module: an ELF header and some bytes.
    fn module() -> Vec<u8> {
        let mut m = b"\x7fELF\x02\x01\x01".to_vec();
        m.extend((0u8..=255).cycle().take(4000));
        m
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn trusting(keys: &[&SecretKey]) -> Policy {
        Policy::RequireSigned(TrustedKeys::from_keys(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.public(), format!("k{i}.pub"))),
        ))
    }

    /// The kernel's layout: module, PKCS#7 blob, struct module_signature,
    /// magic.
    fn kernel_signed(m: &[u8]) -> Vec<u8> {
        let pkcs7 = vec![0x30u8; 300];
        let mut out = m.to_vec();
        out.extend_from_slice(&pkcs7);
        out.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(pkcs7.len() as u32).to_be_bytes());
        out.extend_from_slice(KERNEL_MAGIC);
        out
    }

    #[test]
    fn valid_signature_is_verified_and_stripped() {
        let m = module();
        let k = key(1);
        let signed = sign(&m, &k).unwrap();
        assert_eq!(signed.len(), m.len() + TRAILER_LEN);
        let c = trusting(&[&key(9), &k]).check(&signed).unwrap();
        assert_eq!(c.module, &m[..]);
        assert_eq!(
            c.provenance,
            Provenance::Verified {
                key_id: k.id(),
                key_file: "k1.pub".into(),
                level: 0,
                kernel_signed: false
            }
        );
        assert_eq!(
            c.provenance.to_string(),
            format!("verified: {} (k1.pub), level 0", k.id())
        );
    }

    #[test]
    fn without_trusted_keys_a_signature_is_stripped_not_verified() {
        let m = module();
        let k = key(1);
        let signed = sign(&m, &k).unwrap();
        let c = Policy::AcceptUnsigned.check(&signed).unwrap();
        assert_eq!(c.module, &m[..]);
        assert_eq!(
            c.provenance.to_string(),
            format!(
                "not verified: signed by {} at level 0, no --trusted-keys",
                k.id()
            )
        );
        // Even a tampered one: nothing is checked, and the status says so.
        let mut bad = signed.clone();
        bad[100] ^= 1;
        let c = Policy::AcceptUnsigned.check(&bad).unwrap();
        assert!(matches!(c.provenance, Provenance::NotVerified { .. }));
    }

    #[test]
    fn unknown_key_is_refused_naming_it() {
        let signed = sign(&module(), &key(2)).unwrap();
        let e = trusting(&[&key(1)]).check(&signed).unwrap_err();
        let SignatureError::UnknownKey { key_id, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*key_id, key(2).id());
        let msg = e.to_string();
        assert!(msg.contains(&key(2).id().to_string()), "{msg}");
        assert!(msg.contains(&key(1).id().to_string()), "{msg}");
        assert!(msg.contains("k0.pub"), "{msg}");
    }

    #[test]
    fn a_wrong_key_claiming_a_trusted_id_does_not_verify() {
        // Signed by key 2, but the trailer names key 1's id.
        let m = module();
        let mut signed = sign(&m, &key(2)).unwrap();
        signed[m.len() + 4..m.len() + 12].copy_from_slice(&key(1).id().0);
        let e = trusting(&[&key(1)]).check(&signed).unwrap_err();
        assert!(matches!(e, SignatureError::BadSignature { .. }), "{e}");
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let m = module();
        let k = key(1);
        let signed = sign(&m, &k).unwrap();
        let policy = trusting(&[&k]);
        // Every module byte and every header and signature byte.
        for i in 0..signed.len() - MAGIC.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x40;
            let e = policy.check(&bad).unwrap_err();
            let ok = match e {
                SignatureError::BadSignature { .. } => true,
                // The version/algorithm/reserved bytes.
                SignatureError::Malformed(_) => (m.len()..m.len() + 4).contains(&i),
                // The key id.
                SignatureError::UnknownKey { .. } => (m.len() + 4..m.len() + 12).contains(&i),
                _ => false,
            };
            assert!(ok, "byte {i}: {e}");
        }
        // A changed magic no longer marks a signature: unsigned.
        let mut bad = signed.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert!(matches!(
            policy.check(&bad).unwrap_err(),
            SignatureError::Unsigned
        ));
        let tampered_module = {
            let mut b = signed.clone();
            b[10] ^= 1;
            b
        };
        let msg = policy.check(&tampered_module).unwrap_err().to_string();
        assert!(msg.contains("changed after signing"), "{msg}");
    }

    #[test]
    fn truncated_trailers_are_refused() {
        let k = key(1);
        let policy = trusting(&[&k]);
        let signed = sign(&module(), &k).unwrap();
        // Only the magic survives.
        let e = policy.check(MAGIC).unwrap_err();
        assert!(matches!(e, SignatureError::Malformed(_)), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        // A byte of the signature lost, the magic kept.
        let mut cut = signed[..signed.len() - MAGIC.len() - 1].to_vec();
        cut.extend_from_slice(MAGIC);
        assert!(policy.check(&cut).is_err());
        // The end cut off: no magic, so no signature.
        let cut = &signed[..signed.len() - 1];
        assert!(matches!(
            policy.check(cut).unwrap_err(),
            SignatureError::Unsigned
        ));
        // Without trusted keys a malformed trailer is still an error: where
        // the module ends is unknown.
        assert!(Policy::AcceptUnsigned.check(MAGIC).is_err());
    }

    #[test]
    fn missing_signature_is_refused_only_with_trusted_keys() {
        let m = module();
        let e = trusting(&[&key(1)]).check(&m).unwrap_err();
        assert!(matches!(e, SignatureError::Unsigned));
        assert!(e.to_string().contains("patch is not signed"), "{e}");
        let c = Policy::AcceptUnsigned.check(&m).unwrap();
        assert_eq!(c.module, &m[..]);
        assert_eq!(c.provenance.to_string(), "unsigned");
    }

    #[test]
    fn kernel_signed_module_is_stripped_and_not_trusted() {
        let m = module();
        let ks = kernel_signed(&m);
        let c = Policy::AcceptUnsigned.check(&ks).unwrap();
        assert_eq!(c.module, &m[..]);
        assert_eq!(
            c.provenance.to_string(),
            "unsigned; kernel module signature stripped, not verified"
        );
        let k = key(1);
        let e = trusting(&[&k]).check(&ks).unwrap_err();
        assert!(matches!(e, SignatureError::KernelSignatureOnly), "{e}");
        // Ours on top of the kernel's: verified, both stripped.
        let both = sign(&ks, &k).unwrap();
        let c = trusting(&[&k]).check(&both).unwrap();
        assert_eq!(c.module, &m[..]);
        assert!(matches!(
            c.provenance,
            Provenance::Verified {
                kernel_signed: true,
                ..
            }
        ));
        // A kernel signature whose length points before the file start.
        let mut bad = ks.clone();
        let at = bad.len() - KERNEL_MAGIC.len() - 4;
        bad[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Policy::AcceptUnsigned.check(&bad).unwrap_err(),
            SignatureError::Malformed(_)
        ));
    }

    #[test]
    fn sign_refuses_non_elf_and_signed_input() {
        let k = key(1);
        assert!(matches!(
            sign(b"hello", &k).unwrap_err(),
            SignatureError::NotElf
        ));
        let signed = sign(&module(), &k).unwrap();
        let e = sign(&signed, &key(2)).unwrap_err();
        assert!(matches!(e, SignatureError::AlreadySigned(id) if id == k.id()));
    }

    #[test]
    fn signatures_are_bound_to_the_domain() {
        // A plain Ed25519 signature over the module alone (what another
        // tool would make with the same key) does not verify here.
        let m = module();
        let k = key(1);
        let plain = k.0.sign(&m);
        let mut forged = m.clone();
        forged.extend_from_slice(&header(k.id(), 0));
        forged.extend_from_slice(&plain.to_bytes());
        forged.extend_from_slice(MAGIC);
        assert!(matches!(
            trusting(&[&k]).check(&forged).unwrap_err(),
            SignatureError::BadSignature { .. }
        ));
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "klpv-sig-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_files_round_trip_and_wrong_files_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("keys");
        let (sk, pk, id) = write_key_pair(&d.join("ops")).unwrap();
        assert_eq!(sk, d.join("ops.key"));
        assert_eq!(pk, d.join("ops.pub"));
        let mode = std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let secret = SecretKey::load(&sk).unwrap();
        let public = PublicKey::load(&pk).unwrap();
        assert_eq!(secret.id(), id);
        assert_eq!(public.id(), id);
        // Never overwrites.
        assert!(matches!(
            write_key_pair(&d.join("ops")).unwrap_err(),
            SignatureError::Exists { .. }
        ));
        // The secret key given where a public one belongs, and vice versa.
        let e = PublicKey::load(&sk).unwrap_err().to_string();
        assert!(
            e.contains("ops.key") && e.contains("holds a secret key"),
            "{e}"
        );
        let e = SecretKey::load(&pk).unwrap_err().to_string();
        assert!(e.contains("holds a public key"), "{e}");
        // Garbage.
        std::fs::write(d.join("x.pub"), "ssh-ed25519 AAAA\n").unwrap();
        let e = PublicKey::load(&d.join("x.pub")).unwrap_err().to_string();
        assert!(
            e.contains("x.pub") && e.contains("klpvisor-ed25519-public"),
            "{e}"
        );
        std::fs::write(d.join("x.pub"), "klpvisor-ed25519-public abcd\n").unwrap();
        let e = PublicKey::load(&d.join("x.pub")).unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn trusted_key_directory() {
        let d = tmpdir("trusted");
        // Empty: an error, not "trust nothing".
        let e = TrustedKeys::load_dir(&d).unwrap_err();
        assert!(matches!(e, SignatureError::NoTrustedKeys { .. }), "{e}");
        let (_, _, a) = write_key_pair(&d.join("a")).unwrap();
        let (_, _, b) = write_key_pair(&d.join("b")).unwrap();
        let t = TrustedKeys::load_dir(&d).unwrap();
        let ids: Vec<(KeyId, &str)> = t.keys().iter().map(|k| (k.id, k.file.as_str())).collect();
        assert_eq!(ids, vec![(a, "a.pub"), (b, "b.pub")]);
        // One bad .pub file fails the whole directory, naming the file.
        std::fs::write(d.join("c.pub"), "nonsense").unwrap();
        let e = TrustedKeys::load_dir(&d).unwrap_err().to_string();
        assert!(e.contains("c.pub"), "{e}");
        assert!(TrustedKeys::load_dir(&d.join("missing")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn signing_with_a_loaded_key_verifies_with_the_loaded_directory() {
        let d = tmpdir("e2e");
        let (sk, _, id) = write_key_pair(&d.join("release")).unwrap();
        let m = module();
        let signed = sign(&m, &SecretKey::load(&sk).unwrap()).unwrap();
        let policy = Policy::RequireSigned(TrustedKeys::load_dir(&d).unwrap());
        assert!(policy.enforced());
        let c = policy.check(&signed).unwrap();
        assert_eq!(
            c.provenance.to_string(),
            format!("verified: {id} (release.pub), level 0")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_patch_level_is_signed_and_version_1_reads_as_level_0() {
        let m = module();
        let k = key(1);
        let signed = sign_level(&m, &k, 7).unwrap();
        let c = trusting(&[&k]).check(&signed).unwrap();
        assert_eq!(c.provenance.verified_level(), Some(7));
        assert!(c.provenance.to_string().ends_with("level 7"));
        // Raising the level in the file breaks the signature.
        let at = m.len() + 2;
        let mut raised = signed.clone();
        raised[at] = 9;
        assert!(matches!(
            trusting(&[&k]).check(&raised).unwrap_err(),
            SignatureError::BadSignature { .. }
        ));
        // Without trusted keys the level is only a claim.
        let c = Policy::AcceptUnsigned.check(&signed).unwrap();
        assert_eq!(c.provenance.verified_level(), None);
        // A version 1 trailer (written before levels) verifies, at 0.
        let mut h = header(k.id(), 0);
        h[0] = 1;
        let mut v1 = m.clone();
        v1.extend_from_slice(&h);
        v1.extend_from_slice(&k.0.sign(&signed_message(&h, &m)).to_bytes());
        v1.extend_from_slice(MAGIC);
        let c = trusting(&[&k]).check(&v1).unwrap();
        assert_eq!(c.provenance.verified_level(), Some(0));
        // ... but version 1 never had a level there.
        let mut bad = v1.clone();
        bad[at] = 1;
        assert!(matches!(
            trusting(&[&k]).check(&bad).unwrap_err(),
            SignatureError::Malformed(_)
        ));
    }

    #[test]
    fn trusted_keys_that_others_can_change_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("modes");
        let (_, pk, _) = write_key_pair(&d.join("a")).unwrap();
        let set = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        set(&d, 0o755);
        set(&pk, 0o644);
        TrustedKeys::load_dir(&d).unwrap();
        set(&pk, 0o664);
        let e = TrustedKeys::load_dir(&d).unwrap_err();
        assert!(matches!(e, SignatureError::KeyPermissions { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("a.pub is writable by its group or others"),
            "{e}"
        );
        set(&pk, 0o644);
        set(&d, 0o777);
        let e = TrustedKeys::load_dir(&d).unwrap_err();
        assert!(matches!(e, SignatureError::KeyPermissions { .. }), "{e}");
        set(&d, 0o755);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
