//! The package catalog on a generated 120,000-package catalog (nixpkgs' size): build time,
//! memory, stored size, and search and suggestion latency over 2,000 varied queries, against a
//! naive baseline measured in the same run (every name compared with the query: strsim's
//! Damerau-Levenshtein for suggestions, nucleo-matcher's score for search).
//!
//! Run it with
//!
//!     cargo bench --bench catalog
//!
//! which writes its section of BENCHMARKS.md (between `<!-- bench/catalog: begin -->` and
//! `<!-- bench/catalog: end -->`, replaced if present, else appended). About a minute on 2
//! cores. Without `--bench` (as `cargo test --benches` runs it) it is a quick smoke run on a
//! small catalog that writes nothing. A report, not a gate: it fails only when the catalog
//! does not find what it must.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use nixery::catalog::{Catalog, Package};
use peak_alloc::PeakAlloc;

/// Counts every byte of heap this process holds, and its peak: how the catalog's memory is
/// measured (requested bytes; the allocator's own overhead shows in the RSS column).
#[global_allocator]
static HEAP: PeakAlloc = PeakAlloc;

/// nixpkgs' size.
const PACKAGES: usize = 120_000;
const QUERIES: usize = 2_000;
/// Queries the (slow) baseline runs.
const BASELINE_QUERIES: usize = 400;
const SEARCH_LIMIT: usize = 20;

const BEGIN: &str = "<!-- bench/catalog: begin -->";
const END: &str = "<!-- bench/catalog: end -->";

/// splitmix64: the same catalog and queries every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const SYLLABLES: &[&str] = &[
    "ab", "ac", "ad", "al", "am", "an", "ar", "as", "at", "ba", "be", "bi", "bo", "bu", "ca", "ce",
    "ch", "ci", "co", "cu", "da", "de", "di", "do", "du", "el", "en", "er", "es", "ex", "fa", "fe",
    "fi", "fo", "fu", "ga", "ge", "gi", "go", "gu", "ha", "he", "hi", "ho", "hu", "id", "il", "im",
    "in", "ir", "is", "it", "ja", "jo", "ka", "ke", "ki", "ko", "la", "le", "li", "lo", "lu", "ma",
    "me", "mi", "mo", "mu", "na", "ne", "ni", "no", "nu", "ob", "od", "ol", "om", "on", "op", "or",
    "os", "ot", "pa", "pe", "pi", "po", "pu", "qu", "ra", "re", "ri", "ro", "ru", "sa", "se", "sh",
    "si", "so", "st", "su", "ta", "te", "th", "ti", "to", "tr", "tu", "ul", "um", "un", "ur", "us",
    "va", "ve", "vi", "vo", "wa", "we", "wi", "xa", "xe", "ya", "yo", "za", "ze", "zo", "rs",
    "sql", "git", "lib", "py", "gtk", "qt", "kde",
];
const PREFIXES: &[&str] = &[
    "lib", "python-", "perl-", "go-", "rust-", "gnome-", "kde-", "x", "node-", "ocaml-", "py",
    "lua-", "ruby-", "haskell-", "emacs-", "vim-", "texlive-", "font-", "gst-",
];
const SUFFIXES: &[&str] = &[
    "-utils",
    "-cli",
    "-tools",
    "d",
    "-bin",
    "-git",
    "-unwrapped",
    "-full",
    "-minimal",
    "fs",
    "-server",
    "-client",
    "-gtk",
    "-qt",
    "ctl",
    "-daemon",
    "-static",
    "-dev",
    "-wayland",
    "2",
];
/// Nested sets and the share of packages in each (the rest is top-level), roughly as nixpkgs.
const SETS: &[(&str, usize)] = &[
    ("python3Packages", 9),
    ("python312Packages", 6),
    ("haskellPackages", 13),
    ("rPackages", 8),
    ("perlPackages", 3),
    ("emacsPackages", 4),
    ("vimPlugins", 2),
    ("nodePackages", 2),
    ("ocamlPackages", 1),
    ("xorg", 1),
    ("linuxPackages", 1),
];
const WORDS: &[&str] = &[
    "library",
    "for",
    "the",
    "a",
    "fast",
    "tool",
    "to",
    "and",
    "of",
    "with",
    "command-line",
    "interface",
    "Python",
    "Haskell",
    "bindings",
    "simple",
    "modern",
    "terminal",
    "file",
    "manager",
    "server",
    "client",
    "network",
    "parser",
    "JSON",
    "image",
    "viewer",
    "editor",
    "text",
    "support",
    "written",
    "in",
    "Rust",
    "Go",
    "implementation",
    "protocol",
    "data",
    "system",
    "lightweight",
    "secure",
    "cross-platform",
    "GTK",
    "Qt",
    "desktop",
    "utility",
    "collection",
    "framework",
    "testing",
    "plugin",
    "Emacs",
    "Vim",
    "fonts",
    "audio",
    "video",
];
const LICENSES: &[&str] = &[
    "MIT",
    "GPL-3.0-or-later",
    "GPL-2.0-only",
    "Apache-2.0",
    "BSD-3-Clause",
    "LGPL-2.1-or-later",
    "MPL-2.0",
    "ISC",
    "unfree",
    "MIT, Apache-2.0",
];

