//! A disk in memory with injected faults, for the simulator: a full disk,
//! a sync that fails, and a power cut that keeps what was synced and, of
//! what was not, any subset of pages, torn sectors and garbage bytes.
//!
//! One per simulated node, shared by its shards (all on the simulator's
//! thread). It models what the broker relies on and no more:
//!
//! - Each file has the bytes written (the page cache, what a process that
//!   is killed leaves behind) and the bytes on the medium. `sync_file`
//!   copies the pages written since the last sync; a power cut writes back
//!   any subset of them (pages reach the medium out of order), one of them
//!   torn at a 512-byte sector, and sometimes garbage past the synced end.
//! - Entries: a file created or renamed into a directory since that
//!   directory was last synced may be gone after a power cut; one removed
//!   or replaced since may be back (a rename is atomic: the old file or the
//!   new one, never neither). Directories themselves always survive.
//! - A capacity: creating a file past it fails with `StorageFull`.
//! - An injected sync fault: the next sync cannot open its file, or fails
//!   with an I/O error (after which the broker stops: see `SyncFault`).
//! - A process that dies between two writes, or in the middle of one
//!   ([`MemDisk::die_after_writes`]): from then on nothing it does reaches
//!   the disk, until [`MemDisk::restart`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::dir::DirError;
use super::disk::{Contents, Disk, SegmentFile};

/// Pages reach the medium whole or not at all, in any order...
const PAGE_BYTES: usize = 4096;
/// ...except the one being written when the power went, torn at a sector.
const SECTOR_BYTES: usize = 512;

/// A fault injected into the next [`MemDisk::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFault {
    /// The file cannot be opened: nothing is synced, the broker tries
    /// again later.
    Open,
    /// `fdatasync` fails: the kernel may have dropped the dirty pages, so
    /// the broker aborts; the simulator follows with a power cut.
    Io,
}

/// One file.
#[derive(Debug, Default)]
struct MemFile {
    /// What was written (the page cache).
    cache: Vec<u8>,
    /// What is on the medium.
    durable: Vec<u8>,
    /// Pages written since the last sync.
    dirty: BTreeSet<usize>,
    /// End of the bytes written so far, and as of the last sync.
    written_end: usize,
    synced_end: usize,
}

impl MemFile {
    fn sync(&mut self) {
        for page in std::mem::take(&mut self.dirty) {
            let r = page_range(page, self.cache.len());
            self.durable[r.clone()].copy_from_slice(&self.cache[r]);
        }
        self.synced_end = self.written_end;
    }

    fn wrote(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        let (first, last) = (range.start / PAGE_BYTES, (range.end - 1) / PAGE_BYTES);
        self.dirty.extend(first..=last);
        self.written_end = self.written_end.max(range.end);
    }
}

fn page_range(page: usize, len: usize) -> Range<usize> {
    let start = page * PAGE_BYTES;
    start..(start + PAGE_BYTES).min(len)
}

/// A file's directory entry.
#[derive(Debug, Clone)]
struct Entry {
    file: Arc<Mutex<MemFile>>,
    /// The entry is on the medium (its directory was synced since).
    synced: bool,
}

/// A removed or replaced entry the medium still has, until its directory
/// is synced.
#[derive(Debug)]
struct Ghost {
    path: PathBuf,
    durable: Vec<u8>,
    /// The directory whose sync makes the removal durable.
    anchor: PathBuf,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<PathBuf, Entry>,
    dirs: BTreeSet<PathBuf>,
    ghosts: Vec<Ghost>,
    capacity: Option<u64>,
    fault: Option<SyncFault>,
}

impl State {
    fn used(&self) -> u64 {
        self.files
            .values()
            .map(|e| lock(&e.file).cache.len() as u64)
            .sum()
    }

