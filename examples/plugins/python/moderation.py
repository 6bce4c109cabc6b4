"""moderation: a filter plugin in Python (componentize-py), against
plugin-sdk/wit alone. The same filter as javascript/moderation, word for word,
so the two can replace each other (and be compared) under live traffic.

Settings (moderation.toml, [settings]):
- `banned`: words masked with `*`, matched case-insensitively;
- `max_length`: messages longer than this many bytes are dropped;
- `stamp`: JSON objects get a `"moderated_by": "python"` key.
"""

import json

from wit_world import exports
from wit_world.exports import filter as hook
from wit_world.imports import host

_settings = None


def settings():
    global _settings
    if _settings is None:
        raw = json.loads(host.config() or "{}")
        _settings = {
            "banned": [w.lower() for w in raw.get("banned", []) if w],
            "max_length": int(raw.get("max_length", 4096)),
            "stamp": bool(raw.get("stamp", False)),
        }
    return _settings


def mask(text, banned):
    lowered = text.lower()
    for word in banned:
        start = lowered.find(word)
        while start != -1:
            end = start + len(word)
            text = text[:start] + "*" * len(word) + text[end:]
            lowered = lowered[:start] + "*" * len(word) + lowered[end:]
            start = lowered.find(word, end)
    return text


class Filter(exports.Filter):
    def check(self, message: hook.Message) -> hook.Verdict:
        conf = settings()
        if len(message.content.encode("utf-8")) > conf["max_length"]:
            return hook.Verdict_Drop(f"longer than {conf['max_length']} bytes")
        try:
            value = json.loads(message.content)
        except ValueError:
            return hook.Verdict_Deliver()
        changed = False
        if isinstance(value, str):
            masked = mask(value, conf["banned"])
            changed = masked != value
            value = masked
        elif isinstance(value, dict):
            text = value.get("text")
            if isinstance(text, str):
                masked = mask(text, conf["banned"])
                if masked != text:
                    value["text"] = masked
                    changed = True
            if conf["stamp"]:
                value["moderated_by"] = "python"
                changed = True
        if not changed:
            return hook.Verdict_Deliver()
        return hook.Verdict_Replace(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
