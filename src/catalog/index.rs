//! The search index over a catalog's pullable names: an `fst` map from every name and every
//! last component of a dotted name (`xev` for `xorg.xev`) to the packages it names, walked by
//! prefix for exact and prefix matches and by a Levenshtein automaton (`levenshtein_automata`)
//! for typos; and `nucleo-matcher`'s fzf-style scoring for subsequence matches (`shck` finds
//! `shellcheck`), over names laid out in one array and filtered by their characters first.
//!
//! Why these: the fst is a few bytes per name and finds every key within an edit distance of a
//! query by walking only the prefixes that can still match, so "did you mean" takes a third of
//! a millisecond on 120,000 names where comparing the query with each name (strsim) takes 90
//! (BENCHMARKS.md measures both). fst's own Levenshtein automaton takes up to
//! 20 ms to build for a long query at distance 2; `levenshtein_automata` (tantivy's) builds the
//! same automaton from a precomputed parametric one in well under a millisecond and plugs into
//! fst through its `fst_automaton` feature. Subsequence search is what people expect from a
//! package search box, and nucleo-matcher is the fast, maintained implementation of fzf's
//! scoring. tantivy would bring a full-text engine, on-disk segments and a schema for what
//! is a few hundred thousand short names.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::LazyLock;

use fst::{IntoStreamer, Streamer};
use levenshtein_automata::{Distance, LevenshteinAutomatonBuilder};
use nucleo_matcher::pattern::{AtomKind, CaseMatching, Normalization, Pattern};
use nucleo_matcher::{Matcher, Utf32Str};

use super::Package;

/// Most suggestions for one missing name.
pub const MAX_SUGGESTIONS: usize = 3;

/// Most results of one search, whatever the caller asks: keeps a search's cost bounded.
pub const MAX_RESULTS: usize = 1000;

/// Queries up to this many bytes are matched with typos at edit distance 2; longer ones at 1,
/// so the automaton stays small (its states grow with the query: about 68 per byte at
/// distance 2, 1 KiB each).
const LONG_QUERY: usize = 48;

/// The automaton builders, one per edit distance (a transposition counts as one edit, so
/// `ndoejs` is one edit from `nodejs`). Building them takes about a millisecond, once per
/// process.
static LEVENSHTEIN: LazyLock<[LevenshteinAutomatonBuilder; 2]> = LazyLock::new(|| {
    [
        LevenshteinAutomatonBuilder::new(1, true),
        LevenshteinAutomatonBuilder::new(2, true),
    ]
});

/// How far a name may be from `query` (normalized, `len` bytes) to be called close: nothing
/// for one or two characters (everything short is a typo of them), one edit up to five, two
/// beyond (one past [`LONG_QUERY`]).
fn max_distance(len: usize) -> u8 {
    match len {
        0..=2 => 0,
        3..=5 => 1,
        6..=LONG_QUERY => 2,
        _ => 1,
    }
}

/// The index of a catalog whose packages are sorted by pullable name; package ids are indices
/// into that list.
pub struct Index {
    /// Key → `start << 32 | count`, a range of `postings`.
    keys: fst::Map<Vec<u8>>,
    /// Per key, [`Posting`]s: the package whose full name it is first, then those whose last
    /// component it is, fewer components first.
    postings: Vec<u32>,
    fuzzy: Fuzzy,
}

/// Package ids fit in a posting's 24 bits.
const _: () = assert!(super::MAX_PACKAGES < 1 << 24);

/// How a key names a package: its whole name, or the last component of a dotted name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Name = 0,
    Last = 1,
}

/// A package under a key, in 32 bits so ranking never touches the packages themselves: the id
/// (24 bits), the number of dots in its name (7 bits) and the [`Kind`] (1 bit).
fn posting(id: u32, kind: Kind, depth: usize) -> u32 {
    id | (depth.min(127) as u32) << 24 | (kind as u32) << 31
}

/// One package found, with what orders it among others of its tier: closer (a shorter key, a
/// smaller distance, a better score), then the whole name before a last component, then fewer
/// components, then by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Hit {
    closeness: usize,
    kind: Kind,
    depth: u32,
    id: u32,
}

