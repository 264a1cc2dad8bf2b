//! `restart`: when a worker that exited is started again.

/// When a worker that exited is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Always restart, whatever the exit status.
    #[default]
    Always,
    /// Restart unless it exited cleanly (status 0 or one of `stop_exit_codes`).
    OnFailure,
    /// Never restart.
    Never,
}

crate::choice::string_enum!(
    RestartPolicy,
    "\"always\", \"on-failure\" or \"never\"",
    [("always", RestartPolicy::Always), ("on-failure", RestartPolicy::OnFailure), ("never", RestartPolicy::Never)]
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{app_err, parse_app};

    #[test]
    fn toml_values() {
        let ok: &[(&str, RestartPolicy)] = &[
            ("", RestartPolicy::Always),
            ("restart = \"always\"", RestartPolicy::Always),
            ("restart = \"on-failure\"", RestartPolicy::OnFailure),
            ("restart = \"never\"", RestartPolicy::Never),
            ("restart = \"On-Failure\"", RestartPolicy::OnFailure),
            ("restart = \"NEVER\"", RestartPolicy::Never),
        ];
        for (line, want) in ok {
            assert_eq!(parse_app(line).restart, *want, "{line}");
        }
        let cases: &[(&str, &str)] = &[
            (
                "restart = \"on_failure\"",
                "/x/sup.toml:3:11: key `apps.web.restart`: unknown value `on_failure`, expected one of `always`, `on-failure`, `never` (did you mean `on-failure`?)",
            ),
            (
                "restart = \"sometimes\"",
                "/x/sup.toml:3:11: key `apps.web.restart`: unknown value `sometimes`, expected one of `always`, `on-failure`, `never`",
            ),
            (
                "restart = \"Alwys\"",
                "/x/sup.toml:3:11: key `apps.web.restart`: unknown value `Alwys`, expected one of `always`, `on-failure`, `never` (did you mean `always`?)",
            ),
            (
                "restart = 1",
                "/x/sup.toml:3:11: key `apps.web.restart`: invalid type: integer `1`, expected \"always\", \"on-failure\" or \"never\"",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(app_err(line), *want, "{line}");
        }
    }
}
