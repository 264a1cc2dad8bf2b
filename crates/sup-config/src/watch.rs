//! `watch`: roll the app when its files change (for development).
//!
//! ```toml
//! watch = true
//! watch = { paths = ["src", "config"], ignore = ["*.tmp", "public/uploads"], debounce = "500ms" }
//! ```
//!
//! Paths are relative to the app's `cwd` and stay inside it. `ignore` adds to
//! [`DEFAULT_IGNORE`]: a pattern without `/` matches any file or folder name
//! (`*.log`, `node_modules`), one with `/` matches a path from `cwd` and
//! everything under it (`public/uploads`, `build/**/*.map`).

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::duration::DurationValue;

/// Names never watched: version control, dependencies, caches, logs and editor swap files.
pub const DEFAULT_IGNORE: &[&str] = &[
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    "*.log",
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    // vim writes and deletes this file to test whether a folder is writable.
    "4913",
    ".DS_Store",
];

/// The default quiet time before a burst of changes rolls the app.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(500);

/// The validated `watch` settings of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// Absolute paths watched (files or folders, recursively); the app's `cwd` by default.
    pub paths: Vec<PathBuf>,
    /// Patterns ignored besides [`DEFAULT_IGNORE`], as written.
    pub ignore: Vec<String>,
    /// How long changes must pause before the app rolls.
    pub debounce: Duration,
}

impl WatchConfig {
    /// The matcher of [`DEFAULT_IGNORE`] and this app's `ignore` patterns.
    pub fn matcher(&self) -> Ignore {
        // The patterns were compiled when the file was validated.
        Ignore::new(&self.ignore).unwrap_or_else(|_| Ignore::defaults())
    }
}

/// Decides which changed paths are ignored.
#[derive(Debug, Clone)]
pub struct Ignore {
    by_name: GlobSet,
    by_path: GlobSet,
}

impl Ignore {
    /// [`DEFAULT_IGNORE`] plus `extra`; an invalid pattern is an error naming it.
    pub fn new(extra: &[String]) -> Result<Ignore, String> {
        let mut by_name = GlobSetBuilder::new();
        let mut by_path = GlobSetBuilder::new();
        for p in DEFAULT_IGNORE.iter().copied().chain(extra.iter().map(String::as_str)) {
            let (set, pat) = match p.trim_start_matches('/') {
                rest if rest.contains('/') || p.starts_with('/') => (&mut by_path, rest.trim_end_matches('/')),
                _ => (&mut by_name, p),
            };
            if pat.is_empty() {
                return Err("an `ignore` pattern is empty".to_string());
            }
            let glob = GlobBuilder::new(pat)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("invalid `ignore` pattern `{p}`: {}", e.kind()))?;
            set.add(glob);
        }
        let by_name = by_name.build().map_err(|e| e.to_string())?;
        let by_path = by_path.build().map_err(|e| e.to_string())?;
        Ok(Ignore { by_name, by_path })
    }

    fn defaults() -> Ignore {
        Ignore::new(&[]).unwrap_or(Ignore { by_name: GlobSet::empty(), by_path: GlobSet::empty() })
    }

    /// Whether `rel`, a path relative to the app's `cwd`, or a folder above it, is ignored.
    pub fn is_ignored(&self, rel: &Path) -> bool {
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else { continue };
            prefix.push(name);
            if self.by_name.is_match(Path::new(name)) || self.by_path.is_match(&prefix) {
                return true;
            }
        }
        false
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatchTable {
    paths: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
    debounce: Option<DurationValue>,
}

/// The raw `watch` value: a boolean or a table; paths still relative to `cwd`.
#[derive(Debug)]
pub(crate) struct RawWatch(Option<(Vec<PathBuf>, Vec<String>, Duration)>);

impl RawWatch {
    /// The validated settings for an app running in `cwd`; `None` when `watch = false`.
    pub(crate) fn into_config(self, cwd: &Path) -> Option<WatchConfig> {
        let (paths, ignore, debounce) = self.0?;
        let paths =
            if paths.is_empty() { vec![cwd.to_path_buf()] } else { paths.iter().map(|p| cwd.join(p)).collect() };
        Some(WatchConfig { paths, ignore, debounce })
    }
}