/// A package name that looks like nixpkgs': `libfoobar`, `gnome-bazqux-utils`, `zeta2`.
fn package_name(rng: &mut Rng) -> String {
    let mut name = String::new();
    if rng.chance(25) {
        name.push_str(rng.pick(PREFIXES));
    }
    for _ in 0..1 + rng.below(3) {
        name.push_str(rng.pick(SYLLABLES));
    }
    if rng.chance(25) {
        name.push_str(rng.pick(SUFFIXES));
    }
    if rng.chance(8) {
        write!(name, "_{}", rng.below(30)).ok();
    }
    name
}

/// `n` packages with distinct pullable names, ~60-character descriptions and realistic fields.
fn generate(n: usize, rng: &mut Rng) -> Vec<Package> {
    let mut seen = std::collections::HashSet::new();
    let mut packages = Vec::with_capacity(n);
    while packages.len() < n {
        let mut roll = rng.below(100);
        let set = SETS.iter().find_map(|(set, share)| {
            if roll < *share {
                Some(*set)
            } else {
                roll -= share;
                None
            }
        });
        let base = package_name(rng);
        let attr = match set {
            Some(set) => format!("{set}.{base}"),
            None if rng.chance(1) => format!("_{}{base}", rng.below(10)),
            None => base.clone(),
        };
        if !seen.insert(attr.to_lowercase()) {
            continue;
        }
        let mut description = String::new();
        while description.len() < 45 + rng.below(30) {
            if !description.is_empty() {
                description.push(' ');
            }
            description.push_str(rng.pick(WORDS));
        }
        packages.push(Package {
            name: String::new(),
            version: Some(format!(
                "{}.{}.{}",
                rng.below(10),
                rng.below(40),
                rng.below(20)
            )),
            description: Some(description),
            homepage: Some(format!("https://github.com/{}/{base}", package_name(rng))),
            license: Some(rng.pick(LICENSES).to_string()),
            attr,
        });
    }
    packages
}

/// One edit or two: a substitution, deletion, insertion or transposition.
fn typo(name: &str, rng: &mut Rng) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    for _ in 0..1 + rng.below(2) {
        let at = rng.below(chars.len().max(1));
        let letter = (b'a' + rng.below(26) as u8) as char;
        match rng.below(4) {
            0 if !chars.is_empty() => chars[at] = letter,
            1 if chars.len() > 2 => {
                chars.remove(at);
            }
            2 if at + 1 < chars.len() => chars.swap(at, at + 1),
            _ => chars.insert(at, letter),
        }
    }
    chars.into_iter().collect()
}

/// The kinds of queries, each a share of the 2,000.
const KINDS: &[&str] = &[
    "exact name",
    "exact last component",
    "prefix",
    "typo",
    "nonsense",
    "one character",
    "mixed (dotted, case, words)",
];

fn queries(catalog: &Catalog, n: usize, rng: &mut Rng) -> Vec<(usize, String)> {
    let packages = catalog.packages();
    let name = |rng: &mut Rng| packages[rng.below(packages.len())].name.clone();
    (0..n)
        .map(|i| {
            let kind = i % KINDS.len();
            let query = match kind {
                0 => name(rng),
                1 => {
                    let full = name(rng);
                    full.rsplit('.').next().unwrap_or(&full).to_owned()
                }
                2 => {
                    let full = name(rng);
                    let last = full.rsplit('.').next().unwrap_or(&full).to_owned();
                    last.chars().take(2 + rng.below(5)).collect()
                }
                3 => typo(&name(rng), rng),
                4 => (0..4 + rng.below(9))
                    .map(|_| (b'a' + rng.below(26) as u8) as char)
                    .collect(),
                5 => ((if rng.chance(80) {
                    b'a' + rng.below(26) as u8
                } else {
                    b'0' + rng.below(10) as u8
                }) as char)
                    .to_string(),
                _ => match rng.below(3) {
                    0 => name(rng).to_uppercase(),
                    1 => format!("{} {}", rng.pick(SYLLABLES), rng.pick(SYLLABLES)),
                    _ => format!("haskellpackages.{}", rng.pick(SYLLABLES)),
                },
            };
            (kind, query)
        })
        .collect()
}

