//! bench/layering: how well layering strategies let images share layers, simulated on a real
//! dependency graph. `bench/layering/run` gathers the data and calls this program; see
//! bench/layering/README.md for what is measured and why.
//!
//! Every strategy is run on the same seeded workloads (pairs of images, and a fleet of images
//! pulled onto one host) at each layer budget. Layer sizes are estimated from each store path
//! compressed once on its own, at the server's level, with the server's packer; a sample of real
//! layers checks the estimate. Subcommands:
//!
//! - `simulate`: the table, the curve of nixery's thresholds (`layers::group_with` with one
//!   threshold moved at a time), `results.json`, `report.md`, `curve.md` and the sample the real
//!   server serves (`docker.json`); `--skip-real` only reads cached data and runs in seconds.
//! - `popularity`: popularity counts from the graph, for when `nixery popularity` is missing.
//! - `served`: compares what the real server served (manifests, bytes counted by its metrics)
//!   with the simulation, as Markdown.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use nixery::layers::{Codec, LayerContents, Popularity, Thresholds, pack};
use nixery::nix::{Closure, StorePath, store_path_name};

/// A layer under this many compressed bytes counts as small in the table.
const SMALL_LAYER: u64 = 64 * 1024;

/// Nixery's thresholds (layers.go): a closure above 100 MB, or a popularity of 100 or more,
/// gets an edge from the image root.
const NIXERY_GO_BIG: u64 = 100 * 1_000_000;
const NIXERY_GO_POPULAR: u64 = 100;
/// layers.go gives `nss-cacert` and `iana-etc` this popularity (it adds them to every image).
const NIXERY_GO_EVERYWHERE: u64 = 500_000;

/// The curve: nixery (popularity) with one of its thresholds moved off the default at a time.
/// `popular_fraction` 0 makes every path with a count popular (the threshold is at least 1), 1
/// only those with the largest count; `small_layer` 0 turns the sharing of small layers off. The
/// default values are added when missing.
const CURVE_POPULAR_FRACTIONS: [f64; 8] = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0];
const CURVE_SMALL_LAYERS: [u64; 5] = [0, 64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024];

/// Blocks of 1 MiB a layer being packed may have in the compression pool at once.
const IN_FLIGHT: usize = 8;

#[derive(Parser)]
#[command(about = "Layers that images share: layering strategies side by side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Simulate(SimulateArgs),
    Popularity(PopularityArgs),
    Served(ServedArgs),
}

/// Runs every strategy on the workloads and writes the results.
#[derive(Parser)]
struct SimulateArgs {
    /// Directory with graph.json (`nix path-info --json -r` of every top-level package),
    /// toplevel.json (`[{"attr", "path"}]`, the pinned packages) and popularity.json.
    #[arg(long)]
    data: PathBuf,
    /// Cache of each store path's compressed size alone (lines `LEVEL BYTES PATH`).
    #[arg(long)]
    sizes: PathBuf,
    /// Where results.json, report.md, curve.md and docker.json go.
    #[arg(long)]
    out: PathBuf,
    /// The server's gzip level.
    #[arg(long, default_value_t = 4)]
    level: i32,
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Random pairs of images.
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Images pulled one after another onto one host.
    #[arg(long, default_value_t = 30)]
    fleet: usize,
    /// Layer budgets, the root layer included (the server's NIXERY_MAX_LAYERS); the first is the
    /// default one.
    #[arg(long, value_delimiter = ',', default_value = "96,8")]
    budgets: Vec<usize>,
    /// Simulate from cached data only: compress no store path and pack no real layer.
    #[arg(long)]
    skip_real: bool,
    /// Real layers packed to check the size estimate.
    #[arg(long, default_value_t = 24)]
    real_sample: usize,
    /// Pairs for `docker pull` on the real server.
    #[arg(long, default_value_t = 3)]
    docker_pairs: usize,
    /// Fleet images whose manifests the real server builds and serves.
    #[arg(long, default_value_t = 6)]
    served_images: usize,
    /// Largest estimated image (MB) in the real-server sample (the vfs driver copies every layer).
    #[arg(long, default_value_t = 200)]
    docker_max_mb: u64,
}

/// Popularity counts from the graph: for each store path name, in how many top-level packages'
/// closures it is.
#[derive(Parser)]
struct PopularityArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    output: PathBuf,
}

