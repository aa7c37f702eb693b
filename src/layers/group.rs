//! Grouping an image's store paths into a bounded number of layers.
//!
//! Layering is a pure function of the closure graph, the popularity data and the layer budget, so
//! that every image that needs a path in the same context gets the same layer, byte for byte.
//! A path's *count* is in how many packages' closures the popularity data says it is.
//!
//! 1. Paths that always come together are one unit: when a path refers to another with the same
//!    count, every package that needs the one needs the other. Under a tight budget (at most
//!    [`TIGHT_LAYERS`] layers), a path also joins a path that refers to it when its count is at
//!    most [`TIGHT_JOIN`] times the referrer's: it is needed mostly through that one. Step 5
//!    would merge layers anyway, and its merge depends on the rest of the image; this one depends
//!    only on the two paths and the data, so the path lands in the same layer in every image,
//!    and a small image fits the budget without step 5. Then a unit of at most [`SMALL_UNIT`]
//!    bytes (a shared library, say) joins a unit that refers to it when the count of its least
//!    needed path is at most [`SMALL_UNIT_JOIN`] times that unit's: a small image would give it a
//!    layer of its own and a large image would merge it with the rest in step 5, and neither
//!    layer would be found in the other image; inside the unit that needs it, it is in both.
//!    Both factors are at full strength up to [`FULL_TIGHT_LAYERS`] layers and shrink towards 1
//!    as the budget grows (see [`tight_factors`]): a looser budget merges less, and the rule has
//!    no cliff where it stops.
//! 2. A unit gets a layer of its own when it is *popular* (its count is at least
//!    [`POPULAR_FRACTION`] of the largest count in the data, so the rule works for a 15-package
//!    set and for nixpkgs alike) or *large* (a path of at least [`LARGE_PATH`] bytes): it is
//!    needed by many images, so it should be the same blob in all of them.
//! 3. Every other path joins the layer of its ancestor just below the image root in the dominator
//!    tree, once popular and large units hang from the root: a package and what only it needs form
//!    one layer, and a dependency two packages share is a layer of its own.
//! 4. Layers under [`SMALL_LAYER`] share one layer, but for those of paths in at least half as
//!    many closures as the most popular one (glibc): those are in nearly every image.
//! 5. Past the budget, the layers least likely to be found in another image (lowest count ×
//!    size) share one layer.
//! 6. The most popular layers come first, the shared leftovers last, so images share a long
//!    common prefix of layers and Docker reuses unpacked layers, not only downloads.
//!
//! bench/layering chose the numbers (BENCHMARKS.md has the curve). Without popularity data every
//! count is 0: only large paths are singled out, and the rest is the plain dominator grouping.

use std::collections::{BTreeMap, HashMap};

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};

use super::popularity::Popularity;
use crate::nix::Closure;

/// A path whose count is at least this fraction of the largest count is popular.
pub const POPULAR_FRACTION: f64 = 0.01;

/// A path at least this large (NAR bytes) gets its own layer, as in Nixery.
pub const LARGE_PATH: u64 = 100_000_000;

/// Layers smaller than this (NAR bytes; about 40 KiB compressed) share one layer, unless they are
/// in at least half as many closures as the most popular path.
pub const SMALL_LAYER: u64 = 128 * 1024;

/// A budget of at most this many layers (the image root's aside) is tight: see [`TIGHT_JOIN`]
/// and [`tight_factors`]. bench/layering measured the rules cut off at 16, 24, 31, 47 and 94
/// layers: with the factors scaled, the second universe reads better up to 94 but the first a
/// little worse from 32 on; 47 (a budget of 48, half the default) keeps the first's losses under
/// 0.07 of P5 mean, and the default budget (95) stays out of it.
pub const TIGHT_LAYERS: usize = 47;

/// Up to this many layers, the tight budget's joins use [`TIGHT_JOIN`] and [`SMALL_UNIT_JOIN`]
/// as they are; above it, both shrink towards 1 (see [`tight_factors`]).
pub const FULL_TIGHT_LAYERS: usize = 16;

