// A SPIFFE workload in Node.js, run by tests/clients_e2e.rs against a real sigil-agent: plain
// @grpc/grpc-js on the agent's Unix socket, with stubs loaded at run time from the repository's
// proto/spiffe/workload.proto. There is no SPIFFE library here on purpose: this is what any
// gRPC client does (the `workload.spiffe.io: true` metadata on every call).
//
//   SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock node client.js [audience]
//
// Prints one line per result (`<what> <values...>`) for the test to check; exits non-zero with
// the reason on stderr on any failure.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', '..', 'proto', 'spiffe', 'workload.proto');
// Generous: CI machines are small and loaded.
const TIMEOUT_MS = 90_000;

function workloadClient(endpoint) {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const { SpiffeWorkloadAPI } = grpc.loadPackageDefinition(definition);
  // grpc-js understands `unix:///abs/path` (the SPIFFE_ENDPOINT_SOCKET form) as it is.
  return new SpiffeWorkloadAPI(endpoint, grpc.credentials.createInsecure());
}

function header() {
  const md = new grpc.Metadata();
  md.set('workload.spiffe.io', 'true');
  return md;
}

function deadline() {
  return { deadline: Date.now() + TIMEOUT_MS };
}

function unary(client, rpc, request, md = header()) {
  return new Promise((resolve, reject) =>
    client[rpc](request, md, deadline(), (err, resp) => (err ? reject(err) : resolve(resp))),
  );
}

// The first message of a server stream, then the stream is cancelled.
function firstMessage(client, rpc, request) {
  return new Promise((resolve, reject) => {
    const call = client[rpc](request, header(), deadline());
    call.once('data', (msg) => {
      resolve(msg);
      call.cancel();
    });
    call.on('error', (err) => {
      if (err.code !== grpc.status.CANCELLED) reject(err);
    });
  });
}

// Splits concatenated DER (the Workload API's certificate chains and bundles) into its items.
function splitDer(buf) {
  const out = [];
  let at = 0;
  while (at < buf.length) {
    if (buf[at] !== 0x30) throw new Error(`DER: no SEQUENCE at byte ${at}`);
    let len = buf[at + 1];
    let head = 2;
    if (len & 0x80) {
      const n = len & 0x7f;
      len = 0;
      for (let i = 0; i < n; i++) len = len * 256 + buf[at + 2 + i];
      head += n;
    }
    out.push(buf.subarray(at, at + head + len));
    at += head + len;
  }
  return out;
}

function spiffeIdOf(cert) {
  const uri = (cert.subjectAltName || '')
    .split(', ')
    .find((san) => san.startsWith('URI:spiffe://'));
  if (!uri) throw new Error('the leaf has no spiffe:// URI SAN');
  return uri.slice('URI:'.length);
}

