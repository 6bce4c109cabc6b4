//! Plugins really compiled to wasm32-wasip2, loaded by a running host from its
//! plugin directory: each shipped plugin end to end, hook wiring, refusals,
//! hot swap under load, and plugins that misbehave.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use imhost::config::Options;
use imhost_tests::host::TestHost;
use imhost_tests::plugins::{GrantsFile, PluginDir, guests};
use imhost_tests::terminal::Terminal;
use serde_json::{Value, json};
use sha2::Sha256;

mod identity;
mod isolation;
mod loading;
mod order;
mod reload;
mod shipped;

async fn host_with(dir: &PluginDir) -> TestHost {
    TestHost::start(Options {
        plugins: Some(dir.path().to_owned()),
        ..Options::default()
    })
    .await
}

fn jwt(claims: Value, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn status_of(result: Result<Terminal, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => 101,
    }
}