/// Under a tight budget, a path joins the unit of a path that refers to it when its count is at
/// most this many times the referrer's. bench/layering measured 1.2 to 3 at a budget of 8: 1.2
/// meets the targets on the universe it tunes on and helps the other; 1.5 helps the other more
/// but misses P5 max on the first, and 3 merges so much that it undoes the gain.
pub const TIGHT_JOIN: f64 = 1.2;

/// Under a tight budget, a unit of at most this many NAR bytes (after the joins above) joins the
/// unit of a path that refers to it when its least needed path's count is at most
/// [`SMALL_UNIT_JOIN`] times that of the other unit's least needed path. See [`group`] (step 1).
pub const SMALL_UNIT: u64 = 3_000_000;

/// See [`SMALL_UNIT`]. bench/layering measured 1.5 to 8 with units of 1 to 6 MB at a budget of
/// 8: 2.5 with 3 MB did best on both universes. Less leaves shared libraries in layers of their
/// own that a larger image merges away; 6 MB units gave the first universe a P5 max over 10.
pub const SMALL_UNIT_JOIN: f64 = 2.5;

/// The factors of the tight budget's joins for `max_groups` layers: ([`TIGHT_JOIN`],
/// [`SMALL_UNIT_JOIN`]) up to [`FULL_TIGHT_LAYERS`], then each factor's excess over 1 scaled by
/// `FULL_TIGHT_LAYERS / max_groups` up to [`TIGHT_LAYERS`] (at 32 layers, 1.1 and 1.75); `None`
/// above. With a hard cut at 16 instead, budget 18 read 2.9 times budget 17's P5 mean on
/// bench/layering's second universe (4.93 against 1.70); scaled, 1.68 against 1.70.
pub fn tight_factors(max_groups: usize) -> Option<(f64, f64)> {
    if max_groups <= FULL_TIGHT_LAYERS {
        return Some((TIGHT_JOIN, SMALL_UNIT_JOIN));
    }
    if max_groups > TIGHT_LAYERS {
        return None;
    }
    let scale = FULL_TIGHT_LAYERS as f64 / max_groups as f64;
    Some((
        1.0 + (TIGHT_JOIN - 1.0) * scale,
        1.0 + (SMALL_UNIT_JOIN - 1.0) * scale,
    ))
}

/// The numbers of the layering rule. The server uses [`Thresholds::DEFAULT`]; the benchmark
/// varies them to draw the curve they were chosen from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// See [`POPULAR_FRACTION`].
    pub popular_fraction: f64,
    /// See [`LARGE_PATH`].
    pub large_path: u64,
    /// See [`SMALL_LAYER`].
    pub small_layer: u64,
}

impl Thresholds {
    pub const DEFAULT: Thresholds = Thresholds {
        popular_fraction: POPULAR_FRACTION,
        large_path: LARGE_PATH,
        small_layer: SMALL_LAYER,
    };
}

/// One layer being formed.
struct Group {
    /// The store paths, sorted.
    paths: Vec<String>,
    /// The popularity of the path the group is named after.
    popularity: u64,
    /// Total NAR bytes.
    size: u64,
    /// Leftovers of several groups (small ones, or past the budget): ordered last.
    merged: bool,
}

/// Store paths grouped into at most `max_groups` layers (`max_groups` ≥ 1), each group's paths
/// sorted, the most popular groups first. The image root itself is in no group: it is packed as
/// the image's `/`. `None` when the closure does not contain its root.
pub fn group(
    closure: &Closure,
    popularity: &Popularity,
    max_groups: usize,
) -> Option<Vec<Vec<String>>> {
    group_with(closure, popularity, max_groups, &Thresholds::DEFAULT)
}

