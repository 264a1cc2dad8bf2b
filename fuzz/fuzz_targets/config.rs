//! supervisor.toml: any text gets a config or a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match sup_config::parse(text, std::path::Path::new("/nonexistent/fuzz/supervisor.toml")) {
        Ok(cfg) => {
            for app in &cfg.apps {
                assert!(!app.command.is_empty(), "an app always has a command");
                assert!(app.instances >= 1);
            }
        }
        Err(e) => {
            // Errors name the file.
            assert!(e.to_string().contains("supervisor.toml"), "{e}");
        }
    }
});