/// A `paths` entry: relative, inside `cwd`, with no `..`.
fn check_path(p: &str) -> Result<PathBuf, String> {
    if p.trim().is_empty() {
        return Err("a `paths` entry is empty; leave `paths` out to watch the whole `cwd`".to_string());
    }
    let path = Path::new(p);
    if path.is_absolute() {
        return Err(format!("`paths` entry `{p}` is absolute: paths are relative to the app's `cwd`"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`paths` entry `{p}` leaves the app's `cwd`: watch paths stay inside it"));
    }
    // `.` and `./src` are fine; normalised so `./src` and `src` compare equal.
    Ok(path.components().filter(|c| *c != Component::CurDir).collect())
}

impl<'de> Deserialize<'de> for RawWatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawWatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "true, false, or a table such as { paths = [\"src\"], ignore = [\"*.tmp\"], debounce = \"500ms\" }",
                )
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawWatch, E> {
                Ok(RawWatch(v.then(|| (Vec::new(), Vec::new(), DEFAULT_DEBOUNCE))))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawWatch, A::Error> {
                let t = RawWatchTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let paths = match t.paths {
                    Some(p) if p.is_empty() => {
                        return Err(de::Error::custom(
                            "`paths` is empty: leave it out to watch the whole `cwd`, or set watch = false",
                        ))
                    }
                    Some(p) => {
                        p.iter().map(|p| check_path(p)).collect::<Result<Vec<_>, _>>().map_err(de::Error::custom)?
                    }
                    None => Vec::new(),
                };
                let ignore = t.ignore.unwrap_or_default();
                Ignore::new(&ignore).map_err(de::Error::custom)?;
                let debounce = t.debounce.map_or(DEFAULT_DEBOUNCE, |d| d.0);
                if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&debounce) {
                    return Err(de::Error::custom("`debounce` must be between 10ms and 60s"));
                }
                Ok(RawWatch(Some((paths, ignore, debounce))))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn values() {
        assert_eq!(parse_app("").watch, None);
        assert_eq!(parse_app("watch = false").watch, None);
        let w = parse_app("watch = true").watch;
        assert_eq!(
            w,
            Some(WatchConfig { paths: vec![PathBuf::from("/x")], ignore: vec![], debounce: DEFAULT_DEBOUNCE })
        );
        let w = parse_app(
            "cwd = \"srv\"\nwatch = { paths = [\"src\", \"./lib/\", \".\"], ignore = [\"*.tmp\"], debounce = \"1s\" }",
        )
        .watch;
        let want = WatchConfig {
            paths: vec![PathBuf::from("/x/srv/src"), PathBuf::from("/x/srv/lib"), PathBuf::from("/x/srv")],
            ignore: vec!["*.tmp".to_string()],
            debounce: Duration::from_secs(1),
        };
        assert_eq!(w, Some(want));
    }

    #[test]
    fn ignores() {
        let i = Ignore::new(&["*.tmp".into(), "public/uploads".into(), "/build/**/*.map".into()]).expect("valid");
        for p in [
            ".git/index",
            "node_modules/x/index.js",
            "a/node_modules/b.js",
            "app.log",
            "logs/web.out.log",
            "src/__pycache__/m.cpython-311.pyc",
            "src/.main.rs.swp",
            "src/main.rs~",
            "src/4913",
            "x.tmp",
            "public/uploads/a.png",
            "public/uploads",
            "build/js/app.js.map",
        ] {
            assert!(i.is_ignored(Path::new(p)), "{p} should be ignored");
        }
        for p in ["src/main.js", "index.js", "public/index.html", "build/js/app.js", "logger.js", "uploads/a.png"] {
            assert!(!i.is_ignored(Path::new(p)), "{p} should be watched");
        }
    }

    #[test]
    fn errors() {
        let cases: &[(&str, &str)] = &[
            ("watch = \"yes\"", "expected true, false, or a table"),
            ("watch = { path = [\"src\"] }", "key `apps.web.watch.path`: unknown key (did you mean `paths`?)"),
            ("watch = { paths = [] }", "`paths` is empty: leave it out to watch the whole `cwd`"),
            ("watch = { paths = [\"\"] }", "a `paths` entry is empty"),
            (
                "watch = { paths = [\"/etc\"] }",
                "`paths` entry `/etc` is absolute: paths are relative to the app's `cwd`",
            ),
            ("watch = { paths = [\"../lib\"] }", "`paths` entry `../lib` leaves the app's `cwd`"),
            ("watch = { paths = [\"src/../../x\"] }", "leaves the app's `cwd`"),
            ("watch = { ignore = [\"a[\"] }", "invalid `ignore` pattern `a[`"),
            ("watch = { ignore = [\"\"] }", "an `ignore` pattern is empty"),
            ("watch = { debounce = \"soon\" }", "invalid duration `soon`"),
            ("watch = { debounce = 500 }", "expected a duration string, found number `500`"),
            ("watch = { debounce = \"1ms\" }", "`debounce` must be between 10ms and 60s"),
            ("watch = { debounce = \"2m\" }", "`debounce` must be between 10ms and 60s"),
        ];
        for (line, want) in cases {
            let err = app_err(line);
            assert!(err.contains("key `apps.web.watch"), "{line}: {err}");
            assert!(err.contains(want), "{line}: want `{want}` in {err}");
        }
    }
}