/// [`group`] with other numbers.
pub fn group_with(
    closure: &Closure,
    popularity: &Popularity,
    max_groups: usize,
    thresholds: &Thresholds,
) -> Option<Vec<Vec<String>>> {
    let max_groups = max_groups.max(1);
    let threshold = (popularity.max() as f64 * thresholds.popular_fraction)
        .ceil()
        .max(1.0) as u64;
    let count = |path: &str| popularity.count(path).map_or(0, |(count, _)| count);

    let index: HashMap<&str, usize> = closure
        .paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.as_str(), i))
        .collect();
    let root = *index.get(closure.root.as_str())?;
    let counts: Vec<u64> = closure.paths.iter().map(|p| count(&p.path)).collect();
    let edges: Vec<(usize, usize)> = closure
        .paths
        .iter()
        .enumerate()
        .flat_map(|(from, path)| {
            path.references
                .iter()
                .filter_map(|r| index.get(r.as_str()).copied())
                .filter(move |&to| to != from)
                .map(move |to| (from, to))
        })
        .collect();

    // Paths that always come together share a layer. A path's count is the number of packages
    // whose closure has it; when a path refers to another with the same count, every package
    // that needs the one needs the other, so no image has one without the other. Under a tight
    // budget, also a path needed mostly through the one referring to it (see TIGHT_JOIN).
    let tight = tight_factors(max_groups);
    let together = |from: usize, to: usize| {
        counts[from] == counts[to]
            || tight.is_some_and(|(join, _)| counts[to] as f64 <= join * counts[from] as f64)
    };
    let mut classes = Classes::new(closure.paths.len());
    for &(from, to) in &edges {
        if from != root && counts[from] > 0 && together(from, to) {
            classes.join(from, to);
        }
    }
    if let Some((_, small_unit_join)) = tight {
        join_small_units(
            closure,
            &counts,
            &edges,
            root,
            small_unit_join,
            &mut classes,
        );
    }
    // A unit's count is its least needed path's: how many packages need all of it. (Not its
    // first path's, which would depend on the order Nix lists the paths in.)
    let mut unit_counts: Vec<u64> = vec![u64::MAX; closure.paths.len()];
    for (i, &count) in counts.iter().enumerate() {
        let class = classes.find(i);
        unit_counts[class] = unit_counts[class].min(count);
    }

    let mut graph = DiGraph::<usize, ()>::new();
    let nodes: Vec<NodeIndex> = (0..closure.paths.len())
        .map(|i| graph.add_node(i))
        .collect();
    let node = |i: usize, classes: &mut Classes| nodes[classes.find(i)];
    for (i, path) in closure.paths.iter().enumerate() {
        if i != root
            && (path.nar_size >= thresholds.large_path
                || (!popularity.is_empty() && counts[i] >= threshold))
        {
            let to = node(i, &mut classes);
            graph.update_edge(nodes[root], to, ());
        }
    }
    for &(from, to) in &edges {
        let (from, to) = (node(from, &mut classes), node(to, &mut classes));
        if from != to {
            graph.update_edge(from, to, ());
        }
    }
    let doms = dominators::simple_fast(&graph, nodes[root]);

    // Group each path under its ancestor just below the root in the dominator tree.
    let mut tops: BTreeMap<usize, Group> = BTreeMap::new();
    for (i, path) in closure.paths.iter().enumerate() {
        if i == root {
            continue;
        }
        let mut top = node(i, &mut classes);
        while let Some(idom) = doms.immediate_dominator(top) {
            if idom == nodes[root] {
                break;
            }
            top = idom;
        }
        let group = tops.entry(graph[top]).or_insert_with(|| Group {
            paths: Vec::new(),
            popularity: unit_counts[graph[top]],
            size: 0,
            merged: false,
        });
        group.size += path.nar_size;
        group.paths.push(path.path.clone());
    }

    let groups: Vec<Group> = tops.into_values().collect();
    // Small layers cost a request and an extraction each for a few bytes: those not needed by
    // nearly everything share one layer, last (it differs from image to image, and a common
    // prefix of layers is what Docker reuses unpacked).
    let everywhere = popularity.max().div_ceil(2);
    let (small, mut groups): (Vec<Group>, Vec<Group>) = groups.into_iter().partition(|g| {
        !popularity.is_empty() && g.size < thresholds.small_layer && g.popularity < everywhere
    });
    if !small.is_empty() {
        groups.push(Group {
            size: small.iter().map(|g| g.size).sum(),
            paths: small.into_iter().flat_map(|g| g.paths).collect(),
            popularity: 0,
            merged: true,
        });
    }
    for group in &mut groups {
        group.paths.sort();
    }
    if groups.len() > max_groups {
        // Those most likely to be found in another image keep their own layers; ties by name,
        // so the choice never depends on anything but the inputs.
        groups.sort_by(|a, b| {
            rating(b)
                .cmp(&rating(a))
                .then_with(|| a.paths.cmp(&b.paths))
        });
        let rest = groups.split_off(max_groups - 1);
        let mut paths: Vec<String> = rest.into_iter().flat_map(|g| g.paths).collect();
        paths.sort();
        groups.push(Group {
            paths,
            popularity: 0,
            size: 0,
            merged: true,
        });
    }
    groups.sort_by(|a, b| {
        a.merged
            .cmp(&b.merged)
            .then_with(|| b.popularity.cmp(&a.popularity))
            .then_with(|| a.paths.cmp(&b.paths))
    });
    Some(groups.into_iter().map(|g| g.paths).collect())
}

