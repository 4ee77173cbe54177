//! Architecture invariants that a compiler does not check.

use std::path::Path;

fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            files.push((path.display().to_string(), text));
        }
    }
    files
}

/// The engine knows no transport: no tonic, prost, generated types or
/// server modules. This keeps it reusable behind another front end or a
/// durable store.
#[test]
fn the_engine_knows_no_transport() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker");
    let files = sources(&root);
    assert!(files.len() >= 4, "found the engine's files");
    for (path, text) in files {
        let forbidden = [
            "tonic::",
            "tonic_",
            "prost::",
            "prost_",
            "crate::pb",
            "crate::rpc",
            "crate::server",
            "crate::auth",
        ];
        for forbidden in forbidden {
            assert!(!text.contains(forbidden), "{path} mentions {forbidden}");
        }
    }
}

/// Only the binary installs a tracing subscriber.
#[test]
fn the_library_never_installs_a_subscriber() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (path, text) in sources(&root) {
        if path.ends_with("telemetry.rs") {
            continue;
        }
        assert!(!text.contains(".init()"), "{path} installs a subscriber");
        assert!(
            !text.contains("set_global_default"),
            "{path} installs a subscriber"
        );
    }
}

/// The client library and the worker runtime speak only `taskq.v1`: no
/// engine, no server.
#[test]
fn clients_know_only_the_contract() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = sources(&src.join("worker"));
    files.push((
        "src/client.rs".into(),
        std::fs::read_to_string(src.join("client.rs")).unwrap(),
    ));
    for (path, text) in files {
        for forbidden in [
            "crate::broker",
            "crate::rpc",
            "crate::server",
            "crate::auth",
        ] {
            assert!(!text.contains(forbidden), "{path} uses {forbidden}");
        }
    }
}

/// A file holds one idea: no source file outside the tests passes 1,300
/// lines. The state machine is the largest by design (its header says
/// what it holds); a part of it that keeps its own rules moves out.
#[test]
fn no_source_file_is_over_1300_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (path, text) in sources(&root) {
        // Unit tests compiled only under cfg(test).
        if path.ends_with("/tests.rs") {
            continue;
        }
        let lines = text.lines().count();
        assert!(lines <= 1300, "{path} has {lines} lines");
    }
}