    fn room_for(&self, bytes: usize) -> io::Result<()> {
        match self.capacity {
            Some(cap) if self.used() + bytes as u64 > cap => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (simulated)",
            )),
            _ => Ok(()),
        }
    }

    fn entry(&self, path: &Path) -> io::Result<&Entry> {
        self.files.get(path).ok_or_else(|| not_found(path))
    }

    /// Drop the entry at `path`; the medium keeps it until `anchor` (its
    /// directory, or the removed directory's parent) is synced, if it had
    /// it.
    fn unlink(&mut self, path: &Path, anchor: &Path) -> Option<Entry> {
        let entry = self.files.remove(path)?;
        if entry.synced {
            let durable = lock(&entry.file).durable.clone();
            self.ghosts.push(Ghost {
                path: path.to_path_buf(),
                durable,
                anchor: anchor.to_path_buf(),
            });
        }
        Some(entry)
    }

    fn insert(&mut self, path: &Path, file: MemFile) {
        let file = Arc::new(Mutex::new(file));
        self.files.insert(
            path.to_path_buf(),
            Entry {
                file,
                synced: false,
            },
        );
        if let Some(parent) = path.parent() {
            self.dirs.insert(parent.to_path_buf());
        }
    }
}

/// A death armed by [`MemDisk::die_after_writes`].
#[derive(Debug, Default)]
struct Death {
    /// Whole writes left before the last one.
    writes_left: Option<u64>,
    /// The last write keeps only this many of its bytes (modulo its size).
    torn: Option<u64>,
    /// The process is dead: writes, new files, removals are lost.
    dead: bool,
}

impl Death {
    /// How many bytes of a `len`-byte write reach the page cache.
    fn admit(&mut self, len: usize) -> usize {
        if self.dead {
            return 0;
        }
        match self.writes_left {
            Some(0) => {
                self.dead = true;
                self.writes_left = None;
                self.torn.map_or(len, |t| (t % len.max(1) as u64) as usize)
            }
            Some(n) => {
                self.writes_left = Some(n - 1);
                len
            }
            None => len,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(path)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file (simulated)", path.display()),
    )
}

/// A disk in memory; see the module docs.
#[derive(Debug, Default)]
pub struct MemDisk {
    state: Mutex<State>,
    death: Arc<Mutex<Death>>,
}

impl MemDisk {
    /// An empty disk without a capacity.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// Bound the bytes of all files (`None`: no bound). Files already
    /// there stay; creating one past the bound fails.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.state).capacity = bytes;
    }

    /// Bytes of all files.
    pub fn used_bytes(&self) -> u64 {
        lock(&self.state).used()
    }

    /// The process dies at its `n`-th next write into a segment (0: the
    /// next one): that write reaches the page cache whole, or with `torn`
    /// only its first `torn % size` bytes; nothing after it does.
    pub fn die_after_writes(&self, n: u64, torn: Option<u64>) {
        let mut d = lock(&self.death);
        d.writes_left = Some(n);
        d.torn = torn;
    }

    /// True once the armed death came.
    pub fn died(&self) -> bool {
        lock(&self.death).dead
    }

    /// A new process: no death armed, writes reach the disk again.
    pub fn restart(&self) {
        *lock(&self.death) = Death::default();
    }

    /// Make the next [`MemDisk::sync`] fail with `fault`.
    pub fn inject(&self, fault: SyncFault) {
        lock(&self.state).fault = Some(fault);
    }