/// What the real server served, against the simulation.
#[derive(Parser)]
struct ServedArgs {
    /// docker.json from `simulate`.
    #[arg(long)]
    sample: PathBuf,
    /// Manifests fetched from the server: served-N.json, pair-N-a.json, pair-N-b.json.
    #[arg(long)]
    manifests: PathBuf,
    /// Lines `N BYTES_A BYTES_B`: blob bytes the server sent for each pull of pair N.
    #[arg(long)]
    pulls: PathBuf,
    /// What `docker info` says of its image store, for the report.
    #[arg(long, default_value = "")]
    docker_store: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Simulate(args) => simulate(&args),
        Command::Popularity(args) => popularity(&args),
        Command::Served(args) => served(&args),
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness.

/// splitmix64: small, seeded and the same everywhere, so the workloads never change.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in 0..n.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// The universe: every store path of every top-level package.

struct TopLevel {
    attr: String,
    path: u32,
    closure: Vec<u32>,
}

struct Universe {
    paths: Vec<String>,
    index: HashMap<String, u32>,
    nar: Vec<u64>,
    /// References, without self-references.
    refs: Vec<Vec<u32>>,
    /// NAR bytes of each path's closure (Nix's `closureSize`).
    closure_size: Vec<u64>,
    top: Vec<TopLevel>,
}

#[derive(Deserialize)]
struct TopLevelEntry {
    attr: String,
    path: String,
}

impl Universe {
    fn load(data: &Path) -> anyhow::Result<Universe> {
        let graph_file = data.join("graph.json");
        let graph: Value = serde_json::from_slice(
            &fs::read(&graph_file).with_context(|| format!("reading {}", graph_file.display()))?,
        )
        .with_context(|| format!("parsing {}", graph_file.display()))?;
        // `nix path-info --json` gives an array of objects with a `path` (Nix < 2.19), or an
        // object keyed by path (newer).
        let mut entries: Vec<(String, u64, Vec<String>)> = Vec::new();
        let read = |path: String, v: &Value| -> anyhow::Result<(String, u64, Vec<String>)> {
            let nar = v["narSize"]
                .as_u64()
                .with_context(|| format!("{path} has no narSize"))?;
            let refs = v["references"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Ok((path, nar, refs))
        };
        match &graph {
            Value::Array(items) => {
                for item in items {
                    let path = item["path"].as_str().context("an entry has no path")?;
                    entries.push(read(path.to_owned(), item)?);
                }
            }
            Value::Object(map) => {
                for (path, item) in map {
                    entries.push(read(path.clone(), item)?);
                }
            }
            _ => bail!("{} is neither an array nor an object", graph_file.display()),
        }
        let top_file = data.join("toplevel.json");
        let top: Vec<TopLevelEntry> = serde_json::from_slice(
            &fs::read(&top_file).with_context(|| format!("reading {}", top_file.display()))?,
        )
        .with_context(|| format!("parsing {}", top_file.display()))?;
        ensure!(!top.is_empty(), "{} lists no package", top_file.display());
        Universe::new(entries, top)
    }

    /// The universe of graph entries (path, NAR size, references) and top-level packages.
    fn new(
        mut entries: Vec<(String, u64, Vec<String>)>,
        top: Vec<TopLevelEntry>,
    ) -> anyhow::Result<Universe> {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.dedup_by(|a, b| a.0 == b.0);
        let index: HashMap<String, u32> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.0.clone(), i as u32))
            .collect();
        let mut refs = Vec::with_capacity(entries.len());
        for (path, _, r) in &entries {
            let mut v: Vec<u32> =
                r.iter()
                    .filter(|x| *x != path)
                    .map(|x| {
                        index.get(x).copied().with_context(|| {
                            format!("{path} refers to {x}, which is not in the graph")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
            v.sort_unstable();
            v.dedup();
            refs.push(v);
        }
        let mut u = Universe {
            paths: entries.iter().map(|e| e.0.clone()).collect(),
            nar: entries.iter().map(|e| e.1).collect(),
            index,
            refs,
            closure_size: Vec::new(),
            top: Vec::new(),
        };
        u.closure_size = (0..u.paths.len() as u32)
            .map(|p| u.closure_of(&[p]).iter().map(|&q| u.nar[q as usize]).sum())
            .collect();

        for entry in top {
            let path = *u
                .index
                .get(&entry.path)
                .with_context(|| format!("{} ({}) is not in the graph", entry.attr, entry.path))?;
            let closure = u.closure_of(&[path]);
            u.top.push(TopLevel {
                attr: entry.attr,
                path,
                closure,
            });
        }
        Ok(u)
    }

    /// The sorted closure of `roots`, the roots included.
    fn closure_of(&self, roots: &[u32]) -> Vec<u32> {
        let mut seen = vec![false; self.paths.len()];
        let mut todo: Vec<u32> = roots.to_vec();
        let mut out = Vec::new();
        while let Some(p) = todo.pop() {
            if std::mem::replace(&mut seen[p as usize], true) {
                continue;
            }
            out.push(p);
            todo.extend(&self.refs[p as usize]);
        }
        out.sort_unstable();
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Compressed sizes.

/// A writer that only counts.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compressed bytes of the server's layer holding exactly `paths`.
fn packed_size(paths: &[String], level: i32) -> io::Result<u64> {
    Ok(pack(
        LayerContents::StorePaths(paths),
        Codec::Gzip(level),
        IN_FLIGHT,
        Count(0),
    )?
    .size)
}

/// Each store path's compressed size alone, and the estimate of a layer from them.
struct Sizes {
    /// Compressed bytes of the layer holding only this path.
    alone: Vec<u64>,
    /// Compressed bytes of a layer holding no path (`nix/`, `nix/store/`, the tar end and the
    /// gzip framing): every per-path size includes it once, a layer has it once.
    empty: u64,
}

impl Sizes {
    /// Estimated compressed bytes of a layer of `paths`: the empty layer plus what each path
    /// adds to it.
    fn layer(&self, paths: &[u32]) -> u64 {
        let added: i64 = paths
            .iter()
            .map(|&p| self.alone[p as usize] as i64 - self.empty as i64)
            .sum();
        (self.empty as i64 + added).max(0) as u64
    }

    /// Reads the cache, compresses the paths it lacks (unless `skip_real`) and appends them.
    fn load(u: &Universe, file: &Path, level: i32, skip_real: bool) -> anyhow::Result<Sizes> {
        let mut cached: HashMap<String, u64> = HashMap::new();
        if let Ok(f) = fs::File::open(file) {
            for line in io::BufReader::new(f).lines() {
                let line = line?;
                let mut parts = line.splitn(3, ' ');
                if let (Some(l), Some(bytes), Some(path)) =
                    (parts.next(), parts.next(), parts.next())
                    && l.parse::<i32>().ok() == Some(level)
                    && let Ok(bytes) = bytes.parse::<u64>()
                {
                    cached.insert(path.to_owned(), bytes);
                }
            }
        }
        let empty = packed_size(&[], level)?;
        let missing: Vec<u32> = (0..u.paths.len() as u32)
            .filter(|&p| !cached.contains_key(&u.paths[p as usize]))
            .collect();
        if !missing.is_empty() {
            ensure!(
                !skip_real,
                "{} of {} store paths have no cached compressed size at level {level} in {}: run bench/layering/run once without --skip-real",
                missing.len(),
                u.paths.len(),
                file.display()
            );
            let bytes: u64 = missing.iter().map(|&p| u.nar[p as usize]).sum();
            eprintln!(
                "[layering] compressing {} store paths alone at level {level} ({:.1} MB NAR)",
                missing.len(),
                bytes as f64 / 1e6
            );
            let started = Instant::now();
            let mut out = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .with_context(|| format!("opening {}", file.display()))?;
            let next = AtomicUsize::new(0);
            let done = Mutex::new(Vec::new());
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
            std::thread::scope(|s| -> anyhow::Result<()> {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| -> io::Result<()> {
                            loop {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                let Some(&p) = missing.get(i) else {
                                    return Ok(());
                                };
                                let path = &u.paths[p as usize];
                                let size = packed_size(std::slice::from_ref(path), level)?;
                                nixery::sync::lock(&done).push((p, size));
                            }
                        })
                    })
                    .collect();
                for w in workers {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("a compression thread panicked"))??;
                }
                Ok(())
            })?;
            for (p, size) in done.into_inner().unwrap_or_default() {
                writeln!(out, "{level} {size} {}", u.paths[p as usize])?;
                cached.insert(u.paths[p as usize].clone(), size);
            }
            out.flush()?;
            eprintln!(
                "[layering] compressed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let alone = u.paths.iter().map(|p| cached[p]).collect();
        Ok(Sizes { alone, empty })
    }
}

// ---------------------------------------------------------------------------------------------
// Images and their graphs.

struct Image {
    /// Indices into `Universe::top`, sorted.
    packages: Vec<usize>,
    /// The closure, sorted (the image root is not a universe path).
    paths: Vec<u32>,
    /// A made-up store path for the image root, unique to the package set.
    root: String,
}

impl Image {
    fn new(u: &Universe, mut packages: Vec<usize>) -> Image {
        packages.sort_unstable();
        packages.dedup();
        let mut paths: Vec<u32> = packages
            .iter()
            .flat_map(|&t| u.top[t].closure.iter().copied())
            .collect();
        paths.sort_unstable();
        paths.dedup();
        let mut hasher = Sha256::new();
        for &t in &packages {
            hasher.update(format!("{}\n", u.top[t].attr));
        }
        // Nix's base-32 alphabet, so the name reads as a store path name does.
        const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let hash: String = hasher.finalize()[..32]
            .iter()
            .map(|b| ALPHABET[usize::from(b % 32)] as char)
            .collect();
        Image {
            packages,
            paths,
            root: format!("/nix/store/{hash}-nixery-image-root"),
        }
    }

    fn attrs<'a>(&self, u: &'a Universe) -> Vec<&'a str> {
        self.packages
            .iter()
            .map(|&t| u.top[t].attr.as_str())
            .collect()
    }

    /// The closure as the server sees it: the root (referring to the packages) and every path.
    fn closure(&self, u: &Universe) -> Closure {
        let mut paths = Vec::with_capacity(self.paths.len() + 1);
        paths.push(StorePath {
            path: self.root.clone(),
            deriver: None,
            nar_hash: String::new(),
            nar_size: 0,
            references: self
                .packages
                .iter()
                .map(|&t| u.paths[u.top[t].path as usize].clone())
                .collect(),
        });
        for &p in &self.paths {
            paths.push(StorePath {
                path: u.paths[p as usize].clone(),
                deriver: None,
                nar_hash: String::new(),
                nar_size: u.nar[p as usize],
                references: u.refs[p as usize]
                    .iter()
                    .map(|&r| u.paths[r as usize].clone())
                    .collect(),
            });
        }
        Closure {
            root: self.root.clone(),
            paths,
            packages: self.attrs(u).into_iter().map(str::to_owned).collect(),
            meta: Vec::new(),
        }
    }

    /// The image's name on the registry (`hello/curl`), when every attribute can be named
    /// unambiguously.
    fn registry_name(&self, u: &Universe) -> Option<String> {
        let lower: HashMap<String, usize> = u.top.iter().fold(HashMap::new(), |mut m, t| {
            *m.entry(t.attr.to_lowercase()).or_default() += 1;
            m
        });
        let mut parts = Vec::new();
        for attr in self.attrs(u) {
            let mut name = attr.to_lowercase();
            if name != attr && lower.get(&name).copied().unwrap_or(0) > 1 {
                return None;
            }
            if name.starts_with('_') && name[1..].starts_with(|c: char| c.is_ascii_digit()) {
                name.remove(0);
            }
            let valid = name.split(['.', '_', '-']).all(|w| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
            // Meta-packages stand for other packages.
            if !valid || name == "shell" || name == "builder" {
                return None;
            }
            parts.push(name);
        }
        let name = parts.join("/");
        (name.len() <= 255).then_some(name)
    }
}

/// An image's graph in local numbering: node 0 is the image root, node i + 1 is `paths[i]`.
struct Local {
    refs: Vec<Vec<usize>>,
    /// Children before parents.
    post_order: Vec<usize>,
}

impl Local {
    fn new(u: &Universe, img: &Image) -> Local {
        let local = |p: u32| {
            1 + img
                .paths
                .binary_search(&p)
                .expect("closed under references")
        };
        let mut refs = vec![
            img.packages
                .iter()
                .map(|&t| local(u.top[t].path))
                .collect::<Vec<_>>(),
        ];
        refs[0].sort_unstable();
        refs[0].dedup();
        for &p in &img.paths {
            refs.push(u.refs[p as usize].iter().map(|&r| local(r)).collect());
        }
        // Iterative depth-first post-order from the root.
        let n = refs.len();
        let mut seen = vec![false; n];
        let mut post_order = Vec::with_capacity(n);
        let mut stack = vec![(0usize, 0usize)];
        seen[0] = true;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&child) = refs[node].get(*next) {
                *next += 1;
                if !seen[child] {
                    seen[child] = true;
                    stack.push((child, 0));
                }
            } else {
                post_order.push(node);
                stack.pop();
            }
        }
        Local { refs, post_order }
    }

    fn len(&self) -> usize {
        self.refs.len()
    }
}

/// Universe index of local node `i` (not the root).
fn universe_of(img: &Image, i: usize) -> u32 {
    img.paths[i - 1]
}

// ---------------------------------------------------------------------------------------------
// The strategies.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Dominators,
    OneLayer,
    NixeryGo,
    PopularityContest,
    AutoLayer,
    NixeryPopularity,
}

const STRATEGIES: [Strategy; 6] = [
    Strategy::Dominators,
    Strategy::OneLayer,
    Strategy::NixeryGo,
    Strategy::PopularityContest,
    Strategy::AutoLayer,
    Strategy::NixeryPopularity,
];

impl Strategy {
    fn label(self) -> &'static str {
        match self {
            Strategy::Dominators => "dominators",
            Strategy::OneLayer => "one layer",
            Strategy::NixeryGo => "Nixery (layers.go)",
            Strategy::PopularityContest => "nixpkgs popularity contest",
            Strategy::AutoLayer => "nixpkgs auto-layer",
            Strategy::NixeryPopularity => "nixery (popularity)",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Strategy::Dominators => "dominators",
            Strategy::OneLayer => "one_layer",
            Strategy::NixeryGo => "nixery_go",
            Strategy::PopularityContest => "popularity_contest",
            Strategy::AutoLayer => "auto_layer",
            Strategy::NixeryPopularity => "nixery_popularity",
        }
    }
}

