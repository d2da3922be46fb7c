//! One value on disk: the file format of the result cache and of a
//! worker's spilled values.
//!
//! A file holds one value's postcard bytes behind a header:
//!
//! | field | size | content |
//! |---|---|---|
//! | magic | 8 | `RASKVAL\0` |
//! | format version | 4 | [`FORMAT_VERSION`], little-endian |
//! | type name length | 2 | little-endian, at most [`MAX_TYPE_NAME`] |
//! | type name | n | UTF-8, [`std::any::type_name`] of the value |
//! | value length | 8 | little-endian |
//! | checksum | 32 | blake3 of the value's bytes |
//! | value | length | postcard |
//!
//! Rules:
//!
//! 1. A file is written to a temporary name in its directory and renamed
//!    into place, so a reader sees a whole file or none; two processes
//!    writing the same entry leave one of two equal files. The temporary
//!    name is the writer's own: its process id, a random number drawn
//!    once per process (containers sharing a directory may all have the
//!    same process id) and a count, and the file is created only if no
//!    file has that name, never truncating another writer's.
//! 2. Nothing in a file is trusted: a file that is short, long, of another
//!    format version, of another type or whose bytes do not match the
//!    checksum is [`EntryError::Corrupt`] or [`EntryError::Foreign`], never
//!    a value.
//! 3. Entries are named by key: `dir/ab/abcd…` (the full hex key, under a
//!    directory named by its first two hex digits).
//! 4. Reading takes the value's size in memory once: the header is read
//!    alone, the length it announces checked against the file's size
//!    (a damaged header cannot ask for more memory than the file holds),
//!    and the value read into one buffer of that size
//!    ([`read_shared`]: the shared buffer a cluster keeps it in).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Key;

/// The first eight bytes of every entry.
pub const MAGIC: [u8; 8] = *b"RASKVAL\0";

/// The version of this format; a file of another version is a miss.
pub const FORMAT_VERSION: u32 = 1;

/// The longest type name a header may hold, in bytes.
pub const MAX_TYPE_NAME: usize = 4096;

/// Why an entry could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// No file for that key.
    #[error("no entry")]
    Missing,
    /// The file is not a whole entry of this format (rule 2).
    #[error("{path}: not a valid entry ({reason})")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file holds a value of another type than the one asked for.
    #[error("{path}: holds a `{found}`, not a `{expected}`")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The type in the header.
        found: String,
        /// The type asked for.
        expected: String,
    },
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A value read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The type name the writer recorded.
    pub type_name: String,
    /// The value's postcard bytes, checked against the header's checksum.
    pub bytes: Vec<u8>,
}

/// Where the entry of `key` lives under `dir` (rule 3).
///
/// ```
/// use rask_executor::{entry, Key};
/// let path = entry::path(std::path::Path::new("/cache"), &Key([0xab; 32]));
/// assert!(path.starts_with("/cache/ab"));
/// assert_eq!(path.file_name().unwrap().len(), 64);
/// ```
pub fn path(dir: &Path, key: &Key) -> PathBuf {
    let hex = key.to_string();
    dir.join(&hex[..2]).join(hex)
}

/// `type_name` as a header holds it: its first [`MAX_TYPE_NAME`] bytes at
/// most, cut where a character starts.
fn held_name(type_name: &str) -> &str {
    let mut end = type_name.len().min(MAX_TYPE_NAME);
    while !type_name.is_char_boundary(end) {
        end -= 1;
    }
    &type_name[..end]
}

/// The header of an entry holding `bytes` of type `type_name`.
fn header(type_name: &str, bytes: &[u8]) -> Vec<u8> {
    let name = held_name(type_name).as_bytes();
    let mut out = Vec::with_capacity(8 + 4 + 2 + name.len() + 8 + 32);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // `name` is at most MAX_TYPE_NAME (4096) bytes, so it fits in a u16.
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(bytes).as_bytes());
    out
}

