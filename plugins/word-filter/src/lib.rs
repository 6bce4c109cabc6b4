//! `word-filter`: masks or drops messages that contain configured words.
//!
//! Matching is case-insensitive and Unicode-aware: words and text are
//! compared after Unicode lower-casing, character by character, so Chinese,
//! accented and mixed-case words all match; a masked word is replaced by as
//! many `*` as it has characters. Settings (`[settings]` in word-filter.toml):
//!
//! ```toml
//! [settings]
//! words = ["badword", "脏话"]
//! action = "mask"        # or "drop"
//! mask = "*"
//! ```
//!
//! Only string values inside the message JSON are examined, so keys and
//! structure are never altered; a message that is not JSON is treated as one
//! string.

use imhost_sdk::filter::{Filter, Message, Verdict};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    words: Vec<String>,
    #[serde(default)]
    action: Action,
    #[serde(default = "default_mask")]
    mask: char,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Action {
    #[default]
    Mask,
    Drop,
}

fn default_mask() -> char {
    '*'
}

/// Words lower-cased once, as character vectors.
struct Words {
    words: Vec<Vec<char>>,
    action: Action,
    mask: char,
}

fn lower(c: char) -> char {
    // Single-character lowering keeps positions aligned with the original text.
    c.to_lowercase().next().unwrap_or(c)
}

impl Words {
    fn load() -> Result<Words, String> {
        let settings: Settings = imhost_sdk::host::config()?;
        Ok(Words {
            words: settings
                .words
                .iter()
                .filter(|w| !w.is_empty())
                .map(|w| w.chars().map(lower).collect())
                .collect(),
            action: settings.action,
            mask: settings.mask,
        })
    }

    /// Masks every occurrence in `text`; returns whether anything matched.
    fn mask_text(&self, text: &str) -> (String, bool) {
        let chars: Vec<char> = text.chars().collect();
        let lowered: Vec<char> = chars.iter().copied().map(lower).collect();
        let mut hit = vec![false; chars.len()];
        for word in &self.words {
            if word.len() > lowered.len() {
                continue;
            }
            for start in 0..=lowered.len() - word.len() {
                if lowered[start..start + word.len()] == word[..] {
                    hit[start..start + word.len()]
                        .iter_mut()
                        .for_each(|h| *h = true);
                }
            }
        }
        let any = hit.iter().any(|h| *h);
        let out = chars
            .iter()
            .zip(&hit)
            .map(|(&c, &h)| if h { self.mask } else { c })
            .collect();
        (out, any)
    }

    fn mask_value(&self, value: &mut Value) -> bool {
        match value {
            Value::String(s) => {
                let (masked, any) = self.mask_text(s);
                *s = masked;
                any
            }
            Value::Array(items) => items
                .iter_mut()
                .fold(false, |any, v| self.mask_value(v) | any),
            Value::Object(map) => map
                .values_mut()
                .fold(false, |any, v| self.mask_value(v) | any),
            _ => false,
        }
    }
}

struct WordFilter;

impl Filter for WordFilter {
    fn check(message: Message) -> Verdict {
        let words = match Words::load() {
            Ok(words) => words,
            Err(err) => {
                imhost_sdk::host::warn(&err);
                return Verdict::Deliver;
            }
        };
        let mut value: Value = serde_json::from_str(&message.content)
            .unwrap_or_else(|_| Value::String(message.content.clone()));
        if !words.mask_value(&mut value) {
            return Verdict::Deliver;
        }
        match words.action {
            Action::Drop => Verdict::Drop("contains a filtered word".into()),
            Action::Mask => Verdict::Replace(value.to_string()),
        }
    }
}

imhost_sdk::export_filter!(WordFilter);
