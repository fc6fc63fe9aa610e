//! The documentation checked against what it describes: every key of the reference
//! config (`conf/chatgate.yaml`, commented-out keys included) has a row with its value
//! in docs/configuration.md and every documented key is in the reference config; every
//! metric the code registers is in docs/operations.md; and the README's tour runs
//! against a real `chatgate demo`, each command giving the answer its comment promises.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::demo::Demo;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

// ---------------------------------------------------------------------------------
// conf/chatgate.yaml <-> docs/configuration.md

/// Keys whose value is free-form (passed on as written), so their children are no keys.
const FREE_FORM: &[&str] = &["routes[].params"];

/// One key of the reference config.
#[derive(Debug, Default, Clone)]
struct ConfKey {
    /// Whether the key holds a value (a leaf), rather than only a section of keys.
    leaf: bool,
    /// The scalar values the file shows for it (uncommented and commented-out lines).
    values: BTreeSet<String>,
}

/// A line that holds a key, commented out or not: `(column, list item, key, rest)`.
/// `# key: value` counts as a key line when the `#` stands where the text would;
/// prose comments never start with a lower-case word directly followed by `:`.
fn key_line(line: &str) -> Option<(usize, bool, &str, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let mut text = &line[indent..];
    let mut column = indent;
    if let Some(uncommented) = text.strip_prefix('#') {
        let uncommented = uncommented.strip_prefix(' ').unwrap_or(uncommented);
        let inner = uncommented.len() - uncommented.trim_start_matches(' ').len();
        column += inner;
        text = &uncommented[inner..];
    }
    let dash = text.starts_with("- ");
    if dash {
        text = &text[2..];
    }
    let key_len = text
        .bytes()
        .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        .count();
    let key = &text[..key_len];
    let rest = text[key_len..].strip_prefix(':')?;
    if key.is_empty() || !key.as_bytes()[0].is_ascii_lowercase() {
        return None;
    }
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    Some((column, dash, key, rest))
}

fn scalar(value: &serde_yaml_ng::Value) -> Option<String> {
    match value {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Records `path` with `value`, descending into flow mappings (`{a: 1}`) and the
/// mappings inside flow sequences (`[{a: 1}]`).
fn record(keys: &mut BTreeMap<String, ConfKey>, path: &str, value: &serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    let entry = keys.entry(path.to_string()).or_default();
    match value {
        Value::Null => {}
        Value::Mapping(map) => {
            // An inline section (`{a: 1}`) holds keys; a free-form one is a value.
            if FREE_FORM.contains(&path) {
                entry.leaf = true;
                return;
            }
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    record(keys, &format!("{path}.{k}"), v);
                }
            }
        }
        Value::Sequence(items) => {
            entry.leaf = true;
            for item in items {
                if item.is_mapping() {
                    for (k, v) in item.as_mapping().into_iter().flatten() {
                        if let Some(k) = k.as_str() {
                            record(keys, &format!("{path}[].{k}"), v);
                        }
                    }
                }
            }
        }
        other => {
            entry.leaf = true;
            entry.values.extend(scalar(other));
        }
    }
}

/// Every key path of a reference config, e.g. `limits.max_body_bytes`,
/// `routes[].kind`, `upstreams.<name>.endpoints[].weight`.
fn config_keys(yaml: &str) -> BTreeMap<String, ConfKey> {
    let mut keys = BTreeMap::new();
    // (column, path) of the open sections and list items.
    let mut stack: Vec<(usize, String)> = Vec::new();
    for line in yaml.lines() {
        let Some((column, dash, key, rest)) = key_line(line) else {
            continue;
        };
        let key_column = if dash { column + 2 } else { column };
        let pop_from = if dash { column } else { key_column };
        while stack.last().is_some_and(|(c, _)| *c >= pop_from) {
            stack.pop();
        }
        let mut parent = stack.last().map(|(_, p)| p.clone()).unwrap_or_default();
        if dash {
            parent.push_str("[]");
            stack.push((column, parent.clone()));
        }
        if FREE_FORM.iter().any(|f| parent.starts_with(f)) {
            continue;
        }
        let segment = if parent == "upstreams" { "<name>" } else { key };
        let path = if parent.is_empty() {
            segment.to_string()
        } else {
            format!("{parent}.{segment}")
        };
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&format!("v:{rest}"))
            .unwrap_or_else(|e| {
                panic!("conf/chatgate.yaml: cannot read the value of {path} in {line:?}: {e}")
            });
        record(&mut keys, &path, &value["v"]);
        stack.push((key_column, path));
    }
    keys
}

