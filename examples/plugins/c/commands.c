// commands: an inbound plugin in C (clang + wasi-libc, bindings from
// `wit-bindgen c`), against plugin-sdk/wit alone. Terminals send text frames:
//
//   ping                  -> the server answers "pong" on the same socket
//   /whisper ID some text -> client ID receives {"from":SENDER,"whisper":"some text"}
//
// Anything else is ignored (left to the next inbound plugin, if any).
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "inbound_plugin.h"

// A string of ours for the host: allocated with malloc, freed by the
// generated post-return code once the host has copied it.
static inbound_plugin_string_t owned(const char *bytes, size_t len) {
  inbound_plugin_string_t s = {.ptr = malloc(len ? len : 1), .len = len};
  if (s.ptr == NULL) abort();
  memcpy(s.ptr, bytes, len);
  return s;
}

// Appends `text` as a JSON string (quotes and escapes included) to `out`,
// which has room for 6 bytes per input byte plus 2.
static size_t json_string(char *out, const uint8_t *text, size_t len) {
  size_t n = 0;
  out[n++] = '"';
  for (size_t i = 0; i < len; i++) {
    uint8_t c = text[i];
    if (c == '"' || c == '\\') {
      out[n++] = '\\';
      out[n++] = (char)c;
    } else if (c < 0x20) {
      n += (size_t)sprintf(out + n, "\\u%04x", c);
    } else {
      out[n++] = (char)c;  // UTF-8 passes through unchanged
    }
  }
  out[n++] = '"';
  return n;
}

static bool starts_with(const inbound_plugin_string_t *s, const char *prefix) {
  size_t len = strlen(prefix);
  return s->len >= len && memcmp(s->ptr, prefix, len) == 0;
}

void exports_imhost_plugin_inbound_handle(exports_imhost_plugin_inbound_frame_t *frame,
                                          exports_imhost_plugin_inbound_action_t *ret) {
  ret->tag = EXPORTS_IMHOST_PLUGIN_INBOUND_ACTION_IGNORE;
  const inbound_plugin_string_t *text = &frame->text;

  if (text->len == 4 && memcmp(text->ptr, "ping", 4) == 0) {
    ret->tag = EXPORTS_IMHOST_PLUGIN_INBOUND_ACTION_REPLY;
    ret->val.reply = owned("pong", 4);
  } else if (starts_with(text, "/whisper ")) {
    // "/whisper ID rest": parse ID, then the rest is the message.
    size_t at = strlen("/whisper ");
    char digits[21] = {0};
    size_t nd = 0;
    while (at < text->len && nd < 20 && (text->ptr[at] == '-' || (text->ptr[at] >= '0' && text->ptr[at] <= '9'))) {
      digits[nd++] = (char)text->ptr[at++];
    }
    if (nd > 0 && at < text->len && text->ptr[at] == ' ') {
      at++;
      int64_t to = strtoll(digits, NULL, 10);
      size_t rest = text->len - at;
      char *json = malloc(64 + rest * 6);
      if (json == NULL) abort();
      size_t n = (size_t)sprintf(json, "{\"from\":%" PRId64 ",\"whisper\":", frame->client_id);
      n += json_string(json + n, text->ptr + at, rest);
      json[n++] = '}';

      int64_t *receivers = malloc(sizeof(int64_t));
      if (receivers == NULL) abort();
      receivers[0] = to;
      ret->tag = EXPORTS_IMHOST_PLUGIN_INBOUND_ACTION_DELIVER;
      ret->val.deliver.target.tag = IMHOST_PLUGIN_TYPES_TARGET_DIRECT;
      ret->val.deliver.target.val.direct.ptr = receivers;
      ret->val.deliver.target.val.direct.len = 1;
      ret->val.deliver.content = (inbound_plugin_string_t){.ptr = (uint8_t *)json, .len = n};
    } else {
      ret->tag = EXPORTS_IMHOST_PLUGIN_INBOUND_ACTION_REPLY;
      const char *usage = "usage: /whisper ID message";
      ret->val.reply = owned(usage, strlen(usage));
    }
  }
  exports_imhost_plugin_inbound_frame_free(frame);
}
