//! Small durable-filesystem helpers: private directories and atomic replacement.

use std::fs;
use std::io;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Fsyncs a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes `path`; a file already gone (another task removed it first) is fine.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Replaces `path` with `bytes` atomically: write a temp file, fsync it,
/// rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent"))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_file_another_task_removed_is_fine() {
        let td = tempfile::tempdir().unwrap();
        let path = td.path().join("00000000000000000005-00000000000000000001.snap");
        remove_if_present(&path).expect("already gone");
        fs::write(&path, b"x").unwrap();
        remove_if_present(&path).expect("removed");
        assert!(!path.exists());
        let dir_err = remove_if_present(td.path()).expect_err("a directory is not removed");
        assert_ne!(dir_err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn private_dir_and_atomic_write() {
        let td = tempfile::tempdir().unwrap();
        let d = td.path().join("a/b");
        create_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        write_atomic(&d.join("f"), b"one").unwrap();
        write_atomic(&d.join("f"), b"two").unwrap();
        assert_eq!(fs::read(d.join("f")).unwrap(), b"two");
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "temp file left behind");
    }
}