/// The rows of the key tables in docs/configuration.md: key path → default cell.
fn documented_keys(markdown: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `key` | default | meaning |" splits into ["", key, default, meaning, ""].
        if cells.len() < 5 || !cells[0].is_empty() {
            continue;
        }
        let Some(key) = cells[1].strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            continue;
        };
        if key.contains('`') || key.contains(' ') {
            continue;
        }
        assert!(
            rows.insert(key.to_string(), cells[2].to_string()).is_none(),
            "docs/configuration.md documents {key} twice"
        );
    }
    rows
}

/// What is wrong between the reference config and its documentation; empty when they agree.
fn config_doc_problems(yaml: &str, markdown: &str) -> Vec<String> {
    let keys = config_keys(yaml);
    let docs = documented_keys(markdown);
    let mut problems = Vec::new();
    for (path, key) in &keys {
        let Some(default) = docs.get(path) else {
            if key.leaf {
                problems.push(format!(
                    "{path} is in conf/chatgate.yaml but has no row in docs/configuration.md"
                ));
            }
            continue;
        };
        for value in &key.values {
            if !default.contains(&format!("`{value}`")) {
                problems.push(format!(
                    "{path}: conf/chatgate.yaml shows `{value}`, docs/configuration.md's default cell says {default:?}"
                ));
            }
        }
    }
    for path in docs.keys() {
        if !keys.contains_key(path) {
            problems.push(format!(
                "{path} is documented in docs/configuration.md but not in conf/chatgate.yaml"
            ));
        }
    }
    problems
}

#[test]
fn every_config_key_is_documented_with_its_default_and_nothing_else_is() {
    let problems = config_doc_problems(&read("conf/chatgate.yaml"), &read("docs/configuration.md"));
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_config_check_notices_a_key_on_one_side_only() {
    let yaml = "limits:\n  max_body_bytes: 10  # the limit\n  # header_timeout: 5s\nroutes:\n  - path: /a\n    # params: {temperature: 1}\n    # rate_limits: {tokens_per_day: 3}\nupstreams:\n  main:\n    endpoints: [{address: \"h:1\", weight: 2}]\n";
    let docs = "| key | default | meaning |\n|---|---|---|\n| `limits.max_body_bytes` | `10` | x |\n| `limits.header_timeout` | `5s` | x |\n| `routes[].path` | required, e.g. `/a` | x |\n| `routes[].params` | `{}` | x |\n| `routes[].rate_limits.tokens_per_day` | `3` | x |\n| `upstreams.<name>.endpoints` | required | x |\n| `upstreams.<name>.endpoints[].address` | required, e.g. `h:1` | x |\n| `upstreams.<name>.endpoints[].weight` | `2` | x |\n";
    assert_eq!(config_doc_problems(yaml, docs), Vec::<String>::new());

    let added_to_yaml = yaml.replace("routes:", "  # body_timeout: 30s\nroutes:");
    let problems = config_doc_problems(&added_to_yaml, docs);
    assert!(
        problems.len() == 1 && problems[0].contains("limits.body_timeout"),
        "{problems:?}"
    );

    let added_to_docs = format!("{docs}| `limits.ghost` | `1` | x |\n");
    let problems = config_doc_problems(yaml, &added_to_docs);
    assert!(
        problems.len() == 1 && problems[0].contains("limits.ghost"),
        "{problems:?}"
    );

    let other_default = docs.replace("| `5s` |", "| `6s` |");
    let problems = config_doc_problems(yaml, &other_default);
    assert!(
        problems.len() == 1 && problems[0].contains("header_timeout"),
        "{problems:?}"
    );
}

// ---------------------------------------------------------------------------------
// metrics <-> docs/operations.md

/// Every `"chatgate_..."` string literal that is a whole metric name, in every source file.
fn registered_metrics(dir: &Path, names: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("src/") {
        let path = entry.expect("src entry").path();
        if path.is_dir() {
            registered_metrics(&path, names);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("source file");
            for piece in text.split('"').skip(1).step_by(2) {
                let is_name = piece.starts_with("chatgate_")
                    && piece
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if is_name && !NOT_METRICS.contains(&piece) {
                    names.insert(piece.to_string());
                }
            }
        }
    }
}

/// `chatgate_...` string literals in the code that are no metric (SQL table names).
const NOT_METRICS: &[&str] = &["chatgate_conversations", "chatgate_schema"];

/// The metric names of the tables in docs/operations.md (rows starting with a name).
fn documented_metrics(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix("| `chatgate_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("chatgate_{name}"))
        .collect()
}

#[test]
fn every_metric_is_documented_in_operations_and_nothing_else_is() {
    let mut registered = BTreeSet::new();
    registered_metrics(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut registered,
    );
    assert!(registered.len() > 10, "found only {registered:?} in src/");
    let documented = documented_metrics(&read("docs/operations.md"));
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&registered).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "registered but not in docs/operations.md's tables: {undocumented:?}; \
         documented but not registered anywhere in src/: {unknown:?}"
    );
}

