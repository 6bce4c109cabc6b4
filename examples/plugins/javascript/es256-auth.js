// es256-auth: an auth plugin in JavaScript (componentize-js) that accepts
// ES256 JSON Web Tokens, verified by the host: the plugin parses the token
// and checks its claims; the signature check (ABI 1.1 `verify-signature`)
// and the key set (`key-set-key`: fetched, cached and rotated by the host)
// are the host's. No crypto code in the plugin, and no async: componentize-js
// has no `crypto.subtle`, and needs none.
//
// Settings (es256-auth.toml, [settings]):
//   jwks_url  the provider's JWKS (the operator lists it under `key_sets`)
//   issuer    required `iss`
//   audience  required in `aud`
// The client id is the numeric `sub`; the metadata is the `name` claim.

import { config, keySetKey, verifySignature } from 'imhost:plugin/host@1.1.0';

const decoder = new TextDecoder();
const encoder = new TextEncoder();

function base64url(text) {
  const base64 = text.replace(/-/g, '+').replace(/_/g, '/');
  const binary = atob(base64 + '='.repeat((4 - (base64.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

const json = (part) => JSON.parse(decoder.decode(base64url(part)));

let settings = null;
function options() {
  if (settings === null) {
    settings = JSON.parse(config() || '{}');
    if (typeof settings.jwks_url !== 'string') throw new Error('es256-auth needs settings.jwks_url');
  }
  return settings;
}

function check(token) {
  const parts = token.split('.');
  const header = json(parts[0]);
  if (header.alg !== 'ES256') return `algorithm ${header.alg} is not accepted`;
  // `keySetKey` throws (a WIT `err`) when the set cannot be had.
  const key = keySetKey(options().jwks_url, header.kid ?? undefined);
  if (key === undefined) return `no key ${header.kid} in the key set`;
  const signed = encoder.encode(`${parts[0]}.${parts[1]}`);
  if (!verifySignature('ES256', key, signed, base64url(parts[2]))) return 'bad signature';
  const claims = json(parts[1]);
  const now = Date.now() / 1000;
  if (typeof claims.exp === 'number' && now > claims.exp) return 'expired';
  if (typeof claims.nbf === 'number' && now < claims.nbf) return 'not valid yet';
  if (options().issuer && claims.iss !== options().issuer) return 'wrong issuer';
  const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (options().audience && !aud.includes(options().audience)) return 'wrong audience';
  if (!/^-?\d{1,19}$/.test(String(claims.sub))) return '`sub` is not a client id';
  return { clientId: BigInt(claims.sub), metadata: claims.name ?? undefined };
}

export const auth = {
  authenticate(request) {
    const token = request.token ?? '';
    if (token.split('.').length !== 3) return { tag: 'pass' };
    try {
      const outcome = check(token);
      return typeof outcome === 'string'
        ? { tag: 'deny', val: outcome }
        : { tag: 'allow', val: outcome };
    } catch (err) {
      return { tag: 'deny', val: `es256-auth: ${err?.payload ?? err}` };
    }
  },
};