/// Under a tight budget, small units join a unit that refers to them (see [`SMALL_UNIT`]): the
/// small shared libraries a large image has to merge away would otherwise be layers of their
/// own in a small image, and a layer the large image lacks. Each unit's *top* is its least
/// needed path (lowest count, then name). Units are taken from the least needed top up, so a
/// unit that joined carries along what joined it; each joins the candidate whose unit's top is
/// the most needed (then the last by name), the same choice whatever order Nix lists paths in.
/// `factor` is [`SMALL_UNIT_JOIN`] as [`tight_factors`] scales it.
fn join_small_units(
    closure: &Closure,
    counts: &[u64],
    edges: &[(usize, usize)],
    root: usize,
    factor: f64,
    classes: &mut Classes,
) {
    let name = |i: usize| closure.paths[i].path.as_str();
    let key = |i: usize| (counts[i], name(i));
    let n = closure.paths.len();
    // The units as the joins left them: each one's top and NAR bytes, by its name in `classes`.
    let mut top: Vec<usize> = (0..n).collect();
    let mut size = vec![0u64; n];
    for i in (0..n).filter(|&i| i != root) {
        let unit = classes.find(i);
        size[unit] += closure.paths[i].nar_size;
        if key(i) < key(top[unit]) {
            top[unit] = i;
        }
    }
    let mut referrers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(from, to) in edges {
        if from == root || counts[from] == 0 {
            continue;
        }
        let (from, to) = (classes.find(from), classes.find(to));
        if from != to {
            referrers.entry(to).or_default().push(from);
        }
    }
    let mut units: Vec<usize> = (0..n)
        .filter(|&i| i != root && classes.find(i) == i)
        .collect();
    units.sort_by(|&a, &b| key(top[a]).cmp(&key(top[b])));
    // The top of each unit as it grows here, by its current name in `classes`.
    let mut grown_top = top.clone();
    for unit in units {
        if size[unit] > SMALL_UNIT {
            continue;
        }
        let own = classes.find(unit);
        let mut best: Option<usize> = None;
        for &referrer in referrers.get(&unit).into_iter().flatten() {
            let other = classes.find(referrer);
            let candidate = grown_top[other];
            if other == own || counts[top[unit]] as f64 > factor * counts[candidate] as f64 {
                continue;
            }
            if best.is_none_or(|b| key(candidate) > key(grown_top[classes.find(b)])) {
                best = Some(referrer);
            }
        }
        if let Some(referrer) = best {
            let joined_top = grown_top[classes.find(referrer)];
            classes.join(unit, referrer);
            let joined = classes.find(unit);
            grown_top[joined] = joined_top;
        }
    }
}

/// Disjoint sets of paths (union-find), each named by one of its members.
struct Classes(Vec<usize>);

impl Classes {
    fn new(n: usize) -> Classes {
        Classes((0..n).collect())
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    /// Puts `a` and `b` in one set, named by the smaller index so the result does not depend on
    /// the order of joins.
    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        let (low, high) = (a.min(b), a.max(b));
        self.0[high] = low;
    }
}