/// Writes the entry of `key` under `dir`: to a temporary file, renamed into
/// place (rule 1). Creates the directories it needs. Returns the number of
/// bytes the file takes.
///
/// # Errors
///
/// The I/O error of creating, writing or renaming the file (a full disk
/// among them); the temporary file is removed.
///
/// ```
/// use rask_executor::{entry, Key};
/// let dir = std::env::temp_dir().join(format!("rask-entry-doc-{}", std::process::id()));
/// let key = Key([7; 32]);
/// entry::write(&dir, &key, "u8", &[42]).unwrap();
/// let back = entry::read(&dir, &key, Some("u8")).unwrap();
/// assert_eq!(back.bytes, vec![42]);
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write(dir: &Path, key: &Key, type_name: &str, bytes: &[u8]) -> io::Result<u64> {
    let target = path(dir, key);
    let parent = target.parent().unwrap_or(dir);
    fs::create_dir_all(parent)?;
    let (mut file, temporary) = temporary_file(parent, key)?;
    let header = header(type_name, bytes);
    let written = (|| {
        file.write_all(&header)?;
        file.write_all(bytes)?;
        file.flush()?;
        drop(file);
        fs::rename(&temporary, &target)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    Ok((header.len() + bytes.len()) as u64)
}

/// Temporary files this process started writing.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A random number of this process's own, for its temporary names (rule 1).
fn salt() -> u64 {
    static SALT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SALT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    })
}