impl Hit {
    fn new(posting: u32, closeness: usize) -> Hit {
        Hit {
            closeness,
            kind: if posting >> 31 == 1 {
                Kind::Last
            } else {
                Kind::Name
            },
            depth: posting >> 24 & 0x7f,
            id: posting & 0xff_ffff,
        }
    }
}

/// Keys that start with `prefix`, are longer than it and have at most `max_len` bytes.
struct PrefixUpTo<'a> {
    prefix: &'a [u8],
    max_len: usize,
}

impl fst::Automaton for PrefixUpTo<'_> {
    /// Bytes read so far; `None` once the key cannot match.
    type State = Option<usize>;

    fn start(&self) -> Option<usize> {
        Some(0)
    }

    fn is_match(&self, read: &Option<usize>) -> bool {
        read.is_some_and(|n| n > self.prefix.len())
    }

    fn can_match(&self, read: &Option<usize>) -> bool {
        read.is_some()
    }

    fn accept(&self, read: &Option<usize>, byte: u8) -> Option<usize> {
        let n = (*read)?;
        if n >= self.max_len {
            return None;
        }
        match self.prefix.get(n) {
            Some(&wanted) if wanted != byte => None,
            _ => Some(n + 1),
        }
    }
}

/// Most names the subsequence tier scores for one query, shortest names first: a query of
/// common letters (`al ke`) is a subsequence of tens of thousands of names, and scoring them
/// all would take 10 ms; among the shortest few thousand are the best matches in practice.
const MAX_SCORED: usize = 2_500;

/// Every name again, shortest first, laid out for one sequential scan: what subsequence search
/// reads.
struct Fuzzy {
    ids: Vec<u32>,
    /// The characters each name has ([`char_mask`]).
    masks: Vec<u64>,
    /// The names, one after another.
    names: Vec<u8>,
    /// Where each name ends in `names`.
    ends: Vec<u32>,
}

/// One bit per character a name can have (`a`–`z`, `0`–`9`, `.`, `_`, `-`), one for any other:
/// a name that lacks one of the query's characters is passed over in a nanosecond.
fn char_mask(text: &[u8]) -> u64 {
    text.iter().fold(0, |mask, &b| {
        let bit = match b {
            b'a'..=b'z' => b - b'a',
            b'0'..=b'9' => 26 + b - b'0',
            b'.' => 36,
            b'_' => 37,
            b'-' => 38,
            _ => 39,
        };
        mask | 1 << bit
    })
}

/// Whether `needle`'s bytes appear in `haystack` in order.
fn is_subsequence(needle: &[u8], haystack: &[u8]) -> bool {
    let mut rest = haystack.iter();
    needle.iter().all(|b| rest.any(|h| h == b))
}

impl Fuzzy {
    fn build(packages: &[Package]) -> Fuzzy {
        let mut order: Vec<u32> = (0..packages.len() as u32).collect();
        order.sort_by_key(|&id| packages.get(id as usize).map_or(0, |p| p.name.len()));
        let mut fuzzy = Fuzzy {
            ids: Vec::with_capacity(order.len()),
            masks: Vec::with_capacity(order.len()),
            names: Vec::with_capacity(packages.iter().map(|p| p.name.len()).sum()),
            ends: Vec::with_capacity(order.len()),
        };
        for id in order {
            let Some(package) = packages.get(id as usize) else {
                continue;
            };
            fuzzy.ids.push(id);
            fuzzy.masks.push(char_mask(package.name.as_bytes()));
            fuzzy.names.extend_from_slice(package.name.as_bytes());
            fuzzy.ends.push(fuzzy.names.len() as u32);
        }
        fuzzy
    }

    fn heap_bytes(&self) -> usize {
        self.ids.capacity() * 4
            + self.masks.capacity() * 8
            + self.names.capacity()
            + self.ends.capacity() * 4
    }

