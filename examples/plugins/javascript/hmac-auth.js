// hmac-auth: an auth plugin in JavaScript (componentize-js), against
// plugin-sdk/wit alone.
//
// Terminals connect with `/ws?token=<client_id>.<expires_unix_ms>.<signature>`
// where signature = hex(HMAC-SHA256(secret, "<client_id>.<expires_unix_ms>")).
// A business backend mints such tokens without calling imhost at all. Tokens
// that are not of this shape are passed on (the built-in connect tokens still
// work); a token of this shape that is expired or badly signed is denied.
//
// The HMAC is the host's (ABI 1.1 `hmac-verify`: native, constant-time): the
// plugin carries no crypto code.
//
// Settings (hmac-auth.toml, [settings]): `secret` (at least 16 characters).

import { config, hmacVerify, log } from 'imhost:plugin/host@1.1.0';

const encoder = new TextEncoder();

function fromHex(text) {
  const bytes = new Uint8Array(text.length / 2);
  for (let i = 0; i < bytes.length; i++) bytes[i] = parseInt(text.substr(i * 2, 2), 16);
  return bytes;
}

let secret = null;
function secretKey() {
  if (secret === null) {
    const settings = JSON.parse(config() || '{}');
    if (typeof settings.secret !== 'string' || settings.secret.length < 16) {
      throw new Error('hmac-auth needs settings.secret of at least 16 characters');
    }
    secret = encoder.encode(settings.secret);
  }
  return secret;
}

const SHAPE = /^(-?\d{1,19})\.(\d{1,15})\.([0-9a-f]{64})$/;

export const auth = {
  authenticate(request) {
    const match = SHAPE.exec(request.token ?? '');
    if (!match) return { tag: 'pass' };
    const [, clientId, expires, signature] = match;
    const signed = encoder.encode(`${clientId}.${expires}`);
    if (!hmacVerify('sha256', secretKey(), signed, fromHex(signature))) {
      log('info', `bad signature for client ${clientId} from ${request.remoteAddr}`);
      return { tag: 'deny', val: 'bad token signature' };
    }
    if (Number(expires) < Date.now()) {
      return { tag: 'deny', val: 'token expired' };
    }
    return { tag: 'allow', val: { clientId: BigInt(clientId), metadata: `hmac:${clientId}` } };
  },
};
