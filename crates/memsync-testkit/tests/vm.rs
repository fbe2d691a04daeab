//! The VM harness itself: a guest boots, runs a script with an added dynamic binary and a
//! kernel module, and every way a guest can fail reaches the test as a failure.

use std::time::Duration;

use memsync_testkit::vm::{GuestFailure, Kernel, Vm};

const BOOT: Duration = Duration::from_secs(240);

/// On 6.12 only: the other VM tests boot 6.1 with binaries, libraries, modules and an
/// environment (the 6.1 kernel matrices, `device::direct_mount_6_1`), and a second boot here
/// would cost 4-5 s of the VM tests' time for nothing the harness does differently per kernel.
#[test]
fn guest_runs_a_script_with_binaries_modules_and_env() {
    let name = "6.12";
    let Some(kernel) = Kernel::debian(name, "guest_runs_a_script") else {
        return;
    };
    // A dynamically linked host binary: its libraries must come along.
    let env = std::fs::canonicalize("/usr/bin/env").unwrap();
    let out = Vm::new(&kernel)
        .with_binary_as(&env, "host-env")
        .with_modules(&["nbd", "ext4"])
        .with_env("GREETING", "it's here")
        .with_file("/etc/memsync-vm-test", "file contents\n", 0o644)
        .run_script(
            "uname -r\n\
             host-env | grep '^GREETING='\n\
             cat /etc/memsync-vm-test\n\
             test -b /dev/nbd0 && echo nbd-ok\n\
             grep -q '^ext4 ' /proc/modules && grep -q '^jbd2 ' /proc/modules && echo ext4-ok\n\
             grep -c nobody /etc/passwd\n\
             echo done",
            BOOT,
        );
    let text = &out.output;
    for want in [
        kernel.release.as_str(),
        "GREETING=it's here",
        "file contents",
        "nbd-ok",
        "ext4-ok",
        "done",
    ] {
        assert!(
            text.contains(want),
            "{name}: lacks {want:?}:\n{}",
            out.console
        );
    }
    assert!(out.boot <= out.total);
    eprintln!(
        "{name}: script began {:?} after qemu started, qemu ran {:?}",
        out.boot, out.total
    );
}

fn failure(script: &str, timeout: Duration) -> Option<GuestFailure> {
    // Any kernel would do: the failures do not depend on it.
    let kernel = Kernel::debian("6.12", "guest_failures")?;
    Some(
        Vm::new(&kernel)
            .try_run_script(script, timeout)
            .expect_err("the guest run must fail"),
    )
}

#[test]
fn a_failing_command_fails_the_run_with_its_status_and_the_console() {
    let Some(f) = failure("echo before\nfalse\necho after", BOOT) else {
        return;
    };
    let GuestFailure::Exit { code, console } = &f else {
        panic!("expected an exit failure, got {f}");
    };
    assert_eq!(*code, 1, "{f}");
    assert!(
        console.contains("before") && !console.contains("after"),
        "{f}"
    );
    assert!(f.to_string().contains("--- guest console ---"), "{f}");
}

#[test]
fn a_kernel_panic_fails_the_run() {
    let Some(f) = failure("echo c > /proc/sysrq-trigger\nsleep 600", BOOT) else {
        return;
    };
    assert!(matches!(f, GuestFailure::Panic { .. }), "{f}");
}

#[test]
fn a_guest_past_its_timeout_is_killed() {
    // The deadline falls inside the boot: qemu must be killed and the run reported.
    let Some(f) = failure("sleep 600", Duration::from_millis(1500)) else {
        return;
    };
    assert!(matches!(f, GuestFailure::Timeout { .. }), "{f}");
}
