//! Grouping an image's store paths into a bounded number of layers.
//!
//! Layering is a pure function of the closure graph, the popularity data and the layer budget, so
//! that every image that needs a path in the same context gets the same layer, byte for byte.
//!
//! 1. A path gets a layer of its own when it is *popular* (its count is at least
//!    [`POPULAR_FRACTION`] of the largest count in the data, so the rule works for a 15-package
//!    set and for nixpkgs alike) or *large* (at least [`LARGE_PATH`] bytes): it is needed by many
//!    images, so it should be the same blob in all of them.
//! 2. Every other path joins the layer of its ancestor just below the image root in the dominator
//!    tree, once popular and large paths hang from the root: a package and what only it needs form
//!    one layer, and a dependency two packages share is a layer of its own.
//! 3. Past the budget, the layers least likely to be found in another image (lowest popularity ×
//!    size) share one layer.
//! 4. The most popular layers come first, so images share a long common prefix of layers and
//!    Docker reuses unpacked layers, not only downloads.
//!
//! Without popularity data every count is 0: only large paths are singled out, and the rest is
//! the dominator grouping.

use std::collections::{BTreeMap, HashMap};

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};

use super::popularity::Popularity;
use crate::nix::Closure;

/// A path whose count is at least this fraction of the largest count is popular.
pub const POPULAR_FRACTION: f64 = 0.1;

/// A path at least this large (NAR bytes) gets its own layer, as in Nixery.
pub const LARGE_PATH: u64 = 100_000_000;

/// One layer being formed.
struct Group {
    /// The store paths, sorted.
    paths: Vec<String>,
    /// The popularity of the path the group is named after.
    popularity: u64,
    /// Total NAR bytes.
    size: u64,
}

/// Store paths grouped into at most `max_groups` layers (`max_groups` ≥ 1), each group's paths
/// sorted, the most popular groups first. The image root itself is in no group: it is packed as
/// the image's `/`. `None` when the closure does not contain its root.
pub fn group(
    closure: &Closure,
    popularity: &Popularity,
    max_groups: usize,
) -> Option<Vec<Vec<String>>> {
    let max_groups = max_groups.max(1);
    let threshold = (popularity.max() as f64 * POPULAR_FRACTION).ceil().max(1.0) as u64;
    let count = |path: &str| popularity.count(path).map_or(0, |(count, _)| count);

    let mut graph = DiGraph::<&str, ()>::new();
    let index: HashMap<&str, NodeIndex> = closure
        .paths
        .iter()
        .map(|p| (p.path.as_str(), graph.add_node(p.path.as_str())))
        .collect();
    let root = *index.get(closure.root.as_str())?;
    for path in &closure.paths {
        let from = index[path.path.as_str()];
        if from != root
            && (path.nar_size >= LARGE_PATH
                || (!popularity.is_empty() && count(&path.path) >= threshold))
        {
            graph.update_edge(root, from, ());
        }
        for reference in &path.references {
            if let Some(&to) = index.get(reference.as_str())
                && reference != &path.path
            {
                graph.update_edge(from, to, ());
            }
        }
    }
    let doms = dominators::simple_fast(&graph, root);

    // Group each path under its ancestor just below the root in the dominator tree.
    let mut tops: BTreeMap<&str, Group> = BTreeMap::new();
    for path in &closure.paths {
        let node = index[path.path.as_str()];
        if node == root {
            continue;
        }
        let mut top = node;
        while let Some(idom) = doms.immediate_dominator(top) {
            if idom == root {
                break;
            }
            top = idom;
        }
        let group = tops.entry(graph[top]).or_insert_with(|| Group {
            paths: Vec::new(),
            popularity: count(graph[top]),
            size: 0,
        });
        group.size += path.nar_size;
        group.paths.push(path.path.clone());
    }

    let mut groups: Vec<Group> = tops.into_values().collect();
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
        });
    }
    groups.sort_by(|a, b| {
        b.popularity
            .cmp(&a.popularity)
            .then_with(|| a.paths.cmp(&b.paths))
    });
    Some(groups.into_iter().map(|g| g.paths).collect())
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
                    nar_size: *size,
                    references: refs.iter().map(|r| r.to_string()).collect(),
                })
                .collect(),
            packages: Vec::new(),
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

    #[test]
    fn a_closure_without_its_root_is_refused_not_a_panic() {
        let c = closure("root", &[("a", &["b"], 1), ("b", &[], 1)]);
        assert_eq!(group(&c, &Popularity::default(), 10), None);
    }
}
