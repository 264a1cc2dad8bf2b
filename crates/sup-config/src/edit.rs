//! Adding and removing an `[apps.NAME]` table in the file itself (`supctl add` and
//! `remove`), keeping its comments and layout (toml_edit), and replacing it only with a
//! result that validates, through a temporary file and a rename.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, InlineTable, Item, Table};

use crate::Config;

/// An app to add, as `supctl add` describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewApp {
    /// The app's name, the key of its table.
    pub name: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// `instances`, when given.
    pub instances: Option<u32>,
    /// `listen` addresses.
    pub listen: Vec<String>,
    /// `port`: the port the app binds itself (what probes connect to).
    pub port: Option<u16>,
    /// `ready`: a string form (`notify`, ...), `tcp`, or an HTTP path such as `/health`.
    pub ready: Option<String>,
    /// `env`, in order.
    pub env: Vec<(String, String)>,
    /// `cwd`, when given.
    pub cwd: Option<String>,
}

/// Why the file was not changed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The file could not be read, or its folder not written.
    #[error("cannot {what} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The request does not fit the file (the app exists, does not exist, ...).
    #[error("{0}")]
    Refused(String),
    /// The file is invalid as it is, before any change.
    #[error("the file has an error; fix it first: {0}")]
    AlreadyInvalid(crate::ConfigError),
    /// The file with the change would be invalid.
    #[error("the result would be invalid: {0}")]
    Invalid(crate::ConfigError),
}

/// Adds `app`'s table to the file at `path` and returns the new configuration.
pub fn add_app(path: &Path, app: &NewApp) -> Result<Config, EditError> {
    rewrite(path, |doc, file| {
        if app.command.is_empty() {
            return Err(EditError::Refused("give the app's command after `--`".into()));
        }
        let apps = apps_table(doc, file)?;
        if apps.contains_key(&app.name) {
            return Err(EditError::Refused(format!(
                "app `{}` already exists in `{file}`: `supctl remove {}` first, or edit its table",
                app.name, app.name
            )));
        }
        apps.set_implicit(true);
        let mut table = table_of(app);
        // After every table, and after the comments that end the file, one blank line apart.
        let last = tables(doc.as_table()).into_iter().max().unwrap_or(0);
        table.set_position(last + 1);
        let trailing = doc.trailing().as_str().unwrap_or("").to_string();
        let gap = if trailing.ends_with("\n\n") || (trailing.is_empty() && last == 0) { "" } else { "\n" };
        table.decor_mut().set_prefix(format!("{trailing}{gap}"));
        doc.set_trailing("");
        apps_table(doc, file)?.insert(&app.name, Item::Table(table));
        Ok(())
    })
}

/// Removes app `name`'s table (with its sub-tables and the comments above it) from the file
/// at `path` and returns the new configuration.
pub fn remove_app(path: &Path, name: &str) -> Result<Config, EditError> {
    rewrite(path, |doc, file| {
        let apps = apps_table(doc, file)?;
        let Some(removed) = apps.remove(name) else {
            return Err(EditError::Refused(format!("no app named `{name}` in `{file}`")));
        };
        // Comments right above the header go with the table; those a blank line above it
        // belong to the file and stay, before whatever came next.
        let Some(removed) = removed.as_table() else { return Ok(()) };
        let prefix = removed.decor().prefix().and_then(|p| p.as_str()).unwrap_or("");
        let kept = prefix.rfind("\n\n").map_or("", |i| &prefix[..=i]).to_string();
        let at = removed.position().unwrap_or(0);
        let next = tables(doc.as_table()).into_iter().filter(|p| *p > at).min();
        match next.and_then(|p| table_at(doc.as_table_mut(), p)) {
            Some(t) => {
                let old = t.decor().prefix().and_then(|p| p.as_str()).unwrap_or("").to_string();
                t.decor_mut().set_prefix(format!("{kept}{old}"));
            }
            None => {
                let old = doc.trailing().as_str().unwrap_or("").to_string();
                doc.set_trailing(format!("{kept}{old}"));
            }
        }
        Ok(())
    })
}

/// The `apps` table, created when the file has none.
fn apps_table<'a>(doc: &'a mut DocumentMut, file: &str) -> Result<&'a mut Table, EditError> {
    let item = doc.entry("apps").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    item.as_table_mut().ok_or_else(|| {
        EditError::Refused(format!("`apps` in `{file}` is not written as [apps.NAME] tables; edit the file by hand"))
    })
}