/// How much keeping a group as its own layer is worth: its bytes times how often it is needed.
fn rating(group: &Group) -> u128 {
    u128::from(group.size) * u128::from(group.popularity.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::StorePath;

    fn closure(root: &str, edges: &[(&str, &[&str], u64)]) -> Closure {
        Closure {
            root: root.to_owned(),
            paths: edges
                .iter()
                .map(|(path, refs, size)| StorePath {
                    path: path.to_string(),
                    deriver: None,
                    nar_hash: String::new(),
                    nar_size: *size,
                    references: refs.iter().map(|r| r.to_string()).collect(),
                })
                .collect(),
            packages: Vec::new(),
            meta: Vec::new(),
        }
    }

    #[test]
    fn shared_dependencies_get_their_own_layer() {
        let c = closure(
            "root",
            &[
                ("root", &["hello", "curl"], 1),
                ("hello", &["libc", "hello"], 10),
                ("curl", &["libc", "openssl"], 10),
                ("openssl", &["libc"], 10),
                ("libc", &[], 10),
            ],
        );
        assert_eq!(
            group(&c, &Popularity::default(), 10).unwrap(),
            vec![vec!["curl", "openssl"], vec!["hello"], vec!["libc"]]
        );
    }

    #[test]
    fn the_layer_of_a_shared_path_is_the_same_in_both_images() {
        let a = closure(
            "ra",
            &[
                ("ra", &["hello", "bash"], 1),
                ("hello", &["libc"], 1),
                ("bash", &["libc"], 1),
                ("libc", &[], 1),
            ],
        );
        let b = closure(
            "rb",
            &[
                ("rb", &["curl", "bash"], 1),
                ("curl", &["libc"], 1),
                ("bash", &["libc"], 1),
                ("libc", &[], 1),
            ],
        );
        let ga = group(&a, &Popularity::default(), 10).unwrap();
        let gb = group(&b, &Popularity::default(), 10).unwrap();
        assert!(ga.contains(&vec!["libc".to_owned()]) && gb.contains(&vec!["libc".to_owned()]));
        assert!(ga.contains(&vec!["bash".to_owned()]) && gb.contains(&vec!["bash".to_owned()]));
    }

    #[test]
    fn small_groups_are_merged_past_the_limit() {
        let c = closure(
            "root",
            &[
                ("root", &["a", "b", "c", "d"], 1),
                ("a", &[], 40),
                ("b", &[], 30),
                ("c", &[], 20),
                ("d", &[], 10),
            ],
        );
        assert_eq!(
            group(&c, &Popularity::default(), 3).unwrap(),
            vec![vec!["a"], vec!["b"], vec!["c", "d"]]
        );
    }

    #[test]
    fn one_group_takes_everything() {
        let c = closure(
            "root",
            &[("root", &["a", "b"], 1), ("a", &[], 1), ("b", &[], 1)],
        );
        assert_eq!(
            group(&c, &Popularity::default(), 1).unwrap(),
            vec![vec!["a", "b"]]
        );
    }

    /// Popularity counts for bare names (`closure` uses names, not store paths).
    fn counts(pairs: &[(&str, u64)]) -> Popularity {
        Popularity::from_counts(pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect())
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn a_popular_path_is_a_layer_of_its_own_even_when_one_package_needs_it() {
        // Alone, hello's dominator subtree holds libc; with the data, libc is its own layer, the
        // same one curl's image has.
        let pop = counts(&[("hello", 1), ("curl", 1), ("libc", 100)]);
        let hello = closure(
            "ra",
            &[
                ("ra", &["hello"], 1),
                ("hello", &["libc"], MB),
                ("libc", &[], MB),
            ],
        );
        let curl = closure(
            "rb",
            &[
                ("rb", &["curl"], 1),
                ("curl", &["libc"], MB),
                ("libc", &[], MB),
            ],
        );
        assert_eq!(
            group(&hello, &pop, 10).unwrap(),
            vec![vec!["libc"], vec!["hello"]]
        );
        assert_eq!(
            group(&curl, &pop, 10).unwrap(),
            vec![vec!["libc"], vec!["curl"]]
        );
        assert_eq!(
            group(&hello, &Popularity::default(), 10).unwrap(),
            vec![vec!["hello", "libc"]]
        );
    }

    #[test]
    fn paths_that_always_come_together_share_a_layer() {
        // perl-modules is needed by exactly the packages that need perl: one layer, at every
        // budget. (The budget here is not tight: under one, this small libc, needed by 2.5 times
        // as many packages as perl, would join perl's unit.)
        let pop = counts(&[
            ("git", 1),
            ("perl", 40),
            ("perl-modules", 40),
            ("libc", 100),
        ]);
        let c = closure(
            "root",
            &[
                ("root", &["git"], 1),
                ("git", &["perl", "libc"], MB),
                ("perl", &["perl-modules", "libc"], MB),
                ("perl-modules", &[], MB),
                ("libc", &[], MB),
            ],
        );
        assert_eq!(
            group(&c, &pop, TIGHT_LAYERS + 1).unwrap(),
            vec![vec!["libc"], vec!["perl", "perl-modules"], vec!["git"]]
        );
    }

    #[test]
    fn small_layers_share_one_last_unless_nearly_everything_needs_them() {
        let pop = counts(&[("app", 1), ("tiny-lib", 10), ("tzdata", 60), ("libc", 100)]);
        let c = closure(
            "root",
            &[
                ("root", &["app", "tiny-lib", "tzdata"], 1),
                ("app", &["libc"], 1000),
                ("tiny-lib", &["libc"], 1000),
                ("tzdata", &[], 1000),
                ("libc", &[], MB),
            ],
        );
        assert_eq!(
            group(&c, &pop, 10).unwrap(),
            vec![vec!["libc"], vec!["tzdata"], vec!["app", "tiny-lib"]]
        );
    }

    #[test]
    fn past_the_budget_the_layers_least_likely_shared_merge() {
        let pop = counts(&[("a", 1), ("b", 50), ("c", 90), ("d", 100)]);
        let c = closure(
            "root",
            &[
                ("root", &["a", "b", "c", "d"], 1),
                ("a", &[], 10 * MB),
                ("b", &[], MB),
                ("c", &[], MB),
                ("d", &[], MB),
            ],
        );
        // Ratings (count × size): a 10, b 50, c 90, d 100.
        assert_eq!(
            group(&c, &pop, 3).unwrap(),
            vec![vec!["d"], vec!["c"], vec!["a", "b"]]
        );
    }

    /// python needs libpython, libpython needs expat and libc; libpython and expat are needed
    /// mostly through python (counts within TIGHT_JOIN of it), libc by everything.
    fn python(root: &str, extra: &[(&'static str, &'static [&'static str], u64)]) -> Closure {
        python_needing(root, &[], extra)
    }

    /// [`python`], where libpython also needs `libraries` (name, size), and `extra` paths
    /// the root refers to besides python.
    fn python_needing(
        root: &str,
        libraries: &[(&'static str, u64)],
        extra: &[(&'static str, &'static [&'static str], u64)],
    ) -> Closure {
        let refs: Vec<&str> = std::iter::once("python")
            .chain(extra.iter().map(|(p, _, _)| *p))
            .collect();
        let libpython_refs: Vec<&str> = ["expat", "libc"]
            .into_iter()
            .chain(libraries.iter().map(|(name, _)| *name))
            .collect();
        let mut edges: Vec<(&str, &[&str], u64)> = vec![
            (root, &refs, 1),
            ("python", &["libpython"], MB),
            ("libpython", &libpython_refs, 8 * MB),
            ("expat", &[], 200 * 1024),
            ("libc", &[], 12 * MB),
        ];
        edges.extend(libraries.iter().map(|&(name, size)| (name, &[][..], size)));
        edges.extend_from_slice(extra);
        closure(root, &edges)
    }

    fn python_counts() -> Popularity {
        counts(&[
            ("python", 40),
            ("libpython", 44),
            ("expat", 46),
            ("libc", 100),
            ("junit", 1),
            ("app", 1),
        ])
    }

    #[test]
    fn under_a_tight_budget_a_dependency_needed_mostly_through_one_path_joins_it() {
        let c = python("root", &[]);
        assert_eq!(
            group(&c, &python_counts(), FULL_TIGHT_LAYERS).unwrap(),
            vec![vec!["libc"], vec!["expat", "libpython", "python"]]
        );
        // Above it, only equal counts join: each is a layer of its own.
        assert_eq!(
            group(&c, &python_counts(), TIGHT_LAYERS + 1).unwrap(),
            vec![
                vec!["libc"],
                vec!["expat"],
                vec!["libpython"],
                vec!["python"]
            ]
        );
    }

    #[test]
    fn under_a_tight_budget_adding_a_small_package_leaves_the_other_layers_alone() {
        // The same image with junit (small, new, needing python) added, at a budget that binds
        // for the second image: every layer but the one holding junit is one the first had.
        let pop = python_counts();
        let first = group(&python("ra", &[]), &pop, 3).unwrap();
        let second = group(&python("rb", &[("junit", &["python"], 10 * 1024)]), &pop, 3).unwrap();
        assert_eq!(second.len(), 3);
        for layer in &second {
            if !layer.contains(&"junit".to_owned()) {
                assert!(
                    first.contains(layer),
                    "{layer:?} is not a layer of {first:?}"
                );
            }
        }
        assert!(second.contains(&vec!["junit".to_owned()]));
        // The same with a larger package that has a dependency of its own.
        let third = group(
            &python(
                "rc",
                &[("app", &["python", "libapp"], MB), ("libapp", &[], MB)],
            ),
            &pop,
            3,
        )
        .unwrap();
        assert_eq!(third.len(), 3);
        assert!(third.contains(&vec!["app".to_owned(), "libapp".to_owned()]));
        for layer in &third {
            if !layer.contains(&"app".to_owned()) {
                assert!(
                    first.contains(layer),
                    "{layer:?} is not a layer of {first:?}"
                );
            }
        }
    }

    /// python as above, where libpython also needs libdb (small, needed by more than python:
    /// 2.25 times its count) and libbig (the same count, but larger than SMALL_UNIT).
    fn python_with_libraries(
        root: &str,
        extra: &[(&'static str, &'static [&'static str], u64)],
    ) -> Closure {
        python_needing(root, &[("libdb", MB), ("libbig", SMALL_UNIT + 1)], extra)
    }

    fn library_counts() -> Popularity {
        counts(&[
            ("python", 40),
            ("libpython", 44),
            ("expat", 46),
            ("libdb", 90),
            ("libbig", 90),
            ("libc", 100),
            ("junit", 1),
            ("app", 1),
            ("tool", 2),
        ])
    }

    #[test]
    fn under_a_tight_budget_a_small_library_joins_the_unit_that_needs_it() {
        let c = python_with_libraries("root", &[]);
        assert_eq!(
            group(&c, &library_counts(), FULL_TIGHT_LAYERS).unwrap(),
            vec![
                vec!["libc"],
                vec!["libbig"],
                vec!["expat", "libdb", "libpython", "python"]
            ]
        );
        // Above it, each is a layer of its own.
        assert_eq!(
            group(&c, &library_counts(), TIGHT_LAYERS + 1).unwrap(),
            vec![
                vec!["libc"],
                vec!["libbig"],
                vec!["libdb"],
                vec!["expat"],
                vec!["libpython"],
                vec!["python"]
            ]
        );
    }

    #[test]
    fn the_tight_joins_ask_for_closer_counts_as_the_budget_grows() {
        // libpython needs 1.1 times python's count, expat 1.05 times libpython's, libdb 2.25
        // times python's unit's. At 16 layers all three join python (the test above); at 24
        // (factors 1.13 and 2) libdb stays out; at 40 (1.08 and 1.6) libpython too, and expat
        // still joins it.
        let c = python_with_libraries("root", &[]);
        assert_eq!(
            group(&c, &library_counts(), 24).unwrap(),
            vec![
                vec!["libc"],
                vec!["libbig"],
                vec!["libdb"],
                vec!["expat", "libpython", "python"]
            ]
        );
        assert_eq!(
            group(&c, &library_counts(), 40).unwrap(),
            vec![
                vec!["libc"],
                vec!["libbig"],
                vec!["libdb"],
                vec!["expat", "libpython"],
                vec!["python"]
            ]
        );
    }

    #[test]
    fn the_tight_factors_shrink_from_full_strength_and_stop_below_the_default_budget() {
        assert_eq!(
            tight_factors(FULL_TIGHT_LAYERS),
            Some((TIGHT_JOIN, SMALL_UNIT_JOIN))
        );
        let (join, small) = tight_factors(2 * FULL_TIGHT_LAYERS).unwrap();
        assert!((join - 1.1).abs() < 1e-9 && (small - 1.75).abs() < 1e-9);
        let mut last = (TIGHT_JOIN, SMALL_UNIT_JOIN);
        for groups in FULL_TIGHT_LAYERS + 1..=TIGHT_LAYERS {
            let (join, small) = tight_factors(groups).unwrap();
            assert!(join < last.0 && join > 1.0 && small < last.1 && small > 1.0);
            last = (join, small);
        }
        assert_eq!(tight_factors(TIGHT_LAYERS + 1), None);
        // The server's default budget (96, the root layer's included) is not tight.
        assert_eq!(tight_factors(95), None);
    }

    #[test]
    fn under_a_tight_budget_a_small_image_has_the_layers_of_a_large_one() {
        // A small package on python, then the same with more packages, over the budget: the
        // small image's layers are the large one's, but for the small package's own. Without
        // the join, libdb is a layer of the small image and merged away in the large one.
        let pop = library_counts();
        let small = group(
            &python_with_libraries("ra", &[("junit", &["python"], 10 * 1024)]),
            &pop,
            4,
        )
        .unwrap();
        let large = group(
            &python_with_libraries(
                "rb",
                &[
                    ("junit", &["python"], 10 * 1024),
                    ("app", &["python"], MB),
                    ("tool", &["libc"], 2 * MB),
                ],
            ),
            &pop,
            4,
        )
        .unwrap();
        assert_eq!(large.len(), 4);
        assert!(small.contains(&vec!["junit".to_owned()]), "{small:?}");
        for layer in small.iter().filter(|l| **l != ["junit"]) {
            assert!(
                large.contains(layer),
                "{layer:?} is not a layer of {large:?}"
            );
        }
    }

    #[test]
    fn the_order_nix_lists_paths_in_changes_nothing() {
        let pop = counts(&[
            ("git", 1),
            ("perl", 40),
            ("perl-modules", 40),
            ("libc", 100),
        ]);
        let mut edges: Vec<(&str, &[&str], u64)> = vec![
            ("root", &["git", "curl"], 1),
            ("git", &["perl", "libc"], MB),
            ("curl", &["libc", "zlib"], MB),
            ("zlib", &["libc"], 1000),
            ("perl", &["perl-modules", "libc"], MB),
            ("perl-modules", &[], MB),
            ("libc", &[], MB),
        ];
        let expected = group(&closure("root", &edges), &pop, 4).unwrap();
        for _ in 0..edges.len() {
            edges.rotate_left(1);
            assert_eq!(group(&closure("root", &edges), &pop, 4).unwrap(), expected);
            edges.reverse();
            assert_eq!(group(&closure("root", &edges), &pop, 4).unwrap(), expected);
        }
        // The same for the tight budget's joins, whose units are named by their first path.
        let mut c = python_with_libraries(
            "root",
            &[("app", &["python"], MB), ("tool", &["libc"], 2 * MB)],
        );
        let expected = group(&c, &library_counts(), 3).unwrap();
        for _ in 0..c.paths.len() {
            c.paths.rotate_left(1);
            assert_eq!(group(&c, &library_counts(), 3).unwrap(), expected);
            c.paths.reverse();
            assert_eq!(group(&c, &library_counts(), 3).unwrap(), expected);
        }
    }

    #[test]
    fn a_closure_without_its_root_is_refused_not_a_panic() {
        let c = closure("root", &[("a", &["b"], 1), ("b", &[], 1)]);
        assert_eq!(group(&c, &Popularity::default(), 10), None);
    }
}
