// A real third-party OAuth 2.0 server for token-broker's interoperability
// tests: oidc-provider with the client-credentials grant, resource
// indicators (RFC 8707) and JWT access tokens.
//
// Usage: node server.mjs CONFIG.json
// CONFIG: {"port": N, "ttl": seconds, "scopes": [...], "resource": URI,
//          "clients": [oidc-provider client metadata, ...]}
// Prints one JSON line {"event": "peer.listening", "issuer": URL} when ready.
// GET /_test/methods lists the client authentication method of every token
// request so far, so tests can check the broker sent the configured one.

import { generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${config.port}`;
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
      defaultResource: () => config.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => ({
        scope: config.scopes.join(' '),
        audience: resource,
        accessTokenTTL: config.ttl,
        accessTokenFormat: 'jwt',
      }),
    },
  },
});

const methods = [];

function methodOf(ctx, body) {
  const params = new URLSearchParams(body);
  const basic = /^basic /i.test(ctx.get('authorization'));
  const post = params.has('client_secret');
  const assertion = params.has('client_assertion');
  if ([basic, post, assertion].filter(Boolean).length > 1) return 'several';
  if (basic) return 'client_secret_basic';
  if (post) return 'client_secret_post';
  if (assertion) return 'private_key_jwt';
  return 'none';
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/_test/methods') {
    ctx.body = methods;
    return;
  }
  if (ctx.path === '/token' && ctx.method === 'POST') {
    const chunks = [];
    for await (const chunk of ctx.req) chunks.push(chunk);
    const body = Buffer.concat(chunks).toString();
    methods.push(methodOf(ctx, body));
    // oidc-provider reads a body already consumed from ctx.req.body.
    ctx.req.body = Object.fromEntries(new URLSearchParams(body));
  }
  await next();
});

const server = provider.listen(config.port, '127.0.0.1', () => {
  console.log(JSON.stringify({ event: 'peer.listening', issuer }));
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