/// What the strategies read besides the image.
struct Strategies<'a> {
    u: &'a Universe,
    popularity: &'a Popularity,
    /// The popularity file as it is: Nixery looks names up exactly.
    counts: &'a HashMap<String, u64>,
    /// nixery (popularity)'s numbers: the server's defaults but on the curve.
    thresholds: Thresholds,
}

impl Strategies<'_> {
    /// The image's paths (root excluded) grouped into at most `groups` layers, in the
    /// strategy's order; each group sorted.
    fn layers(&self, s: Strategy, img: &Image, groups: usize) -> Vec<Vec<u32>> {
        let mut layers = match s {
            // nixery before issue 11: no data, and no 100 MB rule either.
            Strategy::Dominators => self.server(
                img,
                &Popularity::default(),
                groups,
                &Thresholds {
                    large_path: u64::MAX,
                    ..Thresholds::DEFAULT
                },
            ),
            Strategy::NixeryPopularity => {
                self.server(img, self.popularity, groups, &self.thresholds)
            }
            Strategy::OneLayer => vec![img.paths.clone()],
            Strategy::NixeryGo => self.nixery_go(img, groups),
            Strategy::PopularityContest => self.popularity_contest(img, groups),
            Strategy::AutoLayer => self.auto_layer(img, groups),
        };
        for layer in &mut layers {
            layer.sort_unstable();
        }
        layers.retain(|l| !l.is_empty());
        layers
    }

    /// nixery's own `layers::group`, as the server calls it (with `thresholds` as the
    /// server's defaults, `layers::group_with` otherwise).
    fn server(
        &self,
        img: &Image,
        popularity: &Popularity,
        groups: usize,
        thresholds: &Thresholds,
    ) -> Vec<Vec<u32>> {
        let closure = img.closure(self.u);
        nixery::layers::group_with(&closure, popularity, groups, thresholds)
            .expect("the closure has its root")
            .into_iter()
            .map(|g| g.iter().map(|p| self.u.index[p]).collect())
            .collect()
    }

    /// Nixery's layers.go: big (closure > 100 MB) or popular (≥ 100) paths get an edge from
    /// the root; each subtree below the root of the dominator tree is a layer rated
    /// popularity(top) × size; layers sorted by rating, and the lowest merged into the next
    /// until the budget is met. Size is what layers.go sums: its members' `closureSize`.
    fn nixery_go(&self, img: &Image, budget: usize) -> Vec<Vec<u32>> {
        let u = self.u;
        let local = Local::new(u, img);
        let popularity = |i: usize| -> u64 {
            let name = store_path_name(&u.paths[universe_of(img, i) as usize]);
            if name.starts_with("nss-cacert") || name.starts_with("iana-etc") {
                NIXERY_GO_EVERYWHERE
            } else {
                self.counts.get(name).copied().unwrap_or(1)
            }
        };
        let mut graph = DiGraph::<(), ()>::new();
        let nodes: Vec<NodeIndex> = (0..local.len()).map(|_| graph.add_node(())).collect();
        for &p in &local.refs[0] {
            graph.update_edge(nodes[0], nodes[p], ());
        }
        for i in 1..local.len() {
            let p = universe_of(img, i) as usize;
            if u.closure_size[p] > NIXERY_GO_BIG || popularity(i) >= NIXERY_GO_POPULAR {
                graph.update_edge(nodes[0], nodes[i], ());
            }
            for &r in &local.refs[i] {
                graph.update_edge(nodes[i], nodes[r], ());
            }
        }
        let doms = dominators::simple_fast(&graph, nodes[0]);
        let mut tops: BTreeMap<usize, (Vec<u32>, u64)> = BTreeMap::new();
        for i in 1..local.len() {
            let mut top = nodes[i];
            while let Some(idom) = doms.immediate_dominator(top) {
                if idom == nodes[0] {
                    break;
                }
                top = idom;
            }
            let entry = tops.entry(top.index()).or_default();
            let p = universe_of(img, i);
            entry.0.push(p);
            entry.1 += u.closure_size[p as usize];
        }
        let mut layers: Vec<(Vec<u32>, u128)> = tops
            .into_iter()
            .map(|(top, (mut paths, size))| {
                paths.sort_unstable();
                (paths, u128::from(popularity(top)) * u128::from(size))
            })
            .collect();
        // Go's sort.Slice is not stable: ties by contents here, so runs agree.
        layers.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        while layers.len() > budget.max(1) {
            let (paths, rating) = layers.remove(0);
            layers[0].0.extend(paths);
            layers[0].1 += rating;
        }
        layers.into_iter().map(|(paths, _)| paths).collect()
    }

    /// nixpkgs' referencesByPopularity (closure-graph.py): a path's popularity from the
    /// image's own graph; the most popular paths get a layer each, the rest share the last.
    fn popularity_contest(&self, img: &Image, groups: usize) -> Vec<Vec<u32>> {
        let u = self.u;
        let local = Local::new(u, img);
        let n = local.len();
        // contest[x][s]: closure-graph.py's graph_popularity_contest of x's children (0: absent),
        // computed children first. Saturating: on a large graph the counts outgrow any integer,
        // as the number of paths through a DAG does.
        let mut contest: Vec<Vec<u128>> = vec![Vec::new(); n];
        for &x in &local.post_order {
            let mut counts = vec![0u128; n];
            for &c in &local.refs[x] {
                counts[c] = counts[c].saturating_add(1);
                for (s, &v) in contest[c].iter().enumerate() {
                    if v > 0 {
                        counts[s] = counts[s].saturating_add(v.saturating_add(1));
                    }
                }
            }
            contest[x] = counts;
        }
        // The root is the only path nothing refers to: it counts 1, the rest what it sees + 1.
        let mut ranked: Vec<(u128, String, u32)> = (1..n)
            .map(|i| {
                let p = universe_of(img, i);
                let path = &u.paths[p as usize];
                // closure-graph.py's package_name: the name first, then the hash.
                let key = match path.split_once('-') {
                    Some((hash, name)) => format!("{name}-{hash}"),
                    None => path.clone(),
                };
                (contest[0][i].saturating_add(1), key, p)
            })
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let order: Vec<u32> = ranked.into_iter().map(|r| r.2).collect();
        let groups = groups.max(1);
        if order.len() <= groups {
            return order.into_iter().map(|p| vec![p]).collect();
        }
        let mut layers: Vec<Vec<u32>> = order[..groups - 1].iter().map(|&p| vec![p]).collect();
        layers.push(order[groups - 1..].to_vec());
        layers
    }

    /// nixpkgs' auto-layer.py (dockerTools' default since 25.05): the largest paths become
    /// primaries one by one; every path is in the layer named by the set of primaries that
    /// need it; stop before the layer count would exceed the limit. The image root is in the
    /// graph and then left out, as the customisation layer is there.
    fn auto_layer(&self, img: &Image, limit: usize) -> Vec<Vec<u32>> {
        let u = self.u;
        let local = Local::new(u, img);
        let n = local.len();
        let words = n.div_ceil(64);
        let nar = |i: usize| {
            if i == 0 {
                0
            } else {
                u.nar[universe_of(img, i) as usize]
            }
        };
        let name = |i: usize| -> &str {
            if i == 0 {
                &img.root
            } else {
                &u.paths[universe_of(img, i) as usize]
            }
        };
        // Dependencies and users (transitively), each without the path itself.
        let mut deps = vec![Bits::new(words); n];
        for &x in &local.post_order {
            let mut d = Bits::new(words);
            for &c in &local.refs[x] {
                d.insert(c);
                d.union_with(&deps[c]);
            }
            deps[x] = d;
        }
        let mut users = vec![Bits::new(words); n];
        for &x in local.post_order.iter().rev() {
            for &c in &local.refs[x] {
                let mut from_x = users[x].clone();
                from_x.insert(x);
                users[c].union_with(&from_x);
            }
        }
        let mut by_size: Vec<usize> = (0..n).collect();
        by_size.sort_by(|&a, &b| nar(a).cmp(&nar(b)).then_with(|| name(a).cmp(name(b))));
        let mut split = vec![Bits::new(words); n];
        while let Some(primary) = by_size.pop() {
            let mut next = split.clone();
            let mut own = Bits::new(words);
            own.insert(primary);
            next[primary] = own;
            for dep in deps[primary].iter() {
                next[dep].subtract(&users[primary]);
                if !next[dep].intersects(&deps[primary]) {
                    next[dep].insert(primary);
                }
            }
            if next.iter().collect::<HashSet<_>>().len() > limit.max(1) {
                break;
            }
            split = next;
        }
        let mut layers: HashMap<&Bits, Vec<usize>> = HashMap::new();
        for (i, id) in split.iter().enumerate() {
            layers.entry(id).or_default().push(i);
        }
        // Ordered by closure size, so a layer comes after the layers it needs.
        let mut ordered: Vec<(u64, Vec<u32>)> = layers
            .into_values()
            .map(|members| {
                let mut closure = Bits::new(words);
                for &m in &members {
                    closure.insert(m);
                    closure.union_with(&deps[m]);
                }
                let size = closure.iter().map(nar).sum();
                let mut paths: Vec<u32> = members
                    .into_iter()
                    .filter(|&m| m != 0)
                    .map(|m| universe_of(img, m))
                    .collect();
                paths.sort_unstable();
                (size, paths)
            })
            .filter(|(_, paths)| !paths.is_empty())
            .collect();
        ordered.sort();
        ordered.into_iter().map(|(_, paths)| paths).collect()
    }
}