    /// The best `wanted` packages (not in `seen`) whose name has each word of `query` as a
    /// subsequence, by nucleo's score, then shorter names; at most [`MAX_SCORED`] scored.
    fn search(&self, query: &str, wanted: usize, seen: &HashSet<u32>) -> Vec<Hit> {
        let words: Vec<&[u8]> = query.split_whitespace().map(str::as_bytes).collect();
        if words.is_empty() || wanted == 0 {
            return Vec::new();
        }
        let needed = words.iter().fold(0, |mask, w| mask | char_mask(w));
        let pattern = Pattern::new(
            query,
            CaseMatching::Respect,
            Normalization::Never,
            AtomKind::Fuzzy,
        );
        let mut matcher = Matcher::default();
        // The worst kept so far on top: a higher score, then an earlier (shorter) name, is better.
        let mut kept: BinaryHeap<Reverse<(u32, Reverse<usize>)>> =
            BinaryHeap::with_capacity(wanted + 1);
        let mut scored = 0;
        let mut start = 0;
        for (i, (&mask, &end)) in self.masks.iter().zip(&self.ends).enumerate() {
            let end = end as usize;
            let name = self.names.get(start..end).unwrap_or_default();
            start = end;
            if mask & needed != needed || !words.iter().all(|w| is_subsequence(w, name)) {
                continue;
            }
            if self.ids.get(i).is_none_or(|id| seen.contains(id)) {
                continue;
            }
            // Names are ASCII (the image name grammar).
            let Some(score) = pattern.score(Utf32Str::Ascii(name), &mut matcher) else {
                continue;
            };
            kept.push(Reverse((score, Reverse(i))));
            if kept.len() > wanted {
                kept.pop();
            }
            scored += 1;
            if scored == MAX_SCORED {
                break;
            }
        }
        let mut kept = kept.into_vec();
        kept.sort_unstable();
        kept.into_iter()
            .enumerate()
            .filter_map(|(rank, Reverse((_, Reverse(i))))| {
                Some(Hit {
                    closeness: rank,
                    kind: Kind::Name,
                    depth: 0,
                    id: *self.ids.get(i)?,
                })
            })
            .collect()
    }
}

impl Index {
    /// Builds the index of `packages`, sorted by name with no name twice.
    pub fn build(packages: &[Package]) -> Index {
        let mut entries: Vec<(&str, u32)> = Vec::with_capacity(packages.len() * 2);
        for (id, package) in packages.iter().enumerate() {
            let id = id as u32;
            let depth = package.name.matches('.').count();
            entries.push((&package.name, posting(id, Kind::Name, depth)));
            if let Some((_, last)) = package.name.rsplit_once('.') {
                entries.push((last, posting(id, Kind::Last, depth)));
            }
        }
        // By key, then by posting: the whole name first, fewer dots first, then by name.
        entries.sort_unstable();

        let mut builder = fst::MapBuilder::memory();
        let mut postings = Vec::with_capacity(entries.len());
        let mut start = 0;
        while start < entries.len() {
            let key = entries[start].0;
            let end = start + entries[start..].partition_point(|e| e.0 == key);
            let first = postings.len() as u64;
            postings.extend(entries[start..end].iter().map(|e| e.1));
            // Keys come sorted and distinct, the only conditions insert has.
            if let Err(e) = builder.insert(key, first << 32 | (end - start) as u64) {
                tracing::error!(key, error = %e, "catalog index: key refused");
            }
            start = end;
        }
        let keys = builder
            .into_inner()
            .ok()
            .and_then(|bytes| fst::Map::new(bytes).ok())
            .unwrap_or_default();
        Index {
            keys,
            postings,
            fuzzy: Fuzzy::build(packages),
        }
    }

    /// Bytes of heap the index holds.
    pub fn heap_bytes(&self) -> usize {
        self.keys.as_fst().as_bytes().len() + self.postings.capacity() * 4 + self.fuzzy.heap_bytes()
    }