/// No source file imports from a file that imports it back, directly or
/// through others: every dependency between the crate's files goes one
/// way, so each part can be read and changed from the bottom up.
///
/// A file's dependencies are the files that define what it names through
/// `use` and through `crate::`/`super::` paths in its code. Re-exports
/// (`pub use`) are followed to the file that defines the item, and are not
/// dependencies of their own: a `mod.rs` that only declares and re-exports
/// is a table of contents. `main.rs` is a separate crate and is left out.
#[test]
fn no_source_file_imports_a_file_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let crate_graph = imports::Graph::read(&root);
    assert!(crate_graph.files() >= 30, "found the crate's files");
    assert!(
        crate_graph.edges() >= 60,
        "found the files' imports: {}",
        crate_graph.edges()
    );
    if let Some(cycle) = crate_graph.find_cycle() {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

/// The checker itself: a cycle it must find, and a facade it must see
/// through.
#[test]
fn the_import_cycle_check_finds_cycles() {
    let dir = std::env::temp_dir().join(format!("taskq-arch-{}", std::process::id()));
    let write = |path: &str, text: &str| {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a;\nmod b;\nmod c;\n");
    write("a/mod.rs", "mod x;\npub use x::X;\n");
    write("a/x.rs", "use crate::b::B;\npub struct X(B);\n");
    write(
        "b.rs",
        "pub struct B;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
    );
    write(
        "c.rs",
        "// crate::a::X in a comment is no import\nfn f() -> crate::a::X { todo!() }\n",
    );
    let graph = imports::Graph::read(&dir);
    assert!(graph.find_cycle().is_none(), "no cycle yet");
    assert!(graph.depends("c.rs", "a/x.rs"), "re-export followed");
    assert!(
        !graph.depends("c.rs", "a/mod.rs"),
        "a facade is no dependency"
    );
    // b now needs c, which needs a/x.rs, which needs b.
    write("b.rs", "pub struct B;\nfn g() { super::c::f(); }\n");
    let cycle = imports::Graph::read(&dir)
        .find_cycle()
        .expect("the cycle is found");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}

/// Lease and ttl timing runs on tokio's clock (`tokio::time::Instant`):
/// monotonic, and paused in the engine's tests, which is how those tests
/// check expiry to the millisecond. So the engine never reads
/// `std::time::Instant`, and reads the wall clock only in `clock.rs`, once
/// at start, to date what it shows clients (README, I12).
#[test]
fn the_engine_times_leases_on_the_tokio_clock_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/broker");
    let files = sources(&root);
    assert!(files.len() >= 4, "found the engine's files");
    let mut clocks = 0;
    for (path, text) in files {
        clocks += usize::from(text.contains("tokio::time::Instant"));
        // Unit tests compare wall-clock times they are shown.
        let wall_clock_allowed = path.ends_with("/clock.rs") || path.ends_with("/tests.rs");
        for read in std_clock_reads(&text) {
            if read == "SystemTime::now" && wall_clock_allowed {
                continue;
            }
            panic!("{path} reads {read}: time leases with tokio::time::Instant");
        }
    }
    assert!(clocks >= 3, "found the engine's clock imports");
}

/// The clock check itself: what it must find, and what it must let pass.
#[test]
fn the_clock_check_finds_std_clock_reads() {
    let cases = [
        (
            "use std::time::{Duration, Instant};",
            vec!["std::time::Instant"],
        ),
        ("use std::time::Instant as Now;", vec!["std::time::Instant"]),
        (
            "use std::{sync::Arc, time::{Instant, SystemTime}};",
            vec!["std::time::Instant"],
        ),
        ("use std::time::*;", vec!["std::time::*"]),
        ("use std::time;", vec!["std::time"]),
        (
            "let t = std::time::Instant::now();",
            vec!["std::time::Instant"],
        ),
        (
            "let t = ::std::time::Instant::now();",
            vec!["std::time::Instant"],
        ),
        ("let w = SystemTime::now();", vec!["SystemTime::now"]),
        (
            "use tokio::time::Instant;\nfn f() { Instant::now(); }",
            vec![],
        ),
        ("use std::time::{Duration, SystemTime};", vec![]),
        ("// not std::time::Instant, a comment\n", vec![]),
    ];
    for (text, expected) in cases {
        assert_eq!(std_clock_reads(text), expected, "{text}");
    }
}

/// What `text` reads of the standard library's clocks: `std::time::Instant`
/// (imported or named in code), the whole of `std::time` (a glob or the
/// module, through which it could be named unseen), and `SystemTime::now`.
fn std_clock_reads(text: &str) -> Vec<&'static str> {
    let mut reads = Vec::new();
    for leaf in imports::use_leaves(text) {
        let leaf: Vec<&str> = leaf.iter().map(String::as_str).collect();
        let read = match leaf.as_slice() {
            ["std", "time", "Instant"] => "std::time::Instant",
            ["std", "time", "*"] => "std::time::*",
            ["std", "time"] => "std::time",
            _ => continue,
        };
        reads.push(read);
    }
    let code = imports::strip_comments(text);
    if code.contains("std::time::Instant") && !reads.contains(&"std::time::Instant") {
        reads.push("std::time::Instant");
    }
    if code.contains("SystemTime::now") {
        reads.push("SystemTime::now");
    }
    reads
}

mod imports {
    //! A reader of the crate's module tree, enough for the cycle check
    //! and the clock check: it knows `mod` files, `use` trees, inline
    //! `crate::`/`super::` paths, `pub use` re-exports and inline modules
    //! (`mod tests { }`).

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    type Module = Vec<String>;

    struct File {
        name: String,
        text: String,
    }

    #[derive(Default)]
    pub struct Graph {
        files: BTreeMap<Module, File>,
        /// Per module: name -> the path it re-exports, from the crate root.
        reexports: BTreeMap<Module, BTreeMap<String, Vec<String>>>,
        edges: BTreeMap<String, BTreeSet<String>>,
    }