/// A set of local node numbers.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(words: usize) -> Bits {
        Bits(vec![0; words])
    }
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn union_with(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a |= b);
    }
    fn subtract(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a &= !b);
    }
    fn intersects(&self, other: &Bits) -> bool {
        self.0.iter().zip(&other.0).any(|(a, b)| a & b != 0)
    }
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits >> b & 1 == 1)
                .map(move |b| w * 64 + b)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Running a strategy on the workload.

/// One strategy at one budget over every image of the workload.
struct Run {
    strategy: Strategy,
    budget: usize,
    /// Distinct layers: their paths and estimated compressed size.
    layers: Vec<(Vec<u32>, u64)>,
    /// Each image's layers, in order (ids into `layers`), root layer excluded.
    images: Vec<Vec<usize>>,
}

impl Run {
    fn new(
        cx: &Strategies<'_>,
        sizes: &Sizes,
        strategy: Strategy,
        budget: usize,
        images: &[Image],
    ) -> Run {
        let groups = budget - 1;
        let mut ids: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut layers = Vec::new();
        let mut per_image = Vec::with_capacity(images.len());
        for img in images {
            let groups_of = cx.layers(strategy, img, groups);
            assert!(
                groups_of.len() <= groups,
                "{} made {} layers for {:?}, over the budget of {budget} (root layer included)",
                strategy.label(),
                groups_of.len() + 1,
                img.attrs(cx.u)
            );
            let mut all: Vec<u32> = groups_of.iter().flatten().copied().collect();
            all.sort_unstable();
            assert!(
                all == img.paths,
                "{} did not put each of the {} paths of {:?} in exactly one layer",
                strategy.label(),
                img.paths.len(),
                img.attrs(cx.u)
            );
            let mut mine = Vec::with_capacity(groups_of.len());
            for g in groups_of {
                let next = layers.len();
                let id = *ids.entry(g.clone()).or_insert(next);
                if id == next {
                    let size = sizes.layer(&g);
                    layers.push((g, size));
                }
                mine.push(id);
            }
            per_image.push(mine);
        }
        Run {
            strategy,
            budget,
            layers,
            images: per_image,
        }
    }

    fn size(&self, id: usize) -> u64 {
        self.layers[id].1
    }

    fn bytes(&self, ids: &[usize]) -> u64 {
        ids.iter().map(|&l| self.size(l)).sum()
    }

    /// Bytes a client holding image `have` downloads for image `want`: by layer identity (a
    /// content store such as containerd's), and as Docker's classic store does (everything
    /// past the common prefix of layers, as a chain).
    fn download(&self, have: usize, want: usize) -> (u64, u64) {
        let held: HashSet<usize> = self.images[have].iter().copied().collect();
        let by_layer = self.images[want]
            .iter()
            .filter(|l| !held.contains(l))
            .map(|&l| self.size(l))
            .sum();
        let prefix = common_prefix(&self.images[have], &self.images[want]);
        (by_layer, self.bytes(&self.images[want][prefix..]))
    }
}

fn common_prefix(a: &[usize], b: &[usize]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What the table shows for one strategy at one budget.
#[derive(Serialize, Clone)]
struct Metrics {
    strategy: &'static str,
    key: &'static str,
    budget: usize,
    p5_mean: f64,
    p5_p90: f64,
    p5_p99: f64,
    p5_max: f64,
    /// The pair with the largest P5: its images' packages, the lower bound and the bytes
    /// downloaded (estimated, compressed).
    p5_worst: Option<WorstPair>,
    /// Pairs in the P5 statistics (lower bound > 0).
    pairs_counted: usize,
    /// Pairs whose second image adds no store path; left out of P5.
    pairs_no_new_paths: usize,
    /// ... of which this many downloaded something anyway, and how many bytes in all.
    pairs_no_new_paths_downloading: usize,
    pairs_no_new_paths_bytes: u64,
    /// The same with Docker's classic image store (ChainID: all layers after the common prefix).
    p5_chain_mean: f64,
    p5_chain_p90: f64,
    fleet: f64,
    fleet_chain: f64,
    fleet_download: u64,
    fleet_union: u64,
    /// Distinct layers over every image of both workloads ÷ the union of their store paths.
    /// (Over the fleet alone it equals `fleet`: one host starting empty holds each layer once.)
    storage: f64,
    storage_bytes: u64,
    storage_union: u64,
    storage_layers: usize,
    layers_mean: f64,
    layers_max: usize,
    small_layers_mean: f64,
    small_layers_share: f64,
    prefix_layers_mean: f64,
    prefix_bytes_mean: f64,
}

#[derive(Serialize, Clone)]
struct WorstPair {
    first: Vec<String>,
    second: Vec<String>,
    bound: u64,
    downloaded: u64,
}

struct Workload {
    images: Vec<Image>,
    /// Image indices (first, second).
    pairs: Vec<(usize, usize)>,
    /// Image indices, in pull order.
    fleet: Vec<usize>,
}

impl Workload {
    fn new(u: &Universe, seed: u64, pairs: usize, fleet: usize) -> Workload {
        let mut rng = Rng(seed);
        let draw = |rng: &mut Rng| {
            let k = 1 + rng.below(4).min(u.top.len() - 1);
            let mut packages = Vec::new();
            while packages.len() < k {
                let t = rng.below(u.top.len());
                if !packages.contains(&t) {
                    packages.push(t);
                }
            }
            Image::new(u, packages)
        };
        let mut images = Vec::new();
        let mut pair_list = Vec::new();
        for _ in 0..pairs {
            images.push(draw(&mut rng));
            images.push(draw(&mut rng));
            pair_list.push((images.len() - 2, images.len() - 1));
        }
        let mut fleet_rng = Rng(seed ^ 0xf1ee_7000);
        let fleet_list = (0..fleet)
            .map(|_| {
                images.push(draw(&mut fleet_rng));
                images.len() - 1
            })
            .collect();
        Workload {
            images,
            pairs: pair_list,
            fleet: fleet_list,
        }
    }

    /// Estimated bytes of the union of the paths of `images`, as one layer.
    fn union(&self, sizes: &Sizes, images: impl Iterator<Item = usize>) -> u64 {
        let mut all: Vec<u32> = images
            .flat_map(|i| self.images[i].paths.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        sizes.layer(&all)
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank - 1]
}

fn metrics(run: &Run, w: &Workload, sizes: &Sizes, u: &Universe) -> Metrics {
    let mut p5 = Vec::new();
    let mut worst: Option<(f64, WorstPair)> = None;
    let mut p5_chain = Vec::new();
    let (mut zero, mut zero_downloading, mut zero_bytes) = (0, 0, 0);
    for &(a, b) in &w.pairs {
        let (have, want) = (&w.images[a], &w.images[b]);
        let new: Vec<u32> = want
            .paths
            .iter()
            .copied()
            .filter(|p| have.paths.binary_search(p).is_err())
            .collect();
        let (by_layer, by_chain) = run.download(a, b);
        if new.is_empty() {
            zero += 1;
            if by_layer > 0 {
                zero_downloading += 1;
                zero_bytes += by_layer;
            }
            continue;
        }
        // The lower bound: the new paths as one layer.
        let bound = sizes.layer(&new) as f64;
        let ratio = by_layer as f64 / bound;
        if worst.as_ref().is_none_or(|(r, _)| ratio > *r) {
            let attrs = |img: &Image| img.attrs(u).into_iter().map(str::to_owned).collect();
            worst = Some((
                ratio,
                WorstPair {
                    first: attrs(have),
                    second: attrs(want),
                    bound: bound as u64,
                    downloaded: by_layer,
                },
            ));
        }
        p5.push(ratio);
        p5_chain.push(by_chain as f64 / bound);
    }

    let fleet_union = w.union(sizes, w.fleet.iter().copied());
    let mut held = HashSet::new();
    let mut chains: HashSet<Vec<usize>> = HashSet::new();
    let (mut fleet_download, mut fleet_chain) = (0u64, 0u64);
    for &i in &w.fleet {
        let layers = &run.images[i];
        for &l in layers {
            if held.insert(l) {
                fleet_download += run.size(l);
            }
        }
        // Docker's classic store keeps a layer by its chain: the layer and all below it.
        let mut known = true;
        for k in 1..=layers.len() {
            let chain = layers[..k].to_vec();
            if known && chains.contains(&chain) {
                continue;
            }
            known = false;
            fleet_chain += run.size(layers[k - 1]);
            chains.insert(chain);
        }
    }
    // The registry: every distinct layer of both workloads, against all their store paths.
    let all_layers: HashSet<usize> = run.images.iter().flatten().copied().collect();
    let storage_bytes = run.bytes(&all_layers.iter().copied().collect::<Vec<_>>());
    let storage_union = w.union(sizes, 0..w.images.len());

    let counts: Vec<f64> = run.images.iter().map(|l| l.len() as f64).collect();
    let small: Vec<f64> = run
        .images
        .iter()
        .map(|l| l.iter().filter(|&&id| run.size(id) < SMALL_LAYER).count() as f64)
        .collect();
    let (mut prefix_layers, mut prefix_bytes) = (Vec::new(), Vec::new());
    for pair in w.fleet.windows(2) {
        let (a, b) = (&run.images[pair[0]], &run.images[pair[1]]);
        let k = common_prefix(a, b);
        prefix_layers.push(k as f64);
        prefix_bytes.push(run.bytes(&b[..k]) as f64);
    }
    Metrics {
        strategy: run.strategy.label(),
        key: run.strategy.key(),
        budget: run.budget,
        p5_mean: mean(&p5),
        p5_p90: percentile(&p5, 90.0),
        p5_p99: percentile(&p5, 99.0),
        p5_max: p5.iter().copied().fold(f64::NAN, f64::max),
        p5_worst: worst.map(|(_, w)| w),
        pairs_counted: p5.len(),
        pairs_no_new_paths: zero,
        pairs_no_new_paths_downloading: zero_downloading,
        pairs_no_new_paths_bytes: zero_bytes,
        p5_chain_mean: mean(&p5_chain),
        p5_chain_p90: percentile(&p5_chain, 90.0),
        fleet: fleet_download as f64 / fleet_union as f64,
        fleet_chain: fleet_chain as f64 / fleet_union as f64,
        fleet_download,
        fleet_union,
        storage: storage_bytes as f64 / storage_union as f64,
        storage_bytes,
        storage_union,
        storage_layers: all_layers.len(),
        layers_mean: mean(&counts),
        layers_max: run.images.iter().map(Vec::len).max().unwrap_or(0),
        small_layers_mean: mean(&small),
        small_layers_share: small.iter().sum::<f64>() / counts.iter().sum::<f64>(),
        prefix_layers_mean: mean(&prefix_layers),
        prefix_bytes_mean: mean(&prefix_bytes),
    }
}

/// Runs the jobs (strategy, budget, nixery (popularity)'s thresholds) on every image of the
/// workload, on every core; the runs in the jobs' order.
fn run_all(
    cx: &Strategies<'_>,
    sizes: &Sizes,
    w: &Workload,
    jobs: &[(Strategy, usize, Thresholds)],
) -> anyhow::Result<Vec<Run>> {
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(usize, Run)>> = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(strategy, budget, thresholds)) = jobs.get(i) else {
                        return;
                    };
                    let cx = Strategies { thresholds, ..*cx };
                    let run = Run::new(&cx, sizes, strategy, budget, &w.images);
                    nixery::sync::lock(&done).push((i, run));
                }
            });
        }
    });
    let mut runs = done.into_inner().unwrap_or_default();
    ensure!(runs.len() == jobs.len(), "a strategy failed (see above)");
    runs.sort_by_key(|(i, _)| *i);
    Ok(runs.into_iter().map(|(_, r)| r).collect())
}

