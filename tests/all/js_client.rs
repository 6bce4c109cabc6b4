//! The JavaScript terminal client (`clients/js/`) under Node's own test
//! runner (`npm test` there), against real imhost nodes that its tests start,
//! restart, pause and stop by PID: reconnect with backoff and fresh URLs,
//! force-offline, receipts, the keep-alive probe and a dead link.

use imhost_tests::process::npm_test;

#[test]
fn the_javascript_client_passes_its_tests_against_real_nodes() {
    npm_test("clients/js", &[]);
}