    impl Graph {
        pub fn read(root: &Path) -> Self {
            let mut graph = Self::default();
            graph.collect(root, root);
            let modules: Vec<Module> = graph.files.keys().cloned().collect();
            for module in &modules {
                for (public, depth, path) in paths(&graph.files[module].text) {
                    if public && depth == 0 {
                        if let Some(absolute) = graph.absolute(module, 0, &path) {
                            let name = path.last().unwrap().clone();
                            graph
                                .reexports
                                .entry(module.clone())
                                .or_default()
                                .insert(name, absolute);
                        }
                    }
                }
            }
            for module in &modules {
                let from = graph.files[module].name.clone();
                for (public, depth, path) in paths(&graph.files[module].text) {
                    if public && depth == 0 {
                        continue;
                    }
                    let Some(absolute) = graph.absolute(module, depth, &path) else {
                        continue;
                    };
                    if let Some(to) = graph.resolve(&absolute, 0) {
                        if to != from {
                            graph.edges.entry(from.clone()).or_default().insert(to);
                        }
                    }
                }
            }
            graph
        }

        fn collect(&mut self, root: &Path, dir: &Path) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    self.collect(root, &path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let name = path
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string()
                    .replace('\\', "/");
                let mut module: Module = name
                    .trim_end_matches(".rs")
                    .split('/')
                    .map(String::from)
                    .collect();
                if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                    module.pop();
                }
                if name == "main.rs" {
                    continue;
                }
                let text = strip_comments(&std::fs::read_to_string(&path).unwrap());
                self.files.insert(module, File { name, text });
            }
        }

        /// `path` as written in `module` (inside `depth` inline modules),
        /// from the crate root; `None` for another crate's path.
        fn absolute(&self, module: &Module, depth: usize, path: &[String]) -> Option<Vec<String>> {
            let mut base = module.clone();
            let mut rest = path;
            match rest.first().map(String::as_str) {
                Some("crate") => {
                    base.clear();
                    rest = &rest[1..];
                }
                Some("self") => rest = &rest[1..],
                Some("super") => {
                    let mut inline = depth;
                    while rest.first().map(String::as_str) == Some("super") {
                        if inline > 0 {
                            inline -= 1;
                        } else {
                            base.pop()?;
                        }
                        rest = &rest[1..];
                    }
                }
                Some(first) => {
                    let mut child = module.clone();
                    child.push(first.to_string());
                    if !self.files.contains_key(&child) {
                        return None;
                    }
                }
                None => return None,
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }

        /// The file that defines what `path` (from the crate root) names.
        fn resolve(&self, path: &[String], hops: usize) -> Option<String> {
            let mut module: Module = Vec::new();
            for segment in path {
                let mut child = module.clone();
                child.push(segment.clone());
                if self.files.contains_key(&child) {
                    module = child;
                    continue;
                }
                if let Some(target) = self.reexports.get(&module).and_then(|r| r.get(segment)) {
                    if hops < 16 && target.as_slice() != path {
                        return self.resolve(target, hops + 1);
                    }
                }
                break;
            }
            self.files.get(&module).map(|f| f.name.clone())
        }

        pub fn files(&self) -> usize {
            self.files.len()
        }

        pub fn edges(&self) -> usize {
            self.edges.values().map(BTreeSet::len).sum()
        }

        #[allow(dead_code)]
        pub fn depends(&self, from: &str, to: &str) -> bool {
            self.edges.get(from).is_some_and(|e| e.contains(to))
        }

        /// A cycle of files, first file repeated at the end, if any.
        pub fn find_cycle(&self) -> Option<Vec<String>> {
            let mut done = BTreeSet::new();
            for start in self.edges.keys() {
                let mut path = Vec::new();
                if let Some(cycle) = self.visit(start, &mut path, &mut done) {
                    return Some(cycle);
                }
            }
            None
        }

        fn visit(
            &self,
            file: &String,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|f| f == file) {
                let mut cycle = path[at..].to_vec();
                cycle.push(file.clone());
                return Some(cycle);
            }
            if done.contains(file) {
                return None;
            }
            path.push(file.clone());
            for next in self.edges.get(file).into_iter().flatten() {
                if let Some(cycle) = self.visit(next, path, done) {
                    return Some(cycle);
                }
            }
            path.pop();
            done.insert(file.clone());
            None
        }
    }

    /// The text without comments (string literals are kept as they are).
    pub fn strip_comments(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars().peekable();
        let mut in_string = false;
        while let Some(c) = chars.next() {
            if in_string {
                out.push(c);
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else if c == '"' {
                    in_string = false;
                }
                continue;
            }
            if c == '"' {
                in_string = true;
                out.push(c);
            } else if c == '/' && chars.peek() == Some(&'/') {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            } else if c == '/' && chars.peek() == Some(&'*') {
                let mut last = ' ';
                for n in chars.by_ref() {
                    if last == '*' && n == '/' {
                        break;
                    }
                    last = n;
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// The path of every leaf of the `use` trees in `text` (comments
    /// skipped).
    pub fn use_leaves(text: &str) -> Vec<Vec<String>> {
        paths(&strip_comments(text))
            .into_iter()
            .map(|(_, _, path)| path)
            .collect()
    }

    fn is_ident(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_'
    }

    /// Every path a file names: `(re-export, inline module depth, path)`,
    /// one per leaf of each `use` tree and one per `crate::`/`super::`
    /// path in code. Text in string literals is skipped.
    fn paths(text: &str) -> Vec<(bool, usize, Vec<String>)> {
        let chars: Vec<char> = text.chars().collect();
        let mut found = Vec::new();
        let mut depth_stack: Vec<usize> = Vec::new();
        let mut braces = 0usize;
        let mut i = 0;
        let word_at =
            |i: usize| -> String { chars[i..].iter().take_while(|c| is_ident(**c)).collect() };
        while i < chars.len() {
            let c = chars[i];
            if c == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
                continue;
            }
            if c == '\'' && i + 2 < chars.len() && chars[i + 2] == '\'' {
                i += 3; // a char literal such as '{'
                continue;
            }
            if c == '{' {
                braces += 1;
            } else if c == '}' {
                braces = braces.saturating_sub(1);
                if depth_stack.last() == Some(&braces) {
                    depth_stack.pop();
                }
            }
            let boundary = i == 0 || !is_ident(chars[i - 1]);
            if !boundary || !is_ident(c) {
                i += 1;
                continue;
            }
            let word = word_at(i);
            let after = i + word.len();
            match word.as_str() {
                "mod" => {
                    let mut j = after;
                    while j < chars.len() && chars[j].is_whitespace() {
                        j += 1;
                    }
                    let name = word_at(j);
                    let mut k = j + name.len();
                    while k < chars.len() && chars[k].is_whitespace() {
                        k += 1;
                    }
                    if !name.is_empty() && chars.get(k) == Some(&'{') {
                        depth_stack.push(braces);
                    }
                    i = after;
                }
                "use" => {
                    let end = chars[after..]
                        .iter()
                        .position(|c| *c == ';')
                        .map_or(chars.len(), |p| after + p);
                    let tree: String = chars[after..end].iter().collect();
                    let before: String = chars[i.saturating_sub(16)..i].iter().collect();
                    let public = before.trim_end().ends_with("pub")
                        || before.trim_end().ends_with(')') && before.contains("pub(");
                    for path in use_tree(&tree) {
                        found.push((public, depth_stack.len(), path));
                    }
                    i = end;
                }
                "crate" | "super" if chars.get(after) == Some(&':') => {
                    let mut path = vec![word.clone()];
                    let mut j = after;
                    while chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                        let next = word_at(j + 2);
                        if next.is_empty() {
                            break;
                        }
                        j += 2 + next.len();
                        path.push(next);
                    }
                    found.push((false, depth_stack.len(), path));
                    i = j;
                }
                _ => i = after,
            }
        }
        found
    }

    /// The leaves of a `use` tree: `a::{b, c::{d as e, self}, *}`.
    fn use_tree(tree: &str) -> Vec<Vec<String>> {
        fn walk(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
            let tree = tree.trim();
            if let Some(open) = tree.find('{') {
                let head: Vec<String> = tree[..open]
                    .split("::")
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                let mut base = prefix.to_vec();
                base.extend(head);
                let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
                let mut level = 0;
                let mut start = 0;
                for (k, c) in inner.char_indices() {
                    match c {
                        '{' => level += 1,
                        '}' => level -= 1,
                        ',' if level == 0 => {
                            walk(&inner[start..k], &base, out);
                            start = k + 1;
                        }
                        _ => {}
                    }
                }
                walk(&inner[start..], &base, out);
                return;
            }
            let leaf = tree.split(" as ").next().unwrap_or("").trim();
            if leaf.is_empty() {
                return;
            }
            let mut path = prefix.to_vec();
            for segment in leaf.split("::").map(str::trim) {
                if segment != "self" || path.is_empty() {
                    path.push(segment.to_string());
                }
            }
            out.push(path);
        }
        let mut out = Vec::new();
        walk(tree, &[], &mut out);
        out
    }
}