/// Latency percentiles of `samples`.
struct Latency {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        max: samples.last().copied().unwrap_or_default(),
    }
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = f();
    (value, started.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Resident set size, from /proc/self/statm.
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The naive "did you mean": every name and last component against the query.
fn naive_suggest(packages: &[Package], missing: &str) -> Vec<String> {
    let query = missing.trim().to_lowercase();
    let max = match query.len() {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2,
    };
    let mut close: Vec<(usize, &str)> = packages
        .iter()
        .filter_map(|p| {
            let last = p.name.rsplit('.').next().unwrap_or(&p.name);
            let d = strsim::damerau_levenshtein(&query, &p.name)
                .min(strsim::damerau_levenshtein(&query, last));
            (d <= max && p.name != query).then_some((d, p.name.as_str()))
        })
        .collect();
    close.sort();
    close
        .into_iter()
        .take(3)
        .map(|(_, n)| n.to_owned())
        .collect()
}

/// The naive search: nucleo's score of every name, sorted.
fn naive_search<'a>(packages: &'a [Package], query: &str, limit: usize) -> Vec<&'a Package> {
    use nucleo_matcher::pattern::{CaseMatching, Normalization, Pattern};
    let pattern = Pattern::parse(query, CaseMatching::Ignore, Normalization::Smart);
    let mut matcher = nucleo_matcher::Matcher::default();
    let mut buf = Vec::new();
    let mut scored: Vec<(u32, &Package)> = packages
        .iter()
        .filter_map(|p| {
            let score = pattern.score(
                nucleo_matcher::Utf32Str::new(&p.name, &mut buf),
                &mut matcher,
            )?;
            Some((score, p))
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    scored.into_iter().take(limit).map(|(_, p)| p).collect()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (packages_n, queries_n, baseline_n) = if full {
        (PACKAGES, QUERIES, BASELINE_QUERIES)
    } else {
        (5_000, 200, 20)
    };
    let run_started = Instant::now();
    let mut rng = Rng(0x6e69_7865_7279);

    // Build: time (median of 3), heap and RSS of the catalog alone (its input is consumed).
    let mut builds = Vec::new();
    let mut catalog = None;
    let mut heap = 0;
    let mut peak = 0;
    let mut rss_delta = 0;
    for round in 0..3 {
        drop(catalog.take());
        let mut round_rng = Rng(0x6e69_7865_7279);
        let base_heap = HEAP.current_usage();
        let base_rss = rss();
        let input = generate(packages_n, &mut round_rng);
        let input_heap = HEAP.current_usage() - base_heap;
        HEAP.reset_peak_usage();
        let (built, took) = time(|| Catalog::from_packages(input));
        builds.push(took);
        if round == 0 {
            heap = HEAP.current_usage() - base_heap;
            peak = HEAP.peak_usage() - base_heap;
            rss_delta = rss().saturating_sub(base_rss);
            println!(
                "input {}, catalog {} ({} packages)",
                mb(input_heap),
                mb(heap),
                built.len()
            );
        }
        catalog = Some(built);
    }
    builds.sort();
    let build = builds[1];
    let Some(catalog) = catalog else { return };
    assert_eq!(
        catalog.len(),
        packages_n,
        "every generated package is in the catalog"
    );

    let (bytes, to_bytes) = time(|| catalog.to_bytes());
    let (read, from_bytes) = time(|| Catalog::from_bytes(&bytes));
    let read = read.expect("the catalog reads back");
    assert_eq!(read.packages(), catalog.packages());
    drop(read);

    // The must-finds, among 120,000 neighbours.
    let mut must = catalog.packages().to_vec();
    for attr in [
        "hello",
        "xorg.xev",
        "_1password",
        "nodejs",
        "haskellPackages.shellcheck",
    ] {
        must.push(Package {
            name: String::new(),
            attr: attr.to_owned(),
            version: None,
            description: None,
            homepage: None,
            license: None,
        });
    }
    let with_real = Catalog::from_packages(must);
    let first = |q: &str| with_real.search(q, 1).first().map(|p| p.name.clone());
    assert_eq!(first("hello").as_deref(), Some("hello"));
    assert_eq!(first("xev").as_deref(), Some("xorg.xev"));
    assert_eq!(first("1password").as_deref(), Some("1password"));
    assert_eq!(
        with_real.suggest("nodjs").first().map(String::as_str),
        Some("nodejs")
    );
    assert!(with_real.suggest("zzzzzz").is_empty());
    drop(with_real);

    // Latency.
    let queries = queries(&catalog, queries_n, &mut rng);
    for (_, q) in queries.iter().take(100) {
        catalog.search(q, SEARCH_LIMIT);
        catalog.suggest(q);
    }
    let mut search = vec![Vec::new(); KINDS.len()];
    let mut suggest = vec![Vec::new(); KINDS.len()];
    let mut results = 0;
    let mut suggested = 0;
    for (kind, q) in &queries {
        let (found, took) = time(|| catalog.search(q, SEARCH_LIMIT));
        results += found.len();
        search[*kind].push(took);
        let (close, took) = time(|| catalog.suggest(q));
        suggested += usize::from(!close.is_empty());
        suggest[*kind].push(took);
    }
    let all = |per: &[Vec<Duration>]| latency(per.iter().flatten().copied().collect());
    let search_all = all(&search);
    let suggest_all = all(&suggest);

    // Baseline, on the first queries of each kind.
    let baseline: Vec<&(usize, String)> = queries.iter().take(baseline_n).collect();
    let mut naive_search_times = Vec::new();
    let mut naive_suggest_times = Vec::new();
    for (_, q) in &baseline {
        naive_search_times.push(time(|| naive_search(catalog.packages(), q, SEARCH_LIMIT)).1);
        naive_suggest_times.push(time(|| naive_suggest(catalog.packages(), q)).1);
    }
    let mut ours_search = Vec::new();
    let mut ours_suggest = Vec::new();
    for (_, q) in &baseline {
        ours_search.push(time(|| catalog.search(q, SEARCH_LIMIT)).1);
        ours_suggest.push(time(|| catalog.suggest(q)).1);
    }
    let (naive_search_l, naive_suggest_l) =
        (latency(naive_search_times), latency(naive_suggest_times));
    let (ours_search_l, ours_suggest_l) = (latency(ours_search), latency(ours_suggest));
    let ratio =
        |ours: Duration, naive: Duration| naive.as_secs_f64() / ours.as_secs_f64().max(1e-9);

    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    let five_ms = Duration::from_millis(5);
    let mut report = String::new();
    let w = &mut report;
    writeln!(w, "{BEGIN}").ok();
    writeln!(
        w,
        "## Package catalog: search and suggestions (benches/catalog.rs)"
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "Generated by `cargo bench --bench catalog` on {} in {:.0} s; {}. A report, not a gate.",
        command(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        run_started.elapsed().as_secs_f64(),
        machine()
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "**Catalog.** {} generated packages with nixpkgs-like names (syllables, prefixes such as \
         `lib`/`python-`, suffixes such as `-utils`; {}% in nested sets such as \
         `haskellPackages.*`, `python3Packages.*`, `xorg.*`; 1% `_`-digit names), a version, a \
         45–75 character description, a homepage and a license each; seeded splitmix64, the same \
         every run.",
        catalog.len(),
        SETS.iter().map(|s| s.1).sum::<usize>()
    )
    .ok();
    writeln!(w).ok();
    writeln!(w, "| Metric | Value | Target | Met |").ok();
    writeln!(w, "| --- | --- | --- | --- |").ok();
    writeln!(
        w,
        "| Build (`Catalog::from_packages`, median of 3) | {} | | |",
        ms(build)
    )
    .ok();
    writeln!(
        w,
        "| Memory: heap held by the catalog | {} | ≤ 100 MB | {} |",
        mb(heap),
        met(heap <= 100_000_000)
    )
    .ok();
    writeln!(
        w,
        "| Memory: peak heap while building (input included) | {} | | |",
        mb(peak)
    )
    .ok();
    writeln!(
        w,
        "| Memory: RSS growth for input and catalog | {} | | |",
        mb(rss_delta)
    )
    .ok();
    writeln!(
        w,
        "| Memory: the catalog's own count (`heap_bytes`) | {} | | |",
        mb(catalog.heap_bytes())
    )
    .ok();
    writeln!(
        w,
        "| Stored (`to_bytes`) | {} in {}; read back (`from_bytes`) in {} | | |",
        mb(bytes.len()),
        ms(to_bytes),
        ms(from_bytes)
    )
    .ok();
    writeln!(
        w,
        "| Search, {} queries, limit {SEARCH_LIMIT}: p50 / p99 / max | {} / {} / {} | p99 ≤ 5 ms | {} |",
        queries.len(),
        ms(search_all.p50),
        ms(search_all.p99),
        ms(search_all.max),
        met(search_all.p99 <= five_ms)
    )
    .ok();
    writeln!(
        w,
        "| Suggest, {} queries: p50 / p99 / max | {} / {} / {} | p99 ≤ 5 ms | {} |",
        queries.len(),
        ms(suggest_all.p50),
        ms(suggest_all.p99),
        ms(suggest_all.max),
        met(suggest_all.p99 <= five_ms)
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "Per kind of query ({} of each kind; {results} search results in all, {suggested} queries with a suggestion):",
        queries.len() / KINDS.len()
    )
    .ok();
    writeln!(w).ok();
    writeln!(w, "| Query | Search p50 / p99 | Suggest p50 / p99 |").ok();
    writeln!(w, "| --- | --- | --- |").ok();
    for (i, kind) in KINDS.iter().enumerate() {
        let (s, g) = (latency(search[i].clone()), latency(suggest[i].clone()));
        writeln!(
            w,
            "| {kind} | {} / {} | {} / {} |",
            ms(s.p50),
            ms(s.p99),
            ms(g.p50),
            ms(g.p99)
        )
        .ok();
    }
    writeln!(w).ok();
    writeln!(
        w,
        "**Against a naive baseline** (same run, first {} queries): comparing the query with every \
         name, as a catalog without an index would (suggest: strsim's Damerau-Levenshtein with the \
         same distance bounds; search: nucleo-matcher's score of every name, sorted). Ratio = \
         baseline / catalog.",
        baseline.len()
    )
    .ok();
    writeln!(w).ok();
    writeln!(
        w,
        "| | Catalog p50 / p99 | Baseline p50 / p99 | Ratio p50 / p99 |"
    )
    .ok();
    writeln!(w, "| --- | --- | --- | --- |").ok();
    for (what, ours, naive) in [
        ("Search", &ours_search_l, &naive_search_l),
        ("Suggest", &ours_suggest_l, &naive_suggest_l),
    ] {
        writeln!(
            w,
            "| {what} | {} / {} | {} / {} | {:.1}x / {:.1}x |",
            ms(ours.p50),
            ms(ours.p99),
            ms(naive.p50),
            ms(naive.p99),
            ratio(ours.p50, naive.p50),
            ratio(ours.p99, naive.p99)
        )
        .ok();
    }
    writeln!(w).ok();
    writeln!(
        w,
        "Memory is the heap the catalog holds once built, counted by a global allocator in the \
         benchmark (requested bytes; the RSS row adds the allocator's overhead and the freed input's \
         pages). Latency is one query at a time on one thread, after 100 warm-up queries."
    )
    .ok();
    writeln!(w, "{END}").ok();

    print!("{report}");
    if full {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        let updated = match (existing.find(BEGIN), existing.find(END)) {
            (Some(begin), Some(end)) if begin < end => {
                let after = &existing[end + END.len()..];
                let after = after.strip_prefix('\n').unwrap_or(after);
                format!("{}{report}{after}", &existing[..begin])
            }
            _ if existing.is_empty() => report,
            _ => format!(
                "{}\n{report}",
                existing.trim_end_matches('\n').to_owned() + "\n"
            ),
        };
        std::fs::write(&path, updated).expect("writing BENCHMARKS.md");
        println!("wrote {}", path.display());
    }
}

/// What `args` prints, trimmed ("?" if it cannot run).
fn command(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// CPU, cores and nixery's commit.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let commit = command(&["git", "rev-parse", "--short", "HEAD"]);
    let dirty = !command(&["git", "status", "--porcelain"]).is_empty();
    format!(
        "{cpu}, {cores} cores, commit {commit}{}, `cargo bench` (release)",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    )
}