// ---------------------------------------------------------------------------------------------
// The curve the thresholds were chosen from.

/// One point: the default thresholds with one of them moved.
struct CurvePoint {
    /// The threshold moved: `popular_fraction` or `small_layer`.
    varied: &'static str,
    thresholds: Thresholds,
}

/// Every value of `CURVE_POPULAR_FRACTIONS` at the default `small_layer`, then every value of
/// `CURVE_SMALL_LAYERS` at the default `popular_fraction`; the default point is in both.
fn curve_points() -> Vec<CurvePoint> {
    let d = Thresholds::DEFAULT;
    let mut fractions = CURVE_POPULAR_FRACTIONS.to_vec();
    if !fractions.contains(&d.popular_fraction) {
        fractions.push(d.popular_fraction);
        fractions.sort_by(f64::total_cmp);
    }
    let mut small = CURVE_SMALL_LAYERS.to_vec();
    if !small.contains(&d.small_layer) {
        small.push(d.small_layer);
        small.sort_unstable();
    }
    let by_fraction = fractions.into_iter().map(|f| CurvePoint {
        varied: "popular_fraction",
        thresholds: Thresholds {
            popular_fraction: f,
            ..d
        },
    });
    let by_small = small.into_iter().map(|s| CurvePoint {
        varied: "small_layer",
        thresholds: Thresholds {
            small_layer: s,
            ..d
        },
    });
    by_fraction.chain(by_small).collect()
}

/// The smallest count that is popular at `fraction`, as `layers::group_with` computes it.
fn popular_count(popularity: &Popularity, fraction: f64) -> u64 {
    (popularity.max() as f64 * fraction).ceil().max(1.0) as u64
}

/// A row of the curve, in results.json.
#[derive(Serialize)]
struct CurveRow {
    varied: &'static str,
    popular_fraction: f64,
    small_layer: u64,
    large_path: u64,
    /// The server's thresholds (`Thresholds::DEFAULT`).
    default: bool,
    /// The smallest popular count at this fraction.
    popular_count: u64,
    #[serde(flatten)]
    metrics: Metrics,
}

fn kib(bytes: u64) -> String {
    if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn curve_table(curve: &[CurveRow], budgets: &[usize], max_count: u64) -> String {
    let d = Thresholds::DEFAULT;
    let mut t = format!(
        "nixery (popularity) on the same workloads and size estimates as the table above, with one \
         of its thresholds moved at a time and the others at their defaults (`layers::group_with`; \
         large_path stays {} MB). **popular_fraction**: a set of paths gets a layer of its own when \
         its count is at least this fraction of the largest count ({max_count} here), rounded up \
         and at least 1 (default {}). **small_layer**: layers under this many NAR bytes share one \
         layer, but for those of paths in at least half as many closures as the most popular one; \
         0 turns it off (default {}). Moving either down tends to give more paths a layer of their \
         own: fewer bytes downloaded and stored twice, more layers (and more small ones) per \
         image; moving it up, the reverse. The server's defaults are in bold.\n\n\
         | Budget | Thresholds | {METRIC_COLUMNS}\n| --- | --- | {METRIC_RULE}\n",
        d.large_path / 1_000_000,
        d.popular_fraction,
        kib(d.small_layer),
    );
    for &b in budgets {
        for r in curve.iter().filter(|r| r.metrics.budget == b) {
            let label = if r.varied == "popular_fraction" {
                let what = if r.popular_fraction <= 0.0 {
                    ": every counted path"
                } else if r.popular_fraction >= 1.0 {
                    ": only the most popular"
                } else {
                    ""
                };
                format!(
                    "popular_fraction {} (count ≥ {}{what})",
                    r.popular_fraction, r.popular_count
                )
            } else if r.small_layer == 0 {
                "small_layer 0 (off)".to_owned()
            } else {
                format!("small_layer {}", kib(r.small_layer))
            };
            let label = if r.default {
                format!("**{label}, default**")
            } else {
                label
            };
            t.push_str(&format!("| {b} | {label} | {}\n", metric_cells(&r.metrics)));
        }
    }
    t
}

// ---------------------------------------------------------------------------------------------
// simulate

fn mb(bytes: f64) -> String {
    format!("{:.1}", bytes / 1e6)
}

/// Bytes as MB, or as kB below one MB.
fn human(bytes: f64) -> String {
    if bytes.abs() >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.1} kB", bytes / 1e3)
    }
}

fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |name: &str, timings: &mut Vec<(String, f64)>| {
            let s = last.elapsed().as_secs_f64();
            eprintln!("[layering] {name}: {s:.2} s");
            timings.push((name.to_owned(), s));
            last = Instant::now();
        }
    };
    ensure!(
        args.budgets.iter().all(|&b| b >= 2),
        "a budget must leave room for the root layer and one more"
    );
    let u = Universe::load(&args.data)?;
    let popularity_bytes = fs::read(args.data.join("popularity.json"))
        .with_context(|| format!("reading {}/popularity.json", args.data.display()))?;
    let popularity = Popularity::parse(&popularity_bytes).map_err(anyhow::Error::msg)?;
    let counts: HashMap<String, u64> = serde_json::from_slice(&popularity_bytes)?;
    lap("load", &mut timings);
    let sizes = Sizes::load(&u, &args.sizes, args.level, args.skip_real)?;
    lap("per-path sizes", &mut timings);

    let w = Workload::new(&u, args.seed, args.pairs, args.fleet);
    let cx = Strategies {
        u: &u,
        popularity: &popularity,
        counts: &counts,
        thresholds: Thresholds::DEFAULT,
    };
    let jobs: Vec<(Strategy, usize, Thresholds)> = args
        .budgets
        .iter()
        .flat_map(|&b| STRATEGIES.iter().map(move |&s| (s, b, Thresholds::DEFAULT)))
        .collect();
    let runs = run_all(&cx, &sizes, &w, &jobs)?;
    lap("layering every image", &mut timings);
    let results: Vec<Metrics> = runs.iter().map(|r| metrics(r, &w, &sizes, &u)).collect();
    lap("metrics", &mut timings);

    // The curve: the default point is the table's nixery (popularity) row, the others run here.
    let points = curve_points();
    let curve_jobs: Vec<(Strategy, usize, Thresholds)> = args
        .budgets
        .iter()
        .flat_map(|&b| {
            let mut distinct: Vec<Thresholds> = Vec::new();
            for p in &points {
                if p.thresholds != Thresholds::DEFAULT && !distinct.contains(&p.thresholds) {
                    distinct.push(p.thresholds);
                }
            }
            distinct
                .into_iter()
                .map(move |t| (Strategy::NixeryPopularity, b, t))
        })
        .collect();
    let curve_runs = run_all(&cx, &sizes, &w, &curve_jobs)?;
    let curve_metrics: Vec<Metrics> = curve_runs
        .iter()
        .map(|r| metrics(r, &w, &sizes, &u))
        .collect();
    let mut curve: Vec<CurveRow> = Vec::new();
    for &b in &args.budgets {
        for p in &points {
            let m = if p.thresholds == Thresholds::DEFAULT {
                results
                    .iter()
                    .find(|m| m.key == Strategy::NixeryPopularity.key() && m.budget == b)
            } else {
                curve_jobs
                    .iter()
                    .position(|&(_, jb, jt)| jb == b && jt == p.thresholds)
                    .map(|i| &curve_metrics[i])
            }
            .context("a point of the curve was not run")?;
            curve.push(CurveRow {
                varied: p.varied,
                popular_fraction: p.thresholds.popular_fraction,
                small_layer: p.thresholds.small_layer,
                large_path: p.thresholds.large_path,
                default: p.thresholds == Thresholds::DEFAULT,
                popular_count: popular_count(&popularity, p.thresholds.popular_fraction),
                metrics: m.clone(),
            });
        }
    }
    lap("the curve", &mut timings);

    let real = if args.skip_real {
        None
    } else {
        let r = real_check(&u, &runs, args)?;
        lap("real layers packed", &mut timings);
        Some(r)
    };
    let docker = docker_sample(&u, &w, &runs, args);

    // The universe in numbers.
    let nar_total: u64 = u.nar.iter().sum();
    let alone_total: u64 = sizes.alone.iter().sum();
    let all: Vec<u32> = (0..u.paths.len() as u32).collect();
    let universe = json!({
        "top_level_packages": u.top.len(),
        "store_paths": u.paths.len(),
        "nar_bytes": nar_total,
        "compressed_bytes_each_path_alone": alone_total,
        "compressed_bytes_as_one_layer_estimate": sizes.layer(&all),
        "empty_layer_bytes": sizes.empty,
        "popularity_max": popularity.max(),
        "popularity_names": popularity.len(),
        "image_paths_mean": mean(&w.images.iter().map(|i| i.paths.len() as f64).collect::<Vec<_>>()),
        "image_paths_max": w.images.iter().map(|i| i.paths.len()).max(),
        "image_bytes_mean": mean(&w.images.iter().map(|i| sizes.layer(&i.paths) as f64).collect::<Vec<_>>()),
    });

    let table = table(&results, &args.budgets);
    let targets = targets(&results, &args.budgets);
    let chain_table = chain_table(&results, &args.budgets);
    let curve_table = curve_table(&curve, &args.budgets, popularity.max());
    println!("{table}");
    println!("{targets}");
    println!("{curve_table}");

    let mut report = String::new();
    report.push_str(&format!(
        "**Universe.** {} top-level packages, {} store paths in their closures, {} MB NAR; \
         compressed at level {}, {} MB (each path alone). Popularity data: {} names, largest \
         count {} (so Nixery's absolute threshold of 100 is {:.0}% of the largest count here). \
         Workload images have {:.0} store paths on average (at most {}), {} MB compressed.\n\n",
        u.top.len(),
        u.paths.len(),
        mb(nar_total as f64),
        args.level,
        mb(alone_total as f64),
        popularity.len(),
        popularity.max(),
        100.0 * NIXERY_GO_POPULAR as f64 / popularity.max().max(1) as f64,
        universe["image_paths_mean"].as_f64().unwrap_or(0.0),
        universe["image_paths_max"],
        mb(universe["image_bytes_mean"].as_f64().unwrap_or(0.0)),
    ));
    if let Some(real) = &real {
        report.push_str(&real.markdown);
        report.push('\n');
    }
    report.push_str(&table);
    report.push('\n');
    report.push_str(&targets);
    report.push('\n');
    report.push_str(&chain_table);

    fs::create_dir_all(&args.out)?;
    let out = json!({
        "seed": args.seed,
        "level": args.level,
        "budgets": args.budgets,
        "pairs": args.pairs,
        "fleet": args.fleet,
        "universe": universe,
        "results": results,
        "curve": curve,
        "real_check": real.as_ref().map(|r| &r.json),
        "timings_s": timings.iter().map(|(k, v)| (k.clone(), *v)).collect::<BTreeMap<_, _>>(),
        "workload": {
            "pairs": w.pairs.iter().map(|&(a, b)| [w.images[a].attrs(&u), w.images[b].attrs(&u)]).collect::<Vec<_>>(),
            "fleet": w.fleet.iter().map(|&i| w.images[i].attrs(&u)).collect::<Vec<_>>(),
        },
    });
    fs::write(
        args.out.join("results.json"),
        serde_json::to_vec_pretty(&out)?,
    )?;
    fs::write(args.out.join("report.md"), &report)?;
    fs::write(args.out.join("curve.md"), &curve_table)?;
    fs::write(
        args.out.join("docker.json"),
        serde_json::to_vec_pretty(&docker)?,
    )?;
    eprintln!(
        "[layering] done in {:.1} s; wrote {}/results.json, report.md, curve.md, docker.json",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn f2(v: f64) -> String {
    if v.is_nan() {
        "n/a".to_owned()
    } else {
        format!("{v:.2}")
    }
}

/// The metrics' column headers, after the table's own first columns.
const METRIC_COLUMNS: &str = "P5 mean | P5 p90 | P5 p99 | P5 max | Fleet | Storage | Layers/image mean / max | Layers < 64 KiB per image | Common prefix, consecutive fleet images |";
const METRIC_RULE: &str = "--- | --- | --- | --- | --- | --- | --- | --- | --- |";

/// The metrics' cells of a row, as `METRIC_COLUMNS` names them.
fn metric_cells(m: &Metrics) -> String {
    format!(
        "{} | {} | {} | {} | {} | {} | {:.1} / {} | {:.1} ({:.0}%) | {:.1} layers, {} MB |",
        f2(m.p5_mean),
        f2(m.p5_p90),
        f2(m.p5_p99),
        f2(m.p5_max),
        f2(m.fleet),
        f2(m.storage),
        m.layers_mean,
        m.layers_max,
        m.small_layers_mean,
        100.0 * m.small_layers_share,
        m.prefix_layers_mean,
        mb(m.prefix_bytes_mean),
    )
}

fn table(results: &[Metrics], budgets: &[usize]) -> String {
    let mut t = format!("| Strategy | Budget | {METRIC_COLUMNS}\n| --- | --- | {METRIC_RULE}\n");
    for &b in budgets {
        for m in results.iter().filter(|m| m.budget == b) {
            t.push_str(&format!("| {} | {b} | {}\n", m.strategy, metric_cells(m)));
        }
    }
    t
}

fn chain_table(results: &[Metrics], budgets: &[usize]) -> String {
    let mut t = String::from(
        "As Docker's classic image store pulls (a layer is reused only when the whole chain below it is present, so everything past the first layer that differs is downloaded):\n\n\
         | Strategy | Budget | P5 mean | P5 p90 | Fleet |\n| --- | --- | --- | --- | --- |\n",
    );
    for &b in budgets {
        for m in results.iter().filter(|m| m.budget == b) {
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                m.strategy,
                b,
                f2(m.p5_chain_mean),
                f2(m.p5_chain_p90),
                f2(m.fleet_chain)
            ));
        }
    }
    t
}

fn targets(results: &[Metrics], budgets: &[usize]) -> String {
    let find = |key: &str, b: usize| results.iter().find(|m| m.key == key && m.budget == b);
    let yes = |ok: bool| if ok { "met" } else { "**not met**" };
    let mut t = String::from("Targets (reported, not enforced):\n\n");
    if let Some(m) = budgets.first().and_then(|&b| find("nixery_popularity", b)) {
        t.push_str(&format!(
            "- budget {}: nixery (popularity) P5 mean {} ≤ 1.25: {}; P5 p90 {} ≤ 2: {}; fleet {} ≤ 1.5: {}\n",
            m.budget,
            f2(m.p5_mean),
            yes(m.p5_mean <= 1.25),
            f2(m.p5_p90),
            yes(m.p5_p90 <= 2.0),
            f2(m.fleet),
            yes(m.fleet <= 1.5),
        ));
    }
    for &b in budgets.iter().skip(1) {
        let Some(m) = find("nixery_popularity", b) else {
            continue;
        };
        let baselines: Vec<&Metrics> = results
            .iter()
            .filter(|o| o.budget == b && o.key != "nixery_popularity")
            .collect();
        let beaten: Vec<&str> = baselines
            .iter()
            .filter(|o| !(m.p5_mean < o.p5_mean && m.p5_p90 < o.p5_p90 && m.fleet < o.fleet))
            .map(|o| o.strategy)
            .collect();
        t.push_str(&format!(
            "- budget {b}: nixery (popularity) better than every baseline on P5 mean, P5 p90 and fleet at once: {}{}; P5 max {} ≤ 10: {}\n",
            yes(beaten.is_empty()),
            if beaten.is_empty() { String::new() } else { format!(" (not better than: {})", beaten.join(", ")) },
            f2(m.p5_max),
            yes(m.p5_max <= 10.0),
        ));
    }
    t
}

// ---------------------------------------------------------------------------------------------
// The estimate against real layers.

struct RealCheck {
    json: Value,
    markdown: String,
}

