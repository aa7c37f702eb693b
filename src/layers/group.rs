//! Grouping an image's store paths into a bounded number of layers.
//!
//! Each package the image root references directly (and every path only it needs) becomes one
//! layer: the path's subtree in the dominator tree of the closure graph rooted at the image root.
//! A dependency shared by two packages is dominated by the root itself, so it gets a layer of its
//! own, and that layer is byte-identical in every image that needs it: pulling a second image
//! downloads only what is new. When there are more groups than layers allowed, the largest groups
//! keep their own layers and the rest share one.

use std::collections::{BTreeMap, HashMap};

use petgraph::algo::dominators;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::nix::Closure;

/// Store paths grouped into at most `max_groups` layers (`max_groups` ≥ 1), each group's paths
/// sorted, groups in a stable order. The image root itself is in no group: it is packed as the
/// image's `/`. `None` when the closure does not contain its root.
pub fn group(closure: &Closure, max_groups: usize) -> Option<Vec<Vec<String>>> {
    let max_groups = max_groups.max(1);
    let mut graph = DiGraph::<&str, ()>::new();
    let index: HashMap<&str, NodeIndex> = closure
        .paths
        .iter()
        .map(|p| (p.path.as_str(), graph.add_node(p.path.as_str())))
        .collect();
    let root = *index.get(closure.root.as_str())?;
    for path in &closure.paths {
        for reference in &path.references {
            if let Some(&to) = index.get(reference.as_str())
                && reference != &path.path
            {
                graph.add_edge(index[path.path.as_str()], to, ());
            }
        }
    }
    let doms = dominators::simple_fast(&graph, root);

    // Group each path under its ancestor just below the root in the dominator tree.
    let mut groups: BTreeMap<&str, (u64, Vec<String>)> = BTreeMap::new();
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
        let entry = groups.entry(graph[top]).or_default();
        entry.0 += path.nar_size;
        entry.1.push(path.path.clone());
    }

    let mut groups: Vec<(u64, Vec<String>)> = groups.into_values().collect();
    if groups.len() > max_groups {
        // Largest first; ties by name so the choice never depends on anything but the closure.
        groups.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let rest = groups.split_off(max_groups - 1);
        let merged = rest.into_iter().flat_map(|(_, paths)| paths).collect();
        groups.push((0, merged));
    }
    let mut groups: Vec<Vec<String>> = groups
        .into_iter()
        .map(|(_, mut paths)| {
            paths.sort();
            paths
        })
        .collect();
    groups.sort();
    Some(groups)
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
            group(&c, 10).unwrap(),
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
        let ga = group(&a, 10).unwrap();
        let gb = group(&b, 10).unwrap();
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
            group(&c, 3).unwrap(),
            vec![vec!["a"], vec!["b"], vec!["c", "d"]]
        );
    }

    #[test]
    fn one_group_takes_everything() {
        let c = closure(
            "root",
            &[("root", &["a", "b"], 1), ("a", &[], 1), ("b", &[], 1)],
        );
        assert_eq!(group(&c, 1).unwrap(), vec![vec!["a", "b"]]);
    }

    #[test]
    fn a_closure_without_its_root_is_refused_not_a_panic() {
        let c = closure("root", &[("a", &["b"], 1), ("b", &[], 1)]);
        assert_eq!(group(&c, 10), None);
    }
}
