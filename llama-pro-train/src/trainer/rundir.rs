//! The output directory of a run: held exclusively while the run writes to it, refused to a
//! fresh run when it holds an earlier one (unless overwriting), cleaned of the temporary files
//! that interrupted writes left.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use llama_pro_core::save::remove_stale_temps;

use crate::error::{Result, TrainError};

/// What a run writes into its output directory (an earlier run is recognised by them).
pub const RUN_FILES: [&str; 6] = [
    "checkpoints",
    "model",
    "metrics.jsonl",
    "report.json",
    "loss.png",
    "train.toml",
];

/// The lock file (holds the PID of the process that owns the directory).
pub const LOCK_FILE: &str = ".llama-pro.lock";

/// A run's output directory, owned by this process until dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// The entries of an earlier run in `dir` (empty when there is none, or no `dir`);
    /// `checkpoints/` counts when it holds a checkpoint (not only temporary files).
    pub fn earlier_run(dir: &Path) -> Vec<&'static str> {
        let has_checkpoint = |p: &Path| {
            std::fs::read_dir(p).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
        };
        RUN_FILES
            .into_iter()
            .filter(|f| match *f {
                "checkpoints" => has_checkpoint(&dir.join(f)),
                _ => dir.join(f).exists(),
            })
            .collect()
    }

    /// The error for a fresh run into `dir` when it holds an earlier run.
    pub fn refuse_fresh(dir: &Path) -> Result<()> {
        let found = Self::earlier_run(dir);
        if found.is_empty() {
            return Ok(());
        }
        Err(TrainError::setting(
            "output",
            format!(
                "{} holds an earlier run ({}): continue it with resume, replace it with overwrite, \
                 or choose another output directory",
                dir.display(),
                found.join(", ")
            ),
        ))
    }

    /// Take `dir` for a run: create it, lock it (an error if another process holds it), remove
    /// the temporary files that dead processes left in it and in `checkpoints/`; for a fresh run,
    /// refuse an earlier run in it, or with `overwrite` remove that run's files. Returns the
    /// paths it removed.
    pub fn claim(dir: &Path, fresh: bool, overwrite: bool) -> Result<(Self, Vec<PathBuf>)> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| TrainError::io(&lock_path, e))?;
        if lock.try_lock().is_err() {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            return Err(TrainError::setting(
                "output",
                format!(
                    "{} is in use by another llama-pro run (process {}); wait for it to finish or \
                     choose another output directory",
                    dir.display(),
                    holder.trim()
                ),
            ));
        }
        let io = |e| TrainError::io(&lock_path, e);
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        write!(lock, "{}", std::process::id()).map_err(io)?;
        let mut removed = remove_stale_temps(dir, None);
        removed.extend(remove_stale_temps(&dir.join("checkpoints"), None));
        if fresh {
            if overwrite {
                for f in Self::earlier_run(dir) {
                    let p = dir.join(f);
                    let r = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    r.map_err(|e| TrainError::io(&p, e))?;
                    removed.push(p);
                }
            } else {
                Self::refuse_fresh(dir)?;
            }
        }
        Ok((
            Self {
                path: dir.to_path_buf(),
                _lock: lock,
            },
            removed,
        ))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
