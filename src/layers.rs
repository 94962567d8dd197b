//! The crate's shape, checked: every top-level module sits in one layer, imports point only the
//! way the data flows (entry points → transports → operations → domain → infrastructure →
//! leaves), and no modules import each other in a circle. Run with `cargo test --lib layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, from the entry points down. A module may use its own layer or one below it.
const LAYERS: &[(&str, &[&str])] = &[
    ("entry points", &["check", "ctl", "hook", "serve"]),
    ("transports", &["api", "client", "vpn"]),
    ("operations", &["app", "cluster"]),
    ("domain", &["policy", "registry", "sessions", "state"]),
    (
        "infrastructure",
        &[
            "audit",
            "bandwidth",
            "config",
            "metrics",
            "net",
            "store",
            "sync",
        ],
    ),
    ("leaves", &["session", "wire"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// The source of a file without its inline `#[cfg(test)] mod tests` (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Top-level module → the top-level modules it names as `crate::x`.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = top.trim_end_matches(".rs").to_string();
            let file = path.file_name().unwrap().to_string_lossy();
            if ["lib", "main", "layers"].contains(&module.as_str()) || file == "tests.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let uses = graph.entry(module.clone()).or_default();
            for (i, _) in without_tests(&text).match_indices("crate::") {
                let rest = &text[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

/// A circle in the graph, if there is one, as the modules along it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod checks {
    use super::*;

    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
    }

    #[test]
    fn every_module_has_a_layer_and_imports_point_down() {
        let graph = graph();
        assert!(graph.len() >= 15, "too few modules found: {graph:?}");
        let mut wrong = Vec::new();
        for (module, uses) in &graph {
            let Some(from) = layer_of(module) else {
                wrong.push(format!(
                    "module `{module}` is in no layer (add it to LAYERS)"
                ));
                continue;
            };
            for used in uses {
                match layer_of(used) {
                    None => wrong.push(format!("`{module}` uses `{used}`, which is in no layer")),
                    Some(to) if to < from => wrong.push(format!(
                        "`{module}` ({}) uses `{used}` ({}): imports must point down",
                        LAYERS[from].0, LAYERS[to].0
                    )),
                    Some(_) => {}
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn no_import_circle() {
        if let Some(circle) = find_circle(&graph()) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }

    #[test]
    fn the_checker_finds_a_circle() {
        let mut g = BTreeMap::new();
        g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
        g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
        g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
        assert_eq!(find_circle(&g).unwrap(), ["a", "b", "c", "a"]);
        g.insert("c".to_string(), BTreeSet::new());
        assert!(find_circle(&g).is_none());
    }
}