/// Packs a seeded sample of the workload's layers for real and compares with the estimate. A
/// layer of one path is exact by construction, so the sample is of layers of two paths or more.
fn real_check(u: &Universe, runs: &[Run], args: &SimulateArgs) -> anyhow::Result<RealCheck> {
    // A seeded sample of each strategy's distinct layers, within a byte budget per strategy
    // (packing runs at about 100 MB/s).
    let cap: u64 = 1_500_000_000 / STRATEGIES.len() as u64;
    let per_strategy = args.real_sample.div_ceil(STRATEGIES.len());
    let mut rng = Rng(args.seed ^ 0x5ea1);
    let mut taken: HashSet<Vec<u32>> = HashSet::new();
    let (mut chosen, mut nar) = (Vec::new(), 0u64);
    for s in STRATEGIES {
        let mut candidates: Vec<&(Vec<u32>, u64)> = runs
            .iter()
            .filter(|r| r.strategy == s)
            .flat_map(|r| r.layers.iter())
            .filter(|(paths, _)| paths.len() >= 2)
            .collect();
        candidates.sort();
        candidates.dedup();
        for i in (1..candidates.len()).rev() {
            candidates.swap(i, rng.below(i + 1));
        }
        let (mut mine, mut nar_mine) = (0, 0u64);
        for (paths, estimate) in candidates {
            let bytes: u64 = paths.iter().map(|&p| u.nar[p as usize]).sum();
            if mine < per_strategy && nar_mine + bytes <= cap && taken.insert(paths.clone()) {
                nar += bytes;
                nar_mine += bytes;
                mine += 1;
                chosen.push((paths.clone(), (*estimate, s.label())));
            }
        }
    }
    eprintln!(
        "[layering] packing {} real layers ({:.1} MB NAR) to check the estimate",
        chosen.len(),
        nar as f64 / 1e6
    );
    let mut rows = Vec::new();
    for (paths, (estimate, strategy)) in &chosen {
        let names: Vec<String> = paths.iter().map(|&p| u.paths[p as usize].clone()).collect();
        let real = packed_size(&names, args.level)?;
        rows.push(json!({
            "strategy": strategy,
            "paths": paths.len(),
            "estimate": estimate,
            "real": real,
            "error": *estimate as f64 / real as f64 - 1.0,
        }));
    }
    let errors: Vec<f64> = rows.iter().filter_map(|r| r["error"].as_f64()).collect();
    let abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
    let est_total: u64 = rows.iter().filter_map(|r| r["estimate"].as_u64()).sum();
    let real_total: u64 = rows.iter().filter_map(|r| r["real"].as_u64()).sum();
    let worst = rows
        .iter()
        .max_by(|a, b| {
            a["error"]
                .as_f64()
                .unwrap_or(0.0)
                .abs()
                .total_cmp(&b["error"].as_f64().unwrap_or(0.0).abs())
        })
        .cloned()
        .unwrap_or(Value::Null);
    let summary = json!({
        "layers": rows.len(),
        "mean_abs_error": mean(&abs),
        "p90_abs_error": percentile(&abs, 90.0),
        "max_abs_error": abs.iter().copied().fold(0.0, f64::max),
        "mean_error": mean(&errors),
        "estimate_bytes": est_total,
        "real_bytes": real_total,
        "total_error": est_total as f64 / real_total as f64 - 1.0,
        "worst": worst,
        "rows": rows,
    });
    let markdown = format!(
        "**Size estimate against real layers.** {} layers of two or more store paths, drawn from every strategy's layers, packed for real with nixery's packer at level {}: estimate/real − 1 is {:+.2}% over their {} MB in all; per layer, mean |error| {:.2}%, p90 {:.2}%, worst {:+.2}% ({} paths, {} kB real, from {}). (A layer of one path is exact by construction.)\n",
        rows.len(),
        args.level,
        100.0 * (est_total as f64 / real_total as f64 - 1.0),
        mb(real_total as f64),
        100.0 * mean(&abs),
        100.0 * percentile(&abs, 90.0),
        100.0 * summary["worst"]["error"].as_f64().unwrap_or(0.0),
        summary["worst"]["paths"],
        summary["worst"]["real"].as_u64().unwrap_or(0) / 1000,
        summary["worst"]["strategy"].as_str().unwrap_or("?"),
    );
    Ok(RealCheck {
        json: summary,
        markdown,
    })
}

// ---------------------------------------------------------------------------------------------
// The sample the real server serves.

/// Pairs to pull with Docker and fleet images to have served, with nixery (popularity)'s
/// simulated layers at the default budget.
fn docker_sample(u: &Universe, w: &Workload, runs: &[Run], args: &SimulateArgs) -> Value {
    let budget = args.budgets[0];
    let Some(run) = runs
        .iter()
        .find(|r| r.strategy == Strategy::NixeryPopularity && r.budget == budget)
    else {
        return Value::Null;
    };
    let cap = args.docker_max_mb * 1_000_000;
    let image = |i: usize| -> Option<Value> {
        let name = w.images[i].registry_name(u)?;
        let sizes: Vec<u64> = run.images[i].iter().map(|&l| run.size(l)).collect();
        (sizes.iter().sum::<u64>() <= cap)
            .then(|| json!({ "name": name, "packages": w.images[i].attrs(u), "layers": sizes }))
    };
    let mut pairs = Vec::new();
    for (n, &(a, b)) in w.pairs.iter().enumerate() {
        if pairs.len() >= args.docker_pairs {
            break;
        }
        let (Some(ia), Some(ib)) = (image(a), image(b)) else {
            continue;
        };
        let (by_layer, by_chain) = run.download(a, b);
        let have = &w.images[a].paths;
        let new: Vec<u32> = w.images[b]
            .paths
            .iter()
            .copied()
            .filter(|p| have.binary_search(p).is_err())
            .collect();
        if new.is_empty() || ia["name"] == ib["name"] {
            continue;
        }
        pairs.push(json!({
            "pair": n,
            "a": ia,
            "b": ib,
            "sim_by_layer": by_layer,
            "sim_by_chain": by_chain,
        }));
    }
    let served: Vec<Value> = w
        .fleet
        .iter()
        .filter_map(|&i| image(i))
        .take(args.served_images)
        .collect();
    json!({ "budget": budget, "strategy": run.strategy.label(), "pairs": pairs, "served": served })
}

// ---------------------------------------------------------------------------------------------
// served

