//! The sup supervisor core.
//!
//! # Theory of operation
//!
//! supd runs one tokio runtime on one thread plus two kinds of helper threads:
//! the *spawner* (all forks happen there, so `PR_SET_PDEATHSIG` ties workers
//! to supd's life) and one *log writer* per app (file I/O never blocks the
//! event loop).
//!
//! - [`reaper`] owns `waitpid`: exits are noticed on SIGCHLD, at once.
//! - [`spawner`] forks and execs with the socket-activation protocol.
//! - [`worker`] watches one process: exit, notify socket, readiness deadline, stop.
//! - [`accepting`] sees, in /proc, whether a new worker waits for connections on its sockets.
//! - [`slot`] is the state machine of one instance slot; it is the only place
//!   where a slot's state changes, and every change is logged with a reason.
//! - [`app`] runs operations (start, stop, restart) over an app's slots, one at a time.
//! - [`listeners`] binds the sockets that outlive workers.
//! - [`supervisor`] holds the apps; [`control`] serves the HTTP/JSON API over a Unix socket.
//!
//! Status is read from `watch` channels each slot publishes on every
//! transition, so answering `status` never waits on a busy task.

pub mod accepting;
pub mod app;
pub mod control;
pub mod cron;
pub mod fdstore;
pub mod filewatch;
pub mod history;
pub mod listeners;
pub mod logread;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod nodeipc;
pub mod notify;
pub mod probe;
pub mod reaper;
pub mod slot;
pub mod spawner;
pub mod spec;
pub mod steer;
pub mod supervisor;
pub mod worker;

pub use supervisor::{Supervisor, Verb};

/// The layers of docs/architecture.md, checked against the code: a module
/// uses only modules of its own layer or below, with no cycle, and no module
/// of the core uses a driver.
#[cfg(test)]
mod layers {
    use std::collections::HashMap;

    /// Module, layer: 0 leaf, 1 process, 2 worker, 3 slot, 4 app, 5 supervisor, 6 drivers.
    const LAYERS: &[(&str, u8)] = &[
        ("spec", 0),
        ("reaper", 1),
        ("spawner", 1),
        ("notify", 1),
        ("nodeipc", 1),
        ("probe", 1),
        ("accepting", 1),
        ("listeners", 1),
        ("fdstore", 1),
        ("steer", 1),
        ("history", 1),
        ("logs", 1),
        ("logread", 1),
        ("worker", 2),
        ("slot", 3),
        ("app", 4),
        ("supervisor", 5),
        ("monitor", 6),
        ("cron", 6),
        ("filewatch", 6),
        ("metrics", 6),
        ("control", 6),
    ];

    const SOURCES: &[(&str, &str)] = &[
        ("spec", include_str!("spec.rs")),
        ("reaper", include_str!("reaper.rs")),
        ("spawner", include_str!("spawner.rs")),
        ("notify", include_str!("notify.rs")),
        ("nodeipc", include_str!("nodeipc.rs")),
        ("probe", include_str!("probe.rs")),
        ("accepting", include_str!("accepting.rs")),
        ("listeners", include_str!("listeners.rs")),
        ("fdstore", include_str!("fdstore.rs")),
        ("steer", include_str!("steer.rs")),
        ("history", include_str!("history.rs")),
        ("logs", include_str!("logs.rs")),
        ("logread", include_str!("logread.rs")),
        ("worker", include_str!("worker.rs")),
        ("slot", include_str!("slot.rs")),
        ("app", include_str!("app.rs")),
        ("supervisor", include_str!("supervisor.rs")),
        ("monitor", include_str!("monitor.rs")),
        ("cron", include_str!("cron.rs")),
        ("filewatch", include_str!("filewatch.rs")),
        ("metrics", include_str!("metrics.rs")),
        ("control", include_str!("control.rs")),
    ];

    /// The crate modules `src` uses outside its tests.
    fn uses(src: &str) -> Vec<String> {
        let code = src.split("#[cfg(test)]\n").next().unwrap_or(src);
        // Doc links name modules without using them.
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        let mut out: Vec<String> = code
            .split("crate::")
            .skip(1)
            .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
            .filter(|m: &String| !m.is_empty())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn every_module_has_a_layer() {
        let lib = include_str!("lib.rs");
        for line in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
            let name = line.trim_end_matches(';');
            assert!(LAYERS.iter().any(|(m, _)| *m == name), "module `{name}` has no layer");
            assert!(SOURCES.iter().any(|(m, _)| *m == name), "module `{name}` is not checked");
        }
    }

    #[test]
    fn no_module_uses_a_layer_above_it_and_there_is_no_cycle() {
        let layer: HashMap<&str, u8> = LAYERS.iter().copied().collect();
        let mut graph: HashMap<&str, Vec<String>> = HashMap::new();
        for (module, src) in SOURCES {
            let own = layer[module];
            for dep in uses(src) {
                let Some(&theirs) = layer.get(dep.as_str()) else { continue };
                assert!(theirs <= own, "`{module}` (layer {own}) uses `{dep}` (layer {theirs}) above it");
                if dep != *module {
                    graph.entry(module).or_default().push(dep);
                }
            }
        }
        // Depth-first search for a cycle among same-layer uses.
        fn visit<'a>(
            m: &'a str,
            graph: &'a HashMap<&str, Vec<String>>,
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
        ) {
            if done.contains(&m) {
                return;
            }
            assert!(!path.contains(&m), "import cycle: {} -> {m}", path.join(" -> "));
            path.push(m);
            for d in graph.get(m).into_iter().flatten() {
                visit(d, graph, path, done);
            }
            path.pop();
            done.push(m);
        }
        let mut done = Vec::new();
        for (m, _) in SOURCES {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
    }
}
