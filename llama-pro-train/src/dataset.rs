//! Training examples: documents tokenized, packed into fixed windows (or kept one per line),
//! mixed across sources by weight, in an order that depends only on the seed and a small cursor
//! (so a resumed run sees exactly the examples an uninterrupted one would).

use std::path::{Path, PathBuf};

use llama_pro_core::Tokenizer;
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::DataSource;
use crate::data::{existing, read_sequences};
use crate::error::{Result, TrainError};
use crate::trainer::Observer;

/// One training source: its windows and mixture weight.
#[derive(Debug, Clone)]
pub struct Source {
    /// File name (for logs).
    pub path: PathBuf,
    /// Relative sampling weight.
    pub weight: f64,
    /// Size and SHA-256 of the file.
    pub digest: crate::data::FileDigest,
    /// Training examples (token ids, at most `seq_len` long).
    pub windows: Vec<Vec<u32>>,
}

/// How data files become training examples for one model.
#[derive(Debug, Clone, Copy)]
pub struct DataContext<'a> {
    /// The model's tokenizer (text lines need one; `input_ids` lines do not).
    pub tokenizer: Option<&'a Tokenizer>,
    /// Its `tokenizer.json` (part of the token cache's key).
    pub tokenizer_file: Option<&'a Path>,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Pack documents into full windows (EOS between them) instead of one per line.
    pub packing: bool,
    /// The separator when packing.
    pub eos: Option<u32>,
    /// The token cache directory, if caching.
    pub cache: Option<&'a Path>,
}

/// Read a source: every document tokenized; with `packing`, documents joined with `eos` between
/// them and cut into windows of exactly `seq_len` tokens (a last partial window is dropped unless
/// it is the only one), else one window per document, truncated to `seq_len`.
/// Documents are read through the token cache when `ctx.cache` is set (see
/// [`read_documents_cached`](crate::data::read_documents_cached)).
pub fn load_source(
    source: &DataSource,
    ctx: &DataContext<'_>,
    observer: &mut dyn Observer,
) -> Result<Source> {
    let path = existing(&source.path)?;
    let digest = crate::data::file_digest(&path)?;
    let mut docs = match ctx.cache {
        Some(dir) => crate::data::read_documents_cached_as(
            &path,
            &digest,
            ctx.tokenizer,
            ctx.tokenizer_file,
            ctx.vocab_size,
            dir,
            observer,
        )?,
        None => read_sequences(&path, ctx.tokenizer, ctx.vocab_size, usize::MAX)?,
    };
    let seq_len = ctx.seq_len;
    if !ctx.packing {
        docs.iter_mut().for_each(|d| d.truncate(seq_len));
    }
    let windows = if ctx.packing {
        let mut stream: Vec<u32> = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
        for d in docs {
            stream.extend_from_slice(&d);
            if let Some(e) = ctx.eos {
                stream.push(e);
            }
        }
        let mut w: Vec<Vec<u32>> = stream.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
        if w.is_empty() {
            w.push(stream);
        }
        w
    } else {
        docs
    };
    let windows: Vec<Vec<u32>> = windows.into_iter().filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(TrainError::Data {
            path,
            line: 0,
            message: "no training example with at least 2 tokens".into(),
        });
    }
    Ok(Source {
        path,
        weight: source.weight,
        digest,
        windows,
    })
}

/// Move `⌊fraction · n⌋` of each source's `n` windows into a validation set, after a seeded
/// shuffle: a source too small to give one window (fewer than `1 / fraction`) keeps all of its
/// windows for training. Returns the held-out windows and, per source, how many were taken.
pub fn split_validation(
    sources: &mut [Source],
    fraction: f64,
    seed: u64,
) -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut val = Vec::new();
    let mut taken = Vec::new();
    for (i, s) in sources.iter_mut().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0xA5A5_0000 + i as u64));
        s.windows.shuffle(&mut rng);
        let n = s.windows.len();
        let k = (n as f64 * fraction.max(0.0)).floor() as usize;
        if k == 0 || k >= n {
            taken.push(0);
            continue;
        }
        val.extend(s.windows.split_off(n - k));
        taken.push(k);
    }
    (val, taken)
}

/// Where the example stream is: restoring it restores the exact order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Examples drawn so far.
    pub drawn: u64,
    /// Per source: examples drawn from it so far.
    pub per_source: Vec<u64>,
}

/// A deterministic, resumable stream of training examples over weighted sources.
pub struct ExampleStream {
    sources: Vec<Source>,
    seed: u64,
    cursor: DataCursor,
    /// Cached permutation of (source, epoch).
    perms: Vec<Option<(u64, Vec<usize>)>>,
}

impl ExampleStream {
    /// A stream starting at the beginning.
    pub fn new(sources: Vec<Source>, seed: u64) -> Self {
        let n = sources.len();
        Self {
            sources,
            seed,
            cursor: DataCursor {
                drawn: 0,
                per_source: vec![0; n],
            },
            perms: vec![None; n],
        }
    }

    /// Total windows over all sources.
    pub fn len(&self) -> usize {
        self.sources.iter().map(|s| s.windows.len()).sum()
    }

    /// True when there is no window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Current position.
    pub fn cursor(&self) -> &DataCursor {
        &self.cursor
    }

    /// Continue from a saved position.
    pub fn restore(&mut self, cursor: DataCursor) -> Result<()> {
        if cursor.per_source.len() != self.sources.len() {
            return Err(TrainError::Invalid(format!(
                "the checkpoint's data cursor has {} sources, this run has {}: resume with the same data files",
                cursor.per_source.len(),
                self.sources.len()
            )));
        }
        self.cursor = cursor;
        Ok(())
    }

    /// The next example: the source is drawn by weight with an RNG seeded by (seed, example
    /// number); within a source, windows come in a seeded permutation per pass.
    pub fn next_example(&mut self) -> Vec<u32> {
        let k = self.cursor.drawn;
        let s = if self.sources.len() == 1 {
            0
        } else {
            let total: f64 = self.sources.iter().map(|s| s.weight).sum();
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k);
            let mut u = rng.random::<f64>() * total;
            let mut pick = self.sources.len() - 1;
            for (i, src) in self.sources.iter().enumerate() {
                if u < src.weight {
                    pick = i;
                    break;
                }
                u -= src.weight;
            }
            pick
        };
        let n = self.sources[s].windows.len();
        let idx = self.cursor.per_source[s];
        let (epoch, pos) = (idx / n as u64, (idx % n as u64) as usize);
        let stale = !matches!(&self.perms[s], Some((e, _)) if *e == epoch);
        if stale {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ ((s as u64) << 32) ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            perm.shuffle(&mut rng);
            self.perms[s] = Some((epoch, perm));
        }
        let w = match &self.perms[s] {
            Some((_, perm)) => self.sources[s].windows[perm[pos]].clone(),
            None => unreachable!("permutation was just built"),
        };
        self.cursor.drawn += 1;
        self.cursor.per_source[s] += 1;
        w
    }

    /// The next `n` examples.
    pub fn next_batch(&mut self, n: usize) -> Vec<Vec<u32>> {
        (0..n).map(|_| self.next_example()).collect()
    }
}