// ---------------------------------------------------------------------------------
// The README's tour against `chatgate demo`

/// A command of the tour and what its `# -> STATUS [BODY]` comment promises.
#[derive(Debug)]
struct TourStep {
    command: String,
    status: Option<u16>,
    /// The reply body, `\n` standing for a line feed; ending in `...`, only its start.
    body: Option<String>,
}

/// The commands of the README's block between `<!-- tour -->` and `<!-- /tour -->`:
/// continued lines (`\`) joined, each with the expectation on the line after it.
fn tour(readme: &str) -> Vec<TourStep> {
    let start = readme
        .find("<!-- tour -->")
        .expect("README has no <!-- tour --> block");
    let end = readme
        .find("<!-- /tour -->")
        .expect("README has no <!-- /tour -->");
    let block = &readme[start..end];
    let code = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(code, _)| code)
        .expect("the tour block holds a ```sh code block");
    let mut steps: Vec<TourStep> = Vec::new();
    let mut pending = String::new();
    for line in code.lines() {
        let trimmed = line.trim();
        if let Some(expect) = trimmed.strip_prefix("# -> ") {
            let step = steps.last_mut().expect("an expectation follows a command");
            let (status, body) = expect.split_once(' ').unwrap_or((expect, ""));
            step.status = Some(status.parse().expect("# -> STATUS"));
            step.body = (!body.is_empty()).then(|| body.to_string());
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        pending.push_str(line);
        if pending.ends_with('\\') {
            pending.push('\n');
            continue;
        }
        steps.push(TourStep {
            command: std::mem::take(&mut pending),
            status: None,
            body: None,
        });
    }
    assert!(pending.is_empty(), "the tour ends inside a command");
    steps
}

const STATUS_MARK: &str = "\n@@status ";
const STEP_MARK: &str = "@@step\n";

#[test]
fn the_readme_tour_does_what_its_comments_say() {
    let steps = tour(&read("README.md"));
    let checked = steps.iter().filter(|s| s.status.is_some()).count();
    assert!(
        checked >= 8,
        "the tour checks only {checked} commands: {steps:#?}"
    );
    let demo = Demo::start();
    // One script, so that variables (the token) carry from command to command. A
    // checked command runs in a subshell whose `curl` also prints the status.
    let mut script = String::from("set -u\n");
    for step in &steps {
        let command = step
            .command
            .replace("localhost:8080", &format!("localhost:{}", demo.port))
            .replace("localhost:9090", &format!("localhost:{}", demo.admin));
        if step.status.is_some() {
            script.push_str(&format!(
                "printf '{}'\n(curl() {{ command curl -w '{}%{{http_code}}' \"$@\"; }}\n{command}\n)\n",
                STEP_MARK.replace('\n', "\\n"),
                STATUS_MARK.replace('\n', "\\n")
            ));
        } else {
            // Unchecked (the login keeping the token): run here, its output set aside.
            script.push_str(&format!("{{ {command}\n}} >/dev/null\n"));
        }
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "the tour failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let outputs: Vec<&str> = stdout.split(STEP_MARK).skip(1).collect();
    let expected: Vec<&TourStep> = steps.iter().filter(|s| s.status.is_some()).collect();
    assert_eq!(outputs.len(), expected.len(), "output:\n{stdout}");
    for (step, output) in expected.iter().zip(outputs) {
        let (body, status) = output
            .rsplit_once(STATUS_MARK)
            .unwrap_or_else(|| panic!("no status from {}: {output:?}", step.command));
        assert_eq!(
            status.trim().parse::<u16>().ok(),
            step.status,
            "{}\nanswered {body:?}",
            step.command
        );
        if let Some(want) = &step.body {
            let want = want.replace("\\n", "\n");
            let ok = match want.strip_suffix("...") {
                Some(start) => body.starts_with(start),
                None => body == want,
            };
            assert!(
                ok,
                "{}\nanswered {body:?}, the README says {want:?}",
                step.command
            );
        }
    }
}
