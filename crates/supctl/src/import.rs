//! `supctl import`: converts a PM2 ecosystem file (`ecosystem.config.js`,
//! `.cjs`, `.mjs` or `.json`) into a commented `supervisor.toml`.
//!
//! JavaScript files are evaluated with the machine's `node` (no npm package is
//! needed); JSON files are parsed directly. Every PM2 option is either mapped
//! to a sup key, explained in a comment, or reported as not carried over (on
//! standard error and as a comment in the output). Nothing is dropped silently.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sup_proto::exit;

pub use sup_cli::supctl::ImportArgs;

/// Runs `supctl import`; returns the exit status.
pub fn run(args: &ImportArgs) -> i32 {
    match import(args) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("supctl: {e}");
            exit::FAILED
        }
    }
}

fn import(args: &ImportArgs) -> Result<(), String> {
    if let (Some(out), false) = (&args.output, args.force) {
        if std::fs::symlink_metadata(out).is_ok() {
            return Err(format!("`{}` already exists; use --force to overwrite it", out.display()));
        }
    }
    let source = absolute(&args.file)?;
    let root = read_ecosystem(&source)?;
    let base = source.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let converted = convert(&root, &source, &base, args.env.as_deref())?;
    for w in &converted.warnings {
        eprintln!("warning: {w}");
    }
    match &args.output {
        None => print!("{}", converted.text),
        Some(out) => {
            std::fs::write(out, &converted.text).map_err(|e| format!("cannot write `{}`: {e}", out.display()))?;
            let n = converted.apps;
            eprintln!(
                "supctl: wrote `{}` ({n} app{}, {} warning{}); check it with `supctl config check {}`",
                out.display(),
                plural(n),
                converted.warnings.len(),
                plural(converted.warnings.len()),
                out.display()
            );
        }
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `path` made absolute against the current directory, with `.` components removed.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?.join(path)
    };
    Ok(clean(&joined))
}

/// Removes `.` components (lexically; `..` is kept as written).
fn clean(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, Component::CurDir)).collect()
}

// ---------------------------------------------------------------------------
// Reading the ecosystem file

/// Marks the start of the JSON in node's output, so that anything the file
/// itself prints while it is evaluated is ignored.
const MARK: &str = "\n--supctl-import-json--\n";

/// Evaluated by `node -e SCRIPT FILE`: loads FILE (CommonJS, or ESM through
/// `import()`), and prints its export as JSON after [`MARK`].
const NODE_SCRIPT: &str = r#"
const f = process.argv[1];
const fail = (e) => { process.stderr.write(String((e && e.stack) || e) + '\n'); process.exit(1); };
// An ES module: `export default {...}`, else its named exports (`export const apps = [...]`).
const plain = (v) => {
  if (!v || v[Symbol.toStringTag] !== 'Module') return v;
  if (v.default !== undefined) return v.default;
  return Object.fromEntries(Object.keys(v).filter((k) => k !== '__esModule').map((k) => [k, v[k]]));
};
const done = (v) => {
  v = plain(v);
  process.stdout.write('\n--supctl-import-json--\n' + JSON.stringify(v === undefined ? null : v), () => process.exit(0));
};
let loaded;
try {
  loaded = Promise.resolve(require(f));
} catch (e) {
  // ESM that require() cannot load: .mjs, or `export` in a .js file on a Node without require(esm).
  const esm = e && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE' || e instanceof SyntaxError);
  if (esm) {
    loaded = import(require('url').pathToFileURL(f).href).catch((e2) => Promise.reject(e instanceof SyntaxError ? e : e2));
  } else {
    fail(e);
  }
}
if (loaded) loaded.then(done, fail);
"#;

/// How long an ecosystem file may take to evaluate.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);

fn read_ecosystem(path: &Path) -> Result<Value, String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "yml" | "yaml" => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            let invalid = |e: String| format!("`{}` is not valid YAML: {e}", path.display());
            let mut v: serde_norway::Value = serde_norway::from_str(&text).map_err(|e| invalid(e.to_string()))?;
            // `<<: *defaults`, common in ecosystem files that share settings between apps.
            v.apply_merge().map_err(|e| invalid(e.to_string()))?;
            serde_json::to_value(v).map_err(|e| invalid(e.to_string()))
        }
        "json" => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("`{}` is not valid JSON: {e}", path.display()))
        }
        "js" | "cjs" | "mjs" => {
            std::fs::File::open(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            eval_js(path)
        }
        _ => Err(format!(
            "`{}`: unknown kind of ecosystem file; expected a .js, .cjs, .mjs, .json, .yaml or .yml file",
            path.display()
        )),
    }
}

