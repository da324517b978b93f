//! Training examples: documents tokenized, packed into fixed windows (or kept one per line),
//! mixed across sources by weight, in an order that depends only on the seed and a small cursor
//! (so a resumed run sees exactly the examples an uninterrupted one would).

use std::path::{Path, PathBuf};

use llama_pro_core::Tokenizer;
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{DataSource, PackMode};
use crate::data::{existing, read_sequences};
use crate::error::{Result, TrainError};
use crate::sft::{ChatFormat, Encoder};
use crate::trainer::{Event, Observer};

/// One training example: a row of token ids, which of them are trained, and the documents it
/// holds when several are packed into it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per token: is it a target of the loss (predicted from the token before it). `None`: every
    /// token (pretraining).
    pub targets: Option<Vec<bool>>,
    /// Lengths of the documents packed in this example, in order (they sum to `ids.len()`); empty
    /// for one document. Attention stays within a document and positions restart in each.
    pub docs: Vec<usize>,
}

impl Example {
    /// A pretraining example: every token trained, one document.
    pub fn text(ids: Vec<u32>) -> Self {
        Self {
            ids,
            targets: None,
            docs: vec![],
        }
    }

    /// Tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether token `t` is a target: trained, and not the first token of a document.
    pub fn is_target(&self, t: usize) -> bool {
        if t == 0 || t >= self.ids.len() {
            return false;
        }
        if self.docs.len() > 1 {
            let mut start = 0;
            for &d in &self.docs {
                if start == t {
                    return false;
                }
                start += d;
                if start > t {
                    break;
                }
            }
        }
        self.targets.as_ref().is_none_or(|m| m[t])
    }

    /// Number of tokens the loss covers.
    pub fn num_targets(&self) -> usize {
        (1..self.ids.len()).filter(|&t| self.is_target(t)).count()
    }
}

/// Pack examples into rows of at most `seq_len` tokens, whole examples only, by best fit in
/// order of decreasing length (each example goes to the fullest row it fits in, as
/// LLaMA-Factory's knapsack for `neat_packing` does); ties keep the input order, so the result
/// depends only on the input. O(n log n): rows are indexed by their free space.
pub fn pack_neat(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    // Free space → rows with that much room (the lowest index first).
    let mut by_room: std::collections::BTreeMap<usize, std::collections::BTreeSet<usize>> =
        Default::default();
    for i in order {
        let n = examples[i].len();
        let fit = by_room
            .range(n..)
            .next()
            .and_then(|(&room, rows)| Some((room, *rows.first()?)));
        let b = match fit {
            Some((room, b)) => {
                let rows = by_room.get_mut(&room).expect("the row was just found here");
                rows.remove(&b);
                if rows.is_empty() {
                    by_room.remove(&room);
                }
                bins[b].0 += n;
                bins[b].1.push(i);
                b
            }
            None => {
                bins.push((n, vec![i]));
                bins.len() - 1
            }
        };
        let room = seq_len.saturating_sub(bins[b].0);
        if room > 0 {
            by_room.entry(room).or_default().insert(b);
        }
    }
    bins.into_iter()
        .map(|(_, items)| {
            let mut row = Example::default();
            let any_targets = items.iter().any(|&i| examples[i].targets.is_some());
            let mut targets = Vec::new();
            for i in items {
                let e = &examples[i];
                row.ids.extend_from_slice(&e.ids);
                match &e.targets {
                    Some(t) => targets.extend_from_slice(t),
                    None => targets.extend(std::iter::repeat_n(true, e.len())),
                }
                if e.docs.is_empty() {
                    row.docs.push(e.len());
                } else {
                    row.docs.extend_from_slice(&e.docs);
                }
            }
            if any_targets {
                row.targets = Some(targets);
            }
            if row.docs.len() == 1 {
                row.docs.clear();
            }
            row
        })
        .collect()
}

/// Join examples into one stream and cut it into rows of exactly `seq_len` tokens (the last
/// partial row is dropped unless it is the only one); attention crosses the joins.
pub fn pack_concat(examples: Vec<Example>, seq_len: usize) -> Vec<Example> {
    let any_targets = examples.iter().any(|e| e.targets.is_some());
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for e in examples {
        targets.extend(match e.targets {
            Some(t) => t,
            None => vec![true; e.ids.len()],
        });
        ids.extend(e.ids);
    }
    let mut rows: Vec<Example> = ids
        .chunks_exact(seq_len)
        .zip(targets.chunks_exact(seq_len))
        .map(|(i, t)| Example {
            ids: i.to_vec(),
            targets: any_targets.then(|| t.to_vec()),
            docs: vec![],
        })
        .collect();
    if rows.is_empty() {
        rows.push(Example {
            ids,
            targets: any_targets.then_some(targets),
            docs: vec![],
        });
    }
    rows
}

