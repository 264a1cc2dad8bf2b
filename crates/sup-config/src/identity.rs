//! `user` and `group` (and `control_socket_group`): names or numeric ids, looked up now so
//! that a typo fails at load time rather than at spawn time.

use std::fmt;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A system user a worker runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// A system group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group name (the number itself when the group has no entry).
    pub name: String,
    /// Group id.
    pub gid: u32,
}

/// A user or group as written: a name, or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdOrName {
    /// A numeric id (integer, or a string of digits).
    Id(u32),
    /// A name.
    Name(String),
}

impl fmt::Display for IdOrName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdOrName::Id(id) => write!(f, "{id}"),
            IdOrName::Name(name) => f.write_str(name),
        }
    }
}

impl<'de> Deserialize<'de> for IdOrName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IdOrNameVisitor)
    }
}

struct IdOrNameVisitor;

impl Visitor<'_> for IdOrNameVisitor {
    type Value = IdOrName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a name or a numeric id")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u32::try_from(v)
            .map(IdOrName::Id)
            .map_err(|_| E::custom(format!("expected a name or a numeric id, found `{v}`")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.visit_i64(i64::try_from(v).unwrap_or(-1))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.is_empty() {
            return Err(E::custom("expected a name or a numeric id, found ``"));
        }
        if v.chars().all(|c| c.is_ascii_digit()) {
            return v.parse().map(IdOrName::Id).map_err(|_| E::custom(format!("id `{v}` is too large")));
        }
        Ok(IdOrName::Name(v.to_string()))
    }
}

/// Looks a user up in the system's user database.
pub(crate) fn lookup_user(who: &IdOrName) -> Result<User, String> {
    let found = match who {
        IdOrName::Id(uid) => nix::unistd::User::from_uid(Uid::from_raw(*uid)),
        IdOrName::Name(name) => nix::unistd::User::from_name(name),
    }
    .map_err(|e| format!("cannot look up user `{who}`: {}", e.desc()))?;
    let user = found.ok_or_else(|| format!("unknown user `{who}`"))?;
    Ok(User { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir })
}

/// Looks a group up in the system's group database.
pub(crate) fn lookup_group(which: &IdOrName) -> Result<Group, String> {
    let found = match which {
        IdOrName::Id(gid) => nix::unistd::Group::from_gid(Gid::from_raw(*gid)),
        IdOrName::Name(name) => nix::unistd::Group::from_name(name),
    }
    .map_err(|e| format!("cannot look up group `{which}`: {}", e.desc()))?;
    let group = found.ok_or_else(|| format!("unknown group `{which}`"))?;
    Ok(Group { name: group.name, gid: group.gid.as_raw() })
}

/// The primary group of `user`; a gid without a group entry is still usable by number.
pub(crate) fn primary_group(user: &User) -> Group {
    match nix::unistd::Group::from_gid(Gid::from_raw(user.gid)) {
        Ok(Some(group)) => Group { name: group.name, gid: user.gid },
        _ => Group { name: user.gid.to_string(), gid: user.gid },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, err, parse_app, parse_ok};

    #[test]
    fn lookups() {
        let root = lookup_user(&IdOrName::Name("root".into())).expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(lookup_user(&IdOrName::Id(0)).expect("uid 0").name, "root");
        assert_eq!(lookup_group(&IdOrName::Id(0)).expect("gid 0").gid, 0);
        let cases: &[(Result<User, String>, &str)] = &[
            (lookup_user(&IdOrName::Name("no-such-user-xyz".into())), "unknown user `no-such-user-xyz`"),
            (lookup_user(&IdOrName::Id(3_999_999)), "unknown user `3999999`"),
        ];
        for (got, want) in cases {
            assert_eq!(got.as_ref().err().map(String::as_str), Some(*want));
        }
        assert_eq!(
            lookup_group(&IdOrName::Name("no-such-group-xyz".into())),
            Err("unknown group `no-such-group-xyz`".to_string())
        );
    }

    #[test]
    fn toml_values() {
        let app = parse_app("user = \"root\"");
        assert_eq!(app.user.as_ref().map(|u| u.uid), Some(0));
        assert_eq!(app.group.as_ref().map(|g| g.gid), Some(0));
        let app = parse_app("user = 0\ngroup = \"0\"");
        assert_eq!(app.user.map(|u| u.name), Some("root".to_string()));
        assert_eq!(app.group.map(|g| g.gid), Some(0));
        assert_eq!(parse_app("").user, None);
        assert_eq!(parse_app("").group, None);
        let cfg = parse_ok("[supervisor]\ncontrol_socket_group = \"root\"\n");
        assert_eq!(cfg.supervisor.control_socket_group.map(|g| g.gid), Some(0));

        let cases: &[(&str, &str)] = &[
            ("user = \"bob-no-such\"", "/x/sup.toml:3:8: key `apps.web.user`: unknown user `bob-no-such`"),
            ("group = \"nogroup-xyz\"", "/x/sup.toml:3:9: key `apps.web.group`: unknown group `nogroup-xyz`"),
            ("user = -1", "/x/sup.toml:3:8: key `apps.web.user`: expected a name or a numeric id, found `-1`"),
            (
                "user = true",
                "/x/sup.toml:3:8: key `apps.web.user`: invalid type: boolean `true`, expected a name or a numeric id",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
        assert_eq!(
            err("[supervisor]\ncontrol_socket_group = \"nogroup-xyz\"\n"),
            "/x/sup.toml:2:24: key `supervisor.control_socket_group`: unknown group `nogroup-xyz`"
        );
    }
}
