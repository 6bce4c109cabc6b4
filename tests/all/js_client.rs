//! The JavaScript terminal client (`clients/js/`) under Node's own test
//! runner (`npm test` there), against real imhost nodes that its tests start,
//! restart, pause and stop by PID: reconnect with backoff and fresh URLs,
//! force-offline, receipts, the keep-alive probe and a dead link.

use std::path::Path;
use std::process::Command;

use imhost_tests::process::imhost_bin;

/// Runs `npm test` in `dir` (relative to the repository root) with the
/// binary under test, failing with its output.
pub fn npm_test(dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let output = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&dir)
        .env("IMHOST_BIN", imhost_bin())
        .output()
        .expect("npm not found: scripts/test installs Node.js 20+");
    assert!(
        output.status.success(),
        "npm test in {} failed:\n{}\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_javascript_client_passes_its_tests_against_real_nodes() {
    npm_test("clients/js");
}