/// One training source: its windows and mixture weight.
#[derive(Debug, Clone)]
pub struct Source {
    /// File name (for logs).
    pub path: PathBuf,
    /// Relative sampling weight.
    pub weight: f64,
    /// Size and SHA-256 of the file.
    pub digest: crate::data::FileDigest,
    /// Training examples (at most `seq_len` tokens each).
    pub windows: Vec<Example>,
}

/// How instruction files are read for supervised fine-tuning.
#[derive(Debug, Clone, Copy)]
pub struct ChatData<'a> {
    /// The model's template and tokenizer (`None`: only pre-tokenized lines can be read).
    pub encoder: Option<&'a Encoder<'a>>,
    /// The files' format.
    pub format: ChatFormat,
    /// Why there is no encoder (for the error at the first conversation).
    pub missing: &'a str,
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
    /// How examples fill rows ([`PackMode::Neat`] packing happens after the validation split,
    /// in [`pack_neat`]: here each document stays an example of its own).
    pub packing: PackMode,
    /// Supervised fine-tuning: how instruction files are read.
    pub chat: Option<ChatData<'a>>,
    /// The separator when packing.
    pub eos: Option<u32>,
    /// The token cache directory, if caching.
    pub cache: Option<&'a Path>,
}

/// Read a source. Text: every document tokenized; with [`PackMode::Concat`], documents joined
/// with `eos` between them and cut into windows of exactly `seq_len` tokens (a last partial
/// window is dropped unless it is the only one); with [`PackMode::Neat`], each document with its
/// `eos` an example (longer ones cut into `seq_len` pieces), packed later by [`pack_neat`]; with
/// [`PackMode::None`], one window per document, truncated to `seq_len`. Documents are read
/// through the token cache when `ctx.cache` is set (see
/// [`read_documents_cached`](crate::data::read_documents_cached)). Supervised fine-tuning
/// (`ctx.chat`): conversations encoded with their labels ([`crate::sft::load_examples`]), joined
/// and cut with `Concat`, else one example each.
pub fn load_source(
    source: &DataSource,
    ctx: &DataContext<'_>,
    observer: &mut dyn Observer,
) -> Result<Source> {
    let path = existing(&source.path)?;
    let digest = crate::data::file_digest(&path)?;
    if let Some(chat) = ctx.chat {
        let (encoded, stats) = crate::sft::load_examples(
            &path,
            chat.format,
            chat.encoder,
            chat.missing,
            ctx.vocab_size,
            ctx.seq_len,
        )?;
        observer.on_event(&Event::Info(&format!(
            "{}: {} conversations, {} tokens of which {} trained ({:.0}%); {} cut at seq_len {}, {} dropped (no trained token left)",
            path.display(),
            stats.kept,
            stats.tokens,
            stats.trained_tokens,
            100.0 * stats.trained_tokens as f64 / stats.tokens.max(1) as f64,
            stats.truncated,
            ctx.seq_len,
            stats.dropped
        )));
        let examples: Vec<Example> = encoded
            .into_iter()
            .map(|e| Example {
                targets: Some(e.targets()),
                ids: e.input_ids,
                docs: vec![],
            })
            .collect();
        let windows = match ctx.packing {
            PackMode::Concat => pack_concat(examples, ctx.seq_len),
            PackMode::None | PackMode::Neat => examples,
        };
        return Ok(Source {
            path,
            weight: source.weight,
            digest,
            windows,
        });
    }
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
    let windows = if ctx.packing == PackMode::Neat {
        // Each document with its EOS is an example; longer ones are cut into seq_len pieces.
        let mut w = Vec::new();
        for mut d in docs {
            if let Some(e) = ctx.eos {
                d.push(e);
            }
            w.extend(d.chunks(seq_len).map(<[u32]>::to_vec));
        }
        w
    } else if ctx.packing == PackMode::Concat {
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
        docs.iter_mut().for_each(|d| d.truncate(seq_len));
        docs
    };
    let windows: Vec<Example> = windows
        .into_iter()
        .filter(|w| w.len() >= 2)
        .map(Example::text)
        .collect();
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
) -> (Vec<Example>, Vec<usize>) {
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
    pub fn next_example(&mut self) -> Example {
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
    pub fn next_batch(&mut self, n: usize) -> Vec<Example> {
        (0..n).map(|_| self.next_example()).collect()
    }
}
