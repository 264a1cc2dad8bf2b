//! The man pages and completions that supd's build script renders describe
//! exactly the commands and flags that `supctl --help` shows.

use std::io::Read;
use std::process::Command;

use sup::*;

fn help(args: &[&str]) -> String {
    let out = Command::new(bin("supctl")).args(args).arg("--help").env_remove("SUPD_CONFIG").output().expect("supctl");
    assert!(out.status.success(), "supctl {args:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command names in the "Commands:" section of a help text.
fn commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags a help text lists.
fn flags(help: &str) -> Vec<String> {
    let mut out: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap_or(w).trim_end_matches('.').to_string())
        .filter(|w| w.chars().skip(2).all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn man(page: &str) -> String {
    let path = bin_dir().join("sup-assets/man").join(format!("{page}.1.gz"));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).expect("gzip");
    // roff escapes the dashes of flags.
    text.replace("\\-", "-")
}

#[test]
fn every_command_and_flag_of_supctl_help_is_in_its_man_page() {
    let top = help(&[]);
    let cmds = commands(&top);
    assert!(cmds.len() >= 15, "supctl --help lists its commands: {top}");
    let main_page = man("supctl");
    let mut pages = 0;
    let mut queue: Vec<Vec<String>> = cmds.iter().map(|c| vec![c.clone()]).collect();
    while let Some(path) = queue.pop() {
        assert!(main_page.contains(&path[0]), "supctl(1) lists `{}`", path[0]);
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        let page = man(&format!("supctl-{}", path.join("-")));
        pages += 1;
        for flag in flags(&text) {
            assert!(page.contains(&flag), "supctl-{}(1) documents {flag}", path.join("-"));
        }
        for sub in commands(&text) {
            let mut p = path.clone();
            p.push(sub);
            queue.push(p);
        }
    }
    assert!(pages > cmds.len(), "subcommands of subcommands (config check/apply) have pages too");
    let supd = man("supd");
    for flag in ["--config", "SUPD_CONFIG", "SIGHUP"] {
        assert!(supd.contains(flag), "supd(1) documents {flag}");
    }
}

#[test]
fn completions_know_every_command() {
    let cmds = commands(&help(&[]));
    for file in ["supctl.bash", "_supctl", "supctl.fish"] {
        let path = bin_dir().join("sup-assets/completions").join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for c in &cmds {
            assert!(text.contains(c.as_str()), "{file} completes `{c}`");
        }
        assert!(text.contains("canary"), "{file} completes flags too");
    }
}