    /// `fdatasync` of `path`, or the fault injected for it.
    pub fn sync(&self, path: &Path) -> Result<(), SyncFault> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        if let Some(fault) = st.fault.take() {
            return Err(fault);
        }
        let entry = st.entry(path).map_err(|_| SyncFault::Open)?;
        lock(&entry.file).sync();
        Ok(())
    }

    /// The power goes: every file keeps what is on the medium plus, of
    /// what was written since its last sync, what `below` picks (see the
    /// module docs); `below(n)` returns a number under `n`. What is left
    /// is what the next start reads.
    pub fn power_cut(&self, below: &mut dyn FnMut(u64) -> u64) {
        let mut st = lock(&self.state);
        // Entries not yet synced: gone, or kept; a replaced file's ghost
        // stands in for it when the new one goes.
        let ghosts = std::mem::take(&mut st.ghosts);
        let unsynced: Vec<PathBuf> = st
            .files
            .iter()
            .filter(|(_, e)| !e.synced)
            .map(|(p, _)| p.clone())
            .collect();
        let mut back = Vec::new();
        let mut keep_new = Vec::new();
        for g in ghosts {
            let replaced = unsynced.contains(&g.path);
            // Replaced: the old file or the new one, never neither.
            let old = below(2) == 0;
            if replaced && !old {
                keep_new.push(g.path);
            } else if replaced || old {
                back.push(g);
            }
        }
        for path in unsynced {
            let replaced = back.iter().any(|g| g.path == path);
            if replaced || (!keep_new.contains(&path) && below(2) == 0) {
                st.files.remove(&path);
            }
        }
        for entry in st.files.values_mut() {
            entry.synced = true;
            let mut f = lock(&entry.file);
            let dirty: Vec<usize> = std::mem::take(&mut f.dirty).into_iter().collect();
            let mut disk = f.durable.clone();
            let torn = (!dirty.is_empty()).then(|| dirty[below(dirty.len() as u64) as usize]);
            for &page in &dirty {
                let r = page_range(page, disk.len());
                if Some(page) == torn {
                    for s in r.clone().step_by(SECTOR_BYTES) {
                        let end = (s + SECTOR_BYTES).min(r.end);
                        if below(2) == 0 {
                            disk[s..end].copy_from_slice(&f.cache[s..end]);
                        }
                    }
                } else if below(2) == 0 {
                    disk[r.clone()].copy_from_slice(&f.cache[r]);
                }
            }
            // Sometimes a few bytes of garbage where a write stopped, past
            // what was synced (a sector the drive did not finish).
            if f.written_end > f.synced_end && below(10) < 3 {
                let at = f.synced_end + below((f.written_end - f.synced_end) as u64) as usize;
                let n = (1 + below(24) as usize).min(disk.len() - at);
                for b in &mut disk[at..at + n] {
                    *b = below(256) as u8;
                }
            }
            let end = f.synced_end;
            f.written_end = end;
            f.durable = disk.clone();
            f.cache = disk;
        }
        for g in back {
            let len = g.durable.len();
            let file = MemFile {
                cache: g.durable.clone(),
                durable: g.durable,
                written_end: len,
                synced_end: len,
                ..MemFile::default()
            };
            st.insert(&g.path, file);
            st.files.get_mut(&g.path).expect("inserted").synced = true;
        }
    }
}

