//! [`BuildId`]: which program a process runs.
//!
//! A task's key names its function by path, not by its code. A worker built
//! from an older version of the program would answer for the new version's
//! `f` with the old code's value, and the scheduler, which shares results by
//! key, would hand a value of one build to a client of another. So every
//! process announces its build in its handshake, and builds never share a
//! task, a key or a worker (see the scheduler's rules).
//!
//! Rules:
//!
//! 1. A process's build id is blake3 of the bytes of its executable (what
//!    `b3sum` prints for the file), computed once, at first use, reading
//!    the file in chunks. Any change of the program (its code, its
//!    dependencies, its build profile) changes it; processes started from
//!    the same file share it.
//! 2. The executable is read through `/proc/self/exe` first, which still
//!    opens the file this process started from after a rebuild replaced it,
//!    then through [`std::env::current_exe`].
//! 3. If neither can be read, the id is blake3 of the executable's path,
//!    with a warning on stderr. That fallback is weaker: a rebuild at the
//!    same path keeps the same id, so an old worker is not told apart from
//!    a new client.
//! 4. The scheduler runs no user code and announces [`BuildId::NONE`].

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::OnceLock;

/// The fingerprint of a program's build: blake3 of its executable.
///
/// Shown as the first 8 hex digits of the hash (`3f2a1b0c`), as errors and
/// logs name it; compare with `b3sum path/to/program`.
///
/// # Examples
///
/// ```
/// use rask_distributed::BuildId;
/// let me = BuildId::current();
/// assert_eq!(me, BuildId::current()); // computed once per process
/// assert_ne!(me, BuildId::NONE);
/// assert_eq!(me.to_string().len(), 8);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BuildId([u8; 32]);

impl BuildId {
    /// All zeros: the build of a process that runs no user code. The
    /// scheduler sends it in its handshakes.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::BuildId;
    /// assert_eq!(BuildId::NONE.to_string(), "00000000");
    /// ```
    pub const NONE: BuildId = BuildId([0; 32]);

    /// The build of this process: blake3 of its executable, computed on
    /// the first call (module rules 1 to 3).
    ///
    /// # Examples
    ///
    /// ```
    /// println!("this program is build {}", rask_distributed::BuildId::current());
    /// ```
    pub fn current() -> BuildId {
        static CURRENT: OnceLock<BuildId> = OnceLock::new();
        *CURRENT.get_or_init(fingerprint)
    }

    /// A build id from its 32 bytes, as a handshake carries it.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::BuildId;
    /// let id = BuildId::from_bytes([0xab; 32]);
    /// assert_eq!(id.to_string(), "abababab");
    /// assert_eq!(id.as_bytes(), &[0xab; 32]);
    /// ```
    pub const fn from_bytes(bytes: [u8; 32]) -> BuildId {
        BuildId(bytes)
    }

    /// The id's 32 bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use rask_distributed::BuildId;
    /// assert_eq!(BuildId::NONE.as_bytes(), &[0; 32]);
    /// ```
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BuildId(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Hashes this process's executable (rules 1 to 3).
fn fingerprint() -> BuildId {
    let mut failures = Vec::new();
    match hash_file(Path::new("/proc/self/exe")) {
        Ok(id) => return id,
        Err(e) => failures.push(format!("/proc/self/exe: {e}")),
    }
    let exe = std::env::current_exe();
    match &exe {
        Ok(path) => match hash_file(path) {
            Ok(id) => return id,
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        },
        Err(e) => failures.push(format!("current_exe: {e}")),
    }
    // Rule 3: the path, or failing that the name this process was started
    // by, is all that is left to tell programs apart.
    let path = match exe {
        Ok(path) => path.into_os_string(),
        Err(_) => std::env::args_os().next().unwrap_or_default(),
    };
    tracing::warn!(
        "cannot read this program's executable ({}); its build id is a hash of its path {:?}, \
         which does not change when the program is rebuilt",
        failures.join("; "),
        path
    );
    let mut hasher = blake3::Hasher::new_derive_key("rask build id of a path v1");
    hasher.update(path.as_encoded_bytes());
    BuildId(*hasher.finalize().as_bytes())
}

/// blake3 of a file's bytes, read in chunks.
fn hash_file(path: &Path) -> std::io::Result<BuildId> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(BuildId(*hasher.finalize().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_build_is_the_hash_of_this_executable() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            BuildId::current().as_bytes(),
            blake3::hash(&bytes).as_bytes()
        );
    }

    #[test]
    fn a_file_hashed_in_chunks_hashes_as_a_whole() {
        let path = std::env::temp_dir().join(format!("rask-build-id-{}", std::process::id()));
        // Several chunks of the reader, and a partial one.
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let id = hash_file(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(id.unwrap().as_bytes(), blake3::hash(&bytes).as_bytes());
    }

    #[test]
    fn display_is_the_first_eight_hex_digits_and_debug_all_of_them() {
        let mut bytes = [0u8; 32];
        bytes[..5].copy_from_slice(&[0x3f, 0x2a, 0x1b, 0x0c, 0xff]);
        let id = BuildId::from_bytes(bytes);
        assert_eq!(id.to_string(), "3f2a1b0c");
        let debug = format!("{id:?}");
        assert_eq!(debug, format!("BuildId(3f2a1b0cff{})", "00".repeat(27)));
    }
}