/// The document positions of every table header under `table`.
fn tables(table: &Table) -> Vec<usize> {
    let mut out = Vec::new();
    for (_, item) in table.iter() {
        match item {
            Item::Table(t) => {
                out.extend(t.position());
                out.extend(tables(t));
            }
            Item::ArrayOfTables(a) => {
                for t in a.iter() {
                    out.extend(t.position());
                    out.extend(tables(t));
                }
            }
            _ => {}
        }
    }
    out
}

/// The table whose header is at document position `at`.
fn table_at(table: &mut Table, at: usize) -> Option<&mut Table> {
    for (_, item) in table.iter_mut() {
        let found = match item {
            Item::Table(t) => {
                if t.position() == Some(at) {
                    return Some(t);
                }
                table_at(t, at)
            }
            Item::ArrayOfTables(a) => {
                a.iter_mut().find_map(|t| if t.position() == Some(at) { Some(t) } else { table_at(t, at) })
            }
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn table_of(app: &NewApp) -> Table {
    let mut t = Table::new();
    t["command"] = value(app.command.iter().collect::<Array>());
    if let Some(cwd) = &app.cwd {
        t["cwd"] = value(cwd.as_str());
    }
    if let Some(n) = app.instances {
        t["instances"] = value(i64::from(n));
    }
    if !app.listen.is_empty() {
        t["listen"] = value(app.listen.iter().collect::<Array>());
    }
    if let Some(port) = app.port {
        t["port"] = value(i64::from(port));
    }
    if let Some(ready) = &app.ready {
        t["ready"] = ready_value(ready);
    }
    if !app.env.is_empty() {
        let mut env = InlineTable::new();
        for (k, v) in &app.env {
            env.insert(k, v.as_str().into());
        }
        t["env"] = value(env);
    }
    t
}

/// `tcp` and HTTP paths become the table forms; any other word stays a string (and is
/// validated with the rest of the file).
fn ready_value(ready: &str) -> Item {
    let mut table = InlineTable::new();
    let path = ready.strip_prefix("http:").unwrap_or(ready);
    if ready.eq_ignore_ascii_case("tcp") {
        table.insert("tcp", true.into());
    } else if path.starts_with('/') {
        table.insert("http", path.into());
    } else {
        return value(ready);
    }
    value(table)
}

/// Reads the file, edits it, validates the result and puts it in place atomically. The file
/// is left byte-identical whenever an error is returned.
fn rewrite(
    path: &Path,
    edit: impl FnOnce(&mut DocumentMut, &str) -> Result<(), EditError>,
) -> Result<Config, EditError> {
    // Write through a symlink to the file it names, as an editor would.
    let real =
        std::fs::canonicalize(path).map_err(|source| EditError::Io { what: "read", path: path.into(), source })?;
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(&real).map_err(|source| EditError::Io { what: "read", path: path.into(), source })?;
    crate::parse(&text, path).map_err(EditError::AlreadyInvalid)?;
    let mut doc: DocumentMut = text.parse().map_err(|e| EditError::Refused(format!("cannot edit `{shown}`: {e}")))?;
    edit(&mut doc, &shown)?;
    let new_text = doc.to_string();
    let cfg = crate::parse(&new_text, path).map_err(EditError::Invalid)?;
    writable(&real).map_err(|source| EditError::Io { what: "write", path: path.into(), source })?;
    replace(&real, new_text.as_bytes()).map_err(|source| EditError::Io { what: "write", path: path.into(), source })?;
    Ok(cfg)
}

/// Refuses a file its owner made read-only, even for root, whom the kernel would let write.
fn writable(path: &Path) -> std::io::Result<()> {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).map_err(std::io::Error::from)?;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o222 == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "the file is read-only"));
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path` with its mode and owner, syncs it, and
/// renames it over `path`.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("/"));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.sup-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(meta.permissions().mode()))?;
        // Only root may give a file away; anyone else writes a file they already own.
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const FILE: &str = "# top comment\n[supervisor]\nlog_level = \"info\" # trailing\n\n# the web app\n[apps.web]\ncommand = \"run web\"   # aligned comment\n\n# the worker\n[apps.worker]\ncommand = [\"run\", \"worker\"]\n[apps.worker.env]\nA = \"1\"\n\n# last words\n";

    fn web2() -> NewApp {
        NewApp {
            name: "api".into(),
            command: vec!["node".into(), "server.js".into()],
            instances: Some(2),
            listen: vec![],
            port: Some(3000),
            ready: Some("/health".into()),
            env: vec![("PORT".into(), "3000".into()), ("MODE".into(), "a b".into())],
            cwd: Some("/srv/api".into()),
        }
    }

    #[test]
    fn add_then_remove_keeps_everything_else() {
        let dir = TempDir::new("edit");
        let path = dir.write("sup.toml", FILE);
        let cfg = add_app(&path, &web2()).expect("add");
        let api = cfg.app("api").expect("added");
        assert_eq!(api.instances, 2);
        assert_eq!(api.ready, crate::ReadyCheck::Http { path: "/health".into() });
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with(FILE), "{text}");
        assert!(
            text.contains("[apps.api]\ncommand = [\"node\", \"server.js\"]\ncwd = \"/srv/api\"\ninstances = 2\n"),
            "{text}"
        );
        assert!(text.contains("env = { PORT = \"3000\", MODE = \"a b\" }"), "{text}");

        let cfg = remove_app(&path, "api").expect("remove");
        assert!(cfg.app("api").is_none());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), FILE);

        let path2 = dir.write("mid.toml", "[apps.a]\ncommand = \"a\"\n\n# about b and c\n\n# b itself\n[apps.b]\ncommand = \"b\"\n\n[apps.c]\ncommand = \"c\"\n");
        remove_app(&path2, "b").expect("remove b");
        assert_eq!(
            std::fs::read_to_string(&path2).expect("read"),
            "[apps.a]\ncommand = \"a\"\n\n# about b and c\n\n[apps.c]\ncommand = \"c\"\n"
        );

        remove_app(&path, "worker").expect("remove worker");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("worker") && !text.contains("A = "), "{text}");
        assert!(text.contains("# top comment") && text.contains("# aligned comment"), "{text}");
    }

    #[test]
    fn refusals_leave_the_file_untouched() {
        let dir = TempDir::new("edit-refuse");
        let path = dir.write("sup.toml", FILE);
        let cases: Vec<(Result<Config, EditError>, &str)> = vec![
            (
                add_app(&path, &NewApp { name: "web".into(), command: vec!["x".into()], ..NewApp::default() }),
                "app `web` already exists",
            ),
            (remove_app(&path, "nope"), "no app named `nope`"),
            (add_app(&path, &NewApp { name: "x".into(), ..NewApp::default() }), "give the app's command"),
            (
                add_app(
                    &path,
                    &NewApp {
                        name: "x".into(),
                        command: vec!["x".into()],
                        ready: Some("notfy".into()),
                        ..NewApp::default()
                    },
                ),
                "the result would be invalid: ",
            ),
            (
                add_app(
                    &path,
                    &NewApp { name: "x".into(), command: vec!["x".into()], instances: Some(0), ..NewApp::default() },
                ),
                "the result would be invalid: ",
            ),
        ];
        for (res, want) in cases {
            let e = res.expect_err(want).to_string();
            assert!(e.contains(want), "want `{want}` in {e}");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), FILE);
        }
        let broken = dir.write("broken.toml", "[apps.web]\ncommand = \"x\"\ninstancs = 1\n");
        let e = add_app(&broken, &web2()).expect_err("broken file").to_string();
        assert!(e.starts_with("the file has an error; fix it first: ") && e.contains("instancs"), "{e}");
    }

    #[test]
    fn a_file_without_apps_gets_them() {
        let dir = TempDir::new("edit-empty");
        let path = dir.write("sup.toml", "# nothing yet\n");
        add_app(
            &path,
            &NewApp {
                name: "a".into(),
                command: vec!["sleep".into(), "9".into()],
                ready: Some("tcp".into()),
                port: Some(1),
                ..NewApp::default()
            },
        )
        .expect("add");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("# nothing yet\n\n[apps.a]\n") || text.starts_with("# nothing yet\n[apps.a]\n"),
            "{text}"
        );
        assert!(text.contains("ready = { tcp = true }"), "{text}");
    }
}