function trustDomainName(key) {
  return key.replace(/^spiffe:\/\//, '');
}

function b64url(s) {
  return Buffer.from(s, 'base64url');
}

// Checks a JWT-SVID's signature against the JWKS of the token's trust domain, then its claims.
function validateLocally(token, jwks, audience) {
  const [h, p, s] = token.split('.');
  const hdr = JSON.parse(b64url(h));
  const claims = JSON.parse(b64url(p));
  const jwk = jwks.keys.find((k) => k.kid === hdr.kid);
  if (!jwk) throw new Error(`no JWT authority with kid ${hdr.kid} in the bundle`);
  const hashes = { ES256: 'sha256', ES384: 'sha384', ES512: 'sha512', RS256: 'sha256', RS384: 'sha384', RS512: 'sha512', PS256: 'sha256', PS384: 'sha384', PS512: 'sha512' };
  const hash = hashes[hdr.alg];
  if (!hash) throw new Error(`unsupported alg ${hdr.alg}`);
  const key = { key: crypto.createPublicKey({ key: jwk, format: 'jwk' }) };
  if (hdr.alg.startsWith('ES')) key.dsaEncoding = 'ieee-p1363';
  if (hdr.alg.startsWith('PS')) key.padding = crypto.constants.RSA_PKCS1_PSS_PADDING;
  if (!crypto.verify(hash, Buffer.from(`${h}.${p}`), key, b64url(s))) {
    throw new Error('bad signature');
  }
  const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (!aud.includes(audience)) throw new Error(`audience ${JSON.stringify(aud)} lacks ${audience}`);
  if (!(claims.exp > Date.now() / 1000)) throw new Error('expired');
  return claims.sub;
}

async function main() {
  const endpoint = process.env.SPIFFE_ENDPOINT_SOCKET;
  if (!endpoint) throw new Error('SPIFFE_ENDPOINT_SOCKET is not set');
  const audience = process.argv[2] || 'sigil-e2e';
  const client = workloadClient(endpoint);

  // X509-SVID: the first message of the FetchX509SVID stream.
  const x509 = await firstMessage(client, 'FetchX509SVID', {});
  const svid = x509.svids[0];
  const chain = splitDer(svid.x509_svid).map((der) => new crypto.X509Certificate(der));
  const id = spiffeIdOf(chain[0]);
  if (id !== svid.spiffe_id) throw new Error(`spiffe_id ${svid.spiffe_id} but the leaf says ${id}`);
  console.log(`x509_svid ${id} ${chain[0].serialNumber.toLowerCase()}`);
  const key = crypto.createPrivateKey({ key: svid.x509_svid_key, format: 'der', type: 'pkcs8' });
  if (!chain[0].checkPrivateKey(key)) throw new Error('the key does not match the leaf');
  const roots = splitDer(svid.bundle).map((der) => new crypto.X509Certificate(der));
  const top = chain[chain.length - 1];
  for (let i = 0; i + 1 < chain.length; i++) {
    if (!chain[i].verify(chain[i + 1].publicKey)) throw new Error(`chain link ${i} does not verify`);
  }
  if (!roots.some((root) => top.verify(root.publicKey))) {
    throw new Error('the X509-SVID does not chain to its bundle');
  }
  console.log(`x509_verified ${id}`);

  const x509Bundles = await firstMessage(client, 'FetchX509Bundles', {});
  for (const [td, der] of Object.entries(x509Bundles.bundles)) {
    console.log(`x509_bundle ${trustDomainName(td)} ${splitDer(der).length}`);
  }
  const jwtBundles = await firstMessage(client, 'FetchJWTBundles', {});
  const jwks = {};
  for (const [td, json] of Object.entries(jwtBundles.bundles)) {
    jwks[trustDomainName(td)] = JSON.parse(json);
    console.log(`jwt_bundle ${trustDomainName(td)} ${jwks[trustDomainName(td)].keys.length}`);
  }

  const jwt = await unary(client, 'FetchJWTSVID', { audience: [audience] });
  const token = jwt.svids[0].svid;
  console.log(`jwt_svid ${jwt.svids[0].spiffe_id}`);
  const sub = validateLocally(token, jwks[new URL(jwt.svids[0].spiffe_id).host], audience);
  console.log(`jwt_validated ${sub} local`);
  const validated = await unary(client, 'ValidateJWTSVID', { audience, svid: token });
  console.log(`jwt_validated ${validated.spiffe_id} agent`);
  const refused = await unary(client, 'ValidateJWTSVID', { audience: 'another-audience', svid: token })
    .then(() => null, (err) => err);
  if (!refused || refused.code !== grpc.status.INVALID_ARGUMENT) {
    throw new Error(`another audience: expected InvalidArgument, got ${refused ? refused.code : 'success'}`);
  }
  console.log('jwt_refused another-audience');

  // Without the security header the agent answers nothing but InvalidArgument.
  const bare = await unary(client, 'FetchJWTSVID', { audience: [audience] }, new grpc.Metadata())
    .then(() => null, (err) => err);
  if (!bare || bare.code !== grpc.status.INVALID_ARGUMENT) {
    throw new Error(`no header: expected InvalidArgument, got ${bare ? bare.code : 'success'}`);
  }
  console.log('no_header_refused');
  client.close();
}

main().catch((err) => {
  console.error(`node client: ${err.stack || err}`);
  process.exit(1);
});
