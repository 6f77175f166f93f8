// A real third-party OAuth 2.0 server for token-broker's interoperability
// tests: oidc-provider with the client-credentials grant, resource
// indicators (RFC 8707) and JWT access tokens.
//
// Usage: node server.mjs CONFIG.json
// CONFIG: {"port": N (0 or absent: any free port), "ttl": seconds,
//          "scopes": [...], "resources": [URI, ...] (the first is the
//          default; any other resource is refused with invalid_target),
//          "clients": [oidc-provider client metadata, ...]}
//
// Prints one JSON line {"event": "peer.listening", "issuer": URL, "port": N}
// on stdout when ready; diagnostics go to stderr as JSON lines. Exits on
// SIGTERM or SIGINT, and when its stdin closes, so a test run that dies
// leaves no peer behind.
//
// GET /_test/requests lists every token request so far, as the server saw
// it: the client authentication method, client_id, content type, scope and
// resource, and for a client assertion its decoded (unverified) header and
// claims. oidc-provider accepts either secret method from any secret client,
// so this record is how a test checks that the configured one was sent.

import { createServer } from 'node:http';
import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const [defaultResource, ...otherResources] = config.resources;
const resources = new Set([defaultResource, ...otherResources]);
const requests = [];

function log(event, fields) {
  console.error(JSON.stringify({ event, ...fields }));
}

function decodePart(part) {
  try {
    return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
  } catch {
    return null;
  }
}

function readParams(ctx, body) {
  if (ctx.is('application/json')) {
    try {
      const parsed = JSON.parse(body);
      return new Map(Object.entries(parsed ?? {}).map(([k, v]) => [k, String(v)]));
    } catch {
      return new Map();
    }
  }
  return new Map(new URLSearchParams(body));
}

function basicClientId(ctx) {
  const match = /^basic\s+(\S+)$/i.exec(ctx.get('authorization'));
  if (!match) return null;
  const pair = Buffer.from(match[1], 'base64').toString('utf8');
  const colon = pair.indexOf(':');
  if (colon === -1) return null;
  return decodeURIComponent(pair.slice(0, colon).replace(/\+/g, '%20'));
}

// What one token request carried. Never the secret: only which way it came.
function record(ctx, body) {
  const params = readParams(ctx, body);
  const basic = /^basic /i.test(ctx.get('authorization'));
  const post = params.has('client_secret');
  const assertion = params.get('client_assertion');
  const used = [
    basic && 'client_secret_basic',
    post && 'client_secret_post',
    assertion !== undefined && 'private_key_jwt',
  ].filter(Boolean);

  const entry = {
    method: used.length > 1 ? 'several' : (used[0] ?? 'none'),
    methods: used,
    client_id: params.get('client_id') ?? basicClientId(ctx),
    content_type: ctx.get('content-type').split(';')[0].trim().toLowerCase(),
    scope: params.get('scope') ?? null,
    resource: params.get('resource') ?? null,
  };
  if (assertion !== undefined) {
    const [header, claims] = assertion.split('.');
    entry.assertion = {
      type: params.get('client_assertion_type') ?? null,
      header: decodePart(header ?? ''),
      claims: decodePart(claims ?? ''),
    };
    entry.client_id ??= entry.assertion.claims?.sub ?? null;
  }

  return entry;
}

async function recorder(ctx, next) {
  if (ctx.path === '/_test/requests' && ctx.method === 'GET') {
    ctx.body = requests;
    return;
  }
  if (ctx.path === '/token' && ctx.method === 'POST') {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const body = Buffer.concat(chunks).toString('utf8');
    requests.push(record(ctx, body));
    // The body is consumed now; oidc-provider parses a raw string left in
    // ctx.req.body instead, after its own content-type check.
    ctx.req.body = body;
  }
  await next();
}

function resourceServer(ctx, resource) {
  if (!resources.has(resource)) throw new errors.InvalidTarget();
  return {
    scope: config.scopes.join(' '),
    audience: resource,
    accessTokenTTL: config.ttl,
    accessTokenFormat: 'jwt',
  };
}

function buildProvider(issuer) {
  // oidc-provider needs an RS256 key even if it signs nothing else.
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signing = { ...privateKey.export({ format: 'jwk' }), alg: 'RS256', use: 'sig' };

  const provider = new Provider(issuer, {
    clients: config.clients.map((client) => ({
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      ...client,
    })),
    jwks: { keys: [signing] },
    scopes: config.scopes,
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => defaultResource,
        useGrantedResource: () => true,
        getResourceServerInfo: resourceServer,
      },
    },
  });
  provider.use(recorder);
  provider.on('grant.error', (ctx, err) => {
    log('peer.refused', { error: err.error, detail: err.error_detail ?? null });
  });
  provider.on('server_error', (ctx, err) => {
    log('peer.crashed', { error: String(err?.stack ?? err) });
  });

  return provider;
}

const server = createServer();
server.listen(config.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  server.on('request', buildProvider(issuer).callback());
  console.log(JSON.stringify({ event: 'peer.listening', issuer, port }));
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, stop);
process.stdin.on('end', stop);
process.stdin.resume();
