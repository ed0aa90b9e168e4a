//! The architecture, checked: the modules of `server/src` import each other without a cycle,
//! so the code reads bottom-up; lapin appears only in `bus/` and tonic's server types only in
//! `api/`. A file is a module (`foo.rs` or `foo/bar.rs`); an edge is any `crate::` or `super::`
//! path in its code outside `#[cfg(test)]`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Every module file of the library (not `lib.rs`, `main.rs` or `bin/`), by module path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(SRC), &mut files);
    files
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(SRC).unwrap().with_extension("");
            let name = relative.to_str().unwrap().replace('/', "::");
            if name == "lib" || name == "main" || name.starts_with("bin::") {
                return None;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere; only the module's own code counts.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            Some((name, code.to_owned()))
        })
        .collect()
}

/// The longest known module that `path` (`a::b::C`) names.
fn resolve(path: &[&str], modules: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|candidate| modules.contains_key(candidate))
}

/// Paths after `prefix` in `code`, with `use` groups (`{a, b::{c, d}}`) expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    fn expand(head: &str, rest: &str, out: &mut Vec<String>) {
        let Some(open) = rest.find('{') else {
            out.push(format!("{head}{rest}"));
            return;
        };
        let (stem, body) = (&rest[..open], &rest[open + 1..]);
        let (mut depth, mut start, mut items) = (1, 0, Vec::new());
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 1 => {
                    items.push(&body[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 1 => {
                    items.push(&body[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        for item in items {
            let item: String = item.split_whitespace().collect();
            if !item.is_empty() {
                expand(&format!("{head}{stem}"), &item, out);
            }
        }
    }
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || "_:{}, \n".contains(c)))
            .unwrap_or(rest.len());
        let mut text = rest[..end].to_owned();
        // A group runs to its matching brace; a plain path ends at the first blank.
        if !text.starts_with(|c: char| c.is_alphanumeric() || c == '{') {
            continue;
        }
        if !text.contains('{') || text.find(' ') < text.find('{') {
            text = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        expand("", &text, &mut out);
    }
    out
}

fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    modules
        .iter()
        .map(|(name, code)| {
            let parent: Vec<&str> = name.split("::").collect();
            let parent = &parent[..parent.len() - 1];
            let mut targets = BTreeSet::new();
            for path in paths_after(code, "crate::") {
                let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
                targets.extend(resolve(&parts, modules));
            }
            for path in paths_after(code, "super::") {
                let mut parts: Vec<&str> = parent.to_vec();
                parts.extend(path.split("::").filter(|p| !p.is_empty()));
                targets.extend(resolve(&parts, modules));
            }
            targets.remove(name);
            (name.clone(), targets)
        })
        .collect()
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_server_modules_import_each_other_without_a_cycle() {
    let modules = modules();
    let graph = edges(&modules);
    assert!(
        graph["app"].contains("order") && graph["order::handler"].contains("inbox"),
        "the import scan misses edges: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_scan_finds_a_cycle_when_there_is_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let mods: BTreeMap<String, String> = [("x", ""), ("x::y", ""), ("z", "")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let code = "use crate::{x::{y::Thing, Other}, z};\nfn f() { crate::z::g(); }";
    let found: BTreeSet<_> = paths_after(code, "crate::")
        .iter()
        .filter_map(|p| resolve(&p.split("::").collect::<Vec<_>>(), &mods))
        .collect();
    assert_eq!(
        found,
        BTreeSet::from(["x".into(), "x::y".into(), "z".into()])
    );
}

#[test]
fn lapin_stays_in_bus_and_tonic_servers_in_api() {
    for (name, code) in modules() {
        let in_bus = name == "bus" || name.starts_with("bus::");
        let in_api = name == "api" || name.starts_with("api::");
        let code_only: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        if !in_bus {
            assert!(!code_only.contains("lapin::"), "{name} uses lapin");
        }
        if !in_api {
            for server_type in ["tonic::transport", "tonic_health", "tonic_reflection"] {
                assert!(
                    !code_only.contains(server_type),
                    "{name} uses {server_type}"
                );
            }
        }
    }
}
