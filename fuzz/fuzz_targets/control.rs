//! The control API: raw bytes from a connected client, through hyper and
//! supd's router, against a live supervisor with one app of long sleeping
//! workers (at most 4, as max_workers says). Every input ends with an answer
//! or a closed connection, never a panic or a hang.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sup_core::supervisor::Supervisor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Harness {
    rt: tokio::runtime::Runtime,
    sup: Arc<Supervisor>,
    followers: sup_core::control::Followers,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sup-fuzz-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("supervisor.toml");
        let text = format!(
            "[supervisor]\nrun_dir = \"{d}/run\"\nlog_dir = \"{d}/logs\"\ncontrol_socket = \"{d}/ctl.sock\"\n\
             max_workers = 4\n[apps.idle]\ncommand = [\"/bin/sleep\", \"1000\"]\nautostart = false\nstop_timeout = \"1s\"\n",
            d = dir.display()
        );
        std::fs::write(&path, &text).expect("config");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let cfg = sup_config::load(&path).expect("valid config");
        let sup = rt.block_on(Supervisor::start(cfg, std::sync::Arc::new(sup_core::spec::NoRecorder))).expect("supervisor");
        Harness { rt, sup, followers: sup_core::control::Followers::new(32) }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        use sup_core::control::Role;
        let role = match data.first().map(|b| b % 3) {
            Some(0) => Role::Act,
            Some(1) => Role::Read,
            _ => Role::Stranger,
        };
        let peer = sup_core::control::Peer { role, uid: Some(1000), pid: None, fd: None };
        let conn = tokio::spawn(sup_core::control::serve_connection(h.sup.clone(), server, peer, h.followers.clone()));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        // Operations on one app queue behind each other; each finishes within a stop_timeout or two.
        let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer)).await;
        if read.is_err() {
            let status = h.sup.status(None).map(|s| format!("{s:?}")).unwrap_or_default();
            let mut procs = String::new();
            for a in h.sup.status(None).map(|s| s.apps).unwrap_or_default() {
                for i in a.instances.iter().filter_map(|i| i.pid) {
                    let stat = std::fs::read_to_string(format!("/proc/{i}/stat")).unwrap_or_default();
                    let wchan = std::fs::read_to_string(format!("/proc/{i}/wchan")).unwrap_or_default();
                    procs.push_str(&format!("\nworker {i}: {stat} wchan={wchan}"));
                }
            }
            for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
                let p = t.path();
                let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
                let stack = std::fs::read_to_string(p.join("stack")).unwrap_or_default();
                procs.push_str(&format!("\nthread {}: {} {}", t.file_name().to_string_lossy(), comm.trim(), stack));
            }
            panic!("the connection did not end within 60 s; supervisor: {status}{procs}");
        }
        if !answer.is_empty() {
            assert!(answer.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&answer));
        }
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(20), conn).await;
    });
});