fn served(args: &ServedArgs) -> anyhow::Result<()> {
    let sample: Value = serde_json::from_slice(&fs::read(&args.sample)?)?;
    let manifest = |file: String| -> anyhow::Result<Vec<(String, u64)>> {
        let path = args.manifests.join(&file);
        let m: Value = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        Ok(m["layers"]
            .as_array()
            .context("a manifest without layers")?
            .iter()
            .map(|l| {
                (
                    l["digest"].as_str().unwrap_or("").to_owned(),
                    l["size"].as_u64().unwrap_or(0),
                )
            })
            .collect())
    };
    let config_size = |file: String| -> u64 {
        fs::read(args.manifests.join(file))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|m| m["config"]["size"].as_u64())
            .unwrap_or(0)
    };
    // Served images: does the server's layering match the simulation, and how far is the
    // estimate from the layers it packed?
    let mut rows = String::new();
    let (mut est_total, mut real_total, mut matched, mut images) = (0u64, 0u64, 0, 0);
    let mut errors: Vec<f64> = Vec::new();
    let mut check = |name: &str, est: &[u64], real: &[(String, u64)], rows: &mut String| {
        // The server's last layer is the image root, which the simulation leaves out.
        let real: Vec<u64> = real[..real.len().saturating_sub(1)]
            .iter()
            .map(|l| l.1)
            .collect();
        let same_count = real.len() == est.len();
        images += 1;
        if same_count {
            matched += 1;
            for (e, r) in est.iter().zip(&real) {
                errors.push((*e as f64 / *r as f64 - 1.0).abs());
            }
        }
        let (e, r): (u64, u64) = (est.iter().sum(), real.iter().sum());
        est_total += e;
        real_total += r;
        rows.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} | {:+.2}% |\n",
            est.len(),
            real.len(),
            human(e as f64),
            human(r as f64),
            100.0 * (e as f64 / r as f64 - 1.0)
        ));
    };
    let as_u64s = |v: &Value| -> Vec<u64> {
        v.as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let empty = Vec::new();
    for (i, s) in sample["served"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let real = manifest(format!("served-{i}.json"))?;
        check(
            s["name"].as_str().unwrap_or("?"),
            &as_u64s(&s["layers"]),
            &real,
            &mut rows,
        );
    }
    let mut pulls: HashMap<usize, (u64, u64)> = HashMap::new();
    if let Ok(text) = fs::read_to_string(&args.pulls) {
        for line in text.lines() {
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [n, a, b] = v[..] {
                pulls.insert(n as usize, (a, b));
            }
        }
    }
    let mut pull_rows = String::new();
    for (i, p) in sample["pairs"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let ra = manifest(format!("pair-{i}-a.json"))?;
        let rb = manifest(format!("pair-{i}-b.json"))?;
        check(
            p["a"]["name"].as_str().unwrap_or("?"),
            &as_u64s(&p["a"]["layers"]),
            &ra,
            &mut rows,
        );
        check(
            p["b"]["name"].as_str().unwrap_or("?"),
            &as_u64s(&p["b"]["layers"]),
            &rb,
            &mut rows,
        );
        let Some(&(_, served_b)) = pulls.get(&i) else {
            continue;
        };
        let (root_b, layers_a, layers_b) = (
            rb.last().map_or(0, |l| l.1),
            &ra[..ra.len().saturating_sub(1)],
            &rb[..rb.len().saturating_sub(1)],
        );
        let held: HashSet<&str> = layers_a.iter().map(|l| l.0.as_str()).collect();
        let real_by_layer: u64 = layers_b
            .iter()
            .filter(|l| !held.contains(l.0.as_str()))
            .map(|l| l.1)
            .sum();
        let prefix = layers_a
            .iter()
            .zip(layers_b)
            .take_while(|(x, y)| x.0 == y.0)
            .count();
        let real_by_chain: u64 = layers_b[prefix..].iter().map(|l| l.1).sum();
        let docker_b = served_b.saturating_sub(root_b + config_size(format!("pair-{i}-b.json")));
        pull_rows.push_str(&format!(
            "| `{}` then `{}` | {} | {} | {} | {} | {} |\n",
            p["a"]["name"].as_str().unwrap_or("?"),
            p["b"]["name"].as_str().unwrap_or("?"),
            human(p["sim_by_layer"].as_u64().unwrap_or(0) as f64),
            human(real_by_layer as f64),
            human(p["sim_by_chain"].as_u64().unwrap_or(0) as f64),
            human(real_by_chain as f64),
            human(docker_b as f64),
        ));
    }
    let abs_mean = mean(&errors);
    println!(
        "**The real server, {} at the default budget.** A nixery serving this package set with this popularity data built {images} images of the workload; for {matched} of them it made as many layers as the simulation (the image root aside). Estimated {} against {} of real layers ({:+.2}%); per layer, mean |error| {:.2}%.\n",
        sample["strategy"].as_str().unwrap_or("?"),
        human(est_total as f64),
        human(real_total as f64),
        100.0 * (est_total as f64 / real_total as f64 - 1.0),
        100.0 * abs_mean,
    );
    println!(
        "| Image | Layers simulated | Layers served | Simulated | Served | Difference |\n| --- | --- | --- | --- | --- | --- |\n{rows}"
    );
    if !pull_rows.is_empty() {
        println!(
            "**`docker pull`, second image of a pair after the first** (Docker's image store: {}). Simulated and real (from the two manifests) downloads by layer identity and by chain (what Docker's classic store fetches: every layer after the first one that differs), and what the server counted in `nixery_blob_bytes_served_total` during the second pull, less that image's root layer and config.\n",
            if args.docker_store.is_empty() {
                "unknown"
            } else {
                &args.docker_store
            }
        );
        println!(
            "| Pair | Simulated, by layer | Real, by layer | Simulated, by chain | Real, by chain | Served by nixery |\n| --- | --- | --- | --- | --- | --- |\n{pull_rows}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// popularity

fn popularity(args: &PopularityArgs) -> anyhow::Result<()> {
    let u = Universe::load(&args.data)?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for t in &u.top {
        let names: HashSet<&str> = t
            .closure
            .iter()
            .map(|&p| store_path_name(&u.paths[p as usize]))
            .collect();
        for name in names {
            *counts.entry(name.to_owned()).or_default() += 1;
        }
    }
    fs::write(&args.output, serde_json::to_vec_pretty(&counts)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A universe from `(name, NAR size, references)`, names becoming store paths, and the
    /// top-level packages.
    fn universe(graph: &[(&str, u64, &[&str])], top: &[&str]) -> Universe {
        let path = |n: &str| format!("/nix/store/{:a<32}-{n}", n.len() % 10);
        let entries = graph
            .iter()
            .map(|(n, size, refs)| (path(n), *size, refs.iter().map(|r| path(r)).collect()))
            .collect();
        let top = top
            .iter()
            .map(|t| TopLevelEntry {
                attr: t.to_string(),
                path: path(t),
            })
            .collect();
        Universe::new(entries, top).unwrap()
    }

    /// Each layer's path names, sorted.
    fn names(u: &Universe, layers: &[Vec<u32>]) -> Vec<Vec<String>> {
        layers
            .iter()
            .map(|l| {
                let mut n: Vec<String> = l
                    .iter()
                    .map(|&p| store_path_name(&u.paths[p as usize]).to_owned())
                    .collect();
                n.sort();
                n
            })
            .collect()
    }

    fn strategies<'a>(
        u: &'a Universe,
        counts: &'a HashMap<String, u64>,
        p: &'a Popularity,
    ) -> Strategies<'a> {
        Strategies {
            u,
            popularity: p,
            counts,
            thresholds: Thresholds::DEFAULT,
        }
    }

    #[test]
    fn the_popularity_contest_ranks_as_closure_graph_py_does() {
        // closure-graph.py's own example: A -> B, G; B -> C, E; C -> D, E; D -> F; E -> F.
        // There: F 9, E 5, D 4, C 3, B 2, G 2, A 1, printed F E D C B G A.
        let u = universe(
            &[
                ("A", 1, &["B", "G"]),
                ("B", 1, &["C", "E"]),
                ("C", 1, &["D", "E"]),
                ("D", 1, &["F"]),
                ("E", 1, &["F"]),
                ("F", 1, &[]),
                ("G", 1, &[]),
            ],
            &["A"],
        );
        let counts = HashMap::new();
        let p = Popularity::default();
        let img = Image::new(&u, vec![0]);
        let layers = strategies(&u, &counts, &p).popularity_contest(&img, 100);
        assert_eq!(
            names(&u, &layers),
            [["F"], ["E"], ["D"], ["C"], ["B"], ["G"], ["A"]]
        );
        let layers = strategies(&u, &counts, &p).popularity_contest(&img, 3);
        assert_eq!(
            names(&u, &layers),
            vec![vec!["F"], vec!["E"], vec!["A", "B", "C", "D", "G"]]
        );
    }

    #[test]
    fn auto_layer_splits_by_the_primaries_that_need_a_path() {
        let u = universe(
            &[
                ("app1", 100, &["lib"]),
                ("app2", 90, &["lib"]),
                ("lib", 50, &["libc"]),
                ("libc", 40, &[]),
            ],
            &["app1", "app2"],
        );
        let counts = HashMap::new();
        let p = Popularity::default();
        let img = Image::new(&u, vec![0, 1]);
        let s = strategies(&u, &counts, &p);
        // Room for all: every path its own layer, the smallest closure first.
        assert_eq!(
            names(&u, &s.auto_layer(&img, 10)),
            [["libc"], ["lib"], ["app2"], ["app1"]]
        );
        // Three layers: app2 as a second primary would make four ({app1}, {app2},
        // {app1, app2} for lib and libc, and the root's), so app1 takes its dependencies.
        assert_eq!(
            names(&u, &s.auto_layer(&img, 3)),
            vec![vec!["app1", "lib", "libc"], vec!["app2"]]
        );
    }

    #[test]
    fn layers_go_merges_the_lowest_rated_into_the_next() {
        // Without popularity data every path counts 1: ratings are closure sizes summed.
        let u = universe(
            &[
                ("a", 10, &["libc"]),
                ("b", 20, &["libc"]),
                ("c", 30, &["libc"]),
                ("libc", 5, &[]),
            ],
            &["a", "b", "c"],
        );
        let counts = HashMap::new();
        let p = Popularity::default();
        let img = Image::new(&u, vec![0, 1, 2]);
        let s = strategies(&u, &counts, &p);
        // libc 5, a 15, b 25, c 35.
        assert_eq!(
            names(&u, &s.nixery_go(&img, 10)),
            [["libc"], ["a"], ["b"], ["c"]]
        );
        // libc into a (20), then that into b: [a libc b] 45 stays after c 35: no re-sort.
        assert_eq!(
            names(&u, &s.nixery_go(&img, 2)),
            vec![vec!["a", "b", "libc"], vec!["c"]]
        );
    }

    #[test]
    fn downloads_count_layers_not_held_and_chains_past_the_common_prefix() {
        let run = Run {
            strategy: Strategy::OneLayer,
            budget: 8,
            layers: vec![(vec![0], 100), (vec![1], 10), (vec![2], 1), (vec![3], 1000)],
            images: vec![vec![0, 1, 2], vec![0, 3, 1, 2]],
        };
        assert_eq!(run.download(0, 1), (1000, 1011));
        assert_eq!(run.download(1, 0), (0, 11));
    }

    #[test]
    fn the_curve_moves_one_threshold_at_a_time_and_passes_the_default_twice() {
        let d = Thresholds::DEFAULT;
        let points = curve_points();
        assert_eq!(points.iter().filter(|p| p.thresholds == d).count(), 2);
        for p in &points {
            let t = p.thresholds;
            assert_eq!(t.large_path, d.large_path);
            match p.varied {
                "popular_fraction" => assert_eq!(t.small_layer, d.small_layer),
                "small_layer" => assert_eq!(t.popular_fraction, d.popular_fraction),
                other => panic!("{other} is no threshold"),
            }
        }
        let p = Popularity::parse(br#"{"glibc": 682, "zlib": 3}"#).unwrap();
        assert_eq!(popular_count(&p, 0.0), 1);
        assert_eq!(popular_count(&p, 0.01), 7);
        assert_eq!(popular_count(&p, 1.0), 682);
    }

    #[test]
    fn splitmix64_is_the_reference_sequence() {
        // The first outputs for seed 0 (Vigna's splitmix64.c).
        let mut r = Rng(0);
        assert_eq!(r.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next(), 0x6e78_9e6a_a1b9_65f4);
    }
}