    /// The hits of a key's `value` (as stored in the map) at `closeness`.
    fn hits(&self, value: u64, closeness: usize) -> impl Iterator<Item = Hit> + '_ {
        let start = (value >> 32) as usize;
        let count = (value & 0xffff_ffff) as usize;
        self.postings
            .get(start..start + count)
            .unwrap_or_default()
            .iter()
            .map(move |&p| Hit::new(p, closeness))
    }

    /// Packages named `query` (normalized) exactly, or whose last component it is.
    fn exact(&self, query: &str) -> Vec<Hit> {
        match self.keys.get(query) {
            Some(value) => self.hits(value, 0).collect(),
            None => Vec::new(),
        }
    }

    /// The best `limit` packages whose name or last component starts with `query` and is longer,
    /// shorter keys first. Keys are read up to a length that doubles until `limit` are found,
    /// so `p` reads the few hundred short keys that start with it, not all 30,000.
    fn prefixed(&self, query: &str, limit: usize) -> Vec<Hit> {
        let mut max_len = query.len() + 2;
        loop {
            let automaton = PrefixUpTo {
                prefix: query.as_bytes(),
                max_len,
            };
            let mut stream = self.keys.search(automaton).into_stream();
            let mut hits = Vec::new();
            while let Some((key, value)) = stream.next() {
                hits.extend(self.hits(value, key.len()));
            }
            hits.sort_unstable();
            let mut seen = HashSet::new();
            hits.retain(|hit| seen.insert(hit.id));
            if hits.len() >= limit || max_len >= crate::image::MAX_NAME_LEN {
                hits.truncate(limit);
                return hits;
            }
            max_len *= 2;
        }
    }

    /// Packages whose name or last component is within [`max_distance`] edits of `query`
    /// (normalized), the closest first; exact matches included.
    fn typos(&self, query: &str) -> Vec<Hit> {
        let distance = max_distance(query.len());
        if distance == 0 {
            return Vec::new();
        }
        let dfa = LEVENSHTEIN[usize::from(distance) - 1].build_dfa(query);
        let mut stream = self.keys.search_with_state(&dfa).into_stream();
        let mut hits = Vec::new();
        while let Some((_, value, state)) = stream.next() {
            if let Distance::Exact(d) = dfa.distance(state) {
                hits.extend(self.hits(value, usize::from(d)));
            }
        }
        hits.sort_unstable();
        hits
    }

    /// Search: exact, then prefix, then fuzzy (typos, then subsequences by score); best first.
    pub fn search<'a>(
        &self,
        packages: &'a [Package],
        query: &str,
        limit: usize,
    ) -> Vec<&'a Package> {
        let limit = limit.min(MAX_RESULTS);
        let normalized = super::name::normalize(query);
        // No name is longer than an image name may be, and none is found by a longer query.
        if limit == 0 || normalized.is_empty() || normalized.len() > crate::image::MAX_NAME_LEN {
            return Vec::new();
        }
        let mut found = Found::new(limit);
        found.extend(self.exact(&normalized));
        if !found.full() {
            found.extend(self.prefixed(&normalized, limit));
        }
        if !found.full() {
            found.extend(self.typos(&normalized));
        }
        if !found.full() {
            let wanted = limit - found.ids.len();
            found.extend(self.fuzzy.search(&normalized, wanted, &found.seen));
        }
        found
            .ids
            .into_iter()
            .filter_map(|id| packages.get(id as usize))
            .collect()
    }

    /// Up to [`MAX_SUGGESTIONS`] names close to `missing`, the closest first; none when nothing
    /// is close. A dotted name's last component counts (`xev` suggests `xorg.xev`); `missing`
    /// itself is never suggested.
    pub fn suggest(&self, packages: &[Package], missing: &str) -> Vec<String> {
        let normalized = super::name::normalize(missing);
        if normalized.is_empty() || normalized.len() > crate::image::MAX_NAME_LEN {
            return Vec::new();
        }
        let mut hits = self.exact(&normalized);
        hits.extend(self.typos(&normalized));
        hits.sort_unstable();
        let mut seen = HashSet::new();
        hits.into_iter()
            .filter(|hit| seen.insert(hit.id))
            .filter_map(|hit| packages.get(hit.id as usize))
            .filter(|package| package.name != normalized)
            .take(MAX_SUGGESTIONS)
            .map(|package| package.name.clone())
            .collect()
    }
}

/// Results so far: package ids in order, each once, at most `limit`.
struct Found {
    ids: Vec<u32>,
    seen: HashSet<u32>,
    limit: usize,
}

impl Found {
    fn new(limit: usize) -> Found {
        Found {
            ids: Vec::new(),
            seen: HashSet::new(),
            limit,
        }
    }

    fn full(&self) -> bool {
        self.ids.len() >= self.limit
    }

    fn extend(&mut self, hits: impl IntoIterator<Item = Hit>) {
        for hit in hits {
            if self.full() {
                return;
            }
            if self.seen.insert(hit.id) {
                self.ids.push(hit.id);
            }
        }
    }
}
