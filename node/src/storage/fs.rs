//! The narrow file-system seam every storage write goes through, so tests can
//! inject torn writes, failed fsyncs and a full disk.
//!
//! [`StdFs`] is the real thing. [`FaultyFs`] wraps it and fails on command;
//! it is public (not test-only) because the cluster tests use it too.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// An open file, read and written at explicit offsets.
pub trait FsFile: Send + Debug {
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn size(&self) -> io::Result<u64>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// fdatasync: the data written so far survives a crash.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// Directory and whole-file operations.
pub trait FileSystem: Send + Sync + Debug {
    /// Opens for reading and writing, creating the file if asked.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes renames and deletions in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
}

/// Writes `data` to `path` atomically: a temporary file, fsync, rename over
/// the target, fsync the directory. After a crash the file is either the old
/// one or the new one, never a mix.
pub fn write_atomic(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs.open(&tmp, true)?;
        f.set_len(0)?;
        f.write_at(data, 0)?;
        f.sync_data()?;
    }
    fs.rename(&tmp, path)?;
    fs.sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[derive(Debug)]
struct StdFile(File);

impl FsFile for StdFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFs;

impl FileSystem for StdFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let f = open_rw(path, create)?;
        Ok(Box::new(StdFile(f)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in fs::read_dir(dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// Faults [`FaultyFs`] injects; change them at any time through the handle.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Bytes that may still be written; a write beyond fails with
    /// `StorageFull` after writing what fits (a torn write). `None`: no limit.
    pub space_left: Option<u64>,
    /// Every fsync fails with an I/O error.
    pub fail_sync: bool,
    /// Count of fsyncs done, to check group commit.
    pub syncs: u64,
    /// Every fsync takes at least this long (a slow disk).
    pub slow_sync: std::time::Duration,
}

/// A [`FileSystem`] that injects [`Faults`].
#[derive(Clone, Debug, Default)]
pub struct FaultyFs {
    pub faults: Arc<Mutex<Faults>>,
}

impl FaultyFs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults.lock().expect("faults lock"));
    }

    pub fn syncs(&self) -> u64 {
        self.faults.lock().expect("faults lock").syncs
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: StdFile,
    faults: Arc<Mutex<Faults>>,
}

fn storage_full() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "no space left on device (injected)",
    )
}

impl FsFile for FaultyFile {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut f = self.faults.lock().expect("faults lock");
        match f.space_left {
            Some(left) if (buf.len() as u64) > left => {
                f.space_left = Some(0);
                drop(f);
                self.inner.write_at(&buf[..left as usize], offset)?;
                Err(storage_full())
            }
            Some(left) => {
                f.space_left = Some(left - buf.len() as u64);
                drop(f);
                self.inner.write_at(buf, offset)
            }
            None => {
                drop(f);
                self.inner.write_at(buf, offset)
            }
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut f = self.faults.lock().expect("faults lock");
        if f.fail_sync {
            return Err(io::Error::other("fsync failed (injected)"));
        }
        f.syncs += 1;
        let delay = f.slow_sync;
        drop(f);
        if !delay.is_zero() {
            // Stands for the device taking its time; not a test waiting.
            std::thread::sleep(delay);
        }
        self.inner.sync_data()
    }
}

impl FileSystem for FaultyFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn FsFile>> {
        let f = open_rw(path, create)?;
        Ok(Box::new(FaultyFile {
            inner: StdFile(f),
            faults: self.faults.clone(),
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        StdFs.read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_dir_all(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        StdFs.create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.faults.lock().expect("faults lock").fail_sync {
            return Err(io::Error::other("fsync failed (injected)"));
        }
        StdFs.sync_dir(dir)
    }

    fn exists(&self, path: &Path) -> bool {
        StdFs.exists(path)
    }
}
