//! The one skip policy of the tests: a test that cannot run here prints `SKIPPED: TEST: REASON`
//! and passes, except under CI (`CI` set, see [`in_ci`]), where it fails.
//!
//! CI runs `scripts/test.sh` as root after `scripts/setup.sh` has installed every tool, server
//! and header the tests use, so a missing one there is a setup bug that a skip would hide (a
//! probe that wrongly says "unsupported" would hide a whole feature's tests). The one exception
//! is a kernel older than the Linux version that introduced a feature: no setup step can
//! provide it, so [`kernel_feature`] still skips then, even under CI, and says which version is
//! needed.

/// Whether we run in CI (`CI` is set and not empty, `false` or `0`). `scripts/test.sh` sets it
/// when it is unset, so local runs of the test command behave as CI does.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skip `test` for a reason that `scripts/setup.sh` (or running as root, as CI does) removes:
/// a missing tool, compiler, server, header, huge page or privilege. Prints
/// `SKIPPED: TEST: REASON` outside CI; panics under CI. The caller returns afterwards.
#[track_caller]
pub fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!(
            "{test}: {reason} (CI is set: scripts/setup.sh and root provide this, so it fails \
             instead of skipping)"
        );
    }
    eprintln!("SKIPPED: {test}: {reason}");
}

/// The running kernel's `(major, minor)` version, from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_kernel_version(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

pub(crate) fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Skip `test` because the kernel lacks `feature`, which Linux `since` (major, minor)
/// introduced. On an older kernel that is a real lack of this machine: `SKIPPED` with the
/// reason, also under CI. On a kernel that should have it (built without it, or a probe that
/// is wrong), it is a [`skip`]: a failure under CI. The caller returns afterwards.
#[track_caller]
pub fn kernel_feature(test: &str, feature: &str, since: (u32, u32)) {
    let running = kernel_version();
    match running {
        Some(v) if v < since => eprintln!(
            "SKIPPED: {test}: the kernel ({}.{}) predates {feature} (Linux {}.{})",
            v.0, v.1, since.0, since.1
        ),
        _ => skip(
            test,
            &format!(
                "the kernel ({}) lacks {feature}, which Linux {}.{} introduced (configured out?)",
                running.map_or("version unknown".into(), |v| format!("{}.{}", v.0, v.1)),
                since.0,
                since.1
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v1147\n"), Some((6, 18)));
        assert_eq!(parse_kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("5.15+"), Some((5, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(kernel_version().is_some(), "this machine's kernel version");
    }

    /// The policy itself, in a child process per environment: a skip passes outside CI and
    /// fails under it; a kernel older than the feature skips in both.
    #[test]
    fn skips_fail_under_ci_unless_the_kernel_predates_the_feature() {
        const CHILD: &str = "MEMSYNC_TESTKIT_SKIP_CHILD";
        if let Ok(what) = std::env::var(CHILD) {
            match what.as_str() {
                "setup" => skip("t", "no frobnicator"),
                "old-kernel" => kernel_feature("t", "FEATURE_X", (2, 6)),
                _ => kernel_feature("t", "FEATURE_Y", (999, 0)),
            }
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let test = "skip::tests::skips_fail_under_ci_unless_the_kernel_predates_the_feature";
        for (what, ci, passes, says) in [
            ("setup", "false", true, "SKIPPED: t: no frobnicator"),
            ("setup", "true", false, "no frobnicator (CI is set"),
            // FEATURE_X is older than this kernel: it should be there.
            ("old-kernel", "false", true, "SKIPPED: t: the kernel"),
            ("old-kernel", "true", false, "lacks FEATURE_X"),
            // FEATURE_Y is newer than this kernel: a real lack, skipped even under CI.
            (
                "new-feature",
                "true",
                true,
                "predates FEATURE_Y (Linux 999.0)",
            ),
            (
                "new-feature",
                "false",
                true,
                "predates FEATURE_Y (Linux 999.0)",
            ),
        ] {
            let out = crate::child::run_test_binary(
                &exe,
                test,
                std::time::Duration::from_secs(60),
                |c| {
                    c.env(CHILD, what).env("CI", ci);
                },
            );
            let text = crate::child::describe(&out);
            assert_eq!(out.status.success(), passes, "{what} CI={ci}: {text}");
            assert!(
                text.contains(says),
                "{what} CI={ci}: lacks {says:?}: {text}"
            );
        }
    }
}
