//! Snapshots: building one from a consistent RocksDB view, keeping the
//! latest on disk, and installing a received one atomically.
//!
//! The file format (chunked LZ4 with CRC32) is in [`format`] and documented
//! in `FORMAT.md` beside it. See `DESIGN.md` in this directory for the
//! install protocol and why each step is ordered as it is. Building,
//! keeping and installing (`store.rs`, `restore.rs`) need RocksDB; the
//! format and the transfer files do not.

pub mod format;
#[cfg(feature = "rocksdb")]
pub mod restore;
#[cfg(feature = "rocksdb")]
mod store;
pub mod transfer;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;

#[cfg(feature = "rocksdb")]
pub use store::SnapshotBuilder;
#[cfg(feature = "rocksdb")]
pub(crate) use store::SnapshotStore;
#[cfg(feature = "rocksdb")]
pub(crate) use store::current_or_rebuild;
#[cfg(feature = "rocksdb")]
pub(crate) use store::install;
#[cfg(feature = "rocksdb")]
use store::snap_err;

use crate::codec::decode;
use crate::fsutil;
use crate::types::SnapshotMeta;

/// A snapshot on disk: its path and an open handle (the handle stays valid
/// even if a newer snapshot replaces the file while it is being sent).
#[derive(Debug)]
pub struct SnapshotFile {
    /// Where the file lives.
    pub path: PathBuf,
    /// An open read handle.
    pub file: fs::File,
}

impl SnapshotFile {
    /// Opens the file at `path`.
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let file = fs::File::open(&path)?;
        Ok(Self { path, file })
    }

    /// Size in bytes.
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Decodes the Raft snapshot meta a snapshot header carries.
pub fn decode_meta(header: &format::SnapshotHeader) -> io::Result<SnapshotMeta> {
    decode(&header.meta, "snapshot meta")
}

/// Sets a stored snapshot that failed verification aside (renamed to
/// `<name>.corrupt`, replacing an older one) so it is neither sent nor
/// saved again; the next request for the current snapshot builds a new one
/// from the state machine. Does nothing if `file` was already replaced.
pub fn quarantine(file: &SnapshotFile) -> io::Result<()> {
    let same = match (fs::metadata(&file.path), file.file.metadata()) {
        (Ok(on_disk), Ok(open)) => on_disk.ino() == open.ino() && on_disk.dev() == open.dev(),
        _ => false,
    };
    if !same {
        return Ok(());
    }
    let Some(dir) = file.path.parent() else {
        return Ok(());
    };
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().ends_with(".corrupt") {
            fsutil::remove_if_present(&entry.path())?;
        }
    }
    let mut to = file.path.clone().into_os_string();
    to.push(".corrupt");
    match fs::rename(&file.path, &to) {
        // A newer snapshot replaced it meanwhile and removed it: nothing
        // is left to set aside.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    fsutil::fsync_dir(dir)?;
    tracing::error!(file = %file.path.display(), "corrupt snapshot set aside; a new one will be built");
    Ok(())
}

/// Directory where a node receiving a snapshot writes it before install.
pub fn incoming_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots").join("incoming")
}
