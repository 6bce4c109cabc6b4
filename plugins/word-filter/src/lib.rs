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

use std::sync::OnceLock;

use imhost_sdk::filter::{Filter, Message, Verdict};
use memchr::memmem::Finder;
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

/// Words lower-cased once, as character vectors (for masking) and as
/// searchers (for the quick check).
struct Words {
    words: Vec<Vec<char>>,
    /// A searcher per lowered word, built once: building one per call cost
    /// more than the search.
    finders: Vec<Finder<'static>>,
    action: Action,
    mask: char,
}

fn lower(c: char) -> char {
    // Single-character lowering keeps positions aligned with the original text.
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    c.to_lowercase().next().unwrap_or(c)
}

impl Words {
    /// The settings, parsed at the instance's first call: they are fixed for
    /// the life of a loaded plugin (a changed manifest loads it anew).
    fn get() -> Result<&'static Words, String> {
        static WORDS: OnceLock<Result<Words, String>> = OnceLock::new();
        WORDS
            .get_or_init(Words::load)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn load() -> Result<Words, String> {
        let settings: Settings = imhost_sdk::host::config()?;
        let words: Vec<Vec<char>> = settings
            .words
            .iter()
            .filter(|w| !w.is_empty())
            .map(|w| w.chars().map(lower).collect())
            .collect();
        Ok(Words {
            finders: words
                .iter()
                .map(|w| Finder::new(&w.iter().collect::<String>()).into_owned())
                .collect(),
            words,
            action: settings.action,
            mask: settings.mask,
        })
    }

    /// Whether no word can be in `content`, decided on the raw text. Without
    /// a backslash, every string of a JSON text appears in it verbatim, so a
    /// word the raw text (lower-cased as matching does) does not contain is
    /// in none of its strings. Most messages are clean, and pass without a
    /// JSON parse; one with an escape takes the full path.
    fn clearly_absent(&self, content: &str) -> bool {
        if content.contains('\\') {
            return false;
        }
        // ASCII text is lowered a byte at a time (what `lower` does to it).
        let lowered = if content.is_ascii() {
            content.to_ascii_lowercase()
        } else {
            content.chars().map(lower).collect()
        };
        !self
            .finders
            .iter()
            .any(|f| f.find(lowered.as_bytes()).is_some())
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
        let words = match Words::get() {
            Ok(words) => words,
            Err(err) => {
                imhost_sdk::host::warn(&err);
                return Verdict::Deliver;
            }
        };
        if words.clearly_absent(&message.content) {
            return Verdict::Deliver;
        }
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