impl Disk for MemDisk {
    fn lock(&self, _root: &Path) -> Result<Option<File>, DirError> {
        Ok(None)
    }

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = lock(&self.state);
        for d in dir.ancestors() {
            st.dirs.insert(d.to_path_buf());
        }
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        if !st.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let under: Vec<PathBuf> = st
            .files
            .keys()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        let anchor = dir.parent().unwrap_or(dir);
        for p in under {
            st.unlink(&p, anchor);
        }
        st.dirs.retain(|d| !d.starts_with(dir));
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let st = lock(&self.state);
        if !st.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let files = st.files.keys().filter(|p| p.parent() == Some(dir));
        let dirs = st.dirs.iter().filter(|d| d.parent() == Some(dir));
        Ok(files.chain(dirs).cloned().collect())
    }

    fn create_segment(&self, path: &Path, bytes: usize) -> io::Result<Box<dyn SegmentFile>> {
        let detached = || MemSegment {
            local: vec![0; bytes],
            shared: Arc::new(Mutex::new(MemFile {
                cache: vec![0; bytes],
                durable: vec![0; bytes],
                ..MemFile::default()
            })),
            death: self.death.clone(),
        };
        if self.died() {
            // A dead process's new file never reaches the disk.
            return Ok(Box::new(detached()));
        }
        let mut st = lock(&self.state);
        if st.files.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists (simulated)", path.display()),
            ));
        }
        if !path.parent().is_some_and(|d| st.dirs.contains(d)) {
            return Err(not_found(path));
        }
        st.room_for(bytes)?;
        let file = MemFile {
            cache: vec![0; bytes],
            durable: vec![0; bytes],
            ..MemFile::default()
        };
        st.insert(path, file);
        let shared = st.files[path].file.clone();
        Ok(Box::new(MemSegment {
            local: vec![0; bytes],
            shared,
            death: self.death.clone(),
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Contents> {
        let st = lock(&self.state);
        let bytes = lock(&st.entry(path)?.file).cache.clone();
        Ok(Box::new(bytes))
    }

    fn read_to_string(&self, path: &Path) -> io::Result<String> {
        let bytes = self.read(path)?;
        String::from_utf8(bytes.as_ref().as_ref().to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    fn write_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        st.room_for(data.len())?;
        st.unlink(path, parent(path));
        let file = MemFile {
            cache: data.to_vec(),
            durable: data.to_vec(),
            written_end: data.len(),
            synced_end: data.len(),
            ..MemFile::default()
        };
        st.insert(path, file);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        let entry = st.files.remove(from).ok_or_else(|| not_found(from))?;
        st.unlink(to, parent(to));
        st.files.insert(
            to.to_path_buf(),
            Entry {
                file: entry.file,
                synced: false,
            },
        );
        Ok(())
    }

    fn copy(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let bytes = self.read(from)?;
        let mut st = lock(&self.state);
        st.room_for(bytes.as_ref().as_ref().len())?;
        st.unlink(to, parent(to));
        let data = bytes.as_ref().as_ref().to_vec();
        let mut file = MemFile {
            durable: vec![0; data.len()],
            cache: data,
            ..MemFile::default()
        };
        let len = file.cache.len();
        file.wrote(0..len);
        st.insert(to, file);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        st.unlink(path, parent(path))
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        self.sync(path)
            .map_err(|f| io::Error::other(format!("{}: {f:?} (simulated)", path.display())))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.died() {
            return Ok(());
        }
        let mut st = lock(&self.state);
        for (p, e) in st.files.iter_mut() {
            if p.parent() == Some(dir) {
                e.synced = true;
            }
        }
        st.ghosts.retain(|g| g.anchor != dir);
        Ok(())
    }
}

/// A segment in memory: its own bytes to hand out as a slice, each write
/// copied to the disk's page cache.
struct MemSegment {
    local: Vec<u8>,
    shared: Arc<Mutex<MemFile>>,
    death: Arc<Mutex<Death>>,
}

impl fmt::Debug for MemSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSegment")
            .field("len", &self.local.len())
            .finish()
    }
}

impl SegmentFile for MemSegment {
    fn bytes(&self) -> &[u8] {
        &self.local
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.local
    }

    fn wrote(&mut self, range: Range<usize>) {
        let n = lock(&self.death).admit(range.len());
        let range = range.start..range.start + n;
        let mut f = lock(&self.shared);
        f.cache[range.clone()].copy_from_slice(&self.local[range.clone()]);
        f.wrote(range);
    }

    fn sync(&self) -> io::Result<()> {
        if !lock(&self.death).dead {
            lock(&self.shared).sync();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut s = seed;
        move |n| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n
        }
    }

    fn write(seg: &mut dyn SegmentFile, at: usize, data: &[u8]) {
        seg.bytes_mut()[at..at + data.len()].copy_from_slice(data);
        seg.wrote(at..at + data.len());
    }

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_may_lose_the_rest() {
        let dir = Path::new("/d");
        for seed in 1..200 {
            let disk = MemDisk::new();
            disk.create_dir_all(dir).unwrap();
            disk.sync_dir(dir).unwrap();
            let path = dir.join("a");
            let mut seg = disk.create_segment(&path, 3 * PAGE_BYTES).unwrap();
            disk.sync_dir(dir).unwrap();
            write(seg.as_mut(), 0, &[1; 5000]);
            disk.sync(&path).unwrap();
            write(seg.as_mut(), 5000, &[2; 5000]);
            drop(seg);
            // A kill keeps everything written.
            assert_eq!(
                &disk.read(&path).unwrap().as_ref().as_ref()[..10000][9999..],
                &[2]
            );
            disk.power_cut(&mut rng(seed));
            let after = disk.read(&path).unwrap();
            let bytes = after.as_ref().as_ref();
            assert!(bytes[..5000].iter().all(|&b| b == 1), "seed {seed}");
            // Garbage, if any, starts before the written end.
            assert!(bytes[10024..].iter().all(|&b| b == 0), "seed {seed}");
        }
    }

    #[test]
    fn an_entry_not_synced_may_go_and_a_rename_is_atomic() {
        let dir = Path::new("/d");
        let (mut gone, mut old) = (0, 0);
        for seed in 1..200 {
            let disk = MemDisk::new();
            disk.create_dir_all(dir).unwrap();
            disk.write_synced(&dir.join("CURRENT"), b"1").unwrap();
            disk.sync_dir(dir).unwrap();
            drop(disk.create_segment(&dir.join("new"), 10).unwrap());
            disk.write_synced(&dir.join("tmp"), b"2").unwrap();
            disk.rename(&dir.join("tmp"), &dir.join("CURRENT")).unwrap();
            disk.power_cut(&mut rng(seed));
            let current = disk.read_to_string(&dir.join("CURRENT")).unwrap();
            assert!(current == "1" || current == "2");
            old += usize::from(current == "1");
            gone += usize::from(disk.read(&dir.join("new")).is_err());
            assert!(disk.read(&dir.join("tmp")).is_err());
        }
        assert!(gone > 0 && gone < 199 && old > 0 && old < 199);
    }

    #[test]
    fn a_process_that_dies_mid_write_leaves_what_came_before_and_a_torn_tail() {
        let dir = Path::new("/d");
        let disk = MemDisk::new();
        disk.create_dir_all(dir).unwrap();
        let path = dir.join("a");
        let mut seg = disk.create_segment(&path, 100).unwrap();
        disk.die_after_writes(1, Some(3));
        write(seg.as_mut(), 0, &[1; 10]);
        assert!(!disk.died());
        write(seg.as_mut(), 10, &[2; 10]);
        assert!(disk.died());
        write(seg.as_mut(), 20, &[3; 10]);
        disk.remove_file(&path).unwrap();
        let bytes = disk.read(&path).unwrap();
        let bytes = bytes.as_ref().as_ref();
        assert_eq!(&bytes[..10], &[1; 10]);
        assert_eq!(&bytes[10..13], &[2; 3]);
        assert!(bytes[13..].iter().all(|&b| b == 0));
        disk.restart();
        write(seg.as_mut(), 30, &[4; 10]);
        assert_eq!(disk.read(&path).unwrap().as_ref().as_ref()[30], 4);
    }

    #[test]
    fn a_file_past_the_capacity_is_refused_and_faults_hit_the_next_sync() {
        let dir = Path::new("/d");
        let disk = MemDisk::new();
        disk.create_dir_all(dir).unwrap();
        disk.set_capacity(Some(100));
        assert!(disk.create_segment(&dir.join("a"), 60).is_ok());
        let full = disk.create_segment(&dir.join("b"), 60).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::StorageFull);
        disk.set_capacity(None);
        assert!(disk.create_segment(&dir.join("b"), 60).is_ok());
        disk.inject(SyncFault::Open);
        assert_eq!(disk.sync(&dir.join("a")), Err(SyncFault::Open));
        assert_eq!(disk.sync(&dir.join("a")), Ok(()));
        assert_eq!(disk.sync(&dir.join("c")), Err(SyncFault::Open));
    }
}