/// A new file under a temporary name of this writer's own in `dir`
/// (rule 1), and the name.
fn temporary_file(dir: &Path, key: &Key) -> io::Result<(fs::File, PathBuf)> {
    loop {
        let temporary = dir.join(format!(
            ".tmp-{}-{:016x}-{}-{}",
            std::process::id(),
            salt(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            &key.to_string()[..16],
        ));
        match fs::File::options()
            .write(true)
            .create_new(true)
            .open(&temporary)
        {
            Ok(file) => return Ok((file, temporary)),
            // Another writer's, left by a crash or in use: the next count.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads the entry of `key` under `dir`; with `expected_type`, a file of
/// another type is [`EntryError::Foreign`].
///
/// The value's bytes are read into one buffer of their size, checked
/// against the file's size before it is made (rule 4).
///
/// # Errors
///
/// [`EntryError::Missing`] when there is no file; [`EntryError::Corrupt`],
/// [`EntryError::Foreign`] or [`EntryError::Io`] otherwise (rule 2).
pub fn read(dir: &Path, key: &Key, expected_type: Option<&str>) -> Result<Entry, EntryError> {
    let mut header = Header::open(dir, key, expected_type)?;
    let mut bytes = vec![0; header.len];
    header.value(&mut bytes)?;
    Ok(Entry {
        type_name: header.type_name,
        bytes,
    })
}

/// [`read`], the value's bytes in a shared buffer made at their size,
/// with the type name the writer recorded: a value read back from disk
/// takes its size in memory once, not once more for the copy an
/// `Arc<[u8]>` of [`Entry::bytes`] would make (rule 4).
///
/// # Errors
///
/// As [`read`].
pub fn read_shared(
    dir: &Path,
    key: &Key,
    expected_type: Option<&str>,
) -> Result<(String, std::sync::Arc<[u8]>), EntryError> {
    let mut header = Header::open(dir, key, expected_type)?;
    let mut bytes: std::sync::Arc<[u8]> = std::iter::repeat_n(0, header.len).collect();
    match std::sync::Arc::get_mut(&mut bytes) {
        Some(buffer) => header.value(buffer)?,
        None => return Err(header.corrupt("the value's buffer is shared")),
    }
    Ok((header.type_name, bytes))
}

/// An entry's file, its header read and checked (rule 2), positioned at
/// the value.
struct Header {
    path: PathBuf,
    file: io::BufReader<fs::File>,
    type_name: String,
    len: usize,
    checksum: [u8; 32],
}

impl Header {
    fn open(dir: &Path, key: &Key, expected_type: Option<&str>) -> Result<Header, EntryError> {
        let path = path(dir, key);
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(EntryError::Missing),
            Err(source) => return Err(EntryError::Io { path, source }),
        };
        let size = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(source) => return Err(EntryError::Io { path, source }),
        };
        let mut header = Header {
            path,
            file: io::BufReader::new(file),
            type_name: String::new(),
            len: 0,
            checksum: [0; 32],
        };
        if header.take::<8>("magic")? != MAGIC {
            return Err(header.corrupt("not a rask entry"));
        }
        let version = u32::from_le_bytes(header.take("version")?);
        if version != FORMAT_VERSION {
            return Err(header.corrupt(&format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let name_len = usize::from(u16::from_le_bytes(header.take("type name length")?));
        if name_len > MAX_TYPE_NAME {
            return Err(header.corrupt("type name too long"));
        }
        let mut name = vec![0; name_len];
        header.fill(&mut name, "type name")?;
        header.type_name =
            String::from_utf8(name).map_err(|_| header.corrupt("type name is not UTF-8"))?;
        let len = u64::from_le_bytes(header.take("value length")?);
        header.checksum = header.take("checksum")?;
        // Before any buffer of that length is made: the file must hold
        // exactly the value the header announces.
        let held = size.saturating_sub((8 + 4 + 2 + name_len + 8 + 32) as u64);
        if held != len {
            return Err(header.corrupt(&format!("header says {len} bytes, the file holds {held}")));
        }
        header.len = usize::try_from(len).map_err(|_| header.corrupt("value too long"))?;
        if let Some(expected) = expected_type {
            // A name past the header's room is compared as the header holds it.
            if held_name(expected) != header.type_name {
                return Err(EntryError::Foreign {
                    path: header.path,
                    found: header.type_name,
                    expected: expected.to_owned(),
                });
            }
        }
        Ok(header)
    }

    fn corrupt(&self, reason: &str) -> EntryError {
        EntryError::Corrupt {
            path: self.path.clone(),
            reason: reason.to_owned(),
        }
    }

    /// Reads exactly `buffer.len()` bytes: a file that ends first is
    /// truncated.
    fn fill(&mut self, buffer: &mut [u8], what: &str) -> Result<(), EntryError> {
        match self.file.read_exact(buffer) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.corrupt(&format!("truncated in the {what}")))
            }
            Err(source) => Err(EntryError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], EntryError> {
        let mut out = [0; N];
        self.fill(&mut out, what)?;
        Ok(out)
    }

    /// Reads the value into `buffer` (its announced length) and checks
    /// it: nothing may follow it (the file grew since it was sized), and
    /// it must match the checksum.
    fn value(&mut self, buffer: &mut [u8]) -> Result<(), EntryError> {
        self.fill(buffer, "value")?;
        let mut more = [0; 1];
        match self.file.read(&mut more) {
            Ok(0) => {}
            Ok(_) => return Err(self.corrupt("bytes after the value")),
            Err(source) => {
                return Err(EntryError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        }
        if blake3::hash(buffer).as_bytes() != &self.checksum {
            return Err(self.corrupt("checksum mismatch"));
        }
        Ok(())
    }
}

/// Removes the entry of `key` under `dir`; a missing file is not an error.
///
/// # Errors
///
/// Any other I/O error.
pub fn remove(dir: &Path, key: &Key) -> io::Result<()> {
    match fs::remove_file(path(dir, key)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rask-entry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Another writer's temporary file is never touched: one of another
    /// process of the same id (a container sharing the directory), named
    /// as this process would name its next one without its random part,
    /// was truncated and renamed into place as this process's entry.
    #[test]
    fn another_writers_temporary_file_is_left_alone() {
        let dir = scratch("tmp-names");
        let key = Key([9; 32]);
        let parent = path(&dir, &key).parent().unwrap().to_owned();
        fs::create_dir_all(&parent).unwrap();
        let theirs = |n: u64| {
            let name = format!(".tmp-{}-{n}-{}", std::process::id(), &key.to_string()[..16]);
            parent.join(name)
        };
        let next = NEXT.load(Ordering::Relaxed);
        for n in next..next + 4 {
            fs::write(theirs(n), b"theirs").unwrap();
        }
        write(&dir, &key, "u8", &[42]).unwrap();
        assert_eq!(read(&dir, &key, Some("u8")).unwrap().bytes, vec![42]);
        for n in next..next + 4 {
            assert_eq!(fs::read(theirs(n)).unwrap(), b"theirs");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// A type's name longer than a header holds (deeply generic types) is
    /// kept cut, at a character's start, and read back as the same type.
    #[test]
    fn an_entry_of_a_long_type_name_reads_back() {
        let dir = scratch("long-name");
        let key = Key([5; 32]);
        let long = format!("{}é{}", "a".repeat(MAX_TYPE_NAME - 1), "b".repeat(100));
        write(&dir, &key, &long, b"xyz").unwrap();
        let entry = read(&dir, &key, Some(&long)).unwrap();
        assert_eq!(entry.bytes, b"xyz");
        assert_eq!(entry.type_name, "a".repeat(MAX_TYPE_NAME - 1));
        let other = format!("{}c", "a".repeat(MAX_TYPE_NAME - 1));
        assert!(matches!(
            read(&dir, &key, Some(&other)),
            Err(EntryError::Foreign { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_written_entry_reads_back_with_its_type() {
        let dir = scratch("roundtrip");
        let key = Key([3; 32]);
        let size = write(&dir, &key, "alloc::vec::Vec<i64>", &[1, 2, 3]).unwrap();
        assert_eq!(size, fs::metadata(path(&dir, &key)).unwrap().len());
        let entry = read(&dir, &key, Some("alloc::vec::Vec<i64>")).unwrap();
        assert_eq!(entry.bytes, vec![1, 2, 3]);
        assert_eq!(entry.type_name, "alloc::vec::Vec<i64>");
        assert!(matches!(
            read(&dir, &key, Some("u8")),
            Err(EntryError::Foreign { found, .. }) if found == "alloc::vec::Vec<i64>"
        ));
        assert!(matches!(
            read(&dir, &Key([4; 32]), None),
            Err(EntryError::Missing)
        ));
        remove(&dir, &key).unwrap();
        remove(&dir, &key).unwrap();
        assert!(matches!(read(&dir, &key, None), Err(EntryError::Missing)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_damage_is_corrupt_never_a_value() {
        let dir = scratch("damage");
        let key = Key([5; 32]);
        write(&dir, &key, "u64", &[9; 100]).unwrap();
        let file = path(&dir, &key);
        let whole = fs::read(&file).unwrap();
        // Every truncation, and a flipped bit at every position.
        for cut in 0..whole.len() {
            fs::write(&file, &whole[..cut]).unwrap();
            assert!(
                matches!(read(&dir, &key, None), Err(EntryError::Corrupt { .. })),
                "cut at {cut}"
            );
        }
        for at in 0..whole.len() {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x10;
            fs::write(&file, &damaged).unwrap();
            let read = read(&dir, &key, Some("u64"));
            assert!(read.is_err(), "a flipped bit at {at} was read as a value");
        }
        let mut longer = whole.clone();
        longer.push(0);
        fs::write(&file, &longer).unwrap();
        assert!(matches!(
            read(&dir, &key, None),
            Err(EntryError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_leave_one_whole_file() {
        let dir = scratch("race");
        let key = Key([6; 32]);
        let bytes = vec![1u8; 1 << 16];
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        write(&dir, &key, "bytes", &bytes).unwrap();
                        if let Ok(entry) = read(&dir, &key, Some("bytes")) {
                            assert_eq!(entry.bytes, bytes);
                        }
                    }
                });
            }
        });
        assert_eq!(read(&dir, &key, None).unwrap().bytes, bytes);
        let left: Vec<_> = fs::read_dir(path(&dir, &key).parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1, "temporary files left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
