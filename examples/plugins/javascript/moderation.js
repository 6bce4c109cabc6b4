// moderation: a filter plugin in JavaScript (componentize-js), against
// plugin-sdk/wit alone. The same filter as python/moderation, word for word,
// so the two can replace each other (and be compared) under live traffic.
//
// Settings (moderation.toml, [settings]):
// - `banned`: words masked with `*`, matched case-insensitively;
// - `max_length`: messages longer than this many bytes are dropped;
// - `stamp`: JSON objects get a `"moderated_by": "javascript"` key.

import { config } from 'imhost:plugin/host@1.1.0';

let settings = null;
function loadSettings() {
  if (settings === null) {
    const raw = JSON.parse(config() || '{}');
    settings = {
      banned: (raw.banned ?? []).filter((w) => w).map((w) => w.toLowerCase()),
      maxLength: Number(raw.max_length ?? 4096),
      stamp: Boolean(raw.stamp ?? false),
    };
  }
  return settings;
}

function mask(text, banned) {
  let lowered = text.toLowerCase();
  for (const word of banned) {
    let start = lowered.indexOf(word);
    while (start !== -1) {
      const end = start + word.length;
      const stars = '*'.repeat(word.length);
      text = text.slice(0, start) + stars + text.slice(end);
      lowered = lowered.slice(0, start) + stars + lowered.slice(end);
      start = lowered.indexOf(word, end);
    }
  }
  return text;
}

const encoder = new TextEncoder();

export const filter = {
  check(message) {
    const conf = loadSettings();
    if (encoder.encode(message.content).length > conf.maxLength) {
      return { tag: 'drop', val: `longer than ${conf.maxLength} bytes` };
    }
    let value;
    try {
      value = JSON.parse(message.content);
    } catch {
      return { tag: 'deliver' };
    }
    let changed = false;
    if (typeof value === 'string') {
      const masked = mask(value, conf.banned);
      changed = masked !== value;
      value = masked;
    } else if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
      if (typeof value.text === 'string') {
        const masked = mask(value.text, conf.banned);
        if (masked !== value.text) {
          value.text = masked;
          changed = true;
        }
      }
      if (conf.stamp) {
        value.moderated_by = 'javascript';
        changed = true;
      }
    }
    return changed ? { tag: 'replace', val: JSON.stringify(value) } : { tag: 'deliver' };
  },
};
