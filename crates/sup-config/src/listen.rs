//! Listen addresses (`"127.0.0.1:8080"`, `"[::1]:8080"`, `"unix:/path.sock"`) and `metrics`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// An address a worker's listening socket binds to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A TCP socket address.
    Tcp(SocketAddr),
    /// A Unix socket path (absolute after loading).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Parses `"IP:PORT"`, `"[IPv6]:PORT"` or `"unix:PATH"` (PATH kept as written).
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("expected a socket path after `unix:`".to_string());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("expected \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\", found `{s}`"))
    }

    /// Makes a relative Unix socket path absolute against `base`.
    pub(crate) fn resolve(self, base: &Path) -> ListenAddr {
        match self {
            ListenAddr::Unix(path) => ListenAddr::Unix(base.join(path)),
            tcp => tcp,
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ListenVisitor)
    }
}

struct ListenVisitor;

impl Visitor<'_> for ListenVisitor {
    type Value = ListenAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address such as \"127.0.0.1:8080\" or \"unix:/path.sock\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        ListenAddr::parse(v).map_err(E::custom)
    }
}

/// A TCP address in a TOML value (`metrics = "127.0.0.1:9105"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for TcpAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TcpVisitor)
    }
}

struct TcpVisitor;

impl Visitor<'_> for TcpVisitor {
    type Value = TcpAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address such as \"127.0.0.1:9105\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        v.parse::<SocketAddr>()
            .map(TcpAddr)
            .map_err(|_| E::custom(format!("expected an address such as \"127.0.0.1:9105\", found `{v}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, err, parse_app, parse_ok};

    #[test]
    fn parses_and_displays() {
        let cases: &[(&str, &str)] = &[
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::1]:8080"),
            ("0.0.0.0:0", "0.0.0.0:0"),
            ("unix:/run/web.sock", "unix:/run/web.sock"),
        ];
        for (input, want) in cases {
            let addr = ListenAddr::parse(input).expect(input);
            assert_eq!(addr.to_string(), *want);
        }
        let bad: &[(&str, &str)] = &[
            ("localhost:80", "expected \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\", found `localhost:80`"),
            ("8080", "expected \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\", found `8080`"),
            ("unix:", "expected a socket path after `unix:`"),
        ];
        for (input, want) in bad {
            assert_eq!(ListenAddr::parse(input), Err(want.to_string()), "{input}");
        }
    }

    #[test]
    fn toml_values() {
        let app = parse_app("listen = [\"127.0.0.1:8080\", \"unix:web.sock\", \"unix:/abs.sock\"]");
        assert_eq!(
            app.listen,
            vec![
                ListenAddr::Tcp("127.0.0.1:8080".parse().expect("addr")),
                ListenAddr::Unix(PathBuf::from("/x/web.sock")),
                ListenAddr::Unix(PathBuf::from("/abs.sock")),
            ]
        );
        assert_eq!(app.listen_backlog, 1024);
        let cfg = parse_ok("[supervisor]\nmetrics = \"127.0.0.1:9105\"\n");
        assert_eq!(cfg.supervisor.metrics, Some("127.0.0.1:9105".parse().expect("addr")));
        let cases: &[(&str, &str)] = &[
            (
                "[apps.web]\ncommand = \"x\"\nlisten = [\"127.0.0.1:1\", \"nope\"]\n",
                "/x/sup.toml:3:26: key `apps.web.listen[1]`: expected \"IP:PORT\", \"[IPv6]:PORT\" or \"unix:/path\", found `nope`",
            ),
            (
                "[apps.web]\ncommand = \"x\"\nlisten = \"127.0.0.1:1\"\n",
                "/x/sup.toml:3:10: key `apps.web.listen`: invalid type: string \"127.0.0.1:1\", expected a sequence",
            ),
            (
                "[supervisor]\nmetrics = \"9105\"\n",
                "/x/sup.toml:2:11: key `supervisor.metrics`: expected an address such as \"127.0.0.1:9105\", found `9105`",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(err(src), *want, "{src}");
        }
        assert_eq!(
            app_err("listen_backlog = -1"),
            "/x/sup.toml:3:18: key `apps.web.listen_backlog`: invalid value: integer `-1`, expected u32"
        );
    }
}