fn eval_js(path: &Path) -> Result<Value, String> {
    let mut child = Command::new("node")
        .arg("-e")
        .arg(NODE_SCRIPT)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "`{}` is JavaScript, which needs `node` to be read, and `node` was not found in PATH; \
                     install Node.js, or convert the file to JSON on a machine that has it",
                    path.display()
                )
            } else {
                format!("cannot run `node` to read `{}`: {e}", path.display())
            }
        })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > NODE_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`node` did not finish evaluating `{}` within {}s",
                    path.display(),
                    NODE_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for `node`: {e}")),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let out = String::from_utf8_lossy(&out);
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        // The error and the stack frames of the user's files, not node's own.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("(node:") && !l.contains("[eval]"))
            .filter(|l| !l.trim_start().starts_with("at node:"))
            .take(12)
            .collect();
        return Err(format!("`node` could not evaluate `{}`:\n{}", path.display(), lines.join("\n")));
    }
    let Some((_, json)) = out.rsplit_once(MARK) else {
        return Err(format!("`node` printed no result for `{}`", path.display()));
    };
    serde_json::from_str(json).map_err(|e| format!("cannot read node's result for `{}`: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Conversion

/// The generated file and what was reported about it.
#[derive(Debug)]
pub struct Converted {
    /// The supervisor.toml text.
    pub text: String,
    /// One line per option not carried over or approximated.
    pub warnings: Vec<String>,
    /// Number of apps written.
    pub apps: usize,
}

/// Converts the root value of an ecosystem file. `base` is the file's folder,
/// against which relative `cwd` values are resolved.
pub fn convert(root: &Value, source: &Path, base: &Path, env_name: Option<&str>) -> Result<Converted, String> {
    let mut warnings = Vec::new();
    let mut root_notes = Vec::new();
    let apps: Vec<&Value> = match root {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => {
            for k in o.keys().filter(|k| k.as_str() != "apps") {
                let msg = format!("top-level option `{k}` is not supported by sup and was not carried over");
                root_notes.push(msg.clone());
                warnings.push(msg);
            }
            match o.get("apps") {
                Some(Value::Array(a)) => a.iter().collect(),
                Some(v @ Value::Object(_)) => vec![v],
                Some(_) => return Err(format!("`{}`: `apps` must be an array of apps", source.display())),
                None => return Err(format!("`{}`: no `apps` array in the exported object", source.display())),
            }
        }
        _ => {
            return Err(format!(
                "`{}`: expected `{{ apps: [...] }}` or an array of apps, found {}",
                source.display(),
                kind(root)
            ))
        }
    };
    if apps.is_empty() {
        warnings.push("the ecosystem file has no apps".into());
    }

    let mut text = String::new();
    header(&mut text, source, env_name, &root_notes);

    let mut taken = HashSet::new();
    let mut env_found = false;
    for (i, app) in apps.iter().enumerate() {
        let Value::Object(obj) = app else {
            return Err(format!("`{}`: app #{} is {}, expected an object", source.display(), i + 1, kind(app)));
        };
        let out = convert_app(obj, i, base, env_name, &mut taken, &mut env_found)
            .map_err(|e| format!("`{}`: {e}", source.display()))?;
        warnings.extend(out.warnings.iter().map(|w| format!("app `{}`: {w}", out.name)));
        text.push('\n');
        text.push_str(&out.text);
    }
    if let (Some(env), false) = (env_name, env_found) {
        if !apps.is_empty() {
            warnings.push(format!("no app has `env_{env}`: only `env` was used"));
        }
    }
    Ok(Converted { text, warnings, apps: apps.len() })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn header(text: &mut String, source: &Path, env_name: Option<&str>, notes: &[String]) {
    let _ = writeln!(text, "# supervisor.toml converted from the PM2 ecosystem file");
    let _ = writeln!(text, "#   {}", one_line(&source.display().to_string()));
    match env_name {
        Some(e) => {
            let _ = writeln!(
                text,
                "# by `supctl import --env {}` (each app's env_{} merged over its env).",
                one_line(e),
                one_line(e)
            );
        }
        None => {
            let _ = writeln!(text, "# by `supctl import` (each app's env only; pick env_NAME with --env NAME).");
        }
    }
    let _ = writeln!(text, "# Review it, then validate it with `supctl config check FILE`.");
    let _ = writeln!(text, "# Every key is described in docs/configuration.md.");
    for n in notes {
        let _ = writeln!(text, "# {}", one_line(n));
    }
    text.push_str(
        r#"
[supervisor]
# Settings of supd itself, left at their defaults. Uncomment to change them.
# control_socket = "/run/supd/control.sock" # default: control.sock in run_dir
# control_socket_mode = "0660"
# control_socket_group = "supd"             # default: supd's own group
# run_dir = "/run/supd"                     # default: /run/supd as root, else $XDG_RUNTIME_DIR/supd
# log_dir = "/var/log/supd"                 # default: /var/log/supd as root, else $XDG_STATE_HOME/supd/logs
# monitor_interval = "1s"
# metrics = "127.0.0.1:9105"                # default: no metrics listener
# log_level = "info"
"#,
    );
}

/// Keys read by [`convert_app`]; everything else is reported.
const HANDLED: &[&str] = &[
    "name",
    "script",
    "args",
    "interpreter",
    "exec_interpreter",
    "interpreter_args",
    "node_args",
    "cwd",
    "instances",
    "exec_mode",
    "env",
    "wait_ready",
    "listen_timeout",
    "kill_timeout",
    "kill_signal",
    "shutdown_with_message",
    "max_memory_restart",
    "exp_backoff_restart_delay",
    "restart_delay",
    "max_restarts",
    "min_uptime",
    "autorestart",
    "stop_exit_codes",
    "out_file",
    "output",
    "error_file",
    "error",
    "log_file",
    "log",
    "pid_file",
    "combine_logs",
    "merge_logs",
    "log_date_format",
    "log_type",
    "uid",
    "gid",
    "autostart",
    "cron_restart",
    "time",
    "instance_var",
    "watch",
    "ignore_watch",
    "watch_delay",
];

/// Why some well-known PM2 options have no equivalent, for the output's comments.
fn hint(key: &str, app: &str) -> Option<String> {
    Some(match key {
        "watch_options" => format!(
            "sup's `watch` takes paths, ignore and debounce only; or run `supctl reload {app}` from your own watcher"
        ),
        "namespace" => "sup has no namespaces; address the app by its name".into(),
        "increment_var" => "sup sets SUP_INSTANCE, NODE_APP_INSTANCE and instance_var to the slot number".into(),
        "vizion" | "post_update" => "deploy with your own tooling, then `supctl reload`".into(),
        "source_map_support" => "add --enable-source-maps to node_args".into(),
        "disable_logs" => "use logs = \"journald\" or rotate the files with logs = { keep = N }".into(),
        "treekill" => "sup always stops the worker's whole process group".into(),
        _ => return None,
    })
}

/// One converted app.
struct AppOut {
    name: String,
    text: String,
    warnings: Vec<String>,
}

/// Builds one `[apps.NAME]` table: keys with their explanations.
#[derive(Default)]
struct Table {
    lines: Vec<String>,
    warnings: Vec<String>,
    notes: Vec<String>,
}

impl Table {
    fn comment(&mut self, text: &str) {
        self.lines.extend(comment_lines(text));
    }
    fn set(&mut self, key: &str, value: String) {
        self.lines.push(format!("{key} = {value}"));
    }
    /// An option not carried over: a warning, and a comment at the end of the table.
    fn dropped(&mut self, key: &str, why: Option<String>) {
        let msg = format!("option `{key}` is not supported by sup and was not carried over");
        self.notes.push(match why {
            Some(w) => format!("{msg}: {w}"),
            None => msg.clone(),
        });
        self.warnings.push(msg);
    }
    /// A PM2 option in milliseconds carried over as a sup duration, with why.
    fn duration_ms(&mut self, pm2_key: &str, value: &Value, key: &str, why: &str) {
        match millis(value) {
            Some(ms) => {
                self.comment(why);
                self.set(key, q(&format!("{ms}ms")));
            }
            None => self.invalid(pm2_key, value, "milliseconds"),
        }
    }
    /// An option whose value could not be used.
    fn invalid(&mut self, key: &str, value: &Value, expected: &str) {
        let msg = format!("option `{key}` was not carried over: expected {expected}, found `{}`", short(value));
        self.notes.push(msg.clone());
        self.warnings.push(msg);
    }
}

fn convert_app(
    obj: &Map<String, Value>,
    index: usize,
    base: &Path,
    env_name: Option<&str>,
    taken: &mut HashSet<String>,
    env_found: &mut bool,
) -> Result<AppOut, String> {
    let mut t = Table::default();
    let label = obj.get("name").and_then(Value::as_str).map(str::to_string);
    let script = match obj.get("script") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            let who = label.as_deref().map(|n| format!("app `{n}`")).unwrap_or_else(|| format!("app #{}", index + 1));
            return Err(format!("{who} has no `script`"));
        }
    };

    // Name.
    let pm2_name = match &label {
        Some(n) => n.clone(),
        None => Path::new(&script).file_stem().and_then(|s| s.to_str()).unwrap_or("app").to_string(),
    };
    let mut name = sanitize_name(&pm2_name);
    if taken.contains(&name) {
        let stem: String = name.chars().take(60).collect();
        let mut n = 2;
        while taken.contains(&format!("{stem}-{n}")) {
            n += 1;
        }
        name = format!("{stem}-{n}");
    }
    taken.insert(name.clone());
    if label.is_none() {
        t.comment(&format!("PM2 app without a name: named after its script `{script}`"));
    } else if name != pm2_name {
        let why = if sanitize_name(&pm2_name) == pm2_name {
            "another app already has this name"
        } else {
            "sup app names are 1 to 64 letters, digits, `_`, `.` and `-`"
        };
        t.comment(&format!("PM2 name `{pm2_name}`: {why}"));
        t.warnings.push(format!("renamed from PM2 name `{pm2_name}`: {why}"));
    }

    // cwd: made absolute against the ecosystem file's folder, where PM2 is usually started.
    let cwd = match obj.get("cwd") {
        Some(Value::String(c)) if !c.trim().is_empty() => {
            let p = Path::new(c.trim());
            clean(&if p.is_absolute() { p.to_path_buf() } else { base.join(p) })
        }
        None | Some(Value::Null) | Some(Value::String(_)) => {
            t.comment("PM2 runs the app in the folder `pm2 start` ran in; assumed to be the ecosystem file's folder");
            base.to_path_buf()
        }
        Some(v) => {
            t.invalid("cwd", v, "a path");
            base.to_path_buf()
        }
    };
    if !cwd.is_dir() {
        t.warnings.push(format!("cwd `{}` is not a folder on this machine", cwd.display()));
    }

    // command.
    let command = build_command(obj, &script, &cwd, &mut t);
    t.set("command", array(&command));
    t.set("cwd", q(&cwd.display().to_string()));

    // env, with env_NAME merged over it.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut env_sources = vec!["env".to_string()];
    if let Some(v) = obj.get("env") {
        env_values("env", v, &mut env, &mut t);
    }
    if let Some(e) = env_name {
        let key = format!("env_{e}");
        if let Some(v) = obj.get(&key) {
            *env_found = true;
            env_values(&key, v, &mut env, &mut t);
            env_sources.push(key);
        }
    }
    let unused: Vec<String> = obj
        .keys()
        .filter(|k| k.starts_with("env_") && Some(k.as_str()) != env_name.map(|e| format!("env_{e}")).as_deref())
        .cloned()
        .collect();

    // instances and exec_mode.
    let mode = obj.get("exec_mode").map(|m| match m.as_str() {
        Some("cluster" | "cluster_mode") => Ok(true),
        Some("fork" | "fork_mode") => Ok(false),
        _ => Err(m),
    });
    let cluster = match mode {
        Some(Ok(c)) => c,
        Some(Err(v)) => {
            t.invalid("exec_mode", v, "\"cluster\" or \"fork\"");
            false
        }
        // PM2 switches to cluster mode when `instances` is given without `exec_mode`.
        None => obj.contains_key("instances"),
    };
    let instances = match obj.get("instances") {
        None => "1".to_string(),
        Some(v) => instances(v, &mut t),
    };
    let node = command.first().is_some_and(|c| Path::new(c).file_name().is_some_and(|f| f == "node"));
    let port = if cluster { env.get("PORT").and_then(|p| p.trim().parse::<u16>().ok()) } else { None };
    let node_cluster = cluster && node && port.is_some();
    match (cluster, port) {
        (true, Some(port)) if node => {
            env.remove("PORT");
            t.comment(
                "PM2 cluster mode: one worker per slot. As Node cluster workers, their server.listen(PORT) \
                 gets the slot's socket from supd, so reloads drop no connection without changing the app.",
            );
            t.set("instances", instances);
            t.comment(&format!(
                "PORT {port} from env (sup passes it on as PORT). PM2 bound every interface: narrow this to \
                 127.0.0.1 if only a local proxy connects."
            ));
            t.set("listen", format!("[{}]", q(&format!("0.0.0.0:{port}"))));
            t.set("node_cluster", "true".into());
        }
        (true, port) => {
            t.comment(
                "PM2 cluster mode: sup starts one process per slot. For zero-downtime reloads the app should \
                 accept connections on the inherited fd 3 with `listen` (see docs/rollouts.md), or bind PORT \
                 itself with SO_REUSEPORT.",
            );
            t.set("instances", instances);
            if let Some(port) = port {
                env.remove("PORT");
                t.comment(&format!(
                    "PORT from env. sup passes it as PORT; for zero-downtime reloads, have the app listen on the \
                     inherited fd 3 and replace `port` with listen = [\"127.0.0.1:{port}\"] (see docs/rollouts.md)."
                ));
                t.set("port", port.to_string());
            } else if node {
                t.comment(
                    "No PORT in env: add listen = [\"0.0.0.0:PORT\"] and node_cluster = true so that the workers' \
                     server.listen(PORT) shares supd's sockets.",
                );
                t.warnings.push("cluster mode without PORT in env: set `listen` and `node_cluster` by hand".into());
            }
        }
        (false, _) => {
            if obj.contains_key("exec_mode") {
                t.comment("PM2 fork mode");
            }
            t.set("instances", instances);
        }
    }

    // Readiness.
    let wait_ready = match obj.get("wait_ready") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            t.invalid("wait_ready", v, "true or false");
            false
        }
    };
    if wait_ready {
        t.comment("PM2 wait_ready: the app says it is ready with process.send('ready')");
        t.set("ready", q("pm2"));
        match obj.get("listen_timeout") {
            Some(v) => t.duration_ms(
                "listen_timeout",
                v,
                "ready_timeout",
                "PM2 listen_timeout. PM2 goes on without the signal after it; sup kills a worker \
                 that is not ready within ready_timeout.",
            ),
            None => t.comment("ready_timeout is left at sup's default of 30s (PM2 waits 3000 ms)"),
        }
    } else if node_cluster {
        t.comment("PM2 cluster mode without wait_ready: a worker is online once its server listens");
        t.set("ready", q("listening"));
        if let Some(v) = obj.get("listen_timeout") {
            let why = "PM2 listen_timeout; sup kills a worker that is not listening within it";
            t.duration_ms("listen_timeout", v, "ready_timeout", why);
        }
    } else {
        t.comment("PM2 considers the app online as soon as it started (no wait_ready)");
        t.set("ready", q("none"));
        if let Some(v) = obj.get("listen_timeout") {
            t.comment(&format!("PM2 listen_timeout = {}: no effect with ready = \"none\"", short(v)));
        }
    }

    // Stopping.
    if let Some(v) = obj.get("kill_timeout") {
        t.duration_ms("kill_timeout", v, "stop_timeout", "PM2 kill_timeout: time to stop before SIGKILL");
    }
    // PM2 stops apps with SIGINT unless told otherwise; apps written for it handle that one.
    match obj.get("kill_signal") {
        None | Some(Value::Null) => {
            t.comment("PM2's default kill_signal (sup's default is SIGTERM)");
            t.set("stop_signal", q("SIGINT"));
        }
        Some(Value::String(sig)) if sup_config::parse_signal(sig.trim()).is_ok() => {
            t.comment("PM2 kill_signal");
            t.set("stop_signal", q(sig.trim()));
        }
        Some(v) => t.invalid("kill_signal", v, "a signal name such as \"SIGINT\""),
    }
    match obj.get("shutdown_with_message") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => t.set("shutdown_with_message", b.to_string()),
        Some(v) => t.invalid("shutdown_with_message", v, "true or false"),
    }

    // Restart policy.
    let autorestart = match obj.get("autorestart") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            t.invalid("autorestart", v, "true or false");
            true
        }
    };
    let stop_codes = match obj.get("stop_exit_codes") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let codes = match v {
                Value::Array(a) => a.iter().map(|c| c.as_i64().and_then(|c| i32::try_from(c).ok())).collect(),
                other => other.as_i64().and_then(|c| i32::try_from(c).ok()).map(|c| vec![c]),
            };
            if codes.is_none() {
                t.invalid("stop_exit_codes", v, "an array of exit codes");
            }
            codes
        }
    };
    if !autorestart {
        t.comment("PM2 autorestart = false");
        t.set("restart", q("never"));
    } else if stop_codes.is_some() {
        t.comment(
            "PM2 stop_exit_codes: these exits are not restarted. sup restarts no clean exit with \
             restart = \"on-failure\", and exit code 0 is always clean.",
        );
        t.set("restart", q("on-failure"));
    }
    if let Some(codes) = stop_codes {
        t.set("stop_exit_codes", format!("[{}]", codes.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")));
    }
    backoff(obj, &mut t);
    if let Some(v) = obj.get("max_restarts") {
        match v.as_u64().and_then(|n| u32::try_from(n).ok()).or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        {
            Some(n) => {
                t.comment(
                    "PM2 max_restarts counts unstable restarts in a row; sup counts crashes within \
                     restart_window (default 60s), then marks the app errored",
                );
                t.set("max_restarts", n.to_string());
            }
            None => t.invalid("max_restarts", v, "a number"),
        }
    }

    // Memory.
    if let Some(v) = obj.get("max_memory_restart") {
        match memory(v) {
            Some(limit) => {
                t.comment(
                    "PM2 max_memory_restart. sup counts the resident memory of the worker's process tree \
                     and replaces the worker without downtime after memory_limit_samples samples over it",
                );
                t.set("memory_limit", limit);
            }
            None => t.invalid("max_memory_restart", v, "a size such as \"300M\" or a number of bytes"),
        }
    }

    // User and group.
    for (key, sup_key) in [("uid", "user"), ("gid", "group")] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if !s.trim().is_empty() => t.set(sup_key, q(s.trim())),
            Some(Value::Number(n)) if n.is_u64() => t.set(sup_key, n.to_string()),
            Some(v) => t.invalid(key, v, "a name or a numeric id"),
        }
    }
    match obj.get("autostart") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => t.set("autostart", b.to_string()),
        Some(v) => t.invalid("autostart", v, "true or false"),
    }

    match obj.get("cron_restart") {
        None | Some(Value::Null) => {}
        Some(Value::String(c)) => match sup_config::CronSchedule::parse(c.trim()) {
            Ok(_) => {
                t.comment("PM2 cron_restart: sup replaces the workers one by one on this schedule, without downtime");
                t.set("cron_restart", q(c.trim()));
            }
            Err(e) => t.invalid("cron_restart", &Value::String(c.clone()), &format!("a valid pattern ({e})")),
        },
        Some(v) => t.invalid("cron_restart", v, "a cron pattern such as \"0 3 * * *\""),
    }

    // Logs.
    logs(obj, &mut t);
    match obj.get("time") {
        Some(Value::Bool(true)) => {
            t.comment("PM2 time = true: sup always stamps every line with the time; nothing to set")
        }
        Some(Value::Bool(false)) | None | Some(Value::Null) => {}
        Some(v) => t.invalid("time", v, "true or false"),
    }
    match obj.get("instance_var") {
        None | Some(Value::Null) => {}
        Some(Value::String(v)) if v == "NODE_APP_INSTANCE" => {
            t.comment(
                "PM2 instance_var = \"NODE_APP_INSTANCE\": sup always sets it (and SUP_INSTANCE) to the slot number",
            );
        }
        Some(Value::String(v)) if !v.is_empty() && !v.contains('=') && !v.contains('\0') => {
            t.comment("PM2 instance_var: this variable is set to the slot number (0, 1, ...), as are SUP_INSTANCE and NODE_APP_INSTANCE");
            t.set("instance_var", q(v));
        }
        Some(v) => t.invalid("instance_var", v, "an environment variable name"),
    }
    watch(obj, &mut t);

    // Options not carried over.
    let handled: BTreeSet<&str> = HANDLED.iter().copied().collect();
    for (k, _) in obj.iter().filter(|(k, _)| !handled.contains(k.as_str()) && !k.starts_with("env_")) {
        t.dropped(k, hint(k, &name));
    }
    for k in &unused {
        let env = k.trim_start_matches("env_");
        t.notes.push(format!("`{k}` was not used (select it with `supctl import --env {env}`)"));
        // Said on stderr too: production settings left behind unnoticed are the costly kind.
        t.warnings.push(format!(
            "has `{k}`, which was not merged: add `--env {env}` to merge it over `env`, as `pm2 start --env {env}` does"
        ));
    }

    // Assemble.
    let mut text = String::new();
    let _ = writeln!(text, "[apps.{}]", key(&name));
    for l in &t.lines {
        text.push_str(l);
        text.push('\n');
    }
    for n in &t.notes {
        for l in comment_lines(n) {
            text.push_str(&l);
            text.push('\n');
        }
    }
    if !env.is_empty() {
        let _ = writeln!(text, "\n# From PM2 {}.", env_sources.join(" and "));
        let _ = writeln!(text, "[apps.{}.env]", key(&name));
        for (k, v) in &env {
            let _ = writeln!(text, "{} = {}", key(k), q(v));
        }
    }
    Ok(AppOut { name, text, warnings: t.warnings })
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`: other characters become `-`.
fn sanitize_name(name: &str) -> String {
    let mapped: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .collect();
    let trimmed: String = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()).chars().take(64).collect();
    if trimmed.is_empty() {
        "app".into()
    } else {
        trimmed
    }
}

/// script + args + interpreter (+ interpreter_args / node_args) → `command`.
fn build_command(obj: &Map<String, Value>, script: &str, cwd: &Path, t: &mut Table) -> Vec<String> {
    let words_of = |key: &str, t: &mut Table| -> Vec<String> {
        match obj.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => match words(v) {
                Ok(w) => w,
                Err(e) => {
                    t.invalid(key, v, &e);
                    Vec::new()
                }
            },
        }
    };
    let mut iargs = words_of("interpreter_args", t);
    iargs.extend(words_of("node_args", t));
    let args = words_of("args", t);

    let interpreter = obj
        .get("interpreter")
        .or_else(|| obj.get("exec_interpreter"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|i| !i.is_empty());
    let ext = Path::new(script).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let direct = |t: &mut Table, iargs: &[String]| -> Vec<String> {
        if !iargs.is_empty() {
            t.warnings.push(
                "interpreter_args/node_args were not carried over: the script runs without an interpreter".into(),
            );
            t.notes.push(format!("interpreter arguments {} were not carried over (no interpreter)", array(iargs)));
        }
        // A bare name that is a file in cwd runs that file, not a program found in PATH.
        let program = if !script.contains('/') && cwd.join(script).is_file() {
            format!("./{script}")
        } else {
            script.to_string()
        };
        std::iter::once(program).chain(args.iter().cloned()).collect()
    };
    let with = |interp: &str, iargs: &[String]| -> Vec<String> {
        std::iter::once(interp.to_string())
            .chain(iargs.iter().cloned())
            .chain(std::iter::once(script.to_string()))
            .chain(args.iter().cloned())
            .collect()
    };
    match interpreter {
        Some("none") => {
            t.comment("PM2 interpreter \"none\": the script is run as a program");
            direct(t, &iargs)
        }
        Some(i) => {
            t.comment(&format!("PM2 interpreter `{i}`"));
            with(if i == "node" { "node" } else { i }, &iargs)
        }
        None if matches!(ext.as_str(), "js" | "mjs" | "cjs") => with("node", &iargs),
        None => {
            let inferred = match ext.as_str() {
                "py" => Some("python3"),
                "sh" => Some("bash"),
                "rb" => Some("ruby"),
                "php" => Some("php"),
                "pl" => Some("perl"),
                "coffee" => Some("coffee"),
                "ts" | "tsx" => Some("ts-node"),
                _ => None,
            };
            match inferred {
                Some(i) => {
                    t.comment(&format!("interpreter `{i}` chosen from the script's extension, as PM2 does"));
                    with(i, &iargs)
                }
                None => direct(t, &iargs),
            }
        }
    }
}

/// A string (split like a shell splits words) or an array of words.
fn words(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => split_words(s),
        Value::Array(a) => a
            .iter()
            .map(|w| match w {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => Err("a string or an array of strings".to_string()),
            })
            .collect(),
        _ => Err("a string or an array of strings".into()),
    }
}

/// Splits like a POSIX shell: whitespace separates words; quotes and backslashes work.
fn split_words(s: &str) -> Result<Vec<String>, String> {
    let unterminated = || "a string with balanced quotes".to_string();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(unterminated()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(unterminated()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(unterminated()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

fn env_values(key: &str, v: &Value, env: &mut BTreeMap<String, String>, t: &mut Table) {
    let Value::Object(vars) = v else {
        if !v.is_null() {
            t.invalid(key, v, "an object of variables");
        }
        return;
    };
    for (k, v) in vars {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            let msg = format!("variable `{}` of `{key}` was not carried over: not a valid name", one_line(k));
            t.notes.push(msg.clone());
            t.warnings.push(msg);
            continue;
        }
        let value = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => {
                env.remove(k);
                continue;
            }
            other => {
                let msg = format!("variable `{k}` of `{key}` is {}; it is passed as its JSON text", kind(other));
                t.notes.push(msg.clone());
                t.warnings.push(msg);
                other.to_string()
            }
        };
        if value.contains('\0') {
            let msg = format!("variable `{k}` of `{key}` was not carried over: its value holds a NUL byte");
            t.notes.push(msg.clone());
            t.warnings.push(msg);
            continue;
        }
        env.insert(k.clone(), value);
    }
}

/// PM2 `instances`: a number, "max", 0 (all CPUs) or -N (all CPUs but N).
fn instances(v: &Value, t: &mut Table) -> String {
    let n = match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) if s.trim().eq_ignore_ascii_case("max") => return q("max"),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 4096 => {
            t.warnings.push(format!("instances = {n} is more than sup's 4096; 4096 is used"));
            "4096".into()
        }
        Some(n) if n > 0 => n.to_string(),
        Some(0) => {
            t.comment("PM2 instances = 0: one per CPU");
            q("max")
        }
        Some(n) => {
            t.comment(&format!(
                "PM2 instances = {n} means all CPUs but {}; sup has no such form: \"max\" is one per CPU, \
                 set a number to leave CPUs free",
                -n
            ));
            t.warnings.push(format!("instances = {n} (all CPUs but {}) became \"max\" (all CPUs)", -n));
            q("max")
        }
        None => {
            t.invalid("instances", v, "a number or \"max\"");
            "1".into()
        }
    }
}

/// Milliseconds: a non-negative number or a string of digits.
fn millis(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.round() as u64))
        }
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A PM2 duration: milliseconds, or a string with a unit ("10s", "1h").
fn duration(v: &Value) -> Option<String> {
    if let Some(ms) = millis(v) {
        return Some(format!("{ms}ms"));
    }
    let s = v.as_str()?.trim();
    sup_config::parse_duration(s).ok().map(|_| s.to_string())
}

/// `max_memory_restart`: "300M", "1G", "512K" or a number of bytes.
fn memory(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n.as_u64().filter(|b| *b > 0).map(|b| b.to_string()),
        Value::String(s) => {
            let s = s.trim();
            match sup_config::parse_size(s) {
                Ok(b) if b > 0 => Some(q(s)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// exp_backoff_restart_delay / restart_delay / min_uptime → `backoff`.
fn backoff(obj: &Map<String, Value>, t: &mut Table) {
    let mut parts: Vec<String> = Vec::new();
    let exp = obj.get("exp_backoff_restart_delay").filter(|v| !v.is_null());
    let fixed = obj.get("restart_delay").filter(|v| !v.is_null());
    if let Some(v) = exp {
        match millis(v).filter(|ms| *ms > 0) {
            Some(ms) => {
                t.comment(&format!(
                    "PM2 exp_backoff_restart_delay = {ms}: delays grow by 1.5 up to 15s, as in PM2 \
                     (sup restarts the first crash at once)"
                ));
                parts.push(format!("initial = {}", q(&format!("{ms}ms"))));
                if ms > 15_000 {
                    parts.push(format!("max = {}", q(&format!("{ms}ms"))));
                }
            }
            None => t.invalid("exp_backoff_restart_delay", v, "milliseconds"),
        }
        if let Some(f) = fixed {
            let msg = format!(
                "option `restart_delay` ({}) was not carried over: exp_backoff_restart_delay is used instead",
                short(f)
            );
            t.notes.push(msg.clone());
            t.warnings.push(msg);
        }
    } else if let Some(v) = fixed {
        match millis(v) {
            Some(ms) => {
                t.comment(&format!(
                    "PM2 restart_delay = {ms}: a fixed delay, approximated with multiplier = 1.0 \
                     (sup restarts the first crash at once)"
                ));
                let d = q(&format!("{ms}ms"));
                parts.push(format!("initial = {d}"));
                parts.push("multiplier = 1.0".into());
                parts.push(format!("max = {d}"));
            }
            None => t.invalid("restart_delay", v, "milliseconds"),
        }
    }
    if let Some(v) = obj.get("min_uptime").filter(|v| !v.is_null()) {
        match duration(v) {
            Some(d) => {
                t.comment(
                    "PM2 min_uptime: a run at least this long is stable, and restarts the backoff count \
                     (reset_after)",
                );
                parts.push(format!("reset_after = {}", q(&d)));
            }
            None => t.invalid("min_uptime", v, "milliseconds or a duration such as \"10s\""),
        }
    }
    if !parts.is_empty() {
        t.set("backoff", format!("{{ {} }}", parts.join(", ")));
    }
}

/// watch / ignore_watch / watch_delay → `watch = true` or `watch = { paths, ignore, debounce }`.
fn watch(obj: &Map<String, Value>, t: &mut Table) {
    let strings = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    };
    let paths = match obj.get("watch") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {
            for k in ["ignore_watch", "watch_delay"].iter().filter(|k| obj.contains_key(**k)) {
                t.comment(&format!("PM2 {k}: no effect without watch"));
            }
            return;
        }
        Some(Value::Bool(true)) => Vec::new(),
        Some(v) => match strings(v) {
            Some(p) => p,
            None => return t.invalid("watch", v, "true, a path or a list of paths"),
        },
    };
    let ignore = match obj.get("ignore_watch") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(v).unwrap_or_else(|| {
            t.invalid("ignore_watch", v, "a path or a list of paths");
            Vec::new()
        }),
    };
    let debounce = match obj.get("watch_delay") {
        None | Some(Value::Null) => None,
        Some(v) => match millis(v) {
            Some(ms) => Some(format!("{ms}ms")),
            None => {
                t.invalid("watch_delay", v, "milliseconds");
                None
            }
        },
    };
    let mut parts = Vec::new();
    if !paths.is_empty() {
        parts.push(format!("paths = {}", array(&paths)));
    }
    if !ignore.is_empty() {
        parts.push(format!("ignore = {}", array(&ignore)));
    }
    if let Some(d) = debounce {
        parts.push(format!("debounce = {}", q(&d)));
    }
    let value = if parts.is_empty() { "true".to_string() } else { format!("{{ {} }}", parts.join(", ")) };
    t.comment(
        "PM2 watch: sup rolls the app (zero downtime) when files under its cwd change; for development. \
         sup ignores .git, node_modules, __pycache__ and log files by default",
    );
    t.set("watch", value);
}

/// Log options: sup keeps per-app files in log_dir.
fn logs(obj: &Map<String, Value>, t: &mut Table) {
    let paths = ["out_file", "output", "error_file", "error", "log_file", "log", "pid_file"];
    let present: Vec<&str> = paths.iter().copied().filter(|k| obj.contains_key(*k)).collect();
    let merge = ["merge_logs", "combine_logs"].iter().any(|k| obj.get(*k).and_then(Value::as_bool) == Some(true));
    let json = obj.get("log_type").and_then(Value::as_str) == Some("json");
    let date = obj.get("log_date_format");
    if !present.is_empty() || merge || date.is_some() || obj.contains_key("log_type") {
        t.comment(
            "sup writes each app's output to its own files in [supervisor] log_dir (APP.out.log and \
             APP.err.log, or APP.log when combined), every line stamped with the time and APP#SLOT, \
             rotated by size (see `logs` in docs/configuration.md)",
        );
    }
    for k in &present {
        let v = obj.get(*k).map(short).unwrap_or_default();
        let msg = format!("option `{k}` ({v}) was not carried over: sup keeps the app's log files in log_dir");
        t.notes.push(msg.clone());
        t.warnings.push(msg);
    }
    if let Some(d) = date {
        let msg = format!("option `log_date_format` ({}) was not carried over: sup stamps lines itself", short(d));
        t.notes.push(msg.clone());
        t.warnings.push(msg);
    }
    match obj.get("log_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "json" || s == "raw" => {}
        Some(v) => t.invalid("log_type", v, "\"json\""),
    }
    let mut parts = Vec::new();
    if merge {
        t.comment(
            "PM2 merge_logs: sup already writes all instances of an app to the same files; \
             combined = true also puts stdout and stderr in one APP.log",
        );
        parts.push("combined = true");
    }
    if json {
        t.comment("PM2 log_type = \"json\"");
        parts.push("format = \"json\"");
    }
    if !parts.is_empty() {
        t.set("logs", format!("{{ {} }}", parts.join(", ")));
    }
}

// ---------------------------------------------------------------------------
// TOML text

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(o, "\\u{:04X}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A TOML key: bare when it can be, else quoted.
fn key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        q(k)
    }
}

fn array(words: &[String]) -> String {
    format!("[{}]", words.iter().map(|w| q(w)).collect::<Vec<_>>().join(", "))
}

/// A comment, wrapped at about 100 columns.
fn comment_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::from("#");
    for word in one_line(text).split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 100 {
            out.push(std::mem::replace(&mut line, String::from("#  ")));
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push(line);
    out
}

/// Text for a comment: one line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A value as short JSON text, for messages.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(split_words(r#"a "b c" 'd e' f\ g"#).unwrap(), ["a", "b c", "d e", "f g"]);
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert!(split_words("'x").is_err());
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize_name("my api"), "my-api");
        assert_eq!(sanitize_name("_x"), "x");
        assert_eq!(sanitize_name("@@@"), "app");
        assert_eq!(sanitize_name(&"a".repeat(80)).len(), 64);
    }

    #[test]
    fn quotes_toml() {
        assert_eq!(q("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(key("api.v2"), "\"api.v2\"");
        assert_eq!(key("NODE_ENV"), "NODE_ENV");
    }
}
